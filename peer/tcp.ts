/**
 * The peer's TCP protocol (DESIGN.md "Peer TCP protocol"): one persistent connection, requests
 * one after another, each a line. `GET <name> [URGENT]` answers `OK <size> <sha256>` and the bytes
 * (an urgent request ahead of others waiting for an upload slot; a fragment still arriving here is
 * passed on as it arrives, its last byte once it is verified), or
 * `ERR ELSEWHERE <host:port> ...` when the peer's upload is better spent on what only it holds
 * (see steering.ts); `HELLO <host:port>` says which peer the client is; `LIST` the fragments
 * held, `PING` `PONG`; a bad line gets `ERR <CODE> <text>` and the connection stays usable; a
 * line over 1 KiB closes it. peer.ts re-exports the server and client.
 * @module
 */
import { LineBuffer } from "../common/lines.ts";
import { describe } from "../common/cli.ts";
import { acceptLoop, isConnectionError } from "../broker/wire.ts";
import { parseAddress } from "../broker.ts";
import { addressKey, ConnectionCounts, defaultMaxPerAddress } from "../common/connection_counts.ts";
import { type FragmentInfo, isFragmentName, type Relay, type Store } from "./store.ts";
import type { Steering } from "./steering.ts";
import { UploadSlots } from "./upload_slots.ts";

/**
 * How many places back (upload_slots.ts) a request waits for an upload slot when no player
 * waits for its fragment; one a player waits for is at the front.
 */
const NOT_WANTED_YET = 3;
/**
 * How many places back a request waits when other requesters were pointed at the peers getting
 * its fragment: those peers, this requester among them, must get it before they can pass it on.
 */
const AWAITED_ELSEWHERE = 1;
/** How many places back a seeder's request waits when other peers hold (or get) its fragment. */
const HELD_ELSEWHERE = 6;
/** Relays (fragments passed on as they arrive) under way at once without an upload slot. */
export const FREE_RELAYS = 2;
/** The longest request line; anything longer closes the connection. */
export const MAX_REQUEST_LINE = 1024;
const CHUNK = 1024 * 1024;
const PACED_CHUNK = 64 * 1024; // smaller writes when throttled, so the pace stays even
const encoder = new TextEncoder();
/** Connections at once unless told otherwise. */
export const DEFAULT_MAX_CONNECTIONS = 256;
/** A connection with no progress, or with no fragment asked for, for this long is closed. */
export const DEFAULT_IDLE_TIMEOUT_MS = 60_000;
/**
 * A fragment's body must go out at least this fast (bytes per second), averaged from its start
 * and checked from {@link DEFAULT_BODY_RATE_WINDOW_MS} on, or the connection is cut: a body
 * holds one of the peer's few upload slots, so a client that reads a little now and then (which
 * the idle watchdog alone lets by) must not hold it for hours. 8 KiB/s is far below any real
 * peer (the sample video plays at 125 KB/s). Time spent waiting on the peer's own --max-upload
 * pacing does not count against the client.
 */
export const DEFAULT_MIN_BODY_RATE = 8 * 1024;
/** How long a body goes before its rate is first checked. */
export const DEFAULT_BODY_RATE_WINDOW_MS = 30_000;

export interface TcpServerOptions {
  /** @default 6001 */
  port?: number;
  hostname?: string;
  /**
   * A connection with no progress (no request, no byte written) for this long is closed, and so
   * is one that has asked for no fragment (`GET`, `LIST`) for this long, however much it
   * `PING`s: a keepalive alone does not hold a slot. @default 60_000
   */
  idleTimeoutMs?: number;
  /** More connections than this at once are answered `ERR BUSY` and closed. @default 256 */
  maxConnections?: number;
  /**
   * More connections than this at once from one client address (an IPv6 /64 counting as one;
   * loopback counts like any other) are answered `ERR BUSY` and closed.
   * @default a quarter of maxConnections (64)
   */
  maxConnectionsPerAddress?: number;
  /**
   * A fragment's body slower than this many bytes per second, averaged from its start and
   * checked once it has gone on for `bodyRateWindowMs`, has its connection cut. @default 8192
   */
  minBodyRate?: number;
  /** @default 30_000 */
  bodyRateWindowMs?: number;
  /** Paces every byte sent, across all connections (the peer's --max-upload). */
  throttle?: (bytes: number, signal?: AbortSignal) => Promise<void>;
  /** Fragments sent at once; more requests wait their turn, fairly between peers. @default 2 */
  uploadSlots?: number;
  /** Decides when a request is pointed at other holders instead of sent (super-seeding). */
  steering?: Steering;
  /**
   * Called once per connection, at its first request other than `PING` (`HELLO`, `LIST`, `GET`, or
   * a bad line): a health probe that only PINGs, every 2 s in compose, is no news.
   */
  onConnect?: (remote: string) => void;
  onSent?: (name: string, remote: string) => void;
  /**
   * Receives one line per failure that is not a client leaving: a connection that ended on an
   * unexpected error (that connection only; a fragment that shrank on disk, a read error), or
   * accepting that fails (the server keeps trying). @default console.error
   */
  onError?: (line: string) => void;
}

/** A running TCP fragment server. */
export interface TcpServer extends AsyncDisposable {
  readonly port: number;
  /** How many connections are open now. */
  readonly connections: number;
  /** Fragments being sent now or waiting for an upload slot. */
  readonly uploads: number;
  close(): Promise<void>;
}

/** Serves `store` over the peer TCP protocol until closed. */
export function startTcpServer(store: Store, options: TcpServerOptions = {}): TcpServer {
  const {
    idleTimeoutMs = DEFAULT_IDLE_TIMEOUT_MS,
    maxConnections = DEFAULT_MAX_CONNECTIONS,
    minBodyRate = DEFAULT_MIN_BODY_RATE,
    bodyRateWindowMs = DEFAULT_BODY_RATE_WINDOW_MS,
  } = options;
  const counts = new ConnectionCounts(
    maxConnections,
    options.maxConnectionsPerAddress ?? defaultMaxPerAddress(maxConnections),
  );
  const slots = new UploadSlots(options.uploadSlots ?? 2);
  const relaying = { now: 0 };
  const warn = options.onError ?? ((line: string) => console.error(line));
  const listener = Deno.listen({ port: options.port ?? 6001, hostname: options.hostname });
  const open = new Map<Deno.Conn, AbortController>();
  const handlers = new Set<Promise<void>>();
  const stop = new AbortController();

  const accepting = acceptLoop(listener, { tag: "[TCP]", warn, stop: stop.signal }, (conn) => {
    const address = addressKey(conn.remoteAddr.hostname);
    const full = counts.admit(address);
    if (full !== undefined) {
      refuse(conn, full === "server" ? "" : " from your address");
      return;
    }
    const gone = new AbortController();
    open.set(conn, gone);
    const remote = formatAddr(conn.remoteAddr);
    const handler = serveConnection(
      conn,
      remote,
      store,
      { ...options, idleTimeoutMs, minBodyRate, bodyRateWindowMs, slots, relaying },
      gone.signal,
    )
      .catch((error) => {
        // A client that vanished, the watchdog or close() is no news; anything else ends
        // this connection only, and is worth a line.
        if (!stop.signal.aborted && !isConnectionError(error)) {
          warn(`[TCP] Dropped ${remote}: ${describe(error)}`);
        }
      })
      .finally(() => {
        open.delete(conn);
        counts.release(address);
        handlers.delete(handler);
        try {
          conn.close();
        } catch { /* already closed */ }
      });
    handlers.add(handler);
  });

  async function close() {
    stop.abort();
    try {
      listener.close();
    } catch { /* already closed */ }
    for (const [conn, gone] of open) {
      gone.abort();
      try {
        conn.close();
      } catch { /* already closed */ }
    }
    await Promise.allSettled([accepting, ...handlers]);
  }

  return {
    port: (listener.addr as Deno.NetAddr).port,
    get connections() {
      return open.size;
    },
    get uploads() {
      return slots.active + slots.waiting;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** Answers a connection there is no room for with `ERR BUSY`, and closes it. */
function refuse(conn: Deno.Conn, why: string): void {
  // The line fits in a fresh socket's buffer: the write does not wait for the client.
  conn.write(encoder.encode(`ERR BUSY too many connections${why}\n`)).catch(() => {})
    .finally(() => {
      try {
        conn.close();
      } catch { /* already closed */ }
    });
}

/** What {@link serveConnection} needs: the options, with their defaults, and the upload slots. */
type ConnectionOptions = TcpServerOptions & {
  idleTimeoutMs: number;
  minBodyRate: number;
  bodyRateWindowMs: number;
  slots: UploadSlots;
  /** Relays under way without a slot (at most {@link FREE_RELAYS}). */
  relaying: { now: number };
};

async function serveConnection(
  conn: Deno.Conn,
  remote: string,
  store: Store,
  options: ConnectionOptions,
  closed: AbortSignal,
): Promise<void> {
  const { idleTimeoutMs, minBodyRate, bodyRateWindowMs } = options;
  const cut = () => {
    try {
      conn.close();
    } catch { /* close() got there first */ }
  };
  // The watchdog closes a connection that makes no progress: an idle client, or one that
  // stopped reading what we send it. Every read and write resets it.
  let watchdog: ReturnType<typeof setTimeout> | undefined;
  const progress = () => {
    clearTimeout(watchdog);
    watchdog = setTimeout(cut, idleTimeoutMs);
  };
  const client: Client = {
    remote,
    closed,
    usedAt: performance.now(),
    fetching: 0,
    introduced: false,
    send: (bytes, paced) => send(bytes, paced), // defined below, with the rate meter
    excused: (waiting) => excused(waiting),
  };
  // And a connection that asks for nothing (GET, LIST) for as long is closed too, however
  // much it PINGs: a keepalive alone must not hold one of the server's slots for ever.
  let unused: ReturnType<typeof setTimeout> | undefined;
  const checkUse = () => {
    const left = client.fetching > 0
      ? idleTimeoutMs
      : client.usedAt + idleTimeoutMs - performance.now();
    if (left <= 0) cut();
    else unused = setTimeout(checkUse, left);
  };
  unused = setTimeout(checkUse, idleTimeoutMs);
  // A fragment's body that goes out slower than minBodyRate is cut off (DEFAULT_MIN_BODY_RATE).
  // The rate is averaged from the body's start, checked once a window has passed: the kernel
  // takes a slow reader's bytes in bursts of half its socket buffer (megabytes on loopback), so
  // a shorter average would cut off an honest reader between bursts, while the average from the
  // start never falls below the rate a reader keeps up. Time spent waiting for the peer's own
  // pacing (--max-upload), or for the bytes of a fragment it is still receiving, is not counted
  // against the client.
  let meter: { since: number; bytes: number; paced: number; pacing?: number } | undefined;
  let rateCheck: ReturnType<typeof setInterval> | undefined;
  const checkRate = () => {
    if (!meter) return;
    const now = performance.now();
    const pacing = meter.pacing === undefined ? 0 : now - meter.pacing;
    const elapsed = now - meter.since - meter.paced - pacing;
    if (elapsed < bodyRateWindowMs) return;
    if (meter.bytes * 1000 / elapsed < minBodyRate) cut();
  };
  client.body = (sending) => {
    clearInterval(rateCheck);
    meter = undefined;
    if (!sending) return;
    meter = { since: performance.now(), bytes: 0, paced: 0 };
    rateCheck = setInterval(checkRate, Math.max(10, Math.min(1_000, bodyRateWindowMs / 4)));
  };
  // Time spent waiting on this peer (its own pacing, bytes it is still receiving) is not counted.
  const excused = async <T>(waiting: Promise<T>): Promise<T> => {
    if (meter) meter.pacing = performance.now();
    try {
      return await waiting;
    } finally {
      if (meter?.pacing !== undefined) {
        meter.paced += performance.now() - meter.pacing;
        meter.pacing = undefined;
      }
    }
  };
  const piece = options.throttle ? PACED_CHUNK : CHUNK;
  // Only fragment bodies are paced: a reply line never waits behind another client's bytes.
  const send = async (bytes: Uint8Array, paced = false) => {
    for (let sent = 0; sent < bytes.length;) {
      if (paced && options.throttle) {
        await excused(options.throttle(Math.min(bytes.length - sent, piece), closed));
      }
      const n = await conn.write(bytes.subarray(sent, sent + piece));
      sent += n;
      if (paced && meter) meter.bytes += n;
      progress();
    }
  };
  const lines = new LineBuffer(MAX_REQUEST_LINE);
  const buffer = new Uint8Array(16 * 1024);
  progress();
  try {
    while (true) {
      const n = await conn.read(buffer);
      if (n === null) return;
      progress();
      lines.push(buffer.subarray(0, n));
      for (let line; (line = lines.shift()) !== undefined;) {
        await answer(line, store, client, options);
      }
      if (lines.overflow) {
        await send(encoder.encode("ERR BAD_REQUEST line too long\n"));
        return;
      }
    }
  } finally {
    clearTimeout(watchdog);
    clearTimeout(unused);
    clearInterval(rateCheck);
  }
}

/**
 * Who is at the other end of a connection: its address, the peer it said it is, and when it
 * last asked for something worth a slot.
 */
interface Client {
  remote: string;
  peer?: string;
  closed: AbortSignal;
  /** When it last asked for a fragment or the list (performance.now()). */
  usedAt: number;
  /** Fragment requests being answered (waiting for a slot, or sending). */
  fetching: number;
  /** Whether onConnect has been told of it: at its first request other than PING. */
  introduced: boolean;
  /** Writes to the connection; only fragment bodies are `paced` (--max-upload). */
  send: (bytes: Uint8Array, paced?: boolean) => Promise<void>;
  /** A fragment's body starts (true) or ends (false): its pace is watched meanwhile. */
  body?: (sending: boolean) => void;
  /** Awaits `waiting` (this peer's doing) without counting the time against the body's rate. */
  excused: <T>(waiting: Promise<T>) => Promise<T>;
}

/** Sends one reply line, unpaced. */
function reply(client: Client, text: string): Promise<void> {
  return client.send(encoder.encode(text + "\n"));
}

async function answer(
  line: string,
  store: Store,
  client: Client,
  options: TcpServerOptions & Pick<ConnectionOptions, "slots" | "relaying">,
): Promise<void> {
  const request = parseRequest(line);
  if ("verb" in request && request.verb === "PING") return reply(client, "PONG");
  if (!client.introduced) {
    client.introduced = true;
    options.onConnect?.(client.remote);
  }
  if ("error" in request) return reply(client, `ERR BAD_REQUEST ${request.error}`);
  if (request.verb === "HELLO") {
    client.peer = request.peer;
    return reply(client, "OK");
  }
  client.usedAt = performance.now();
  if (request.verb === "LIST") {
    const held = store.list();
    return reply(
      client,
      [`OK ${held.length}`, ...held.map((f) => `${f.name} ${f.size} ${f.sha256}`)].join("\n"),
    );
  }
  client.fetching++;
  try {
    await answerGet(request, store, client, options);
  } finally {
    client.fetching--;
    client.usedAt = performance.now();
  }
}

async function answerGet(
  { name, urgent }: { name: string; urgent: boolean },
  store: Store,
  client: Client,
  options: TcpServerOptions & Pick<ConnectionOptions, "slots" | "relaying">,
): Promise<void> {
  const openHeld = async () =>
    await store.open(name) ?? (await store.adopt(name) ? await store.open(name) : undefined);
  let held = await openHeld();
  // Not held yet but on its way here (or asked of a holder): passed on as it arrives, the last
  // byte once verified.
  using relay = held ? undefined : await store.relay(name, { signal: client.closed });
  if (!held && !relay) held = await openHeld(); // it came whole meanwhile
  if (!held && !relay) return reply(client, `ERR NOT_FOUND no fragment "${name}" here`);
  using file = held?.file;
  const info = held?.info ?? relay!.info;
  const { slots, steering, relaying } = options;
  if (urgent) steering?.wantedNow(name);
  // Pointed elsewhere at once, without waiting for a slot, when other uploads are under way.
  const pointer = steering?.redirect(name, client.peer, slots.active + slots.waiting > 0);
  if (pointer) return reply(client, `ERR ELSEWHERE ${pointer.join(" ")}`);
  // In flight counts toward its receiver from the moment it is asked for, waiting included:
  // others asking for it meanwhile are pointed there (it passes the fragment on as it arrives).
  if (client.peer) steering?.asked(name, client.peer);
  try {
    // What a player waits for goes first; a seeder's upload goes to what only it holds before
    // what others can give. Asked when a slot frees, as others get the fragment meanwhile.
    const seeding = store.holdsAll();
    const place = () =>
      seeding && steering?.othersHold(name, client.peer)
        ? HELD_ELSEWHERE
        : urgent || steering?.wanted(name)
        ? 0
        : steering?.awaited(name)
        ? AWAITED_ELSEWHERE
        : NOT_WANTED_YET;
    // A relay takes no slot: it goes at the pace its bytes arrive, and a slot held that long
    // would leave this peer's upload idle; --max-upload still paces it with the rest. Past
    // FREE_RELAYS at once, one waits for a slot like any send: many connections asking for what
    // is arriving would share the upload so thinly that every copy came late.
    const free = relay !== undefined && relaying.now < FREE_RELAYS;
    if (free) relaying.now++;
    const release = free
      ? () => relaying.now--
      : await slots.acquire(client.peer ?? client.remote, client.closed, { place, urgent });
    try {
      if (relay?.failed) { // since it was found arriving
        if (client.peer) steering?.lost(name, client.peer);
        return reply(client, `ERR NOT_FOUND no fragment "${name}" here`);
      }
      if (client.peer) steering?.have(name, client.peer); // out: its send begins
      await reply(client, `OK ${info.size} ${info.sha256}`);
      client.body?.(true);
      const send = (bytes: Uint8Array) => client.send(bytes, true);
      if (file) await sendBody(file, info.size, name, send);
      else await relayBody(relay!, client, send);
    } finally {
      client.body?.(false);
      release();
    }
  } catch (error) {
    if (client.peer) steering?.lost(name, client.peer);
    throw error;
  }
  options.onSent?.(name, client.remote);
}

async function sendBody(
  file: Deno.FsFile,
  size: number,
  name: string,
  send: (bytes: Uint8Array) => Promise<void>,
): Promise<void> {
  const chunk = new Uint8Array(Math.min(CHUNK, Math.max(size, 1)));
  let left = size;
  while (left > 0) {
    const n = await file.read(chunk.subarray(0, Math.min(chunk.length, left)));
    // The size is promised in the OK line: a file that shrank leaves the stream unusable.
    if (n === null) throw new Error(`Fragment "${name}" shrank while being sent`);
    await send(chunk.subarray(0, n));
    left -= n;
  }
}

/**
 * Sends a fragment as it arrives here. Waiting for its bytes is this peer's doing, not the
 * client's: the body's rate check leaves it out. If this peer's copy fails, the connection is cut
 * before the last byte, so the client never holds what this peer found wrong.
 */
async function relayBody(
  relay: Relay,
  client: Client,
  send: (bytes: Uint8Array) => Promise<void>,
): Promise<void> {
  const chunks = relay.chunks[Symbol.asyncIterator]();
  for (let next; !(next = await client.excused(chunks.next())).done;) await send(next.value);
}

/** A parsed request line, or why it is not one. */
export type Request =
  | { verb: "GET"; name: string; urgent: boolean }
  | { verb: "LIST" }
  | { verb: "PING" }
  | { verb: "HELLO"; peer: string }
  | { error: string };

/**
 * Parses one request line: `GET <name> [URGENT]`, a bare `<name>`, `HELLO <host:port>`, `LIST` or
 * `PING`.
 */
export function parseRequest(line: string): Request {
  const words = line.trim().split(/\s+/);
  if (words.length === 1 && words[0] === "") return { error: "empty request" };
  const [verb, ...args] = words;
  if (verb === "LIST" && args.length === 0) return { verb };
  if (verb === "PING" && args.length === 0) return { verb };
  if (verb === "HELLO") {
    try {
      if (args.length !== 1) throw new TypeError("one address");
      const { hostname, port } = parseAddress(args[0]!);
      return { verb, peer: formatHostPort(hostname, port) };
    } catch {
      return { error: "HELLO needs the peer's own address: HELLO <host:port>" };
    }
  }
  // A verb alone is not a fragment's name: a bare `GET` is a request missing its name.
  if (verb === "GET" && args.length === 0) {
    return { error: "GET needs a fragment name: GET <name>" };
  }
  const urgent = verb === "GET" && args.length === 2 && args[1] === "URGENT";
  let name = "";
  if (verb === "GET" && (args.length === 1 || urgent)) name = args[0]!;
  else if (words.length === 1) name = verb!;
  if (name === "") return { error: `unknown request "${line.slice(0, 64)}"` };
  if (!isFragmentName(name)) return { error: `invalid fragment name "${name.slice(0, 64)}"` };
  return { verb: "GET", name, urgent };
}

/**
 * An `ERR` reply from a peer: `code` is NOT_FOUND, BAD_REQUEST, BUSY, INTERNAL or ELSEWHERE; for
 * ELSEWHERE, `elsewhere` holds the `host:port` of the peers to ask instead.
 */
export class PeerError extends Error {
  override name = "PeerError";
  readonly elsewhere: string[];
  constructor(readonly code: string, message: string) {
    super(code === "ELSEWHERE" ? `held elsewhere: ${message}` : message);
    this.elsewhere = code === "ELSEWHERE" ? message.split(" ").filter(isAddress) : [];
  }
}

function isAddress(text: string): boolean {
  try {
    parseAddress(text);
    return true;
  } catch {
    return false;
  }
}

/**
 * A fragment on its way from a peer: its announced size and hash, and its bytes. A chunk may be
 * reused once the next is asked for: copy it to keep it longer.
 */
export interface Download {
  size: number;
  sha256: string;
  chunks: AsyncIterable<Uint8Array>;
  /** Ends the stream without reading it (gRPC; over TCP, close the connection instead). */
  cancel?: () => void;
}

/**
 * One persistent connection to a peer's TCP port. Requests run one at a time (a fragment's
 * bytes must be read before the next request); any broken exchange closes the connection.
 */
export class TcpPeerClient implements Disposable {
  readonly address: string;
  #conn: Deno.Conn;
  #lines = new LineBuffer(MAX_REQUEST_LINE + 200);
  #queue: Promise<unknown> = Promise.resolve();
  #closed = false;
  #readTimeoutMs: number;

  private constructor(address: string, conn: Deno.Conn, readTimeoutMs: number) {
    this.address = address;
    this.#conn = conn;
    this.#readTimeoutMs = readTimeoutMs;
  }

  /** Connects to `host:port`; fails after `timeoutMs` (a dead host) or at once (refused). */
  static async connect(
    address: string,
    { timeoutMs = 5_000, readTimeoutMs = 15_000 } = {},
  ): Promise<TcpPeerClient> {
    const { hostname, port } = parseAddress(address);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const connecting = Deno.connect({ hostname, port });
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new Error(`Timed out connecting to ${address}`)), timeoutMs);
    });
    try {
      const conn = await Promise.race([connecting, timeout]);
      return new TcpPeerClient(address, conn, readTimeoutMs);
    } catch (error) {
      connecting.then((conn) => conn.close(), () => {});
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  /** True once the connection is closed and the client is of no more use. */
  get closed(): boolean {
    return this.#closed;
  }

  /** Checks the peer answers. */
  ping(): Promise<void> {
    return this.#exclusive(async () => {
      await this.#send("PING");
      const line = await this.#readLine();
      if (line !== "PONG") this.#fail(`Unexpected answer to PING: "${line}"`);
    });
  }

  /**
   * Tells the peer which peer this is (the `host:port` it announces), so it can share its upload
   * fairly between peers and point others at what it sends here. A peer too old for `HELLO`
   * answers `ERR BAD_REQUEST`, which is no failure: it serves anyway.
   */
  hello(self: string): Promise<void> {
    return this.#exclusive(async () => {
      await this.#send(`HELLO ${self}`);
      const line = await this.#readLine();
      if (line !== "OK" && !line.startsWith("ERR ")) {
        this.#fail(`Unexpected answer to HELLO: "${line.slice(0, 80)}"`);
      }
    });
  }

  /** What the peer holds. */
  list(): Promise<FragmentInfo[]> {
    return this.#exclusive(async () => {
      await this.#send("LIST");
      const count = Number(this.#expectOk(await this.#readLine())[0]);
      const held: FragmentInfo[] = [];
      for (let i = 0; i < count; i++) {
        const [name, size, sha256] = (await this.#readLine()).split(" ");
        held.push({ name: name!, size: Number(size), sha256: sha256! });
      }
      return held;
    });
  }

  /**
   * Requests fragment `name`. The bytes must be read to the end (or the client closed) before
   * another request runs; they are not verified here: the store verifies as it writes. Each chunk
   * is valid only until the next one is asked for (its buffer is reused), as Store.write uses it.
   * An `urgent` request (a player waits for it) is served ahead of others waiting for a slot.
   */
  async get(name: string, urgent = false): Promise<Download> {
    let release!: () => void;
    const done = new Promise<void>((resolve) => release = resolve);
    const header = await this.#exclusive(async () => {
      await this.#send(urgent ? `GET ${name} URGENT` : `GET ${name}`);
      const line = await this.#readLine();
      const [size = "", sha256 = "", ...more] = this.#expectOk(line);
      // The size decides how many bytes are read next: anything but a whole number (and a hash
      // of 64 hex digits) leaves the stream unreadable.
      if (
        !/^\d{1,16}$/.test(size) || !Number.isSafeInteger(Number(size)) ||
        !/^[0-9a-f]{64}$/.test(sha256) || more.length > 0
      ) {
        this.#fail(`Malformed answer from ${this.address}: "${line.slice(0, 80)}"`);
      }
      return { size: Number(size), sha256 };
    }, done);
    const chunks = this.#body(header.size, release);
    return { ...header, chunks };
  }

  // Yields views of two buffers it takes turns with: while the consumer hashes and writes one
  // chunk, the socket read of the next is already in flight. No read asks for more than the
  // body has left, so the next reply's bytes stay in the socket.
  async *#body(size: number, release: () => void): AsyncGenerator<Uint8Array> {
    let left = size;
    let reading: Promise<number | null> | undefined;
    try {
      const buffered = this.#lines.take(left);
      left -= buffered.length;
      if (buffered.length > 0) yield buffered;
      const buffers = [
        new Uint8Array(Math.min(CHUNK, left)),
        new Uint8Array(Math.min(CHUNK, left)),
      ];
      let turn = 0;
      reading = left > 0 ? this.#read(buffers[0]!) : undefined;
      while (reading) {
        const n = await reading;
        if (n === null) this.#fail(`Connection to ${this.address} closed mid-fragment`);
        left -= n;
        const chunk = buffers[turn]!.subarray(0, n);
        turn = 1 - turn;
        reading = left > 0
          ? this.#read(buffers[turn]!.subarray(0, Math.min(CHUNK, left)))
          : undefined;
        yield chunk;
      }
    } finally {
      if (left > 0) this.close(); // abandoned mid-body: the stream is out of step
      reading?.catch(() => {}); // the read ahead fails with the closed connection; nobody waits
      release();
    }
  }

  #expectOk(line: string): string[] {
    const [status, ...rest] = line.split(" ");
    if (status === "OK") return rest;
    if (status === "ERR") throw new PeerError(rest[0] ?? "INTERNAL", rest.slice(1).join(" "));
    return this.#fail(`Unexpected answer from ${this.address}: "${line.slice(0, 80)}"`);
  }

  async #readLine(): Promise<string> {
    const buffer = new Uint8Array(16 * 1024);
    while (true) {
      const line = this.#lines.shift();
      if (line !== undefined) return line;
      if (this.#lines.overflow) this.#fail(`Overlong answer from ${this.address}`);
      const n = await this.#read(buffer);
      if (n === null) this.#fail(`Connection to ${this.address} closed`);
      this.#lines.push(buffer.subarray(0, n));
    }
  }

  async #read(buffer: Uint8Array): Promise<number | null> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        this.close();
        reject(new Error(`${this.address} sent nothing for ${this.#readTimeoutMs} ms`));
      }, this.#readTimeoutMs);
    });
    try {
      return await Promise.race([this.#conn.read(buffer), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }

  async #send(line: string): Promise<void> {
    const bytes = encoder.encode(line + "\n");
    for (let sent = 0; sent < bytes.length;) sent += await this.#conn.write(bytes.subarray(sent));
  }

  // Runs `work` after every earlier request is done; `until` holds the turn past `work` itself
  // (a fragment's body). A failure closes the connection, except a clean ERR reply.
  #exclusive<T>(work: () => Promise<T>, until?: Promise<void>): Promise<T> {
    const run = this.#queue.then(async () => {
      if (this.#closed) throw new Error(`Connection to ${this.address} is closed`);
      try {
        return await work();
      } catch (error) {
        if (!(error instanceof PeerError)) this.close();
        throw error;
      }
    });
    this.#queue = run.then(() => until, () => {});
    return run;
  }

  #fail(message: string): never {
    this.close();
    throw new Error(message);
  }

  /** Closes the connection; requests in flight fail. */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    try {
      this.#conn.close();
    } catch { /* already closed */ }
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/** `host:port` of a socket address. */
export function formatAddr(addr: Deno.NetAddr): string {
  return formatHostPort(addr.hostname, addr.port);
}

/** `host:port`, bracketing IPv6 hosts. */
export function formatHostPort(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}
