#!/usr/bin/env -S deno run --allow-net
/**
 * The directory: a REST service (Hono) that knows which live peer holds which fragment, and the
 * manifests of the files the swarm shares. State is soft, as in a tracker: peers register,
 * heartbeat with their full state every ttl/3 and are forgotten `--ttl` seconds after the last
 * one, so a restarted directory is whole again within one ttl; a file goes one ttl after no live
 * peer of that file holds any of its fragments. A peer's state names the file its fragments
 * belong to, since every split file names them fragment_<i>.bin. The routes and their zod
 * schemas are the validation and the OpenAPI document at once (`/openapi.json`, Swagger UI at
 * `/apidocs`).
 *
 * A peer's entry is its owner's: registering answers a secret that heartbeats and leaves must
 * carry. The directory lists a peer at the address its requests come from, unless started with
 * `--trust-advertise` (for containers whose peers advertise names). Everything a client can make
 * it hold is bounded: connections (in all and per address, idle ones closed), request bodies
 * (size, deadline, minimum rate, memory), peers (in all and per address), indexed fragments,
 * files, and list answers (paged).
 *
 * This file is the command line and {@link startDirectory}, and exports the whole API; the rest
 * lives beside it: `directory/schemas.ts` (schemas, routes, limits), `directory/registry.ts`
 * (the state), `directory/app.ts` (the Hono app), `directory/server.ts` (connections) and
 * `directory/client.ts` (the client).
 *
 * With `--store redis://host:port[/db]` the state lives in Redis (`directory/redis_store.ts`),
 * and any number of directory processes on the same Redis serve one view.
 *
 * Usage: `deno task directory [--port 5000] [--ttl 30] [--trust-advertise] [--store memory]`
 * @module
 */
import { parseArgs } from "node:util";
import { isLookupError, lookupMessage, runMain, UserError } from "./common/cli.ts";
import { parsePort, portTakenMessage } from "./common/ports.ts";
import { parseRate } from "./common/throttle.ts";
import { type AppOptions, createApp } from "./directory/app.ts";
import { corsOrigins } from "./directory/http.ts";
import { type DirectoryStore, Registry } from "./directory/registry.ts";
import { parseRedisUrl, RedisStore } from "./directory/redis_store.ts";
import {
  DEFAULT_BODY_TIMEOUT,
  DEFAULT_HEADER_TIMEOUT,
  DEFAULT_MAX_BODY_MEMORY,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
  DEFAULT_MAX_INDEXED_FRAGMENTS,
  DEFAULT_MAX_PEERS,
  DEFAULT_MAX_PEERS_PER_ADDRESS,
  DEFAULT_MIN_BODY_RATE,
  DEFAULT_TTL,
  MAX_TTL,
} from "./directory/schemas.ts";
import { type ConnectionLimits, serveConnections } from "./directory/server.ts";

/** The shortest --ttl: peers heartbeat every ttl/3, so less than a second is a flood. */
const MIN_TTL = 1;
/** How long the command line waits for Redis before it says it listens anyway. */
const REDIS_STARTUP_WAIT_MS = 5_000;

export {
  AMBIGUOUS_FILE,
  DEFAULT_BODY_TIMEOUT,
  DEFAULT_HEADER_TIMEOUT,
  DEFAULT_MAX_BODY_MEMORY,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
  DEFAULT_MAX_FILE_FRAGMENTS,
  DEFAULT_MAX_FILES,
  DEFAULT_MAX_INDEXED_FRAGMENTS,
  DEFAULT_MAX_PEERS,
  DEFAULT_MAX_PEERS_PER_ADDRESS,
  DEFAULT_MIN_BODY_RATE,
  DEFAULT_PAGE_LIMIT,
  DEFAULT_TTL,
  ERROR_CODES,
  FILE_ID_PATTERN,
  type FileDetail,
  type FileSummary,
  type FragmentHolders,
  type Health,
  type Heartbeat,
  type Holder,
  HOST_PATTERN,
  MAX_BODY_BYTES,
  MAX_FILE_HOLDERS,
  MAX_PAGE_ITEMS,
  MAX_PAGE_LIMIT,
  MAX_PEER_FRAGMENTS,
  MAX_TTL,
  MIN_ID_PREFIX,
  newSecret,
  type PeerInfo,
  type PeerKey,
  type PeerState,
  type Registration,
  SECRET_PATTERN,
  TOO_MANY_FILES,
  TOO_MANY_FRAGMENTS,
  TOO_MANY_PEERS,
  TOO_MANY_PEERS_FROM_ADDRESS,
} from "./directory/schemas.ts";
export {
  type Awaitable,
  type Claim,
  type DirectoryStore,
  type KnownPeerState,
  type Page,
  type Paged,
  type PublishOutcome,
  Registry,
  type RegistryOptions,
  type Resolution,
  type StoreCounts,
  StoreUnavailableError,
  type UpsertOutcome,
} from "./directory/registry.ts";
export {
  DEFAULT_REDIS_PREFIX,
  parseRedisUrl,
  RedisStore,
  type RedisStoreOptions,
} from "./directory/redis_store.ts";
export { type ConnectionLimits } from "./directory/server.ts";
export { type AppOptions, createApp } from "./directory/app.ts";
export {
  DEFAULT_FAILBACK_MS,
  DirectoryClient,
  type DirectoryClientOptions,
  DirectoryError,
  type LocateOptions,
  parseDirectoryUrls,
  type RegisterOptions,
} from "./directory/client.ts";

/** The port the directory listens on unless told otherwise. */
export const DEFAULT_PORT = 5000;

// ---------------------------------------------------------------------------------------------
// The server

/** Options of {@link startDirectory}. */
export interface DirectoryOptions extends AppOptions, ConnectionLimits {
  /** 0 picks any free port. @default 5000 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /** Where its few log lines go (accepting connections failed, or works again). */
  warn?: (line: string) => void;
  /**
   * Where the state lives, unless `registry` is given: "memory" (this process), or
   * "redis://host:port[/db]", shared by every directory on that Redis. @default "memory"
   */
  store?: string;
}

/** A running directory; close it, or `await using` it. */
export interface DirectoryServer extends AsyncDisposable {
  /** The port it listens on (the real one when started on port 0). */
  readonly port: number;
  /** Its base URL, e.g. `http://localhost:5000`. */
  readonly url: string;
  /** The state it serves. */
  readonly registry: DirectoryStore;
  /** Connections open now. */
  readonly connections: number;
  /** Resolves once the server has stopped. */
  readonly finished: Promise<void>;
  /** Stops listening, lets requests in flight finish, and stops the sweep. */
  close(): Promise<void>;
}

/**
 * Starts the directory on a port; the handle closes it.
 * @example
 * ```ts
 * await using directory = startDirectory({ port: 0, ttl: 30 });
 * const client = new DirectoryClient(directory.url);
 * ```
 */
export function startDirectory(options: DirectoryOptions = {}): DirectoryServer {
  const owned = options.registry === undefined;
  const registry = options.registry ?? newStore(options);
  const app = createApp({ ...options, registry });
  const server = serveConnections({
    ...options,
    port: options.port ?? DEFAULT_PORT,
    hostname: options.hostname ?? "0.0.0.0",
  }, app.fetch);
  // Reads already skip the expired; sweeping every ttl/4 frees their memory soon after.
  const sweeper = setInterval(() => registry.sweep(), Math.max(100, registry.ttl * 250));
  const { hostname, port } = server.addr;
  const shown = hostname === "0.0.0.0" || hostname === "::" ? "localhost" : hostname;
  const url = `http://${shown.includes(":") ? `[${shown}]` : shown}:${port}`;
  let closing: Promise<void> | undefined;
  const close = () => {
    clearInterval(sweeper);
    return closing ??= server.shutdown().then(() => owned ? registry.close?.() : undefined);
  };
  return {
    port,
    url,
    registry,
    get connections() {
      return server.connections;
    },
    finished: server.finished,
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** The store `options.store` names: "memory" (the default) or a redis:// URL. */
function newStore(options: DirectoryOptions): DirectoryStore {
  const store = options.store ?? "memory";
  if (store === "memory") return new Registry(options);
  return new RedisStore(store, options);
}

// ---------------------------------------------------------------------------------------------
// The command line

const USAGE =
  `Usage: deno task directory [--port ${DEFAULT_PORT}] [--ttl ${DEFAULT_TTL}] [--hostname 0.0.0.0] [--trust-advertise] [--cors ORIGIN] [--store memory]

The REST directory: which live peer holds which fragment, and the published manifests.

Options:
  --port PORT        port to listen on, 0 for any free one (default ${DEFAULT_PORT})
  --ttl SECONDS      forget a peer this long after its last heartbeat, and a file this long
                     after no live peer holds any of it (default ${DEFAULT_TTL}, ${MIN_TTL} to ${MAX_TTL})
  --hostname HOST    address to listen on (default 0.0.0.0)
  --trust-advertise  list a peer at the host it names (its --advertise), not at the address
                     its requests come from: for containers whose peers advertise names
  --cors ORIGIN      let pages of ORIGIN (e.g. https://app.example, or * for any) write too:
                     register, heartbeat, leave, publish; repeatable or comma-separated.
                     Pages of any origin may read (GET, HEAD) without it
  --store STORE      where the state lives: memory (default), or redis://host:port[/db],
                     shared by every directory on that Redis (replicas serve one view)
  -h, --help         show this help

Limits:
  --max-peers N          live peers listed (default ${DEFAULT_MAX_PEERS})
  --max-peers-per-address N
                         live peers registered from one client address (default ${DEFAULT_MAX_PEERS_PER_ADDRESS})
  --max-indexed-fragments N
                         fragments indexed, across all peers' lists (default ${DEFAULT_MAX_INDEXED_FRAGMENTS})
  --max-connections N    connections open at once (default ${DEFAULT_MAX_CONNECTIONS})
  --max-connections-per-address N
                         connections open at once from one client address (default ${DEFAULT_MAX_CONNECTIONS_PER_ADDRESS})
  --header-timeout SECONDS
                         close a connection that sends no request this long after it opened,
                         or after its last answer (default ${DEFAULT_HEADER_TIMEOUT})
  --body-timeout SECONDS a request body's deadline, one second later for each RATE bytes
                         of it (default ${DEFAULT_BODY_TIMEOUT})
  --min-body-rate RATE   RATE, in bytes per second, e.g. 16KiB/s (default ${DEFAULT_MIN_BODY_RATE})
  --max-body-memory BYTES
                         request bodies held at once, across all requests; one client address
                         may hold a quarter (default ${DEFAULT_MAX_BODY_MEMORY})`;

/** What the command line sets. */
type CliOptions =
  & Required<Pick<DirectoryOptions, "port" | "ttl" | "hostname" | "trustAdvertise">>
  & DirectoryOptions;

/** The flags that take a whole number of at least 1, and the option each sets. */
const COUNTS = {
  "max-peers": "maxPeers",
  "max-peers-per-address": "maxPeersPerAddress",
  "max-indexed-fragments": "maxIndexedFragments",
  "max-connections": "maxConnections",
  "max-connections-per-address": "maxConnectionsPerAddress",
  "header-timeout": "headerTimeout",
  "body-timeout": "bodyTimeout",
  "max-body-memory": "maxBodyMemory",
} as const satisfies Record<string, keyof DirectoryOptions>;

/** Reads the flags; a mistake throws a {@link UserError} (parseArgs' own errors count as one). */
function parseCli(args: string[]): CliOptions | "help" {
  const { values } = parseArgs({
    args,
    options: {
      port: { type: "string" },
      ttl: { type: "string" },
      hostname: { type: "string" },
      "trust-advertise": { type: "boolean" },
      cors: { type: "string", multiple: true },
      "min-body-rate": { type: "string" },
      store: { type: "string" },
      help: { type: "boolean", short: "h" },
      ...Object.fromEntries(Object.keys(COUNTS).map((flag) => [flag, { type: "string" as const }])),
    },
  });
  if (values.help) return "help";
  const port = values.port === undefined ? DEFAULT_PORT : parsePort(values.port, "--port");
  const ttl = Number(values.ttl ?? DEFAULT_TTL);
  if (!(ttl >= MIN_TTL && ttl <= MAX_TTL)) {
    throw new UserError(
      `Invalid --ttl "${values.ttl}": expected ${MIN_TTL} to ${MAX_TTL} seconds (a day)`,
    );
  }
  const options: CliOptions = {
    port,
    ttl,
    hostname: values.hostname ?? "0.0.0.0",
    trustAdvertise: values["trust-advertise"] ?? false,
  };
  for (const [flag, option] of Object.entries(COUNTS)) {
    const text = (values as Record<string, unknown>)[flag] as string | undefined;
    if (text === undefined) continue;
    const value = Number(text);
    if (!Number.isSafeInteger(value) || value < 1 || !/^\d+$/.test(text)) {
      throw new UserError(`Invalid --${flag} "${text}": expected a whole number of at least 1`);
    }
    options[option] = value;
  }
  if (values["min-body-rate"] !== undefined) {
    try {
      options.minBodyRate = parseRate(values["min-body-rate"]);
    } catch {
      throw new UserError(
        `Invalid --min-body-rate "${values["min-body-rate"]}": expected e.g. 16KiB/s or 16384`,
      );
    }
  }
  if (values.cors !== undefined) {
    try {
      options.cors = corsOrigins(values.cors);
    } catch (error) {
      throw new UserError(`Invalid --cors: ${(error as Error).message}`);
    }
  }
  if (values.store !== undefined && values.store !== "memory") {
    try {
      parseRedisUrl(values.store);
    } catch (error) {
      throw new UserError(`Invalid --store: ${(error as Error).message}`);
    }
  }
  options.store = values.store;
  return options;
}

/** Where `--store` keeps the state, for the listening line: never a Redis password. */
function stateWhere(store: string | undefined): string {
  if (store === undefined || store === "memory") return "state in memory";
  const url = parseRedisUrl(store);
  return `state in Redis at "${url.protocol}//${url.host}${url.pathname}"`;
}

async function main(args = Deno.args): Promise<void> {
  const options = parseCli(args);
  if (options === "help") return console.log(USAGE);
  let directory: DirectoryServer;
  try {
    directory = startDirectory(options);
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) {
      throw new UserError(
        portTakenMessage(options.port!, "the directory's", "choose another with --port"),
      );
    }
    if (error instanceof Deno.errors.AddrNotAvailable) {
      throw new UserError(
        `Cannot listen on "${options.hostname}": it is not an address of this machine`,
      );
    }
    if (isLookupError(error)) throw new UserError(lookupMessage(options.hostname, error));
    throw error;
  }
  // Listening is said once the store answers, so that a client that waits for it gets no 503;
  // an unreachable Redis is said on stderr, and the directory serves 503 until it is back.
  await directory.registry.ready?.(REDIS_STARTUP_WAIT_MS).catch(() => {});
  console.log(
    `[DIRECTORY] Listening on ${directory.url} (Swagger UI: ${directory.url}/apidocs), ` +
      stateWhere(options.store),
  );
  const stop = () => directory.close();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await directory.finished;
  Deno.removeSignalListener("SIGINT", stop);
  Deno.removeSignalListener("SIGTERM", stop);
}

if (import.meta.main) await runMain(() => main());
