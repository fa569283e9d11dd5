/**
 * What the broker and its client share (broker.ts re-exports the public part): the default
 * address, the limits both sides hold to, the topic rule, `host:port` parsing, and the one writer
 * each socket has ({@link Outbox}).
 * @module
 */

/** Where the broker listens unless told otherwise. */
export const DEFAULT_PORT = 5555;
/** The address the CLIs use unless given `--broker`. */
export const DEFAULT_ADDRESS = `localhost:${DEFAULT_PORT}`;

/** The longest line either side accepts unless told otherwise, in bytes. */
export const MAX_LINE = 64 * 1024;
/** The most output that may wait for one socket unless told otherwise, in bytes. */
export const MAX_PENDING = 8 * 1024 * 1024;
/** How much one read takes from a socket. */
export const READ_SIZE = 64 * 1024;
const WRITE_SIZE = 64 * 1024;
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

/**
 * Lines wait here and go out together, up to `WRITE_SIZE` per write, so a burst of small messages
 * costs one syscall, and nothing else ever writes to the socket. What waits is bounded by `limit`,
 * counted in UTF-16 code units (what the queued strings occupy; bytes, for ASCII).
 */
export class Outbox {
  readonly #conn: Deno.Conn;
  readonly #limit: number;
  readonly #onError: (error: unknown) => void;
  // Lines and their "\n"s, as separate entries: one published string is shared by every
  // subscriber's queue instead of being copied into each. The queue starts at #head.
  #lines: string[] = [];
  #head = 0;
  #queued = 0;
  #inFlight = 0;
  #writing: Promise<void> | null = null;
  // Reused for every write, so a flood does not leave a fresh buffer per write to collect.
  #scratch = new Uint8Array(0);

  constructor(conn: Deno.Conn, limit: number, onError: (error: unknown) => void) {
    this.#conn = conn;
    this.#limit = limit;
    this.#onError = onError;
  }

  /** What waits to be written, including a write under way. */
  get pending(): number {
    return this.#queued + this.#inFlight;
  }

  /** Queues `line` (without its `\n`); false, and nothing queued, when that would pass the limit. */
  send(line: string): boolean {
    if (this.pending + line.length + 1 > this.#limit) return false;
    this.#lines.push(line, "\n");
    this.#queued += line.length + 1;
    this.#writing ??= this.#writeAll();
    return true;
  }

  /** Drops whatever has not been handed to the socket yet. */
  clear(): void {
    this.#lines = [];
    this.#head = 0;
    this.#queued = 0;
  }

  /** Resolves once everything queued so far is written (or writing failed). */
  async drained(): Promise<void> {
    while (this.#writing) await this.#writing;
  }

  async #writeAll() {
    // Yield once, so that all the lines queued by the code running now share the first write.
    await Promise.resolve();
    try {
      while (this.#head < this.#lines.length) {
        const text = this.#take();
        this.#inFlight = text.length;
        this.#queued -= text.length;
        // UTF-8 needs at most 3 bytes per UTF-16 code unit.
        if (this.#scratch.length < text.length * 3) this.#scratch = new Uint8Array(text.length * 3);
        const { written } = encoder.encodeInto(text, this.#scratch);
        const bytes = this.#scratch.subarray(0, written);
        for (let done = 0; done < bytes.length;) {
          done += await this.#conn.write(bytes.subarray(done));
        }
        this.#inFlight = 0;
      }
    } catch (error) {
      this.clear();
      this.#onError(error);
    } finally {
      this.#inFlight = 0;
      this.#writing = null;
    }
  }

  // Takes the next lines, at least one and about WRITE_SIZE code units, as one string.
  #take(): string {
    let end = this.#head;
    for (let size = 0; end < this.#lines.length && (size === 0 || size < WRITE_SIZE); end++) {
      size += this.#lines[end].length;
    }
    const text = this.#lines.slice(this.#head, end).join("");
    this.#head = end;
    if (this.#head === this.#lines.length) {
      this.#lines = [];
      this.#head = 0;
    } else if (this.#head > 4096 && this.#head * 2 > this.#lines.length) {
      this.#lines = this.#lines.slice(this.#head); // keep the array from growing without end
      this.#head = 0;
    }
    return text;
  }
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

/** An error in a few plain words: `connection refused` rather than the OS message. */
export function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (error instanceof Deno.errors.TimedOut) return "timed out";
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset";
  const message = error instanceof Error ? error.message : String(error);
  return message.replace(/ \(os error \d+\)$/, "").replace(/^./, (c) => c.toLowerCase());
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
