#!/usr/bin/env -S deno run --allow-net
/**
 * The pub/sub broker and its client. The broker speaks a line protocol over TCP (DESIGN.md,
 * "Broker protocol"): `SUB:<topic>`, `UNSUB:<topic>`, `PUB:<topic>:<message>` and `PING`; every
 * subscriber of a topic gets `MSG:<topic>:<message>`. A subscriber that stops reading is cut off
 * instead of slowing anyone else. The client ({@link connect}) reconnects by itself and restores
 * its subscriptions.
 *
 * Usage: `deno run broker.ts [--port 5555] [--max-pending BYTES] [--max-line BYTES]`
 * @module
 */
import { parseArgs } from "node:util";
import { userMessage } from "./_cli.ts";
import { LineBuffer } from "./_lines.ts";
import { isValidName } from "./split.ts";

/** Where the broker listens unless told otherwise. */
export const DEFAULT_PORT = 5555;
/** The address the CLIs use unless given `--broker`. */
export const DEFAULT_ADDRESS = `localhost:${DEFAULT_PORT}`;
/** The topic on which peers announce the fragments they hold. */
export const ANNOUNCE_TOPIC = "fragmentos";

const MAX_LINE = 64 * 1024;
const MAX_PENDING = 8 * 1024 * 1024;
const PING_INTERVAL_MS = 120_000; // NATS's default: idle clients cost one line every 2 minutes
const MISSED_PINGS = 2;
const READ_SIZE = 64 * 1024;
const WRITE_SIZE = 64 * 1024;
// How long a client that is cut off keeps its socket, so that it may still read why (`ERR:slow
// consumer`) if it resumes reading; the broker has already stopped delivering to it.
const LAST_WORDS_MS = 2000;
// On shutdown the last words get less time, so the broker exits well within a second.
const SHUTDOWN_GRACE_MS = 400;
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
class Outbox {
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

/** True for the errors that just mean the other side (or our own close) ended the connection. */
function isConnectionError(error: unknown): boolean {
  return error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.ConnectionAborted ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.NotConnected ||
    error instanceof Deno.errors.BadResource ||
    error instanceof Deno.errors.Interrupted;
}

/** Resolves when `promise` settles or after `ms`, whichever comes first, leaving no timer. */
async function within(promise: Promise<unknown>, ms: number): Promise<void> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<void>((resolve) => timer = setTimeout(resolve, ms));
  try {
    await Promise.race([promise.catch(() => {}), timeout]);
  } finally {
    clearTimeout(timer);
  }
}

/** `value` quoted for an error message, shortened so a client never gets a huge echo. */
function quote(value: string): string {
  return JSON.stringify(value.length > 40 ? `${value.slice(0, 40)}...` : value);
}

// ---------------------------------------------------------------------------------------------
// The broker

/** Options for {@link startBroker}. */
export interface BrokerOptions {
  /** Port 0 picks a free port; read it back from {@link Broker.port}. @default 5555 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /** Longest line a client may send, in bytes. @default 65536 */
  maxLine?: number;
  /** Output a subscriber may leave unread before it is cut off, in bytes. @default 8 MiB */
  maxPending?: number;
  /** How often idle clients are pinged; two missed `PONG`s drop them. @default 120000 */
  pingIntervalMs?: number;
  /** Receives one line per connection, subscription and cut-off (the CLI's `--verbose`). */
  log?: (line: string) => void;
}

/** What a broker holds right now, for tests and `--verbose`. */
export interface BrokerStats {
  connections: number;
  subscriptions: number;
  topics: number;
  /** Subscribers cut off so far for not reading. */
  slowConsumers: number;
}

/** A running broker. */
export interface Broker extends AsyncDisposable {
  /** The port it listens on (the real one when started on port 0). */
  readonly port: number;
  stats(): BrokerStats;
  /** Stops accepting, tells every client `ERR:shutting down`, and closes them (under 1 s). */
  close(): Promise<void>;
}

/**
 * Starts a broker; the handle closes it.
 * @example
 * await using broker = startBroker({ port: 0 });
 * await using client = await connect(`localhost:${broker.port}`);
 */
export function startBroker(options: BrokerOptions = {}): Broker {
  return new BrokerServer(options);
}

class BrokerServer implements Broker {
  readonly port: number;
  readonly maxLine: number;
  readonly maxPending: number;
  readonly log: (line: string) => void;
  readonly #listener: Deno.TcpListener;
  readonly #sessions = new Set<Session>();
  readonly #topics = new Map<string, Set<Session>>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #pinger: ReturnType<typeof setInterval>;
  #slowConsumers = 0;
  #closing: Promise<void> | null = null;

  constructor(options: BrokerOptions) {
    this.maxLine = options.maxLine ?? MAX_LINE;
    this.maxPending = options.maxPending ?? MAX_PENDING;
    this.log = options.log ?? (() => {});
    this.#listener = Deno.listen({
      hostname: options.hostname ?? "0.0.0.0",
      port: options.port ?? DEFAULT_PORT,
    });
    this.port = this.#listener.addr.port;
    this.#pinger = setInterval(() => this.#pingIdle(), options.pingIntervalMs ?? PING_INTERVAL_MS);
    this.#track(this.#accept());
  }

  stats(): BrokerStats {
    let subscriptions = 0;
    for (const session of this.#sessions) subscriptions += session.topics.size;
    return {
      connections: this.#sessions.size,
      subscriptions,
      topics: this.#topics.size,
      slowConsumers: this.#slowConsumers,
    };
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearInterval(this.#pinger);
      this.#listener.close();
      const sessions = [...this.#sessions];
      const ends = sessions.map((session) => session.end("shutting down"));
      await within(Promise.all(ends), SHUTDOWN_GRACE_MS);
      for (const session of sessions) session.abort();
      while (this.#tasks.size > 0) await Promise.all(this.#tasks);
    })();
    return this.#closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  /** Runs one client's line. Replies go through the client's own outbox, never awaited. */
  handle(session: Session, line: string): void {
    if (line === "PING") return session.send("PONG");
    if (line === "PONG") return; // the answer to our idle ping; reading it was the point
    if (line === "") return session.send("ERR:empty line");
    if (line.includes("\0")) return session.send("ERR:NUL byte in line");
    const colon = line.indexOf(":");
    const verb = colon === -1 ? line : line.slice(0, colon);
    const rest = colon === -1 ? undefined : line.slice(colon + 1);
    if (verb === "PUB") {
      const split = rest?.indexOf(":") ?? -1;
      if (rest === undefined || split === -1) {
        return session.send("ERR:PUB needs a topic and a message: PUB:<topic>:<message>");
      }
      const topic = rest.slice(0, split);
      if (!isValidTopic(topic)) return session.send(`ERR:invalid topic ${quote(topic)}`);
      // The message is `MSG:` followed by the same topic and text: one string for everyone.
      const message = `MSG:${rest}`;
      for (const subscriber of this.#topics.get(topic) ?? []) subscriber.send(message);
      return;
    }
    if (verb !== "SUB" && verb !== "UNSUB") {
      return session.send(`ERR:unknown command ${quote(verb)}`);
    }
    if (!rest) return session.send(`ERR:${verb} needs a topic: ${verb}:<topic>`);
    if (!isValidTopic(rest)) return session.send(`ERR:invalid topic ${quote(rest)}`);
    if (verb === "SUB") this.#subscribe(session, rest);
    else this.#unsubscribe(session, rest);
    session.send(`OK:${verb}:${rest}`);
  }

  /** Drops the subscriptions of a client that is going away, so publishing skips it. */
  forget(session: Session): void {
    for (const topic of session.topics) this.#unsubscribe(session, topic);
  }

  slowConsumer(session: Session): void {
    this.#slowConsumers++;
    this.log(`[BROKER] Cut off ${session.name}: slow consumer`);
  }

  #subscribe(session: Session, topic: string) {
    if (session.topics.has(topic)) return;
    session.topics.add(topic);
    let subscribers = this.#topics.get(topic);
    if (!subscribers) this.#topics.set(topic, subscribers = new Set());
    subscribers.add(session);
    this.log(`[BROKER] ${session.name} subscribed to '${topic}'`);
  }

  #unsubscribe(session: Session, topic: string) {
    if (!session.topics.delete(topic)) return;
    const subscribers = this.#topics.get(topic)!;
    subscribers.delete(session);
    if (subscribers.size === 0) this.#topics.delete(topic);
    this.log(`[BROKER] ${session.name} unsubscribed from '${topic}'`);
  }

  async #accept() {
    // The iterator ends quietly when close() closes the listener.
    for await (const conn of this.#listener) {
      if (this.#closing) {
        conn.close();
        continue;
      }
      conn.setNoDelay(true); // the outbox already batches; Nagle would only add delay
      const session = new Session(this, conn);
      this.#sessions.add(session);
      this.log(`[BROKER] Connected ${session.name}`);
      this.#track(
        session.run().finally(() => {
          this.#sessions.delete(session);
          this.log(`[BROKER] Disconnected ${session.name}`);
        }),
      );
    }
  }

  #pingIdle() {
    for (const session of this.#sessions) session.tick();
  }

  #track(task: Promise<void>) {
    this.#tasks.add(task);
    task.finally(() => this.#tasks.delete(task));
  }
}

/** The broker's side of one client connection. */
class Session {
  readonly name: string;
  readonly topics = new Set<string>();
  readonly #broker: BrokerServer;
  readonly #conn: Deno.TcpConn;
  readonly #outbox: Outbox;
  readonly #lines: LineBuffer;
  #heard = true;
  #unanswered = 0;
  #ending: Promise<void> | null = null;
  #closed = false;

  constructor(broker: BrokerServer, conn: Deno.TcpConn) {
    this.#broker = broker;
    this.#conn = conn;
    this.name = `${conn.remoteAddr.hostname}:${conn.remoteAddr.port}`;
    this.#lines = new LineBuffer(broker.maxLine);
    this.#outbox = new Outbox(conn, broker.maxPending, () => this.end());
  }

  /** Reads and runs lines until the client goes (or is sent away). */
  async run(): Promise<void> {
    const buffer = new Uint8Array(READ_SIZE);
    try {
      while (!this.#ending) {
        const count = await this.#conn.read(buffer);
        if (count === null) break;
        this.#heard = true;
        this.#lines.push(buffer.subarray(0, count));
        for (let line; !this.#ending && (line = this.#lines.shift()) !== undefined;) {
          this.#broker.handle(this, line);
        }
        if (this.#lines.overflow) await this.end("line too long");
      }
    } catch (error) {
      if (!isConnectionError(error)) throw error;
    } finally {
      await this.end();
    }
  }

  /** Sends a line to this client; one that has let too much pile up is cut off instead. */
  send(line: string): void {
    if (!this.#ending && !this.#outbox.send(line)) this.#cutOff();
  }

  /** Called every ping interval: pings a client that said nothing, drops one that stays silent. */
  tick(): void {
    if (this.#heard) {
      this.#heard = false;
      this.#unanswered = 0;
    } else if (this.#unanswered >= MISSED_PINGS) {
      this.#broker.log(`[BROKER] Dropping ${this.name}: no answer to ${MISSED_PINGS} pings`);
      this.end();
    } else {
      this.#unanswered++;
      this.send("PING");
    }
  }

  /**
   * Ends the connection once: stops delivering to it, tries for a while to tell it
   * `ERR:<reason>`, then closes the socket.
   */
  end(reason?: string): Promise<void> {
    this.#ending ??= (async () => {
      this.#broker.forget(this);
      if (reason) {
        this.#outbox.clear();
        this.#outbox.send(`ERR:${reason}`);
        await within(this.#outbox.drained(), LAST_WORDS_MS);
      }
      this.abort();
    })();
    return this.#ending;
  }

  /** Closes the socket now, whatever is still unsent. */
  abort(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#conn.close();
  }

  #cutOff() {
    this.#broker.slowConsumer(this);
    this.end("slow consumer");
  }
}

// ---------------------------------------------------------------------------------------------
// The client

/** A message as a subscriber receives it. */
export interface Message {
  topic: string;
  message: string;
}

/** One subscription: iterate it for messages; it ends when unsubscribed or the client closes. */
export interface Subscription extends AsyncIterable<Message>, AsyncDisposable {
  readonly topic: string;
  /** Stops the messages (and the iteration). */
  unsubscribe(): Promise<void>;
}

/** Options for {@link connect}. */
export interface ClientOptions {
  /**
   * When the broker is down at first, resolve anyway and keep trying in the background (a peer
   * works without the broker) instead of rejecting. @default false
   */
  waitForBroker?: boolean;
  /** First reconnection delay; it doubles up to `maxBackoffMs`, with jitter. @default 100 */
  minBackoffMs?: number;
  /** @default 5000 */
  maxBackoffMs?: number;
  /** Longest line accepted from the broker, in bytes. @default 65536 */
  maxLine?: number;
  /**
   * Most output that may wait for the broker, and most publications held while it is down (sent
   * once it is back, as NATS clients do); past it publishing drops. @default 8 MiB
   */
  maxPending?: number;
  /** Called when the connection is lost (or the first attempt failed, with `waitForBroker`). */
  onDisconnect?: (error: Error) => void;
  /** Called when connected again, once the subscriptions are restored. */
  onReconnect?: () => void;
  /** Called with the reason of each `ERR:` line the broker sends. */
  onError?: (reason: string) => void;
}

/**
 * Connects to a broker at `host:port`. Rejects with a {@link BrokerError} when it cannot be
 * reached (unless `waitForBroker`); after that it reconnects by itself.
 * @example
 * await using client = await connect("localhost:5555");
 * client.publish("fragmentos", "fragment_5.bin");
 * await client.flush();
 */
export async function connect(address: string, options: ClientOptions = {}): Promise<BrokerClient> {
  const client = new BrokerClient(address, options);
  await client.ready;
  return client;
}

/** A broker connection that comes back by itself. Make one with {@link connect}. */
export class BrokerClient implements AsyncDisposable {
  /** The `host:port` it connects to. */
  readonly address: string;
  /** Settles after the first attempt to connect; {@link connect} awaits it. */
  readonly ready: Promise<void>;
  readonly #hostname: string;
  readonly #port: number;
  readonly #options: ClientOptions;
  readonly #topics = new Map<string, Set<Inbox>>();
  #conn: Deno.TcpConn | null = null;
  #outbox: Outbox | null = null;
  /** `PUB:` lines published while disconnected, and their size: sent on reconnection. */
  #held: string[] = [];
  #heldSize = 0;
  #pongs: PromiseWithResolvers<void>[] = [];
  #closed = false;
  #wake: (() => void) | null = null;
  readonly #loop: Promise<void>;

  constructor(address: string, options: ClientOptions = {}) {
    this.address = address;
    ({ hostname: this.#hostname, port: this.#port } = parseAddress(address));
    this.#options = options;
    const first = Promise.withResolvers<void>();
    this.ready = first.promise;
    this.#loop = this.#run(first);
  }

  /** True while a connection is up. */
  get isConnected(): boolean {
    return this.#outbox !== null;
  }

  /**
   * Subscribes to `topic`. Resolves once the broker has the subscription (or at once when the
   * connection is down: it is then restored on reconnection).
   */
  async subscribe(topic: string): Promise<Subscription> {
    if (!isValidTopic(topic)) throw new TypeError(`Invalid topic ${quote(topic)}`);
    if (this.#closed) throw new BrokerError("The broker client is closed");
    const inbox = new Inbox(topic, (it) => this.#unsubscribe(it));
    const inboxes = this.#topics.get(topic);
    if (inboxes) {
      inboxes.add(inbox);
      return inbox;
    }
    this.#topics.set(topic, new Set([inbox]));
    if (this.#outbox?.send(`SUB:${topic}`)) await this.flush().catch(() => {});
    return inbox;
  }

  /**
   * Publishes `message` on `topic`. While the connection is down it is held and sent once the
   * client is back; false when it was dropped instead (past `maxPending`, or the client is
   * closed): delivery is at most once. Call {@link flush} to know the broker took it.
   */
  publish(topic: string, message: string): boolean {
    if (!isValidTopic(topic)) throw new TypeError(`Invalid topic ${quote(topic)}`);
    if (/[\n\r\0]/.test(message)) {
      throw new TypeError("A message cannot hold a newline, carriage return or NUL");
    }
    const line = `PUB:${topic}:${message}`;
    if (this.#outbox) return this.#outbox.send(line);
    const limit = this.#options.maxPending ?? MAX_PENDING;
    if (this.#closed || this.#heldSize + line.length + 1 > limit) return false;
    this.#held.push(line);
    this.#heldSize += line.length + 1;
    return true;
  }

  /** Resolves when the broker has taken everything sent so far (a `PING` answered by `PONG`). */
  flush(): Promise<void> {
    if (!this.#outbox?.send("PING")) {
      return Promise.reject(new BrokerError(`Not connected to broker at "${this.address}"`));
    }
    const pong = Promise.withResolvers<void>();
    this.#pongs.push(pong);
    return pong.promise;
  }

  /** Sends what is queued (briefly), ends the subscriptions and closes the connection. */
  async close(): Promise<void> {
    if (this.#closed) return this.#loop;
    this.#closed = true;
    this.#wake?.();
    if (this.#outbox) await within(this.#outbox.drained(), LAST_WORDS_MS);
    this.#conn?.close();
    for (const inboxes of this.#topics.values()) for (const inbox of inboxes) inbox.end();
    this.#topics.clear();
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // The one connect / read / back off loop of this client.
  async #run(first: PromiseWithResolvers<void>) {
    let failures = 0;
    let everConnected = false;
    while (!this.#closed) {
      let conn: Deno.TcpConn;
      try {
        conn = await Deno.connect({ hostname: this.#hostname, port: this.#port });
      } catch (cause) {
        const error = new BrokerError(
          `Cannot connect to broker at "${this.address}": ${describe(cause)}`,
          { cause },
        );
        if (this.#closed) break;
        if (!everConnected && failures === 0) {
          if (!this.#options.waitForBroker) return first.reject(error);
          first.resolve();
          this.#options.onDisconnect?.(error);
        }
        await this.#backOff(failures++);
        continue;
      }
      if (this.#closed) {
        conn.close();
        break;
      }
      const again = everConnected || failures > 0;
      everConnected = true;
      failures = 0;
      first.resolve();
      const error = await this.#session(conn, again);
      if (!this.#closed) this.#options.onDisconnect?.(error);
    }
  }

  // Uses one connection until it ends; returns why it ended.
  async #session(conn: Deno.TcpConn, again: boolean): Promise<Error> {
    conn.setNoDelay(true);
    this.#conn = conn;
    const outbox = new Outbox(conn, this.#options.maxPending ?? MAX_PENDING, () => {
      // A failed write ends the read below as well.
      conn.close();
    });
    this.#outbox = outbox;
    const reading = this.#read(conn);
    if (this.#topics.size > 0 || again || this.#held.length > 0) {
      for (const topic of this.#topics.keys()) outbox.send(`SUB:${topic}`);
      // After the subscriptions, so this client's own subscriptions see what it held.
      for (const line of this.#held.splice(0)) outbox.send(line);
      this.#heldSize = 0;
      this.flush().then(() => again && this.#options.onReconnect?.(), () => {});
    }
    const error = await reading;
    this.#outbox = this.#conn = null;
    try {
      conn.close();
    } catch (error) {
      if (!(error instanceof Deno.errors.BadResource)) throw error;
    }
    for (const pong of this.#pongs.splice(0)) pong.reject(error);
    return error;
  }

  async #read(conn: Deno.TcpConn): Promise<Error> {
    const lines = new LineBuffer(this.#options.maxLine ?? MAX_LINE);
    const buffer = new Uint8Array(READ_SIZE);
    const lost = (why: string) =>
      new BrokerError(`Connection to broker at "${this.address}" ${why}`);
    try {
      while (true) {
        const count = await conn.read(buffer);
        if (count === null) return lost("closed");
        lines.push(buffer.subarray(0, count));
        for (let line; (line = lines.shift()) !== undefined;) this.#handle(line);
        if (lines.overflow) return lost("sent a line that is too long");
      }
    } catch (error) {
      if (!isConnectionError(error)) throw error;
      return lost(`lost: ${describe(error)}`);
    }
  }

  #handle(line: string) {
    if (line.startsWith("MSG:")) {
      const split = line.indexOf(":", 4);
      if (split === -1) return;
      const topic = line.slice(4, split);
      const message = line.slice(split + 1);
      for (const inbox of this.#topics.get(topic) ?? []) inbox.deliver({ topic, message });
    } else if (line === "PONG") {
      this.#pongs.shift()?.resolve();
    } else if (line === "PING") {
      this.#outbox?.send("PONG");
    } else if (line.startsWith("ERR:")) {
      this.#options.onError?.(line.slice(4));
    } // OK:SUB / OK:UNSUB need nothing: the PING sent after them confirms them.
  }

  async #unsubscribe(inbox: Inbox) {
    const inboxes = this.#topics.get(inbox.topic);
    if (!inboxes?.delete(inbox) || inboxes.size > 0) return;
    this.#topics.delete(inbox.topic);
    if (this.#outbox?.send(`UNSUB:${inbox.topic}`)) await this.flush().catch(() => {});
  }

  // Waits min * 2^failures, capped, with "equal jitter" (half fixed, half random), so many
  // clients cut off by one broker restart do not all come back at the same instant.
  async #backOff(failures: number) {
    const min = this.#options.minBackoffMs ?? 100;
    const max = this.#options.maxBackoffMs ?? 5000;
    const delay = Math.min(max, min * 2 ** Math.min(failures, 20));
    const wait = delay / 2 + Math.random() * delay / 2;
    let timer: ReturnType<typeof setTimeout> | undefined;
    await new Promise<void>((resolve) => {
      this.#wake = resolve;
      timer = setTimeout(resolve, wait);
    });
    clearTimeout(timer);
    this.#wake = null;
  }
}

/** Messages of one subscription, queued until the iterating code takes them. */
class Inbox implements Subscription {
  readonly topic: string;
  readonly #onUnsubscribe: (inbox: Inbox) => Promise<void>;
  #messages: Message[] = [];
  #next = 0;
  #ended = false;
  #wake: (() => void) | null = null;

  constructor(topic: string, onUnsubscribe: (inbox: Inbox) => Promise<void>) {
    this.topic = topic;
    this.#onUnsubscribe = onUnsubscribe;
  }

  deliver(message: Message) {
    if (this.#ended) return;
    this.#messages.push(message);
    this.#wake?.();
  }

  end() {
    this.#ended = true;
    this.#wake?.();
  }

  async unsubscribe(): Promise<void> {
    if (this.#ended) return;
    this.end();
    await this.#onUnsubscribe(this);
  }

  async *[Symbol.asyncIterator](): AsyncIterator<Message> {
    try {
      while (true) {
        if (this.#next < this.#messages.length) {
          const message = this.#messages[this.#next++];
          if (this.#next === this.#messages.length) this.#messages = [], this.#next = 0;
          yield message;
        } else if (this.#ended) {
          return;
        } else {
          await new Promise<void>((resolve) => this.#wake = resolve);
          this.#wake = null;
        }
      }
    } finally {
      await this.unsubscribe(); // leaving the loop early means "no more of these"
    }
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.unsubscribe();
  }
}

/** A connect error in a few plain words: `connection refused` rather than the OS message. */
function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (error instanceof Deno.errors.TimedOut) return "timed out";
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset";
  const message = error instanceof Error ? error.message : String(error);
  return message.replace(/ \(os error \d+\)$/, "").replace(/^./, (c) => c.toLowerCase());
}

// ---------------------------------------------------------------------------------------------
// Addresses and fragment announcements

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

/** A fragment announcement on topic `fragmentos`: a fragment, and maybe a peer that holds it. */
export interface Announcement {
  name: string;
  holder?: { hostname: string; port: number };
}

/** Formats an announcement: `fragment_5.bin` or `fragment_5.bin 10.0.0.7:6001`. */
export function formatAnnouncement(
  name: string,
  holder?: { hostname: string; port: number },
): string {
  if (!isValidName(name)) throw new TypeError(`Invalid fragment name ${quote(name)}`);
  if (!holder) return name;
  const host = holder.hostname.includes(":") ? `[${holder.hostname}]` : holder.hostname;
  return `${name} ${host}:${holder.port}`;
}

/** Parses an announcement; undefined when it is not one (a bad name or address). */
export function parseAnnouncement(message: string): Announcement | undefined {
  const [name, address, ...extra] = message.trim().split(/\s+/);
  if (extra.length > 0 || !isValidName(name)) return undefined;
  if (address === undefined) return { name };
  try {
    return { name, holder: parseAddress(address) };
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// The command line

const USAGE = `Usage: deno task broker [options]

A TCP pub/sub broker (protocol: SUB:<topic>, UNSUB:<topic>, PUB:<topic>:<message>, PING).

Options:
  --port PORT            port to listen on; 0 picks a free one (default ${DEFAULT_PORT})
  --hostname HOST        interface to listen on (default 0.0.0.0)
  --max-pending BYTES    unread output after which a subscriber is cut off (default ${MAX_PENDING})
  --max-line BYTES       longest line a client may send (default ${MAX_LINE})
  --ping-interval SECS   how often idle clients are pinged (default ${PING_INTERVAL_MS / 1000})
  --verbose              log connections and subscriptions on stderr
  -h, --help             show this help`;

/** Parses a positive whole number given to `--flag`, or throws a TypeError saying what is wrong. */
function positive(flag: string, text: string, { zero = false } = {}): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || (!zero && value === 0)) {
    throw new TypeError(
      `--${flag} must be a ${zero ? "" : "positive "}whole number, got ${quote(text)}`,
    );
  }
  return value;
}

function main(args = Deno.args) {
  let options: BrokerOptions;
  try {
    const { values } = parseArgs({
      args,
      options: {
        port: { type: "string", default: String(DEFAULT_PORT) },
        hostname: { type: "string", default: "0.0.0.0" },
        "max-pending": { type: "string", default: String(MAX_PENDING) },
        "max-line": { type: "string", default: String(MAX_LINE) },
        "ping-interval": { type: "string", default: String(PING_INTERVAL_MS / 1000) },
        verbose: { type: "boolean", default: false },
        help: { type: "boolean", short: "h", default: false },
      },
    });
    if (values.help) {
      console.log(USAGE);
      return;
    }
    const port = positive("port", values.port, { zero: true });
    if (port > 65535) throw new TypeError(`--port must be at most 65535, got ${port}`);
    options = {
      port,
      hostname: values.hostname,
      maxPending: positive("max-pending", values["max-pending"]),
      maxLine: positive("max-line", values["max-line"]),
      pingIntervalMs: positive("ping-interval", values["ping-interval"]) * 1000,
      log: values.verbose ? (line) => console.error(line) : undefined,
    };
  } catch (error) {
    if (!(error instanceof TypeError)) throw error;
    console.error(`error: ${userMessage(error)}`);
    Deno.exit(1);
  }

  let broker: Broker;
  try {
    broker = startBroker(options);
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) {
      console.error(`error: Port ${options.port} is already in use`);
    } else if (error instanceof Deno.errors.AddrNotAvailable) {
      console.error(
        `error: Cannot listen on "${options.hostname}": it is not an address of this machine`,
      );
    } else throw error;
    Deno.exit(1);
  }
  console.log(`[BROKER] Listening on port ${broker.port}`);

  const stop = async () => {
    Deno.removeSignalListener("SIGINT", stop);
    Deno.removeSignalListener("SIGTERM", stop);
    await broker.close();
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
}

if (import.meta.main) main();
