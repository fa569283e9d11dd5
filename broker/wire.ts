/**
 * What the broker and its client share (broker.ts re-exports the public part): the default
 * address, the limits both sides hold to, the topic rule, `host:port` parsing, and the one writer
 * each socket has ({@link Outbox}); the peer's TCP server uses its accept loop and error test.
 * @module
 */
import { describe } from "../common/cli.ts";

/** Where the broker listens unless told otherwise. */
export const DEFAULT_PORT = 5555;
/** The address the CLIs use unless given `--broker`. */
export const DEFAULT_ADDRESS = `localhost:${DEFAULT_PORT}`;

/** The longest line either side accepts unless told otherwise, in bytes. */
export const MAX_LINE = 64 * 1024;
/** The most output that may wait for one socket unless told otherwise, in bytes. */
export const MAX_PENDING = 8 * 1024 * 1024;
/** How much one read takes from a socket, at most. */
export const READ_SIZE = 64 * 1024;
const WRITE_SIZE = 64 * 1024;
/** The reason of the `ERR:` line that refuses a `SUB:` past the broker's subscription limit. */
export const TOO_MANY_SUBSCRIPTIONS = "too many subscriptions";
// How long a client that is cut off keeps its socket, so that it may still read why (`ERR:slow
// consumer`) if it resumes reading; the broker has already stopped delivering to it.
export const LAST_WORDS_MS = 2000;

const TOPIC_PATTERN = /^[A-Za-z0-9._-]{1,128}$/;
const encoder = new TextEncoder();

/** True when `topic` may be used: 1 to 128 of `A-Z a-z 0-9 . _ -`. */
export function isValidTopic(topic: string): boolean {
  return TOPIC_PATTERN.test(topic);
}

/** A connection-level failure a user can act on, such as a broker that cannot be reached. */
export class BrokerError extends Error {
  override name = "BrokerError";
}

// ---------------------------------------------------------------------------------------------
// One writer per socket

const NEWLINE = 0x0a;

/**
 * Encodes lines into one buffer that it reuses, so encoding leaves nothing on the heap: the bytes
 * it returns are good until its next call (pass them straight on to {@link Outbox.sendBytes}).
 */
export class LineEncoder {
  #buffer = new Uint8Array(WRITE_SIZE);

  /** `prefix` (ASCII), then `line` and a `\n`, as UTF-8. */
  encode(line: string, prefix = ""): Uint8Array {
    // UTF-8 needs at most 3 bytes per UTF-16 code unit.
    const most = (prefix.length + line.length) * 3 + 1;
    if (this.#buffer.length < most) this.#buffer = new Uint8Array(most);
    const buffer = this.#buffer;
    let at = 0;
    for (; at < prefix.length; at++) buffer[at] = prefix.charCodeAt(at);
    at += encoder.encodeInto(line, buffer.subarray(at)).written;
    buffer[at++] = NEWLINE;
    return buffer.subarray(0, at);
  }
}

/**
 * Bytes that can be handed back to the operating system at once. A plain `Uint8Array` comes
 * from malloc, which keeps what is freed for later (a flood's 2 GB of output stayed in the
 * process after the flood); a resizable `ArrayBuffer` is mapped pages of its own, which
 * `resize(0)` returns (and the garbage collector unmaps). Only for bytes no pending read or
 * write is using.
 */
export function releasableBytes(size: number, most = size): Uint8Array {
  return new Uint8Array(new ArrayBuffer(size, { maxByteLength: most }));
}

/** Returns the pages of bytes made by {@link releasableBytes}; they are empty afterwards. */
export function release(bytes: Uint8Array): void {
  (bytes.buffer as ArrayBuffer).resize(0);
}

const outboxEncoder = new LineEncoder();
// Written-out chunks, shared by every outbox of the process, so a flood reuses the same few
// buffers instead of leaving a fresh one per write to collect. At most this many wait here;
// any other chunk given back is released at once.
const SPARE_CHUNKS = 64;
const spares: Uint8Array[] = [];

/** Bytes waiting to be written: those of `bytes` in `[start, end)`. */
interface Chunk {
  bytes: Uint8Array;
  start: number;
  end: number;
}

/** A count of bytes waiting in several outboxes, such as all of a broker's. */
export interface Tally {
  bytes: number;
}

/** Options for an {@link Outbox}. */
export interface OutboxOptions {
  /** The most bytes that may wait (including a write under way). */
  limit: number;
  /** Called once when a write fails; what waited is dropped. */
  onError: (error: unknown) => void;
  /** Also counts this outbox's waiting bytes, until {@link Outbox.detach}. */
  tally?: Tally;
}

/**
 * Lines wait here and go out together, up to `WRITE_SIZE` per write, so a burst of small messages
 * costs one syscall, and nothing else ever writes to the socket. What waits is bounded by `limit`
 * bytes. It waits encoded, in chunks of `WRITE_SIZE` outside the JavaScript heap: a backlog of
 * many small messages is not many small objects for the garbage collector to keep copying (which
 * made V8 grow its young generation, and the process, by tens of MiB during a flood). A chunk
 * that is not kept as a spare goes back to the operating system as soon as it is written out or
 * dropped.
 */
export class Outbox {
  readonly #conn: Deno.Conn;
  readonly #limit: number;
  readonly #onError: (error: unknown) => void;
  #tally: Tally;
  // The first chunk is the one written from, the last the one filled.
  #chunks: Chunk[] = [];
  #queued = 0;
  #inFlight = 0;
  #writing: Promise<void> | null = null;
  // When output last went out, or started to wait (performance.now()).
  #progressAt = 0;

  constructor(conn: Deno.Conn, options: OutboxOptions) {
    this.#conn = conn;
    this.#limit = options.limit;
    this.#onError = options.onError;
    this.#tally = options.tally ?? { bytes: 0 };
  }

  /** What waits to be written, in bytes, including a write under way. */
  get pending(): number {
    return this.#queued + this.#inFlight;
  }

  /** How long bytes have waited with none written, in ms at `now`; 0 when nothing waits. */
  stalledFor(now: number): number {
    return this.pending === 0 ? 0 : now - this.#progressAt;
  }

  /** Queues `line` (without its `\n`); false, and nothing queued, when that would pass the limit. */
  send(line: string): boolean {
    return this.sendBytes(outboxEncoder.encode(line));
  }

  /**
   * Queues a copy of `bytes`, whole lines with their `\n` (as {@link LineEncoder} gives them), so
   * one encoding serves every subscriber; false, and nothing queued, when that would pass the
   * limit.
   */
  sendBytes(bytes: Uint8Array): boolean {
    const pending = this.pending;
    if (pending + bytes.length > this.#limit) return false;
    if (pending === 0) this.#progressAt = performance.now();
    let tail = this.#chunks.at(-1);
    if (!tail || tail.bytes.length - tail.end < bytes.length) {
      tail = { bytes: takeChunk(bytes.length), start: 0, end: 0 };
      this.#chunks.push(tail);
    }
    tail.bytes.set(bytes, tail.end);
    tail.end += bytes.length;
    this.#queued += bytes.length;
    this.#tally.bytes += bytes.length;
    this.#writing ??= this.#writeAll();
    return true;
  }

  /** Drops whatever has not been handed to the socket yet. */
  clear(): void {
    // A chunk being written stays until its write is done; what follows in it is dropped.
    const keep = this.#writing && this.#inFlight > 0 ? this.#chunks.slice(0, 1) : [];
    for (const chunk of this.#chunks.slice(keep.length)) giveChunk(chunk.bytes);
    if (keep[0]) keep[0].end = keep[0].start;
    this.#chunks = keep;
    this.#tally.bytes -= this.#queued;
    this.#queued = 0;
  }

  /** Stops counting in the tally given to the constructor, from now on. */
  detach(): void {
    this.#tally.bytes -= this.pending;
    this.#tally = { bytes: this.pending };
  }

  /** Resolves once everything queued so far is written (or writing failed). */
  async drained(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  async #writeAll() {
    // Yield once, so that all the lines queued by the code running now share the first write.
    await Promise.resolve();
    try {
      while (this.#queued > 0) {
        const chunk = this.#chunks[0];
        const { bytes, start, end } = chunk;
        if (start === end) { // written out, and lines went on in the next chunk
          giveChunk(this.#chunks.shift()!.bytes);
          continue;
        }
        // Lines queued meanwhile go after `end`: the bytes being written never change.
        chunk.start = end;
        this.#queued -= end - start;
        this.#inFlight = end - start;
        for (let done = start; done < end;) {
          const written = await this.#conn.write(bytes.subarray(done, end));
          done += written;
          this.#inFlight -= written;
          this.#tally.bytes -= written;
          this.#progressAt = performance.now();
        }
        // Written out with nothing after it: fill it again from the start.
        if (chunk.start === chunk.end && this.#chunks.length === 1) chunk.start = chunk.end = 0;
      }
    } catch (error) {
      this.#tally.bytes -= this.#inFlight;
      this.#inFlight = 0;
      this.clear();
      this.#onError(error);
    } finally {
      this.#inFlight = 0;
      this.#writing = null;
      // Nothing waits: an idle outbox holds no buffer.
      if (this.#queued === 0) {
        for (const chunk of this.#chunks.splice(0)) giveChunk(chunk.bytes);
      }
    }
  }
}

function takeChunk(size: number): Uint8Array {
  // A long line gets a chunk of its own.
  if (size > WRITE_SIZE) return releasableBytes(size);
  return spares.pop() ?? releasableBytes(WRITE_SIZE);
}

// Only for a chunk no write is using (a write under way keeps its chunk until it is done).
function giveChunk(bytes: Uint8Array) {
  if (bytes.length === WRITE_SIZE && spares.length < SPARE_CHUNKS) spares.push(bytes);
  else release(bytes);
}

// ---------------------------------------------------------------------------------------------
// Small things both sides need

/**
 * True for the errors that just mean the other side, the network (a keepalive that timed out)
 * or our own close ended the connection. Any other socket error ends the connection as well,
 * but is worth a line in the log.
 */
export function isConnectionError(error: unknown): boolean {
  return error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.TimedOut ||
    error instanceof Deno.errors.NetworkUnreachable ||
    error instanceof Deno.errors.BadResource ||
    error instanceof Deno.errors.Interrupted;
}

// When accepting fails (out of file descriptors, say), wait this long before trying again,
// doubling up to the max, as Go's net/http does: the listener stays ready, so no wait would spin.
const ACCEPT_BACKOFF_MS = 5;
const MAX_ACCEPT_BACKOFF_MS = 1000;

/**
 * Accepts connections on `listener` and hands each to `onConn` until `stop` is aborted (abort it
 * before closing the listener). When accepting fails, the clients already in are served, new ones
 * wait in the backlog, and `warn` gets one line each for giving up (`<tag> Cannot accept
 * connections: ...; retrying`) and for accepting again, however many retries come between.
 * Shared by the broker and the peer's TCP server.
 */
export async function acceptLoop(
  listener: Deno.TcpListener,
  options: { tag: string; warn: (line: string) => void; stop: AbortSignal },
  onConn: (conn: Deno.TcpConn) => void,
): Promise<void> {
  const { tag, warn, stop } = options;
  let backoff = 0;
  while (!stop.aborted) {
    let conn: Deno.TcpConn;
    try {
      conn = await listener.accept();
    } catch (error) {
      if (stop.aborted) break; // the listener was closed
      if (backoff === 0) warn(`${tag} Cannot accept connections: ${describe(error)}; retrying`);
      backoff = Math.min(Math.max(backoff * 2, ACCEPT_BACKOFF_MS), MAX_ACCEPT_BACKOFF_MS);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(wake, backoff);
        stop.addEventListener("abort", wake, { once: true });
        function wake() {
          clearTimeout(timer);
          stop.removeEventListener("abort", wake);
          resolve();
        }
      });
      continue;
    }
    if (backoff > 0) warn(`${tag} Accepting connections again`);
    backoff = 0;
    if (stop.aborted) {
      conn.close();
      break;
    }
    onConn(conn);
  }
}

/** Resolves when `promise` settles or after `ms`, whichever comes first, leaving no timer. */
export async function within(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  try {
    await Promise.race([promise.catch(() => {}), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** `value` quoted for an error message, shortened so a client never gets a huge echo. */
export function quote(value: string): string {
  return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
}

/** Splits `host:port` (or `[v6]:port`); throws a TypeError naming the address when malformed. */
export function parseAddress(address: string): { hostname: string; port: number } {
  const colon = address.lastIndexOf(":");
  const hostname = address.slice(0, colon).replace(/^\[(.*)\]$/, "$1");
  const portText = address.slice(colon + 1);
  const port = Number(portText);
  if (colon < 1 || !hostname || !/^\d+$/.test(portText) || port < 1 || port > 65535) {
    throw new TypeError(
      `Invalid address ${quote(address)}: expected host:port, e.g. localhost:5555`,
    );
  }
  return { hostname, port };
}

// ---------------------------------------------------------------------------------------------
// NATS addresses and subjects (here, so that checking them never loads the NATS client)

/** True when `address` names NATS servers (`nats://...`) rather than one of our brokers. */
export function isNatsAddress(address: string): boolean {
  return /^nats:\/\//i.test(address);
}

/**
 * The servers of `nats://host:port[,nats://host:port...]` (the port defaults to 4222); throws a
 * TypeError naming the address when one is malformed.
 */
export function parseNatsAddress(address: string): string[] {
  const servers = address.split(",").map((server) => server.trim());
  for (const server of servers) {
    const url = URL.parse(server);
    const port = url?.port === "" ? 4222 : Number(url?.port);
    if (
      !url || url.protocol !== "nats:" || url.hostname === "" || !(port >= 1 && port <= 65535) ||
      !["", "/"].includes(url.pathname) || url.search !== "" || url.hash !== ""
    ) {
      throw new TypeError(
        `Invalid NATS address ${
          quote(server)
        }: expected nats://host:port, e.g. nats://localhost:4222`,
      );
    }
  }
  return servers;
}

/**
 * True when `topic` is a valid topic and also a NATS subject: its `.`-separated tokens are not
 * empty (`a..b`, `.a` and `a.` are topics of our broker, but not subjects).
 */
export function isNatsSubject(topic: string): boolean {
  return isValidTopic(topic) && !topic.split(".").includes("");
}

/**
 * The waits between a client's reconnection attempts: min * 2^failures, capped, with "equal
 * jitter" (half fixed, half random), so that many clients cut off by one broker restart do not
 * all come back at the same instant. {@link BackOff.wake} ends a wait at once (on close).
 */
export class BackOff {
  #wake: (() => void) | null = null;

  constructor(readonly minMs = 100, readonly maxMs = 5000) {}

  /** Waits the time for the attempt after `failures` failures in a row. */
  async wait(failures: number): Promise<void> {
    const delay = Math.min(this.maxMs, this.minMs * 2 ** Math.min(failures, 20));
    const wait = delay / 2 + Math.random() * delay / 2;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
      timer = setTimeout(resolve, wait);
    });
    clearTimeout(timer);
    this.#wake = null;
  }

  /** Ends the wait in progress, if any. */
  wake(): void {
    this.#wake?.();
  }
}
