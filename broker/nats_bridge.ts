/**
 * A broker bridged to NATS (`broker.ts --nats URL`): what its line-protocol clients publish goes
 * to NATS as well, and what arrives from NATS reaches its subscribers. Clients of several
 * bridged brokers, and NATS clients, then share topics.
 *
 * No loops: only the broker's own clients' publications go to NATS, and only NATS messages are
 * delivered from it, never sent back. Each bridge has an origin id that its publications carry
 * (header `Fragmentos-Origin`); NATS is asked not to echo them to it, and one that comes back all
 * the same is dropped. Two bridged brokers on one NATS each deliver a message once.
 *
 * Only topics that are NATS subjects go out (`a..b` stays local), and only subjects that are
 * topics, with text a line can carry (no newline, within `--max-line`), come in.
 * @module
 */
import { type Broker, type BrokerOptions, type BrokerStats, startBroker } from "./server.ts";
import { NatsBrokerClient } from "./nats_client.ts";
import { isNatsSubject, isValidTopic, MAX_LINE } from "./wire.ts";
import { escapeControl } from "../common/cli.ts";

/** What a bridged broker holds, and what its bridge has carried. */
export interface BridgedBrokerStats extends BrokerStats {
  /** Messages its clients published that went to NATS. */
  toNats: number;
  /** Messages from NATS delivered to its subscribers' topics. */
  fromNats: number;
  /** Messages from NATS that could not be topics or lines here, dropped. */
  dropped: number;
}

/** A broker with a bridge to NATS. */
export interface BridgedBroker extends Broker {
  /** The id its publications carry on NATS. */
  readonly origin: string;
  /** True while the bridge is connected to NATS. */
  readonly natsConnected: boolean;
  stats(): BridgedBrokerStats;
}

const encoder = new TextEncoder();

/**
 * Starts a broker bridged to the NATS servers of `natsAddress` (`nats://host:port`, several
 * comma-separated). The broker serves at once; when NATS cannot be reached it says so through
 * `warn` and bridges once it is.
 * @example
 * await using broker = await startBridgedBroker("nats://localhost:4222", { port: 0 });
 */
export async function startBridgedBroker(
  natsAddress: string,
  options: BrokerOptions = {},
): Promise<BridgedBroker> {
  const origin = crypto.randomUUID();
  const warn = options.warn ?? ((line: string) => console.error(line));
  const maxLine = options.maxLine ?? MAX_LINE;
  let toNats = 0;
  let fromNats = 0;
  let dropped = 0;
  let said = false;
  const nats = new NatsBrokerClient(natsAddress, {
    origin,
    waitForBroker: true,
    onDisconnect: (error) => {
      if (said) return;
      said = true;
      warn(`[BROKER] ${escapeControl(error.message)}; bridging resumes once it is back`);
    },
    onReconnect: () => {
      said = false;
      warn(`[BROKER] Bridging to NATS at "${natsAddress}" again`);
    },
    onError: (reason) => warn(`[BROKER] NATS says: ${escapeControl(reason)}`),
  });
  await nats.ready;
  let broker: Broker;
  try {
    broker = startBroker({
      ...options,
      onPublish: (topic, message) => {
        options.onPublish?.(topic, message);
        if (isNatsSubject(topic) && nats.publish(topic, message)) toNats++;
      },
    });
  } catch (error) {
    await nats.close();
    throw error;
  }
  await nats.subscribeAll(({ topic, message }) => {
    // `MSG:<topic>:<message>` must be a line a client takes.
    if (
      !isValidTopic(topic) || /[\n\r\0]/.test(message) ||
      (topic.length + 6 + message.length * 3 > maxLine && // UTF-8: at most 3 bytes a unit
        topic.length + 6 + encoder.encode(message).length > maxLine)
    ) {
      dropped++;
      return;
    }
    fromNats++;
    broker.deliver(topic, message);
  });
  let closing: Promise<void> | undefined;
  const close = () =>
    closing ??= (async () => {
      await broker.close();
      await nats.close();
    })();
  return {
    origin,
    port: broker.port,
    get natsConnected() {
      return nats.isConnected;
    },
    stats: () => ({ ...broker.stats(), toNats, fromNats, dropped }),
    deliver: (topic, message) => broker.deliver(topic, message),
    close,
    [Symbol.asyncDispose]: close,
  };
}
