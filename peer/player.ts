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
import { join } from "node:path";
import type { Store } from "./store.ts";
import { type FragmentEntry, type Manifest, MANIFEST_NAME } from "../split.ts";
import { type ConnectionLimits, serveConnections } from "../directory/server.ts";
import { errorCode } from "../directory/protocol.ts";
import { refersTo } from "../common/file_ref.ts";
import { Origins, serveEvents } from "./player_events.ts";

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
   * Called when a page or `/stream/<ref>` opens and the store has no manifest yet: an empty
   * viewer finds one (from the directory; the file `ref` names, as the URL had it: a name, an id
   * or an id's prefix) and adopts it into the store; the page shows it as soon as it is there.
   */
  findManifest?(ref?: string): Promise<unknown>;
}

/** A change on the fragment map: held, in flight (and from whom), missing, or failed. */
export interface FragmentEvent {
  name: string;
  index: number;
  state: "held" | "inflight" | "missing" | "failed";
  from?: string;
  /**
   * Set by the player on a held fragment no one sent while it ran: it was in the store when the
   * player started (the page says "held at start" where it would name the holder).
   */
  heldAtStart?: boolean;
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
 * The longest request target (path and query) answered; a longer one gets a 414. Past about
 * 64 KiB Deno's HTTP server answers a bare 400 itself, before the handler sees the request.
 */
export const MAX_TARGET = 8 * 1024;
/** The methods every route answers; any other gets a 405 that lists them. */
const ALLOW = "GET, HEAD";
const CHUNK = 64 * 1024;
/** Fragments past the one being read that a stream asks for ahead of everything else. */
const READAHEAD = 2;
const PAGE_URL = new URL("./player.html", import.meta.url);

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
  const origins = new Origins(source);
  closing.signal.addEventListener("abort", () => origins.stop());

  function handle(request: Request): Response | Promise<Response> {
    const { pathname, search } = new URL(request.url);
    if (pathname.length + search.length > MAX_TARGET) {
      return problem(414, `The request target is longer than ${MAX_TARGET} bytes`);
    }
    if (request.method !== "GET" && request.method !== "HEAD") {
      return problem(405, `The player answers ${ALLOW} only, not ${request.method}`, {
        allow: ALLOW,
      });
    }
    if (pathname === "/") return new Response(page, { headers: PAGE_HEADERS });
    if (pathname === "/events") return serveEvents(source, origins, request, closing.signal);
    if (pathname.startsWith("/stream/")) {
      // Not request.signal: Deno's legacy behaviour aborts it once a response is sent, and warns.
      // A browser that drops a response cancels its body stream instead.
      const name = pathname.slice("/stream/".length);
      return serveFile(source, request, name, waitMs, closing.signal);
    }
    return problem(404, `Nothing at "${pathname.slice(0, 100)}"`);
  }

  async function handleSafely(request: Request): Promise<Response> {
    try {
      return await handle(request);
    } catch (error) {
      // A stream that broke off for want of a fragment is expected; anything else is a bug.
      if (error instanceof UnavailableError) console.error(`[!] Player: ${error.message}`);
      else console.error("[!] Player:", error);
      return problem(500, "Internal error");
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
  // An open-ended range is the rest of the file (RFC 9110), so `curl -C -` and `wget -c` resume
  // to the whole; it streams as the fragments arrive, so the first bytes need not wait for it.
  const end = last === "" ? size - 1 : Number(last);
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
    return problem(404, "Not a file name");
  }
  // An empty peer finds the file in the directory first: a media player opens the URL with no
  // page to do it (mpv, ffplay, ffprobe). The reference goes as it came: a name, an id or a prefix.
  if (!source.store.manifest && source.findManifest) {
    await within(source.findManifest(name), waitMs);
  }
  const manifest = source.store.manifest;
  // Only the manifest's own file is served, so no name can reach anything else on disk.
  if (!manifest || !refersTo(name, manifest)) {
    return problem(404, `Unknown file "${name.slice(0, 100)}"`);
  }
  // The file's hash is a strong validator: the same bytes on every peer, whatever they hold.
  const validators: Record<string, string> = { etag: `"${manifest.sha256}"` };
  const modified = await manifestTime(source.store, manifest.sha256);
  if (modified) validators["last-modified"] = modified.toUTCString();
  if (notModified(request.headers, validators.etag!, modified)) {
    return new Response(null, { status: 304, headers: validators });
  }
  const headers: Record<string, string> = {
    ...validators,
    "accept-ranges": "bytes",
    "content-type": manifest.mime,
  };
  // A Range whose If-Range names another version of the file is ignored: the whole file goes.
  const range = sameVersion(request.headers.get("if-range"), validators)
    ? parseRange(request.headers.get("range"), manifest.size)
    : undefined;
  if (range === "unsatisfiable") {
    return problem(416, `The file is ${manifest.size} bytes long`, {
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
    if (signal.aborted) return problem(503, "The player is closing");
    if (!(error instanceof UnavailableError)) throw error;
    return problem(503, error.message, { "retry-after": "1" });
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

/**
 * When the store got its manifest (the file's time on disk), to whole seconds as HTTP dates
 * have it; undefined if it cannot be read.
 */
function manifestTime(store: Store, sha256: string): Promise<Date | undefined> {
  // Read once per manifest, not on every range request of a player.
  const known = manifestTimes.get(store);
  if (known?.sha256 === sha256) return known.time;
  const time = readManifestTime(store);
  manifestTimes.set(store, { sha256, time });
  return time;
}

const manifestTimes = new WeakMap<Store, { sha256: string; time: Promise<Date | undefined> }>();

async function readManifestTime(store: Store): Promise<Date | undefined> {
  try {
    const { mtime } = await Deno.stat(join(store.dir, MANIFEST_NAME));
    return mtime ? new Date(Math.floor(mtime.getTime() / 1000) * 1000) : undefined;
  } catch {
    return undefined;
  }
}

/**
 * Whether a GET or HEAD is answered 304 (RFC 9110 13.1.2-3): If-None-Match names the file's
 * tag (or is `*`), or, without If-None-Match, If-Modified-Since is no earlier than `modified`.
 */
function notModified(headers: Headers, etag: string, modified: Date | undefined): boolean {
  const noneMatch = headers.get("if-none-match");
  if (noneMatch !== null) {
    // A weak comparison: W/"x" matches "x".
    return noneMatch.trim() === "*" ||
      noneMatch.split(",").some((tag) => tag.trim().replace(/^W\//, "") === etag);
  }
  const since = Date.parse(headers.get("if-modified-since") ?? "");
  return modified !== undefined && !Number.isNaN(since) && modified.getTime() <= since;
}

/**
 * Whether a Range applies under `ifRange` (RFC 9110 13.1.5): no If-Range, the file's strong tag
 * exactly, or exactly its Last-Modified date.
 */
function sameVersion(ifRange: string | null, validators: Record<string, string>): boolean {
  if (ifRange === null) return true;
  const value = ifRange.trim();
  if (value.startsWith('"') || value.startsWith("W/")) return value === validators.etag;
  const date = Date.parse(value);
  const modified = Date.parse(validators["last-modified"] ?? "");
  return !Number.isNaN(date) && date === modified;
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

/** An error answer in the shape the directory's have: `{"error":{"code","message"}}`. */
function problem(
  status: number,
  message: string,
  headers: Record<string, string> = {},
): Response {
  return Response.json({ error: { code: errorCode(status), message } }, {
    status,
    headers: { ...headers, "content-type": "application/json" },
  });
}
