/**
 * The broker connection over NATS (broker.ts's `connect()` picks it for a `nats://` address):
 * topic `fragmentos` is the NATS subject `fragmentos`. It offers what the line-protocol client
 * offers ({@link BrokerConnection}): until the first connection it holds subscriptions and
 * publications and keeps trying with one back-off loop; after that the official NATS client
 * reconnects by itself, to any server of the cluster, and restores the subscriptions.
 *
 * The bridge (`broker.ts --nats`) uses it with an `origin`: its publications carry that id in a
 * header, and the server is asked not to echo them; whatever comes back with it is dropped.
 * @module
 */
import {
  connect as natsConnect,
  headers as natsHeaders,
  type Msg,
  type MsgHdrs,
  type NatsConnection,
  type Subscription as NatsSubscription,
} from "@nats-io/transport-node";
import { describe } from "../common/cli.ts";
import { type BrokerConnection, type ClientOptions, Inbox, type Message } from "./client.ts";
import {
  BackOff,
  BrokerError,
  isNatsSubject,
  LAST_WORDS_MS,
  MAX_PENDING,
  parseNatsAddress,
  quote,
  within,
} from "./wire.ts";

/** The header that names the bridge a message came through, so that it never comes back to it. */
export const ORIGIN_HEADER = "Fragmentos-Origin";
/** How long one attempt to reach a NATS server may take. */
const CONNECT_TIMEOUT_MS = 5_000;
/** NATS's own wait before trying a server again, unless `maxBackoffMs` is smaller. */
const RECONNECT_WAIT_MS = 2_000;

/** Options of a {@link NatsBrokerClient}: a client's, and the bridge's origin. */
export interface NatsClientOptions extends ClientOptions {
  /**
   * The id of the bridge this client is: it goes with every publication in the
   * {@link ORIGIN_HEADER} header, the server does not echo them, and a message that carries it
   * is dropped.
   */
  origin?: string;
}

/** One topic's subscribers here, and its NATS subscription while connected. */
interface Topic {
  inboxes: Set<Inbox>;
  subscription?: NatsSubscription;
}

/** A broker connection over NATS. Make one with broker.ts's `connect("nats://...")`. */
export class NatsBrokerClient implements BrokerConnection {
  /** The `nats://...` address it was given. */
  readonly address: string;
  /** Settles after the first attempt to connect. */
  readonly ready: Promise<void>;
  readonly #servers: string[];
  readonly #options: NatsClientOptions;
  readonly #headers: MsgHdrs | undefined;
  readonly #topics = new Map<string, Topic>();
  #everything: { handler: (message: Message) => void; subscription?: NatsSubscription } | null =
    null;
  #nc: NatsConnection | null = null;
  #connected = false;
  /** Publications made before the first connection, and their size: sent once connected. */
  #held: [string, string][] = [];
  #heldSize = 0;
  #closed = false;
  readonly #backOff: BackOff;
  readonly #loop: Promise<void>;

  constructor(address: string, options: NatsClientOptions = {}) {
    this.address = address;
    this.#servers = parseNatsAddress(address);
    this.#options = options;
    this.#backOff = new BackOff(options.minBackoffMs, options.maxBackoffMs);
    if (options.origin !== undefined) {
      this.#headers = natsHeaders();
      this.#headers.set(ORIGIN_HEADER, options.origin);
    }
    const first = Promise.withResolvers<void>();
    this.ready = first.promise;
    this.#loop = this.#run(first);
  }

  /** True while connected to a NATS server. */
  get isConnected(): boolean {
    return this.#connected;
  }

  /**
   * Subscribes to `topic` (a NATS subject of the same name). Resolves once the server has the
   * subscription, or at once while not connected (it is made on connection).
   */
  async subscribe(topic: string, onMessage?: (message: Message) => void): Promise<Inbox> {
    if (!isNatsSubject(topic)) throw new TypeError(`Invalid topic ${quote(topic)} for NATS`);
    if (this.#closed) throw new BrokerError("The broker client is closed");
    const inbox = new Inbox(topic, (it) => this.#unsubscribe(it), onMessage);
    const existing = this.#topics.get(topic);
    if (existing) {
      existing.inboxes.add(inbox);
      return inbox;
    }
    const entry: Topic = { inboxes: new Set([inbox]) };
    this.#topics.set(topic, entry);
    if (this.#nc) {
      this.#natsSubscribe(this.#nc, topic, entry);
      await this.flush().catch(() => {});
    }
    return inbox;
  }

  /**
   * Hands every message on every subject to `handler` (the bridge's NATS side); resolves once
   * the server has the subscription, or at once while not connected.
   */
  async subscribeAll(handler: (message: Message) => void): Promise<void> {
    if (this.#everything) throw new TypeError("subscribeAll() was called already");
    this.#everything = { handler };
    if (this.#nc) {
      this.#everything.subscription = this.#nc.subscribe(">", {
        callback: (_, msg) => this.#receive(msg, handler),
      });
      await this.flush().catch(() => {});
    }
  }

  /**
   * Publishes `message` on `topic`. Before the first connection it is held (up to `maxPending`
   * bytes); after that the NATS client buffers it while it reconnects. False when dropped.
   */
  publish(topic: string, message: string): boolean {
    if (!isNatsSubject(topic)) throw new TypeError(`Invalid topic ${quote(topic)} for NATS`);
    if (/[\n\r\0]/.test(message)) {
      throw new TypeError("A message cannot hold a newline, carriage return or NUL");
    }
    if (this.#closed) return false;
    if (this.#nc) {
      try {
        this.#nc.publish(topic, message, this.#headers ? { headers: this.#headers } : undefined);
        return true;
      } catch {
        return false; // closed or draining under us
      }
    }
    const size = topic.length + message.length;
    if (this.#heldSize + size > (this.#options.maxPending ?? MAX_PENDING)) return false;
    this.#held.push([topic, message]);
    this.#heldSize += size;
    return true;
  }

  /** Resolves when the NATS server has taken everything published so far (PING/PONG). */
  async flush(): Promise<void> {
    if (!this.#nc || !this.#connected) {
      throw new BrokerError(`Not connected to broker at "${this.address}"`);
    }
    try {
      await this.#nc.flush();
    } catch (cause) {
      throw new BrokerError(`Broker at "${this.address}": ${describe(cause)}`, { cause });
    }
  }

  /** Sends what is queued (briefly), ends the subscriptions and closes the connection. */
  async close(): Promise<void> {
    if (this.#closed) return this.#loop;
    this.#closed = true;
    this.#backOff.wake();
    const nc = this.#nc;
    if (nc) {
      if (this.#connected) await within(nc.flush(), LAST_WORDS_MS);
      await nc.close().catch(() => {});
    }
    for (const { inboxes } of this.#topics.values()) for (const inbox of inboxes) inbox.end();
    this.#topics.clear();
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  // Connects (trying again with back-off until the first success), then follows the NATS
  // client's status until it is closed: from then on, NATS reconnects by itself.
  async #run(first: PromiseWithResolvers<void>) {
    let failures = 0;
    while (!this.#closed) {
      let nc: NatsConnection;
      try {
        nc = await natsConnect({
          servers: this.#servers,
          name: this.#options.origin === undefined ? "fragmentos" : "fragmentos-bridge",
          noEcho: this.#options.origin !== undefined,
          maxReconnectAttempts: -1,
          reconnectTimeWait: Math.min(RECONNECT_WAIT_MS, this.#options.maxBackoffMs ?? Infinity),
          timeout: CONNECT_TIMEOUT_MS,
        });
      } catch (cause) {
        if (this.#closed) break;
        const error = new BrokerError(
          `Cannot connect to broker at "${this.address}": ${natsReason(cause)}`,
          { cause },
        );
        if (failures === 0) {
          if (!this.#options.waitForBroker) return first.reject(error);
          first.resolve();
          this.#options.onDisconnect?.(error);
        }
        await this.#backOff.wait(failures++);
        continue;
      }
      if (this.#closed) {
        await nc.close().catch(() => {});
        break;
      }
      this.#nc = nc;
      this.#connected = true;
      for (const [topic, entry] of this.#topics) this.#natsSubscribe(nc, topic, entry);
      const everything = this.#everything;
      if (everything) {
        everything.subscription = nc.subscribe(">", {
          callback: (_, msg) => this.#receive(msg, everything.handler),
        });
      }
      for (const [topic, message] of this.#held.splice(0)) this.publish(topic, message);
      this.#heldSize = 0;
      first.resolve();
      if (failures > 0) {
        this.flush().then(() => this.#options.onReconnect?.(), () => {});
      }
      const watching = this.#watch(nc);
      const error = await nc.closed();
      this.#connected = false;
      await watching;
      if (this.#closed) break;
      // The NATS client gave up (it does not, with unlimited reconnects): start afresh.
      this.#nc = null;
      const reason = error ? natsReason(error) : "closed";
      this.#options.onDisconnect?.(
        new BrokerError(`Connection to broker at "${this.address}" ended: ${reason}`),
      );
      failures = 1;
      await this.#backOff.wait(0);
    }
  }

  /** Turns the NATS client's status into this client's callbacks; ends when it closes. */
  async #watch(nc: NatsConnection) {
    for await (const status of nc.status()) {
      if (status.type === "disconnect") {
        this.#connected = false;
        if (this.#closed) continue;
        this.#options.onDisconnect?.(
          new BrokerError(`Connection to broker at "${this.address}" lost (${status.server})`),
        );
      } else if (status.type === "reconnect") {
        this.#connected = true;
        if (!this.#closed) this.#options.onReconnect?.();
      } else if (status.type === "error") {
        this.#options.onError?.(natsReason(status.error));
      } else if (status.type === "close") {
        break;
      }
    }
  }

  #natsSubscribe(nc: NatsConnection, topic: string, entry: Topic) {
    entry.subscription = nc.subscribe(topic, {
      callback: (_, msg) =>
        this.#receive(msg, (message) => {
          for (const inbox of entry.inboxes) inbox.deliver(message);
        }),
    });
  }

  /** Passes a message on, unless it came through this client's own bridge. */
  #receive(msg: Msg, handler: (message: Message) => void) {
    if (this.#headers && msg.headers?.get(ORIGIN_HEADER) === this.#options.origin) return;
    handler({ topic: msg.subject, message: msg.string() });
  }

  async #unsubscribe(inbox: Inbox) {
    const entry = this.#topics.get(inbox.topic);
    if (!entry?.inboxes.delete(inbox) || entry.inboxes.size > 0) return;
    this.#topics.delete(inbox.topic);
    try {
      entry.subscription?.unsubscribe();
    } catch {
      return; // closed already: nothing left to unsubscribe
    }
    if (this.#connected) await this.flush().catch(() => {});
  }
}

/** What a NATS client error says, in a few words ("connection refused"). */
function natsReason(error: unknown): string {
  const text = describe(error);
  return /ECONNREFUSED|refused/i.test(text) ? "connection refused" : text;
}
