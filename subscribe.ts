#!/usr/bin/env -S deno run --allow-net
/**
 * Subscribes to broker topics and prints each message as `[topic] message` on stdout; status
 * lines go to stderr. It survives a broker restart (the client reconnects and resubscribes).
 *
 * Usage: `deno run subscribe.ts fragmentos [more topics] [--broker localhost:5555 or nats://...]`
 * @module
 */
import { parseArgs } from "node:util";
import { escapeControl, requireNet, userMessage } from "./common/cli.ts";
import { LineBuffer } from "./common/lines.ts";
import { BrokerError, brokerHosts, connect, DEFAULT_ADDRESS, isValidTopic } from "./broker.ts";

const USAGE = `Usage: deno run subscribe.ts [TOPIC...] [--broker ADDRESS]

Prints every message published on the topics as "[topic] message". With no topic, asks for one.

Options:
  --broker ADDRESS     the broker: host:port of ours, or nats://host:port for NATS (several
                       comma-separated for a cluster) (default ${DEFAULT_ADDRESS})
  -h, --help           show this help`;

/** Asks for topics on stderr and reads one line of stdin (several topics may be typed). */
async function askTopics(): Promise<string[]> {
  await Deno.stderr.write(new TextEncoder().encode("Topic to subscribe: "));
  const lines = new LineBuffer(4096);
  const buffer = new Uint8Array(4096);
  let line: string | undefined;
  while ((line = lines.shift()) === undefined && !lines.overflow) {
    const count = await Deno.stdin.read(buffer);
    if (count === null) break;
    lines.push(buffer.subarray(0, count));
  }
  return line?.split(/[\s,]+/).filter((topic) => topic !== "") ?? [];
}

/** Throws a TypeError naming the first of `topics` that is not a valid topic. */
function checkTopics(topics: string[]): void {
  const invalid = topics.find((topic) => !isValidTopic(topic));
  if (invalid !== undefined) {
    throw new TypeError(
      `Invalid topic "${invalid}": use 1 to 128 letters, digits, '.', '_' or '-'`,
    );
  }
}

async function main(args = Deno.args) {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      broker: { type: "string", default: DEFAULT_ADDRESS },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return console.log(USAGE);
  checkTopics(positionals);
  // Before a topic is asked: from a pipe, one line naming the task beats a refused connection.
  await requireNet(brokerHosts(values.broker));
  const topics = positionals.length > 0 ? positionals : await askTopics();
  if (topics.length === 0) throw new TypeError("No topic given");
  checkTopics(topics);

  const client = await connect(values.broker, {
    onDisconnect: (error) =>
      console.error(`[SUBSCRIBER] Disconnected: ${escapeControl(error.message)}`),
    onReconnect: () => console.error("[SUBSCRIBER] Reconnected; subscriptions restored"),
    onError: (reason) => console.error(`[SUBSCRIBER] Broker says: ${escapeControl(reason)}`),
  });
  const subscriptions = await Promise.all(topics.map((topic) => client.subscribe(topic)));
  const names = topics.map((topic) => `'${topic}'`).join(", ");
  console.error(`[SUBSCRIBER] Subscribed to ${names}. Waiting for messages...`);

  // Ctrl-C (or compose's SIGTERM) closes the client, which ends the loops below: exit code 0.
  const stop = () => client.close();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await Promise.all(subscriptions.map(async (subscription) => {
    // A message is any text a publisher chose: printed escaped, it stays one line of text.
    for await (const { topic, message } of subscription) {
      console.log(`[${topic}] ${escapeControl(message)}`);
    }
  }));
  Deno.removeSignalListener("SIGINT", stop);
  Deno.removeSignalListener("SIGTERM", stop);
}

if (import.meta.main) {
  try {
    await main();
  } catch (error) {
    // Mistakes a user can fix get one line; anything else keeps its stack.
    if (!(error instanceof TypeError || error instanceof BrokerError)) throw error;
    console.error(`error: ${userMessage(error)}`);
    Deno.exit(1);
  }
}
