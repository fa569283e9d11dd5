/**
 * The broker's client (broker.ts re-exports {@link connect} and its types): one connection with
 * one connect / read / back-off loop that reconnects by itself, restores its subscriptions and
 * sends what was published while it was down; each subscription is an {@link Inbox} to iterate.
 * @module
 */
import { describe } from "../common/cli.ts";
import { LineBuffer } from "../common/lines.ts";
import {
  BackOff,
  BrokerError,
  isConnectionError,
  isValidTopic,
  LAST_WORDS_MS,
  MAX_LINE,
  MAX_PENDING,
  Outbox,
  parseAddress,
  quote,
  READ_SIZE,
  TOO_MANY_SUBSCRIPTIONS,
  within,
} from "./wire.ts";

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

/**
 * A connection to a broker, whichever kind: our own line-protocol broker ({@link BrokerClient})
 * or NATS (`NatsBrokerClient`). broker.ts's `connect()` picks by the address. Both reconnect by
 * themselves, restore their subscriptions, and say so through {@link ClientOptions}.
 */
export interface BrokerConnection extends AsyncDisposable {
  /** The address it was given (`host:port`, or `nats://...`). */
  readonly address: string;
  /** True while a connection is up. */
  readonly isConnected: boolean;
  /**
   * Subscribes to `topic`; messages come by iterating the subscription, or to `onMessage` as
   * they arrive. Resolves once the broker has it (at once while disconnected: it is restored).
   */
  subscribe(topic: string, onMessage?: (message: Message) => void): Promise<Subscription>;
  /** Publishes; false when dropped (closed, or too much held). Delivery is at most once. */
  publish(topic: string, message: string): boolean;
  /** Resolves when the broker has taken everything published so far. */
  flush(): Promise<void>;
  /** Sends what is queued (briefly), ends the subscriptions and closes the connection. */
  close(): Promise<void>;
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
  /**
   * Called when the connection is lost (or the first attempt failed, with `waitForBroker`). Any
   * failure of a connection, even one not expected of a socket, only ends that connection: the
   * client reconnects until {@link BrokerClient.close}.
   */
  onDisconnect?: (error: Error) => void;
  /** Called when connected again, once the subscriptions are restored. */
  onReconnect?: () => void;
  /**
   * Called with the reason of each `ERR:` line the broker sends. When the broker then closes the
   * connection (`too many connections`, `slow consumer`, ...), the client reconnects after a
   * back-off that grows while the broker keeps sending it away.
   */
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
export class BrokerClient implements BrokerConnection {
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
  // The topics of the `SUB:` lines sent on this connection and not answered yet, oldest first:
  // the broker answers each, in order, with `OK:SUB:<topic>` or an `ERR:` refusing it.
  #unconfirmed: string[] = [];
  // True when the last line from the broker was an `ERR:`: if it then closes, it sent this
  // client away (too many connections, say), and reconnecting at once would only repeat that.
  #sentAway = false;
  #closed = false;
  readonly #backOff: BackOff;
  readonly #loop: Promise<void>;

  constructor(address: string, options: ClientOptions = {}) {
    this.address = address;
    ({ hostname: this.#hostname, port: this.#port } = parseAddress(address));
    this.#options = options;
    this.#backOff = new BackOff(options.minBackoffMs, options.maxBackoffMs);
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
   * connection is down: it is then restored on reconnection). Rejects with a
   * {@link BrokerError} when the broker refuses it (past its `--max-subscriptions`). With
   * `onMessage`, each message goes to it as it arrives instead of waiting to be iterated.
   */
  async subscribe(topic: string, onMessage?: (message: Message) => void): Promise<Subscription> {
    if (!isValidTopic(topic)) throw new TypeError(`Invalid topic ${quote(topic)}`);
    if (this.#closed) throw new BrokerError("The broker client is closed");
    const inbox = new Inbox(topic, (it) => this.#unsubscribe(it), onMessage);
    const inboxes = this.#topics.get(topic);
    if (inboxes) {
      inboxes.add(inbox);
      return inbox;
    }
    this.#topics.set(topic, new Set([inbox]));
    if (this.#sendSubscribe(topic)) await this.flush().catch(() => {});
    if (inbox.refusal !== undefined) {
      const what = `the subscription to ${quote(topic)}`;
      throw new BrokerError(`The broker at "${this.address}" refused ${what}: ${inbox.refusal}`);
    }
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
    this.#backOff.wake();
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
        await this.#backOff.wait(failures++);
        continue;
      }
      if (this.#closed) {
        conn.close();
        break;
      }
      const again = everConnected || failures > 0;
      everConnected = true;
      first.resolve();
      let error: Error;
      try {
        error = await this.#session(conn, again);
        // Sent away (too many connections, say): try again later, and later each time.
        if (this.#sentAway && !this.#closed) {
          this.#options.onDisconnect?.(error);
          await this.#backOff.wait(failures++);
          continue;
        }
        failures = 0;
      } catch (cause) {
        // Not a socket's usual ways of ending (#read turns those into a reason): still, it ends
        // this connection only, and the loop goes on.
        error = new BrokerError(
          `Connection to broker at "${this.address}" failed: ${describe(cause)}`,
          { cause },
        );
        this.#outbox = this.#conn = null;
        closeQuietly(conn);
        for (const pong of this.#pongs.splice(0)) pong.reject(error);
        await this.#backOff.wait(0); // a failure that repeats at once must not spin
      }
      if (!this.#closed) this.#options.onDisconnect?.(error);
    }
  }

  // Uses one connection until it ends; returns why it ended.
  async #session(conn: Deno.TcpConn, again: boolean): Promise<Error> {
    conn.setNoDelay(true);
    this.#conn = conn;
    this.#unconfirmed = [];
    this.#sentAway = false;
    const outbox = new Outbox(conn, {
      limit: this.#options.maxPending ?? MAX_PENDING,
      // A failed write ends the read below as well.
      onError: () => conn.close(),
    });
    this.#outbox = outbox;
    const reading = this.#read(conn);
    if (this.#topics.size > 0 || again || this.#held.length > 0) {
      for (const topic of this.#topics.keys()) this.#sendSubscribe(topic);
      // After the subscriptions, so this client's own subscriptions see what it held.
      for (const line of this.#held.splice(0)) outbox.send(line);
      this.#heldSize = 0;
      this.flush().then(() => again && this.#options.onReconnect?.(), () => {});
    }
    const error = await reading;
    this.#outbox = this.#conn = null;
    closeQuietly(conn);
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
      // Whatever the socket says, this connection is over; the loop reconnects.
      return lost(`${isConnectionError(error) ? "lost" : "failed"}: ${describe(error)}`);
    }
  }

  #handle(line: string) {
    // The broker's last words before it closes a connection are an `ERR:` line.
    this.#sentAway = false;
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
    } else if (line.startsWith("OK:SUB:")) {
      this.#unconfirmed.shift();
    } else if (line.startsWith("ERR:")) {
      const reason = line.slice(4);
      if (reason.startsWith(TOO_MANY_SUBSCRIPTIONS)) {
        // It refuses the oldest SUB not answered yet; the connection stays open.
        const topic = this.#unconfirmed.shift();
        const inboxes = topic === undefined ? undefined : this.#topics.get(topic);
        if (inboxes) {
          this.#topics.delete(topic!);
          for (const inbox of inboxes) inbox.refuse(reason);
        }
      } else this.#sentAway = true;
      this.#options.onError?.(reason);
    } // OK:UNSUB needs nothing: the PING sent after it confirms it.
  }

  /** Sends `SUB:<topic>`, and remembers it until the broker answers; false when not sent. */
  #sendSubscribe(topic: string): boolean {
    if (!this.#outbox?.send(`SUB:${topic}`)) return false;
    this.#unconfirmed.push(topic);
    return true;
  }

  async #unsubscribe(inbox: Inbox) {
    const inboxes = this.#topics.get(inbox.topic);
    if (!inboxes?.delete(inbox) || inboxes.size > 0) return;
    this.#topics.delete(inbox.topic);
    if (this.#outbox?.send(`UNSUB:${inbox.topic}`)) await this.flush().catch(() => {});
  }
}

/**
 * Messages of one subscription, queued until the iterating code takes them (or handed to its
 * callback at once). The NATS client uses it too.
 */
export class Inbox implements Subscription {
  readonly topic: string;
  readonly #onUnsubscribe: (inbox: Inbox) => Promise<void>;
  readonly #onMessage: ((message: Message) => void) | undefined;
  #messages: Message[] = [];
  #next = 0;
  #ended = false;
  #wake: (() => void) | null = null;
  /** Why the broker refused this subscription, if it did. */
  refusal: string | undefined;

  constructor(
    topic: string,
    onUnsubscribe: (inbox: Inbox) => Promise<void>,
    onMessage?: (message: Message) => void,
  ) {
    this.topic = topic;
    this.#onUnsubscribe = onUnsubscribe;
    this.#onMessage = onMessage;
  }

  deliver(message: Message) {
    if (this.#ended) return;
    if (this.#onMessage) return this.#onMessage(message);
    this.#messages.push(message);
    this.#wake?.();
  }

  end() {
    this.#ended = true;
    this.#wake?.();
  }

  /** Ends the subscription because the broker refused it. */
  refuse(reason: string) {
    this.refusal = reason;
    this.end();
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

/** Closes `conn`, which may be closed already. */
function closeQuietly(conn: Deno.Conn) {
  try {
    conn.close();
  } catch (error) {
    if (!(error instanceof Deno.errors.BadResource)) throw error;
  }
}
