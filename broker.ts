#!/usr/bin/env -S deno run --allow-net
/**
 * The pub/sub broker and its client. The broker speaks a line protocol over TCP (DESIGN.md,
 * "Broker protocol"): `SUB:<topic>`, `UNSUB:<topic>`, `PUB:<topic>:<message>` and `PING`; every
 * subscriber of a topic gets `MSG:<topic>:<message>`. A subscriber that stops reading is cut off
 * instead of slowing anyone else. The client ({@link connect}) reconnects by itself and restores
 * its subscriptions.
 *
 * This file is the command line, the fragment announcements, and the public API; the server is in
 * `broker/server.ts`, the client in `broker/client.ts`, and what both share in `broker/wire.ts`.
 *
 * Usage: `deno run broker.ts [--port 5555] [--max-pending BYTES] [--max-line BYTES]`
 * @module
 */
import { parseArgs } from "node:util";
import { isLookupError, lookupMessage, userMessage } from "./common/cli.ts";
import { type Broker, type BrokerOptions, PING_INTERVAL_MS, startBroker } from "./broker/server.ts";
import { DEFAULT_PORT, MAX_LINE, MAX_PENDING, parseAddress, quote } from "./broker/wire.ts";
import { isValidName } from "./split.ts";

export {
  BrokerError,
  DEFAULT_ADDRESS,
  DEFAULT_PORT,
  isValidTopic,
  parseAddress,
} from "./broker/wire.ts";
export { type Broker, type BrokerOptions, type BrokerStats, startBroker } from "./broker/server.ts";
export {
  BrokerClient,
  type ClientOptions,
  connect,
  type Message,
  type Subscription,
} from "./broker/client.ts";

/** The topic on which peers announce the fragments they hold. */
export const ANNOUNCE_TOPIC = "fragmentos";

// ---------------------------------------------------------------------------------------------
// Fragment announcements

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
    } else if (isLookupError(error)) {
      console.error(`error: ${lookupMessage(options.hostname!, error)}`);
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
