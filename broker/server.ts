/**
 * The broker's side of the protocol (broker.ts re-exports {@link startBroker} and its types): the
 * listener, the topics and their subscribers, and one {@link Session} per client connection. A
 * subscriber that stops reading is cut off instead of slowing anyone else; idle clients are
 * pinged and dropped when they stay silent. Everything a client can make the broker hold is
 * capped: connections (in all, and per address), subscriptions per connection, output waiting
 * per connection and in all, and the time a line may take to arrive.
 * @module
 */
import { describe } from "../common/cli.ts";
import { addressKey, ConnectionCounts, defaultMaxPerAddress } from "../common/connection_counts.ts";
import { LineBuffer } from "../common/lines.ts";
import {
  acceptLoop,
  DEFAULT_PORT,
  isConnectionError,
  isValidTopic,
  LAST_WORDS_MS,
  LineEncoder,
  MAX_LINE,
  MAX_PENDING,
  Outbox,
  quote,
  READ_SIZE,
  releasableBytes,
  release,
  type Tally,
  TOO_MANY_SUBSCRIPTIONS,
  within,
} from "./wire.ts";

/** How often idle clients are pinged unless told otherwise (NATS's: a line every 2 minutes). */
export const PING_INTERVAL_MS = 120_000;
/** The most connections at once unless told otherwise. */
export const MAX_CONNECTIONS = 1024;
/** The most subscriptions one connection may hold unless told otherwise. */
export const MAX_SUBSCRIPTIONS = 100;
/**
 * The most output waiting for all clients together unless told otherwise, in bytes: twice what
 * one full-length line sent to `MAX_CONNECTIONS` subscribers queues at once.
 */
export const MAX_QUEUED = 128 * 1024 * 1024;
/** How long a line may take from its first byte to its newline unless told otherwise. */
export const LINE_TIMEOUT_MS = 10_000;
/** How long output may wait with nothing written unless told otherwise (NATS's write deadline). */
export const WRITE_TIMEOUT_MS = 10_000;
const MISSED_PINGS = 2;
// On shutdown the last words get less time, so the broker exits well within a second.
const SHUTDOWN_GRACE_MS = 400;
// A session's read buffer starts this small and grows (to READ_SIZE) only for a client that
// fills it: most clients send a line now and then, and an idle connection should cost little.
const FIRST_READ_SIZE = 4096;
// A refused connection is told why, then given this long to read it and hang up before it is
// closed (closing with its bytes unread would reset it, and the reason could be lost).
const REFUSAL_LINGER_MS = 1000;
// At most this many refused connections linger so at once; past it they are closed as soon as
// they are told, so a flood of connections cannot hold many descriptors this way.
const MAX_LINGERING = 16;
const encoder = new TextEncoder();

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
  /** Most connections at once; past it a new one gets `ERR:too many connections`. @default 1024 */
  maxConnections?: number;
  /**
   * Most connections from one address (an IPv6 /64 counts as one address); past it a new one
   * gets `ERR:too many connections from your address`. @default a quarter of maxConnections
   */
  maxConnectionsPerAddress?: number;
  /** Most subscriptions one connection may hold; past it `SUB:` gets an `ERR:`. @default 100 */
  maxSubscriptions?: number;
  /**
   * Most output waiting for all clients together, in bytes; past it the clients with the most
   * waiting are cut off (`ERR:slow consumer`) until it is back under. @default 128 MiB
   */
  maxQueued?: number;
  /**
   * How long a line may take from its first byte to its newline, in ms; past it the client gets
   * `ERR:line timeout` and is closed. @default 10000
   */
  lineTimeoutMs?: number;
  /**
   * How long output may wait for a client with nothing written, in ms; past it the client is
   * cut off (`ERR:slow consumer`). @default 10000
   */
  writeTimeoutMs?: number;
  /** Receives one line per connection, subscription and cut-off (the CLI's `--verbose`). */
  log?: (line: string) => void;
  /**
   * Called with each message a client publishes (after the broker has fanned it out), such as
   * to bridge it to NATS. Messages given to {@link Broker.deliver} do not come here.
   */
  onPublish?: (topic: string, message: string) => void;
  /**
   * Receives one line per failure that is not a client leaving: a connection ended by a socket
   * error other than the usual ones (that connection only), or accepting that fails (the broker
   * keeps trying). @default console.error
   */
  warn?: (line: string) => void;
}

/** What a broker holds right now ({@link Broker.stats}), for tests and monitoring. */
export interface BrokerStats {
  connections: number;
  subscriptions: number;
  topics: number;
  /** Clients cut off so far for not reading (over a limit of waiting output, or stalled). */
  slowConsumers: number;
  /** Output waiting for the clients now, in bytes. */
  queued: number;
  /** Connections refused so far at the connection limits. */
  refused: number;
}

/** A running broker. */
export interface Broker extends AsyncDisposable {
  /** The port it listens on (the real one when started on port 0). */
  readonly port: number;
  stats(): BrokerStats;
  /**
   * Sends `message` to this broker's subscribers of `topic` as if a client had published it,
   * without passing it to `onPublish` (a bridge delivers what it received this way).
   */
  deliver(topic: string, message: string): void;
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
  readonly maxConnections: number;
  readonly maxConnectionsPerAddress: number;
  readonly maxSubscriptions: number;
  readonly maxQueued: number;
  readonly lineTimeoutMs: number;
  readonly writeTimeoutMs: number;
  readonly log: (line: string) => void;
  readonly warn: (line: string) => void;
  readonly #onPublish: ((topic: string, message: string) => void) | undefined;
  /** Output waiting for every session together. */
  readonly output: Tally = { bytes: 0 };
  readonly #listener: Deno.TcpListener;
  readonly #sessions = new Set<Session>();
  readonly #counts: ConnectionCounts;
  readonly #topics = new Map<string, Set<Session>>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #encoder = new LineEncoder();
  readonly #pinger: ReturnType<typeof setInterval>;
  readonly #sweeper: ReturnType<typeof setInterval>;
  #slowConsumers = 0;
  #refused = 0;
  readonly #lingering = new Set<Deno.TcpConn>();
  #closing: Promise<void> | null = null;
  readonly #stopAccepting = new AbortController();

  constructor(options: BrokerOptions) {
    this.maxLine = options.maxLine ?? MAX_LINE;
    this.maxPending = options.maxPending ?? MAX_PENDING;
    this.maxConnections = options.maxConnections ?? MAX_CONNECTIONS;
    this.maxConnectionsPerAddress = options.maxConnectionsPerAddress ??
      defaultMaxPerAddress(this.maxConnections);
    this.#counts = new ConnectionCounts(this.maxConnections, this.maxConnectionsPerAddress);
    this.maxSubscriptions = options.maxSubscriptions ?? MAX_SUBSCRIPTIONS;
    this.maxQueued = options.maxQueued ?? MAX_QUEUED;
    this.lineTimeoutMs = options.lineTimeoutMs ?? LINE_TIMEOUT_MS;
    this.writeTimeoutMs = options.writeTimeoutMs ?? WRITE_TIMEOUT_MS;
    this.log = options.log ?? (() => {});
    this.warn = options.warn ?? ((line) => console.error(line));
    this.#onPublish = options.onPublish;
    this.#listener = Deno.listen({
      hostname: options.hostname ?? "0.0.0.0",
      port: options.port ?? DEFAULT_PORT,
    });
    this.port = this.#listener.addr.port;
    this.#pinger = setInterval(() => this.#pingIdle(), options.pingIntervalMs ?? PING_INTERVAL_MS);
    // The deadlines are checked a few times per timeout, and at least once a second.
    const sweepMs = Math.max(5, Math.min(1000, this.lineTimeoutMs / 4, this.writeTimeoutMs / 4));
    this.#sweeper = setInterval(() => this.#sweep(), sweepMs);
    this.#track(
      acceptLoop(
        this.#listener,
        { tag: "[BROKER]", warn: this.warn, stop: this.#stopAccepting.signal },
        (conn) => this.#serve(conn),
      ),
    );
  }

  stats(): BrokerStats {
    let subscriptions = 0;
    for (const session of this.#sessions) subscriptions += session.topics.size;
    return {
      connections: this.#sessions.size,
      subscriptions,
      topics: this.#topics.size,
      slowConsumers: this.#slowConsumers,
      queued: this.output.bytes,
      refused: this.#refused,
    };
  }

  deliver(topic: string, message: string): void {
    const subscribers = this.#topics.get(topic);
    if (!subscribers) return;
    const line = this.#encoder.encode(`${topic}:${message}`, "MSG:");
    for (const subscriber of subscribers) subscriber.sendBytes(line);
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearInterval(this.#pinger);
      clearInterval(this.#sweeper);
      this.#stopAccepting.abort();
      this.#listener.close();
      for (const conn of this.#lingering) closeQuietly(conn);
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
      const subscribers = this.#topics.get(topic);
      if (subscribers) {
        // The message is `MSG:` followed by the same topic and text, encoded once for everyone.
        const message = this.#encoder.encode(rest, "MSG:");
        for (const subscriber of subscribers) subscriber.sendBytes(message);
      }
      this.#onPublish?.(topic, rest.slice(split + 1));
      return;
    }
    if (verb !== "SUB" && verb !== "UNSUB") {
      return session.send(`ERR:unknown command ${quote(verb)}`);
    }
    if (!rest) return session.send(`ERR:${verb} needs a topic: ${verb}:<topic>`);
    if (!isValidTopic(rest)) return session.send(`ERR:invalid topic ${quote(rest)}`);
    if (verb === "SUB") {
      if (!session.topics.has(rest) && session.topics.size >= this.maxSubscriptions) {
        this.log(`[BROKER] Refused ${session.name} a subscription to '${rest}': at the limit`);
        return session.send(`ERR:${TOO_MANY_SUBSCRIPTIONS}`);
      }
      this.#subscribe(session, rest);
    } else this.#unsubscribe(session, rest);
    session.send(`OK:${verb}:${rest}`);
  }

  /**
   * Called when the output waiting for all sessions passed `maxQueued`: cuts off the sessions
   * with the most waiting until it is back under.
   */
  shed(): void {
    while (this.output.bytes > this.maxQueued) {
      let most: Session | undefined;
      for (const session of this.#sessions) {
        if (!session.ending && session.pending > (most?.pending ?? 0)) most = session;
      }
      if (!most) return;
      most.cutOff("over --max-queued in all");
    }
  }

  /** Drops the subscriptions of a client that is going away, so publishing skips it. */
  forget(session: Session): void {
    for (const topic of session.topics) this.#unsubscribe(session, topic);
  }

  slowConsumer(session: Session, why: string): void {
    this.#slowConsumers++;
    this.log(`[BROKER] Cut off ${session.name}: slow consumer (${why})`);
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

  #serve(conn: Deno.TcpConn) {
    const address = addressKey(conn.remoteAddr.hostname);
    const full = this.#counts.admit(address);
    if (full === "server") return this.#refuse(conn, "too many connections");
    if (full === "address") return this.#refuse(conn, "too many connections from your address");
    try {
      conn.setNoDelay(true); // the outbox already batches; Nagle would only add delay
    } catch {
      this.#counts.release(address);
      conn.close(); // it failed as it arrived: gone already
      return;
    }
    const session = new Session(this, conn);
    this.#sessions.add(session);
    this.log(`[BROKER] Connected ${session.name}`);
    this.#track(
      session.run().finally(() => {
        this.#sessions.delete(session);
        this.#counts.release(address);
        this.log(`[BROKER] Disconnected ${session.name}`);
      }),
    );
  }

  /** Tells a connection past a limit why with one `ERR:` line, and closes it. */
  #refuse(conn: Deno.TcpConn, reason: string) {
    this.#refused++;
    const name = `${conn.remoteAddr.hostname}:${conn.remoteAddr.port}`;
    this.log(`[BROKER] Refused ${name}: ${reason}`);
    // A new socket's send buffer is empty: this write does not wait for the client.
    const told = within(conn.write(encoder.encode(`ERR:${reason}\n`)), REFUSAL_LINGER_MS);
    if (this.#lingering.size >= MAX_LINGERING || this.#closing) {
      this.#track(told.finally(() => closeQuietly(conn)));
      return;
    }
    this.#lingering.add(conn);
    this.#track((async () => {
      try {
        await told;
        conn.closeWrite(); // the reason, then the end: the client may hang up as it reads it
        await within(drain(conn), REFUSAL_LINGER_MS);
      } catch (error) {
        if (!isConnectionError(error)) this.warn(`[BROKER] Refusing ${name}: ${describe(error)}`);
      } finally {
        this.#lingering.delete(conn);
        closeQuietly(conn);
      }
    })());
  }

  #pingIdle() {
    for (const session of this.#sessions) session.tick();
  }

  #sweep() {
    const now = performance.now();
    for (const session of this.#sessions) session.checkDeadlines(now);
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
  // When the line still incomplete began to arrive (performance.now()); 0 when none is.
  #lineStartedAt = 0;
  #ending: Promise<void> | null = null;
  #closed = false;

  constructor(broker: BrokerServer, conn: Deno.TcpConn) {
    this.#broker = broker;
    this.#conn = conn;
    this.name = `${conn.remoteAddr.hostname}:${conn.remoteAddr.port}`;
    this.#lines = new LineBuffer(broker.maxLine);
    this.#outbox = new Outbox(conn, {
      limit: broker.maxPending,
      onError: () => this.end(),
      tally: broker.output,
    });
  }

  /** True once the connection is being ended. */
  get ending(): boolean {
    return this.#ending !== null;
  }

  /** Output waiting for this client, in bytes. */
  get pending(): number {
    return this.#outbox.pending;
  }

  /** Reads and runs lines until the client goes (or is sent away). */
  async run(): Promise<void> {
    const buffer = releasableBytes(FIRST_READ_SIZE, READ_SIZE);
    try {
      while (!this.#ending) {
        const count = await this.#conn.read(buffer);
        if (count === null) break;
        this.#heard = true;
        this.#lines.push(buffer.subarray(0, count));
        let complete = false;
        for (let line; !this.#ending && (line = this.#lines.shift()) !== undefined;) {
          complete = true;
          this.#broker.handle(this, line);
        }
        if (this.#lines.overflow) await this.end("line too long");
        // The deadline runs from the first byte of a line: a client sending a line a byte at a
        // time is heard from all the while, but never finishes.
        if (this.#lines.buffered === 0) this.#lineStartedAt = 0;
        else if (complete || this.#lineStartedAt === 0) this.#lineStartedAt = performance.now();
        if (count === buffer.length && buffer.length < READ_SIZE) {
          (buffer.buffer as ArrayBuffer).resize(buffer.length * 2); // a client with a lot to say
        }
      }
    } catch (error) {
      // Whatever went wrong, it ends this client's connection only.
      if (!isConnectionError(error)) {
        this.#broker.warn(`[BROKER] Dropped ${this.name}: ${describe(error)}`);
      }
    } finally {
      release(buffer); // no read is under way any more
      await this.end();
    }
  }

  /** Sends a line to this client; one that has let too much pile up is cut off instead. */
  send(line: string): void {
    if (this.#ending) return;
    if (!this.#outbox.send(line)) this.cutOff("over --max-pending");
    else if (this.#broker.output.bytes > this.#broker.maxQueued) this.#broker.shed();
  }

  /** Sends an encoded line (its `\n` included) to this client, or cuts it off, as {@link send}. */
  sendBytes(line: Uint8Array): void {
    if (this.#ending) return;
    if (!this.#outbox.sendBytes(line)) this.cutOff("over --max-pending");
    else if (this.#broker.output.bytes > this.#broker.maxQueued) this.#broker.shed();
  }

  /**
   * Called a few times per timeout: ends a connection whose line has taken too long to arrive,
   * and cuts off one whose output has waited too long with nothing written.
   */
  checkDeadlines(now: number): void {
    if (this.#ending) return;
    if (this.#lineStartedAt !== 0 && now - this.#lineStartedAt > this.#broker.lineTimeoutMs) {
      this.#broker.log(`[BROKER] Dropping ${this.name}: line not finished in time`);
      this.end("line timeout");
    } else if (this.#outbox.stalledFor(now) > this.#broker.writeTimeoutMs) {
      this.cutOff("nothing read for --write-timeout");
    }
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
      }
      // What is left is at most a write under way and the reason: no longer the broker's to
      // count against --max-queued, so that cutting a client off brings the total down at once.
      this.#outbox.detach();
      if (reason) await within(this.#outbox.drained(), LAST_WORDS_MS);
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

  /** Cuts this client off for not reading (`why` is for the log), telling it so. */
  cutOff(why: string): void {
    if (this.#ending) return;
    this.#broker.slowConsumer(this, why);
    this.end("slow consumer");
  }
}

/** Reads and drops what a client still sends, until it hangs up. */
async function drain(conn: Deno.Conn): Promise<void> {
  const buffer = new Uint8Array(1024);
  while (await conn.read(buffer) !== null);
}

/** Closes `conn`, which may be closed already. */
function closeQuietly(conn: Deno.Conn) {
  try {
    conn.close();
  } catch {
    // Closed already.
  }
}
