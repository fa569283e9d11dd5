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
 * Every limit a client could push against has a default and a flag: connections (in all and per
 * address), subscriptions per connection, output waiting (per client and in all), line length,
 * and how long a line may take to arrive or output may wait unread. See `--help`.
 *
 * Where one machine is not enough, NATS carries the announcements: {@link connect} speaks NATS
 * for a `nats://` address (`broker/nats_client.ts`), and `--nats URL` bridges this broker's
 * clients to NATS both ways (`broker/nats_bridge.ts`).
 *
 * Usage: `deno run broker.ts [--port 5555] [--nats nats://localhost:4222] [--max-line BYTES]`
 * @module
 */
import { parseArgs } from "node:util";
import {
  exitForPermission,
  isLookupError,
  lookupMessage,
  UserError,
  userMessage,
} from "./common/cli.ts";
import { parsePort, portTakenMessage } from "./common/ports.ts";
import { defaultMaxPerAddress } from "./common/connection_counts.ts";
import {
  type Broker,
  type BrokerOptions,
  LINE_TIMEOUT_MS,
  MAX_CONNECTIONS,
  MAX_QUEUED,
  MAX_SUBSCRIPTIONS,
  PING_INTERVAL_MS,
  startBroker,
  WRITE_TIMEOUT_MS,
} from "./broker/server.ts";
import {
  DEFAULT_PORT,
  isNatsAddress,
  MAX_LINE,
  MAX_PENDING,
  parseAddress,
  parseNatsAddress,
  quote,
} from "./broker/wire.ts";
import {
  type BrokerConnection,
  type ClientOptions,
  connect as connectLine,
} from "./broker/client.ts";
import type { BridgedBroker } from "./broker/nats_bridge.ts";
import { isValidName } from "./split.ts";
import { FILE_ID_PATTERN } from "./common/file_ref.ts";

export {
  BrokerError,
  DEFAULT_ADDRESS,
  DEFAULT_PORT,
  isValidTopic,
  parseAddress,
} from "./broker/wire.ts";
export { type Broker, type BrokerOptions, type BrokerStats, startBroker } from "./broker/server.ts";
/**
 * The line-protocol client's old name for what {@link connect} returns.
 * @deprecated Use {@link BrokerConnection}: `connect()` may now return a NATS connection.
 */
export type BrokerClient = BrokerConnection;
export {
  BrokerClient as LineBrokerClient,
  type BrokerConnection,
  type ClientOptions,
  type Message,
  type Subscription,
} from "./broker/client.ts";
export { isNatsAddress, isNatsSubject } from "./broker/wire.ts";
export type { BridgedBroker, BridgedBrokerStats } from "./broker/nats_bridge.ts";

/**
 * Connects to a broker: NATS for a `nats://host:port` address (several comma-separated for a
 * cluster), else our own broker at `host:port`. Rejects with a {@link BrokerError} when it cannot
 * be reached (unless `waitForBroker`); after that it reconnects by itself.
 * @example
 * await using client = await connect("nats://localhost:4222");
 * client.publish("fragmentos", "fragment_5.bin");
 * await client.flush();
 */
export async function connect(
  address: string,
  options: ClientOptions = {},
): Promise<BrokerConnection> {
  if (!isNatsAddress(address)) return await connectLine(address, options);
  // Loaded only when asked for, so that a line-protocol client never loads the NATS client.
  const { NatsBrokerClient } = await import("./broker/nats_client.ts");
  const client = new NatsBrokerClient(address, options);
  await client.ready;
  return client;
}

/**
 * Checks a broker address as {@link connect} takes it (`host:port`, or `nats://host:port`,
 * several comma-separated); throws a TypeError saying what is wrong.
 */
export function checkBrokerAddress(address: string): void {
  if (isNatsAddress(address)) parseNatsAddress(address);
  else parseAddress(address);
}

/**
 * The `host:port` of each server a broker address names, as net permissions name them; throws
 * a TypeError as {@link checkBrokerAddress} does.
 */
export function brokerHosts(address: string): string[] {
  const hostPort = (hostname: string, port: number | string) =>
    `${hostname.includes(":") && !hostname.startsWith("[") ? `[${hostname}]` : hostname}:${port}`;
  if (!isNatsAddress(address)) {
    const { hostname, port } = parseAddress(address);
    return [hostPort(hostname, port)];
  }
  return parseNatsAddress(address).map((server) => {
    const url = new URL(server);
    return hostPort(url.hostname, url.port || 4222);
  });
}

/**
 * Starts a broker bridged to NATS at `natsAddress`: see `broker/nats_bridge.ts`. The broker
 * serves at once; its bridge connects when NATS can be reached.
 */
export async function startBridgedBroker(
  natsAddress: string,
  options: BrokerOptions = {},
): Promise<BridgedBroker> {
  const bridge = await import("./broker/nats_bridge.ts");
  return bridge.startBridgedBroker(natsAddress, options);
}

/** The topic on which peers announce the fragments they hold. */
export const ANNOUNCE_TOPIC = "fragmentos";

// ---------------------------------------------------------------------------------------------
// Fragment announcements

/**
 * A fragment announcement on topic `fragmentos`: a fragment, maybe a peer that holds it, and the
 * file it is a fragment of, by name and id (its whole-file SHA-256). Peers take it as a HAVE
 * message: every split names its fragments `fragment_<i>.bin`, and two files may share a name,
 * so only the id tells two files' fragments apart.
 */
export interface Announcement {
  name: string;
  holder?: { hostname: string; port: number };
  file?: string;
  fileId?: string;
}

/**
 * Formats an announcement: `fragment_5.bin`, `fragment_5.bin 10.0.0.7:6001`, with the file,
 * `fragment_5.bin 10.0.0.7:6001 sample.webm`, and with its id, `fragment_5.bin 10.0.0.7:6001
 * sample.webm 9f86d0...` (read left to right, it still says who has what).
 */
export function formatAnnouncement(
  name: string,
  holder?: { hostname: string; port: number },
  file?: string,
  fileId?: string,
): string {
  if (!isValidName(name)) throw new TypeError(`Invalid fragment name ${quote(name)}`);
  if (!holder) return name;
  const host = holder.hostname.includes(":") ? `[${holder.hostname}]` : holder.hostname;
  if (file === undefined) return `${name} ${host}:${holder.port}`;
  if (!isValidName(file)) throw new TypeError(`Invalid file name ${quote(file)}`);
  if (fileId === undefined) return `${name} ${host}:${holder.port} ${file}`;
  if (!FILE_ID_PATTERN.test(fileId)) throw new TypeError(`Invalid file id ${quote(fileId)}`);
  return `${name} ${host}:${holder.port} ${file} ${fileId}`;
}

/** Parses an announcement; undefined when it is not one (a bad name, address, file or id). */
export function parseAnnouncement(message: string): Announcement | undefined {
  const [name, address, file, fileId, ...extra] = message.trim().split(/\s+/);
  if (extra.length > 0 || !isValidName(name)) return undefined;
  if (address === undefined) return { name };
  if (file !== undefined && !isValidName(file)) return undefined;
  if (fileId !== undefined && !FILE_ID_PATTERN.test(fileId)) return undefined;
  try {
    return {
      name,
      holder: parseAddress(address),
      ...(file === undefined ? {} : { file }),
      ...(fileId === undefined ? {} : { fileId }),
    };
  } catch {
    return undefined;
  }
}

// ---------------------------------------------------------------------------------------------
// The command line

const PER_ADDRESS = defaultMaxPerAddress(MAX_CONNECTIONS);
const LINE_TIMEOUT_S = LINE_TIMEOUT_MS / 1000;
const WRITE_TIMEOUT_S = WRITE_TIMEOUT_MS / 1000;
const USAGE = `Usage: deno task broker [options]

A TCP pub/sub broker (protocol: SUB:<topic>, UNSUB:<topic>, PUB:<topic>:<message>, PING).

Options:
  --port PORT            port to listen on; 0 picks a free one (default ${DEFAULT_PORT})
  --hostname HOST        interface to listen on (default 0.0.0.0)
  --ping-interval SECS   how often idle clients are pinged (default ${PING_INTERVAL_MS / 1000})
  --nats URL             bridge to NATS both ways: clients' publications go to NATS, and NATS
                         messages reach subscribers (nats://host:port, several comma-separated)
  --verbose              log connections, subscriptions and refusals on stderr
  -h, --help             show this help

Limits (each a whole number at least 1; past one, the client gets an ERR: line):
  --max-connections N                connections at once (default ${MAX_CONNECTIONS})
  --max-connections-per-address N    from one client address, an IPv6 /64 counting as one
                                     (default a quarter of --max-connections, ${PER_ADDRESS})
  --max-subscriptions N              subscriptions of one connection (default ${MAX_SUBSCRIPTIONS})
  --max-line BYTES                   longest line a client may send (default ${MAX_LINE})
  --line-timeout SECS                time a line may take from its first byte (default ${LINE_TIMEOUT_S})
  --max-pending BYTES                output waiting for one client, past which it is cut off
                                     (default ${MAX_PENDING})
  --max-queued BYTES                 output waiting for all clients; past it those with the most
                                     waiting are cut off first (default ${MAX_QUEUED})
  --write-timeout SECS               time output may wait with none of it read, before the
                                     client is cut off (default ${WRITE_TIMEOUT_S})`;

/** Parses a positive whole number given to `--flag`, or throws a TypeError saying what is wrong. */
function positive(flag: string, text: string): number {
  const value = Number(text);
  if (!/^\d+$/.test(text) || value === 0) {
    throw new TypeError(`--${flag} must be a positive whole number, got ${quote(text)}`);
  }
  return value;
}

async function main(args = Deno.args) {
  let options: BrokerOptions;
  let nats: string | undefined;
  try {
    const { values } = parseArgs({
      args,
      options: {
        port: { type: "string", default: String(DEFAULT_PORT) },
        hostname: { type: "string", default: "0.0.0.0" },
        "max-connections": { type: "string", default: String(MAX_CONNECTIONS) },
        "max-connections-per-address": { type: "string" },
        "max-subscriptions": { type: "string", default: String(MAX_SUBSCRIPTIONS) },
        "max-pending": { type: "string", default: String(MAX_PENDING) },
        "max-queued": { type: "string", default: String(MAX_QUEUED) },
        "max-line": { type: "string", default: String(MAX_LINE) },
        "line-timeout": { type: "string", default: String(LINE_TIMEOUT_MS / 1000) },
        "write-timeout": { type: "string", default: String(WRITE_TIMEOUT_MS / 1000) },
        "ping-interval": { type: "string", default: String(PING_INTERVAL_MS / 1000) },
        verbose: { type: "boolean", default: false },
        nats: { type: "string" },
        help: { type: "boolean", short: "h", default: false },
      },
    });
    if (values.help) {
      console.log(USAGE);
      return;
    }
    const port = parsePort(values.port, "--port");
    const maxConnections = positive("max-connections", values["max-connections"]);
    const perAddress = values["max-connections-per-address"];
    const maxConnectionsPerAddress = perAddress === undefined
      ? defaultMaxPerAddress(maxConnections)
      : positive("max-connections-per-address", perAddress);
    if (maxConnectionsPerAddress > maxConnections) {
      throw new TypeError(
        `--max-connections-per-address must be at most --max-connections (${maxConnections}), got ${maxConnectionsPerAddress}`,
      );
    }
    options = {
      port,
      hostname: values.hostname,
      maxConnections,
      maxConnectionsPerAddress,
      maxSubscriptions: positive("max-subscriptions", values["max-subscriptions"]),
      maxPending: positive("max-pending", values["max-pending"]),
      maxQueued: positive("max-queued", values["max-queued"]),
      maxLine: positive("max-line", values["max-line"]),
      lineTimeoutMs: positive("line-timeout", values["line-timeout"]) * 1000,
      writeTimeoutMs: positive("write-timeout", values["write-timeout"]) * 1000,
      pingIntervalMs: positive("ping-interval", values["ping-interval"]) * 1000,
      log: values.verbose ? (line) => console.error(line) : undefined,
    };
    nats = values.nats;
    if (nats !== undefined) parseNatsAddress(nats);
  } catch (error) {
    if (!(error instanceof TypeError || error instanceof UserError)) throw error;
    console.error(`error: ${userMessage(error)}`);
    Deno.exit(1);
  }

  let broker: Broker;
  try {
    broker = nats === undefined ? startBroker(options) : await startBridgedBroker(nats, options);
  } catch (error) {
    // Run with too few permissions (a bare `deno run broker.ts`): say which, no stack.
    if (error instanceof Deno.errors.NotCapable) exitForPermission(error.message);
    if (error instanceof Deno.errors.AddrInUse) {
      console.error(
        `error: ${portTakenMessage(options.port!, "the broker's", "choose another with --port")}`,
      );
    } else if (error instanceof Deno.errors.AddrNotAvailable) {
      console.error(
        `error: Cannot listen on "${options.hostname}": it is not an address of this machine`,
      );
    } else if (isLookupError(error)) {
      console.error(`error: ${lookupMessage(options.hostname!, error)}`);
    } else throw error;
    Deno.exit(1);
  }
  const bridged = nats === undefined ? "" : `, bridged to NATS at "${nats}"`;
  console.log(`[BROKER] Listening on port ${broker.port}${bridged}`);

  const stop = async () => {
    Deno.removeSignalListener("SIGINT", stop);
    Deno.removeSignalListener("SIGTERM", stop);
    await broker.close();
  };
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
}

if (import.meta.main) await main();
