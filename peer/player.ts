/**
 * The peer's HTTP player (DESIGN.md: the peer's HTTP player port): `GET /` a page that plays the
 * video while it arrives, beside a live map of the fragments; `GET /stream/<file>` the file
 * assembled from the store's fragments, with HTTP Range support, fetching missing fragments first
 * and in playback order; `GET /events` the map's updates as server-sent events.
 *
 * It sees the peer only as a {@link PlayerSource}: the store it reads fragments from, and
 * the swarm it asks for missing ones and watches for the map.
 *
 * ```ts
 * const { store, swarm } = peer;
 * await using player = startPlayer({
 *   store,
 *   need: (name, signal) => swarm.need(name, signal),
 *   onEvent: (listener) => swarm.onEvent(listener),
 *   snapshot: () => swarm.snapshot(),
 * }, { port: peer.httpPort });
 * ```
 * @module
 */
import type { Store } from "./store.ts";
import type { FragmentEntry, Manifest } from "../split.ts";
import { type ConnectionLimits, serveConnections } from "../directory/server.ts";

/** What the player needs from a peer. */
export interface PlayerSource {
  /** Manifest (file, mime, size, fragments with offset and size) and the fragments held. */
  store: Store;
  /**
   * Makes sure fragment `name` is held, fetching it now (ahead of the rest) if missing; rejects
   * if it cannot.
   */
  need(name: string, signal?: AbortSignal): Promise<void>;
  /**
   * Map updates for the page: a fragment became held, is in flight (from which peer), or failed.
   * Returns unsubscribe.
   */
  onEvent(listener: (event: FragmentEvent) => void): () => void;
  /** The current state of every fragment, for a page that just opened. */
  snapshot(): FragmentEvent[];
  /**
   * Called when a page opens and the store has no manifest yet: an empty viewer finds one (from
   * the directory) and adopts it into the store; the page shows it as soon as it is there.
   */
  findManifest?(): Promise<unknown>;
}

/** A change on the fragment map: held, in flight (and from whom), missing, or failed. */
export interface FragmentEvent {
  name: string;
  index: number;
  state: "held" | "inflight" | "missing" | "failed";
  from?: string;
}

/**
 * Options of {@link startPlayer}. The connection limits are those of the directory's server
 * (directory/server.ts), with the player's defaults: {@link PLAYER_LIMITS}.
 */
export interface PlayerOptions extends ConnectionLimits {
  /** 0 picks a free port. @default 8001 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /** How long a request waits for one missing fragment before it fails. @default 20_000 */
  waitMs?: number;
  /** Where the few lines worth a log go (accepting failed, or again). @default console.error */
  warn?: (line: string) => void;
}

/**
 * The player's connection limits unless told otherwise. A browser opens about 6 connections to
 * a server, a media player one or two; a connection keeps its place while its answer streams
 * (a video range, the map's events), and past a limit the one waiting longest for a request
 * is closed to make room.
 */
export const PLAYER_LIMITS: Required<ConnectionLimits> = {
  maxConnections: 256,
  maxConnectionsPerAddress: 64,
  headerTimeout: 30,
};

/** A running player server; close it (or dispose it) to stop serving. */
export interface PlayerServer extends AsyncDisposable {
  readonly port: number;
  close(): Promise<void>;
}

/** A byte range of the file, both ends included. */
export interface ByteRange {
  start: number;
  end: number;
}

/**
 * An open-ended range (`bytes=a-`) is answered with at most this many bytes: the browser then
 * streams progressively and asks again, instead of one response holding the whole file hostage.
 */
export const MAX_OPEN_RANGE = 4 * 1024 * 1024;
const CHUNK = 64 * 1024;
const HEARTBEAT_MS = 15_000;
const MANIFEST_POLL_MS = 250;
/** Fragments past the one being read that a stream asks for ahead of everything else. */
const READAHEAD = 2;
/** Events queued for a page that stopped reading; past this it is cut off (it reconnects). */
const MAX_QUEUED_EVENTS = 1000;
const PAGE_URL = new URL("./player.html", import.meta.url);
const encoder = new TextEncoder();

// The page may talk to this server only: no CDN, no internet, as the issue asks.
const PAGE_HEADERS = {
  "content-type": "text/html; charset=utf-8",
  "cache-control": "no-cache",
  "x-content-type-options": "nosniff",
  "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; " +
    "style-src 'unsafe-inline'; img-src data:; media-src 'self'; connect-src 'self'",
};

/** A fragment the stream needed could not be had in time; answered 503 or ends the stream. */
class UnavailableError extends Error {
  override name = "UnavailableError";
}

/** Starts the player's HTTP server over `source`; the handle closes it. */
export function startPlayer(source: PlayerSource, options: PlayerOptions = {}): PlayerServer {
  const page = Deno.readTextFileSync(PAGE_URL);
  const waitMs = options.waitMs ?? 20_000;
  // Aborted on close: ends event streams and wakes every request waiting for a fragment, since
  // shutdown() waits for open responses to finish.
  const closing = new AbortController();

  function handle(request: Request): Response | Promise<Response> {
    if (request.method !== "GET" && request.method !== "HEAD") {
      return text(405, "Method not allowed", { allow: "GET, HEAD" });
    }
    const { pathname } = new URL(request.url);
    if (pathname === "/") return new Response(page, { headers: PAGE_HEADERS });
    if (pathname === "/events") return serveEvents(source, request, closing.signal);
    if (pathname.startsWith("/stream/")) {
      // Not request.signal: Deno's legacy behaviour aborts it once a response is sent, and warns.
      // A browser that drops a response cancels its body stream instead.
      const name = pathname.slice("/stream/".length);
      return serveFile(source, request, name, waitMs, closing.signal);
    }
    return text(404, "Not found");
  }

  async function handleSafely(request: Request): Promise<Response> {
    try {
      return await handle(request);
    } catch (error) {
      // A stream that broke off for want of a fragment is expected; anything else is a bug.
      if (error instanceof UnavailableError) console.error(`[!] Player: ${error.message}`);
      else console.error("[!] Player:", error);
      return text(500, "Internal error");
    }
  }

  // Not Deno.serve: its accept loop ends the whole server on the first accept error, and out of
  // file descriptors ("Too many open files") that error was uncaught and ended the peer. The
  // directory's server accepts connections itself, backs off, and bounds them per address.
  // peer.ts prints the address in its own words.
  const server = serveConnections({
    hostname: options.hostname ?? "0.0.0.0",
    port: options.port ?? 8001,
    maxConnections: options.maxConnections ?? PLAYER_LIMITS.maxConnections,
    maxConnectionsPerAddress: options.maxConnectionsPerAddress ??
      PLAYER_LIMITS.maxConnectionsPerAddress,
    headerTimeout: options.headerTimeout ?? PLAYER_LIMITS.headerTimeout,
    warn: options.warn,
    name: "player",
    busyUntilSent: true,
  }, handleSafely);

  let closed: Promise<void> | undefined;
  function close(): Promise<void> {
    closing.abort();
    return closed ??= server.shutdown();
  }
  return { port: server.addr.port, close, [Symbol.asyncDispose]: close };
}

/**
 * Parses a Range header for a `size`-byte file: the range to send, "unsatisfiable" (416), or
 * undefined when the whole file is to be sent (no header, or one to ignore: malformed or
 * several ranges, which RFC 9110 lets a server ignore).
 */
export function parseRange(
  header: string | null,
  size: number,
): ByteRange | "unsatisfiable" | undefined {
  const match = header?.trim().match(/^bytes=(\d{0,15})-(\d{0,15})$/i);
  if (!match || (match[1] === "" && match[2] === "")) return undefined;
  const [first, last] = [match[1]!, match[2]!];
  if (first === "") { // a suffix: the last n bytes
    const n = Number(last);
    return n === 0 || size === 0
      ? "unsatisfiable"
      : { start: Math.max(0, size - n), end: size - 1 };
  }
  const start = Number(first);
  if (last !== "" && Number(last) < start) return undefined;
  if (start >= size) return "unsatisfiable";
  const end = last === "" ? start + MAX_OPEN_RANGE - 1 : Number(last);
  return { start, end: Math.min(end, size - 1) };
}

async function serveFile(
  source: PlayerSource,
  request: Request,
  encodedName: string,
  waitMs: number,
  signal: AbortSignal,
): Promise<Response> {
  let name;
  try {
    name = decodeURIComponent(encodedName);
  } catch {
    return text(404, "Not found");
  }
  // An empty peer finds the file in the directory first: a media player opens the URL with no
  // page to do it (mpv, ffplay, ffprobe).
  if (!source.store.manifest && source.findManifest) await within(source.findManifest(), waitMs);
  const manifest = source.store.manifest;
  // Only the manifest's own file is served, so no name can reach anything else on disk.
  if (!manifest || name !== manifest.file) {
    return text(404, `Unknown file "${name.slice(0, 100)}"`);
  }
  const range = parseRange(request.headers.get("range"), manifest.size);
  const headers: Record<string, string> = {
    "accept-ranges": "bytes",
    "content-type": manifest.mime,
  };
  if (range === "unsatisfiable") {
    return text(416, "Range not satisfiable", {
      ...headers,
      "content-range": `bytes */${manifest.size}`,
    });
  }
  const { start, end } = range ?? { start: 0, end: manifest.size - 1 };
  headers["content-length"] = String(end - start + 1);
  if (range) headers["content-range"] = `bytes ${start}-${end}/${manifest.size}`;
  const status = range ? 206 : 200;
  if (request.method === "HEAD") return new Response(null, { status, headers });

  const cancelled = new AbortController(); // the browser dropped the response (e.g. a seek)
  const bytes = readRange(
    source,
    manifest,
    { start, end },
    waitMs,
    AbortSignal.any([signal, cancelled.signal]),
  );
  // The first chunk is awaited before answering, so a first fragment that cannot be had is a
  // clear 503 rather than a response that breaks off.
  let first: IteratorResult<Uint8Array>;
  try {
    first = await bytes.next();
  } catch (error) {
    if (signal.aborted) return text(503, "The player is closing");
    if (!(error instanceof UnavailableError)) throw error;
    return text(503, error.message, { "retry-after": "1" });
  }
  let pending: Uint8Array | undefined = first.value;
  const body = new ReadableStream<Uint8Array>({
    async pull(controller) {
      if (pending) {
        controller.enqueue(pending);
        pending = undefined;
        return;
      }
      const next = await bytes.next(); // a rejection errors the stream: the response breaks off
      if (next.done) controller.close();
      else controller.enqueue(next.value);
    },
    async cancel() {
      cancelled.abort();
      await bytes.return(undefined).catch(() => {});
    },
  });
  return new Response(body, { status, headers });
}

/** Waits for `work` at most `ms`; what it resolves or rejects with is not needed. */
async function within(work: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  try {
    await Promise.race([work.then(() => {}, () => {}), late]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Yields bytes `start..end` of the file from the held fragments, in order. The missing fragments
 * the stream reaches next (READAHEAD of them) are asked for ahead of the rest, in playback order;
 * each is awaited (at most `waitMs`) when the stream reaches it. The rest of the file is the
 * swarm's to fetch rarest first, so a crowd watching together does not all want one fragment.
 */
async function* readRange(
  source: PlayerSource,
  manifest: Manifest,
  { start, end }: ByteRange,
  waitMs: number,
  signal: AbortSignal,
): AsyncGenerator<Uint8Array> {
  const { store } = source;
  const covered = manifest.fragments.filter((f) => f.offset + f.size > start && f.offset <= end);
  // Only a head start: the wait below asks again, so an early failure gets a second chance.
  const ask = (i: number) => {
    const fragment = covered[i];
    if (fragment && !store.get(fragment.name)) source.need(fragment.name, signal).catch(() => {});
  };
  for (let i = 0; i < READAHEAD; i++) ask(i);
  // A cold start (nothing of the range held yet) waits for the next fragment too, as a player
  // fills its buffer before it plays: a viewer that got the first fragment ahead of the crowd
  // would otherwise play straight into a stall.
  const cold = covered.length > 1 && !store.get(covered[0]!.name);
  for (const [i, fragment] of covered.entries()) {
    ask(i + READAHEAD);
    using file = await openFragment(source, fragment, waitMs, signal);
    if (i === 0 && cold) {
      await openFragment(source, covered[1]!, waitMs, signal).then(
        (next) => next.close(),
        () => {},
      );
    }
    const from = Math.max(start, fragment.offset) - fragment.offset;
    let left = Math.min(end + 1, fragment.offset + fragment.size) - fragment.offset - from;
    await file.seek(from, Deno.SeekMode.Start);
    while (left > 0) {
      const chunk = new Uint8Array(Math.min(CHUNK, left));
      for (let filled = 0; filled < chunk.length;) {
        const n = await file.read(chunk.subarray(filled));
        if (n === null) {
          throw new Error(`Fragment '${fragment.name}' is shorter than the manifest says`);
        }
        filled += n;
      }
      left -= chunk.length;
      yield chunk;
    }
  }
}

/** Opens a fragment, first waiting (at most `waitMs`) for the source to fetch it if missing. */
async function openFragment(
  source: PlayerSource,
  fragment: FragmentEntry,
  waitMs: number,
  signal: AbortSignal,
): Promise<Deno.FsFile> {
  const held = await source.store.open(fragment.name);
  if (held) return held.file;
  // Given up on after waitMs, or at once when the request goes away: the source may not listen
  // to the signal, and nobody should wait for a response nobody reads.
  let timer: ReturnType<typeof setTimeout> | undefined;
  let onAbort = () => {};
  const late = new Promise<never>((_, reject) => {
    const message = `Fragment '${fragment.name}' did not arrive within ${waitMs} ms`;
    timer = setTimeout(() => reject(new UnavailableError(message)), waitMs);
    onAbort = () => reject(signal.reason);
    signal.addEventListener("abort", onAbort);
  });
  try {
    signal.throwIfAborted();
    await Promise.race([source.need(fragment.name, signal), late]);
  } catch (error) {
    if (error instanceof UnavailableError || signal.aborted) throw error;
    throw new UnavailableError(
      `Fragment '${fragment.name}' is not available: ${
        error instanceof Error ? error.message : error
      }`,
    );
  } finally {
    clearTimeout(timer);
    signal.removeEventListener("abort", onAbort);
  }
  const opened = await source.store.open(fragment.name);
  if (!opened) throw new UnavailableError(`Fragment '${fragment.name}' vanished after it arrived`);
  return opened.file;
}

/**
 * `GET /events`: the manifest (once the store has one), a snapshot of every fragment, then each
 * event as it happens; a comment every 15 s keeps proxies from closing an idle stream.
 */
function serveEvents(source: PlayerSource, request: Request, closing: AbortSignal): Response {
  const headers = {
    "content-type": "text/event-stream; charset=utf-8",
    // no-transform also keeps Deno from compressing, which would hold events back.
    "cache-control": "no-cache, no-transform",
  };
  if (request.method === "HEAD") return new Response(null, { headers });
  const stops: (() => void)[] = [];
  const stop = () => stops.splice(0).forEach((fn) => fn());
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      const write = (chunk: string) => {
        if ((controller.desiredSize ?? 0) < -MAX_QUEUED_EVENTS) {
          stop(); // EventSource reconnects and starts again from a fresh snapshot
          controller.error(new Error("The page stopped reading events"));
          return;
        }
        controller.enqueue(encoder.encode(chunk));
      };
      const send = (event: string, data: unknown) =>
        write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      const introduce = (manifest: Manifest) => {
        const { file, mime, size, fragments } = manifest;
        send("manifest", {
          file,
          mime,
          size,
          fragments: fragments.map(({ index, name, offset, size }) => ({
            index,
            name,
            offset,
            size,
          })),
        });
        send("snapshot", source.snapshot());
      };

      stops.push(source.onEvent((event) => send("fragment", event)));
      const heartbeat = setInterval(() => write(": heartbeat\n\n"), HEARTBEAT_MS);
      stops.push(() => clearInterval(heartbeat));
      const onClosing = () => {
        stop();
        controller.close(); // what is queued still goes out
      };
      closing.addEventListener("abort", onClosing);
      stops.push(() => closing.removeEventListener("abort", onClosing));

      const manifest = source.store.manifest;
      if (manifest) return introduce(manifest);
      // An empty viewer learns the manifest later (from the directory); the store has no
      // event for that, so look now and then until it is there.
      send("snapshot", []);
      source.findManifest?.().catch((error) =>
        send("problem", { message: error instanceof Error ? error.message : String(error) })
      );
      const poll = setInterval(() => {
        const manifest = source.store.manifest;
        if (!manifest) return;
        clearInterval(poll);
        introduce(manifest);
      }, MANIFEST_POLL_MS);
      stops.push(() => clearInterval(poll));
    },
    cancel: stop, // the page went away
  }, new CountQueuingStrategy({ highWaterMark: 16 }));
  return new Response(body, { headers });
}

function text(status: number, message: string, headers: Record<string, string> = {}): Response {
  return new Response(message + "\n", {
    status,
    headers: { ...headers, "content-type": "text/plain; charset=utf-8" },
  });
}
