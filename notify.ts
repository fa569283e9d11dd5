#!/usr/bin/env -S deno run --allow-net
/**
 * Announces on the broker that a fragment is available, waits until the broker has taken the
 * message (`PING`/`PONG`), and exits 0; exits 1 with one line on stderr when it cannot.
 *
 * Usage: `deno run notify.ts fragment_5.bin [--topic fragmentos] [--broker localhost:5555 or nats://...]`
 * @module
 */
import { parseArgs } from "node:util";
import { requireNet, userMessage } from "./common/cli.ts";
import {
  ANNOUNCE_TOPIC,
  BrokerError,
  brokerHosts,
  connect,
  DEFAULT_ADDRESS,
  formatAnnouncement,
  isValidTopic,
} from "./broker.ts";
import { isValidName } from "./split.ts";

/** How long the broker may take to confirm it has the message. */
const FLUSH_TIMEOUT_MS = 5_000;

const USAGE = `Usage: deno run notify.ts FRAGMENT [--topic ${ANNOUNCE_TOPIC}] [--broker ADDRESS]

Publishes that FRAGMENT (e.g. fragment_5.bin) is available, and waits until the broker has it.

Options:
  --topic TOPIC        the topic to publish on (default ${ANNOUNCE_TOPIC})
  --broker ADDRESS     the broker: host:port of ours, or nats://host:port for NATS (several
                       comma-separated for a cluster) (default ${DEFAULT_ADDRESS})
  -h, --help           show this help`;

async function main(args = Deno.args) {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      topic: { type: "string", default: ANNOUNCE_TOPIC },
      broker: { type: "string", default: DEFAULT_ADDRESS },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return console.log(USAGE);
  if (positionals.length !== 1) {
    throw new TypeError("Give exactly one fragment name, e.g. notify.ts fragment_5.bin");
  }
  const [name] = positionals;
  if (!isValidName(name)) {
    throw new TypeError(
      `Invalid fragment name "${name}": use up to 200 letters, digits, '.', '_' or '-', ` +
        "starting with a letter or digit",
    );
  }
  if (!isValidTopic(values.topic)) {
    throw new TypeError(
      `Invalid topic "${values.topic}": use 1 to 128 letters, digits, '.', '_' or '-'`,
    );
  }

  // From a pipe, one line naming the task beats a refused connection; a terminal asks once.
  await requireNet(brokerHosts(values.broker));
  await using client = await connect(values.broker);
  client.publish(values.topic, formatAnnouncement(name));
  // Bounded: something that accepts connections but is not a broker never answers PING.
  let timer: ReturnType<typeof setTimeout> | undefined;
  const silent = new Promise<never>((_, reject) => {
    timer = setTimeout(() => {
      reject(new BrokerError(`The broker at "${values.broker}" did not answer within 5 s`));
    }, FLUSH_TIMEOUT_MS);
  });
  try {
    await Promise.race([client.flush(), silent]);
  } finally {
    clearTimeout(timer);
  }
  console.error(`[NOTIFY] Published '${name}' on '${values.topic}'`);
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
