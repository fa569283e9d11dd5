/**
 * The broker's side of the protocol (broker.ts re-exports {@link startBroker} and its types): the
 * listener, the topics and their subscribers, and one {@link Session} per client connection. A
 * subscriber that stops reading is cut off instead of slowing anyone else; idle clients are
 * pinged and dropped when they stay silent.
 * @module
 */
import { describe } from "../common/cli.ts";
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
  within,
} from "./wire.ts";

/** How often idle clients are pinged unless told otherwise (NATS's: a line every 2 minutes). */
export const PING_INTERVAL_MS = 120_000;
const MISSED_PINGS = 2;
// On shutdown the last words get less time, so the broker exits well within a second.
const SHUTDOWN_GRACE_MS = 400;

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
  readonly warn: (line: string) => void;
  readonly #listener: Deno.TcpListener;
  readonly #sessions = new Set<Session>();
  readonly #topics = new Map<string, Set<Session>>();
  readonly #tasks = new Set<Promise<void>>();
  readonly #encoder = new LineEncoder();
  readonly #pinger: ReturnType<typeof setInterval>;
  #slowConsumers = 0;
  #closing: Promise<void> | null = null;
  readonly #stopAccepting = new AbortController();

  constructor(options: BrokerOptions) {
    this.maxLine = options.maxLine ?? MAX_LINE;
    this.maxPending = options.maxPending ?? MAX_PENDING;
    this.log = options.log ?? (() => {});
    this.warn = options.warn ?? ((line) => console.error(line));
    this.#listener = Deno.listen({
      hostname: options.hostname ?? "0.0.0.0",
      port: options.port ?? DEFAULT_PORT,
    });
    this.port = this.#listener.addr.port;
    this.#pinger = setInterval(() => this.#pingIdle(), options.pingIntervalMs ?? PING_INTERVAL_MS);
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
    };
  }

  close(): Promise<void> {
    this.#closing ??= (async () => {
      clearInterval(this.#pinger);
      this.#stopAccepting.abort();
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
      const subscribers = this.#topics.get(topic);
      if (!subscribers) return;
      // The message is `MSG:` followed by the same topic and text, encoded once for everyone.
      const message = this.#encoder.encode(rest, "MSG:");
      for (const subscriber of subscribers) subscriber.sendBytes(message);
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

  #serve(conn: Deno.TcpConn) {
    try {
      conn.setNoDelay(true); // the outbox already batches; Nagle would only add delay
    } catch {
      conn.close(); // it failed as it arrived: gone already
      return;
    }
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
      // Whatever went wrong, it ends this client's connection only.
      if (!isConnectionError(error)) {
        this.#broker.warn(`[BROKER] Dropped ${this.name}: ${describe(error)}`);
      }
    } finally {
      await this.end();
    }
  }

  /** Sends a line to this client; one that has let too much pile up is cut off instead. */
  send(line: string): void {
    if (!this.#ending && !this.#outbox.send(line)) this.#cutOff();
  }

  /** Sends an encoded line (its `\n` included) to this client, or cuts it off, as {@link send}. */
  sendBytes(line: Uint8Array): void {
    if (!this.#ending && !this.#outbox.sendBytes(line)) this.#cutOff();
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
