#!/usr/bin/env -S deno run --allow-net --allow-read --allow-write --allow-env --allow-run
/**
 * A P2P node, server and client at once: it serves its fragment store over the TCP protocol and
 * gRPC, fetches fragments from neighbours or any holder the directory knows (verifying every
 * byte), tells the directory what it holds and announces new fragments on the broker.
 *
 * ```sh
 * deno run peer.ts 6001 localhost:6002 --dir fragments/6001
 * ```
 * @module
 */
import { parseArgs } from "node:util";
import { isValidName, type Manifest, SplitError } from "./split.ts";
import { join } from "node:path";
import {
  askOncePerKind,
  envIfGranted,
  isDiskFull,
  isLookupError,
  isUserError,
  lookupMessage,
  nameList,
  runMain,
  UserError,
} from "./common/cli.ts";
import {
  Fetcher,
  FetchError,
  type Holder,
  holderAddress,
  holderKey,
  LOOPBACK,
  parseSize,
  StoreWriteError,
  type Transport,
} from "./peer/fetch.ts";
// The directory's client and protocol, not directory.ts: that loads its server too (Hono, zod,
// Redis), a quarter of a second of every peer's start.
import { DirectoryClient, parseDirectoryUrls } from "./directory/client.ts";
import { HOST_PATTERN } from "./directory/protocol.ts";
import { startTcpServer, type TcpServer } from "./peer/tcp.ts";
import { Presence } from "./peer/presence.ts";
import { type FragmentEvent, type Progress, Swarm } from "./peer/swarm.ts";
import { isFragmentName, Store } from "./peer/store.ts";
import { isServed, parsePort, portTakenMessage, TIME_WAIT_MS } from "./common/ports.ts";
import { createThrottle, parseRate } from "./common/throttle.ts";
import { type GrpcFront, startGrpcFront } from "./peer/grpc_front.ts";
import { LazyGrpcClient } from "./peer/grpc_lazy_client.ts";
import { type PlayerServer, startPlayer } from "./peer/player.ts";
import {
  ANNOUNCE_TOPIC,
  type BrokerConnection,
  checkBrokerAddress,
  connect as connectBroker,
  formatAnnouncement,
  parseAddress,
  parseAnnouncement,
} from "./broker.ts";
import { Steering } from "./peer/steering.ts";
import { syncWithFolder } from "./peer/folder_sync.ts";

export { PeerError, TcpPeerClient } from "./peer/tcp.ts";
export type { Download } from "./peer/tcp.ts";
export { FetchError, type Holder, StoreWriteError, type Transport } from "./peer/fetch.ts";

/** gRPC listens on the TCP port plus this (6001 -> 50051), HTTP on the TCP port plus 2000. */
export const GRPC_PORT_OFFSET = 44050;
export const HTTP_PORT_OFFSET = 2000;

export interface PeerOptions {
  /** TCP port; 0 picks a free one. @default 6001 */
  port?: number;
  /** `host:port` of neighbours asked first for a fragment. */
  neighbours?: string[];
  /** The fragment store. @default `fragments/<port>` */
  dir?: string;
  /** Directory URL, or null for none. @default "http://localhost:5000" */
  directory?: string | null;
  /** Broker `host:port` or `nats://…`, or null for none. @default "localhost:5555" */
  broker?: string | null;
  /** The host other machines reach this peer at; the directory sees the request's address otherwise. */
  advertise?: string;
  /** Interface to listen on. @default "0.0.0.0" */
  hostname?: string;
  /** @default port + 44050 (a free one when port is 0); null for no gRPC server */
  grpcPort?: number | null;
  /**
   * The player's address as the user reaches it, printed at start: in a container, the one
   * published on the host. @default `http://ADVERTISE:HTTP_PORT/`
   */
  playerUrl?: string;
  /** The player's HTTP port. @default port + 2000 (a free one when port is 0); null for none */
  httpPort?: number | null;
  /** Upload limit in bytes per second, across all connections. */
  maxUpload?: number;
  /** The largest fragment fetched when the store has no manifest (bytes). @default 1 GiB */
  maxFragment?: number;
  /** Where console and event lines go. @default console.log */
  log?: (line: string) => void;
  /** Live swarm progress, for a progress bar; without it each arrival is a line. */
  progress?: (state: Progress) => void;
  /**
   * The file to fetch (`--fetch-all`, or the player of an empty store) when the store has no
   * manifest yet; needed when the directory lists several.
   */
  file?: string;
}

/** A running peer; close it (or dispose it) to leave the directory and stop serving. */
export interface Peer extends AsyncDisposable {
  readonly store: Store;
  readonly port: number;
  readonly grpcPort: number;
  readonly httpPort: number;
  /** Holders of `name` worth asking: neighbours first, then whom the directory knows. */
  holders(name: string): Promise<Holder[]>;
  /** Fetches `name` from a holder, verified and stored; resolves with where it came from. */
  fetch(name: string, transport?: Transport): Promise<string>;
  /** Neighbours and the peers the directory knows, one line each. */
  describePeers(): Promise<string[]>;
  /** Fetches every missing fragment from the swarm, then joins and verifies the file. */
  fetchAll(): Promise<Manifest>;
  /** The swarm: what the player asks for fragments and watches the map through. */
  readonly swarm: Swarm;
  /**
   * Leaves the directory and stops. With `drainMs`, it first finishes, for at most that long,
   * the uploads it has begun or queued: peers that were counting on it are not cut off.
   */
  close(options?: { drainMs?: number }): Promise<void>;
}

/** Starts a peer: its store, TCP server, directory presence and broker connection. */
export async function startPeer(options: PeerOptions = {}): Promise<Peer> {
  const log = options.log ?? ((line: string) => console.log(line));
  const requestedPort = options.port ?? 6001;
  checkDerivedPorts(requestedPort, options);
  const dir = options.dir ?? join("fragments", String(requestedPort));
  const neighbours = (options.neighbours ?? []).map((address) => {
    const { hostname, port } = parseAddress(address);
    return { host: hostname, port, grpcPort: port + GRPC_PORT_OFFSET };
  });
  const store = await Store.open(
    dir,
    (name) => log(`[!] '${name}' in ${dir} is corrupt; not serving it`),
  );
  const throttle = options.maxUpload ? createThrottle(options.maxUpload) : undefined;
  const hostname = options.hostname ?? "0.0.0.0";
  const steering = new Steering(store);
  const tcp: TcpServer = await listening(
    "TCP",
    requestedPort,
    hostname,
    () =>
      startTcpServer(store, {
        port: requestedPort,
        hostname,
        throttle,
        steering,
        onConnect: (remote) => log(`[+] Connected from ${remote}`),
        onSent: (name, remote) => log(`[✓] Fragment '${name}' sent to ${remote}`),
      }),
  );
  const port = tcp.port;
  // gRPC runs in a supervised child process: a remote client can crash Deno's http2 server
  // (denoland/deno#36788), and that must cost a restart of the child, never the peer. This
  // process holds the port and starts the child only when a client first talks gRPC.
  let grpc: GrpcFront | undefined;
  if (options.grpcPort !== null) {
    const wanted = options.grpcPort ?? (requestedPort === 0 ? 0 : port + GRPC_PORT_OFFSET);
    try {
      grpc = await listening("gRPC", wanted, hostname, () =>
        startGrpcFront({
          dir,
          port: wanted,
          hostname,
          directory: options.directory ?? undefined,
          // Its own pace, in its own process: TCP and gRPC are each held to the rate.
          maxUpload: options.maxUpload,
          onStored: (name) => {
            store.adopt(name).catch((error) => log(`[!] Cannot read '${name}': ${error.message}`));
          },
          onLog: (line) => log(line),
        }), options.grpcPort === undefined ? log : undefined);
    } catch (error) {
      await tcp.close();
      throw error;
    }
  }
  const grpcPort = grpc?.port ?? 0;
  const grpcClient = new LazyGrpcClient();

  const directory = options.directory === null
    ? undefined
    : new DirectoryClient(options.directory ?? "http://localhost:5000", { timeoutMs: 3_000 });
  let broker: BrokerConnection | undefined;
  if (options.broker !== null) {
    const address = options.broker ?? "localhost:5555";
    let said = false;
    broker = await connectBroker(address, {
      waitForBroker: true,
      onDisconnect: (error) => {
        if (said) return;
        said = true;
        log(`[BROKER] ${error.message}; announcements wait until it is back`);
      },
      onReconnect: () => {
        said = false;
        log(`[BROKER] Connected to ${address}`);
      },
    });
  }
  const self = { host: options.advertise ?? "localhost", port };
  let presence: Presence | undefined;
  store.onFragment((info) => {
    presence?.poke();
    broker?.publish(
      ANNOUNCE_TOPIC,
      formatAnnouncement(
        info.name,
        { hostname: self.host, port },
        store.manifest?.file,
        store.manifest?.sha256,
      ),
    );
  });
  const fetcher = new Fetcher(store, {
    log,
    maxFragment: options.maxFragment,
    self: holderAddress(self.host, port),
    grpcDownload: (address, name, signal) =>
      grpcClient.download(address, name, { signal, peer: holderAddress(self.host, grpcPort) }),
  });
  const swarm = new Swarm(store, fetcher, {
    directory,
    neighbours: () => neighbours,
    isSelf: (holder) => isSelf(holder),
  }, { log, progress: options.progress, file: options.file });
  // HAVE messages: what other peers announce they now hold, learnt within milliseconds.
  const announcements = broker
    ? listenForHaves(broker, { store, swarm, steering, isSelf: (holder) => isSelf(holder) })
    : undefined;
  // A player that watches fetches the rest of the video too, its own fragments first: a crowd
  // of watchers then holds different fragments to trade, not all the same one at once.
  let watching: Promise<void> | undefined;
  const watchInBackground = () =>
    swarm.fetchAll().then(() => {}, (error) => {
      if (!isFetchFailure(error)) throw error;
      if (!closing) log(`[!] ${error.message}`);
    });
  let player: PlayerServer | undefined;
  if (options.httpPort !== null) {
    const httpPort = options.httpPort ?? (requestedPort === 0 ? 0 : port + HTTP_PORT_OFFSET);
    try {
      player = await listening("HTTP player", httpPort, hostname, () =>
        startPlayer({
          store,
          need: (name, signal) => {
            watching ??= watchInBackground();
            return swarm.need(name, signal);
          },
          onEvent: (listener) => swarm.onEvent(listener),
          snapshot: () => swarm.snapshot(),
          findManifest: (ref?: string) => swarm.manifest(ref),
        }, { port: httpPort, hostname }), options.httpPort === undefined ? log : undefined);
    } catch (error) {
      swarm[Symbol.dispose]();
      await Promise.all([broker?.close(), tcp.close(), grpc?.close()]);
      grpcClient.close();
      throw error;
    }
  }
  const httpPort = player?.port ?? 0;
  // Only now that every server listens: a start that fails claims nothing.
  log(`[SERVER] Node listening on port ${port}`);
  if (grpc) log(`[gRPC] Listening on port ${grpcPort}`);
  if (player) {
    log(
      `[PLAYER] Watch at ${
        options.playerUrl ?? `http://${options.advertise ?? "localhost"}:${httpPort}/`
      }`,
    );
  }
  // Last, so the directory learns every port that is really open.
  if (directory) {
    presence = new Presence(directory, {
      state: () => ({
        ...(options.advertise ? { host: options.advertise } : {}),
        port,
        grpcPort,
        httpPort,
        fragments: store.list().map((f) => f.name),
      }),
      manifest: () => store.manifest,
      log,
    });
  }
  const folderSync = syncWithFolder(store, ({ lost, found, corrupt }) => {
    presence?.poke(); // what was found was announced as it was adopted
    if (lost.length > 0) log(`[STORE] Gone from ${dir}, no longer offered: ${nameList(lost)}`);
    if (found.length > 0) log(`[STORE] New in ${dir}, verified and offered: ${nameList(found)}`);
    if (corrupt.length > 0) log(`[!] Corrupt in ${dir}, not offered: ${nameList(corrupt)}`);
  });
  if (!options.progress) {
    swarm.onEvent((event: FragmentEvent) => {
      if (event.state !== "held" || !event.from) return;
      const total = store.manifest?.fragments.length ?? 0;
      const held = store.manifest?.fragments.filter((f) => store.get(f.name)).length ?? 0;
      log(`[swarm] ${event.name} from ${event.from} (${held}/${total})`);
    });
  }

  const isSelf = (holder: Holder) =>
    holder.port === port && (holder.host === options.advertise || LOOPBACK.has(holder.host));

  async function holders(name: string): Promise<Holder[]> {
    // Every split names its fragments fragment_<i>.bin: ask for the holders of this store's file.
    const located = directory
      ? await directory.locate(name, { file: store.manifest?.sha256 }).catch(() => [])
      : [];
    // Neighbours first; the directory knows a neighbour's real gRPC port, the command line only
    // the conventional one.
    const byAddress = new Map<string, Holder>();
    for (const holder of [...neighbours, ...located]) {
      const key = holderKey(holder);
      const known = byAddress.get(key);
      if (known) known.grpcPort = holder.grpcPort;
      else if (!isSelf(holder)) {
        byAddress.set(key, {
          host: holder.host,
          port: holder.port,
          grpcPort: holder.grpcPort,
        });
      }
    }
    return [...byAddress.values()];
  }

  async function fetch(name: string, transport: Transport = "tcp"): Promise<string> {
    if (!isFragmentName(name)) throw new FetchError(`Invalid fragment name "${name}"`);
    const manifest = store.manifest;
    if (manifest && !store.expected(name)) {
      // Not asked of anyone: the store would refuse it whoever held it.
      const names = manifest.fragments.map((f) => f.name);
      throw new FetchError(
        `"${name}" is not a fragment of ${manifest.file} (${names[0]} to ${names.at(-1)})`,
      );
    }
    const from = await fetcher.fetch(name, await holders(name), { transport });
    log(`[✓] Fragment '${name}' received from ${from}`);
    return from;
  }

  async function describePeers(): Promise<string[]> {
    const lines = neighbours.map((n) => `neighbour ${holderAddress(n.host, n.port)}`);
    if (directory) {
      try {
        for (const peer of await directory.listPeers()) {
          const address = holderAddress(peer.host, peer.port);
          lines.push(`directory ${address} holds ${peer.fragments.length} fragment(s)`);
        }
      } catch {
        lines.push(`directory ${directory.url} is not reachable`);
      }
    }
    return lines;
  }

  function fetchAll(): Promise<Manifest> {
    return swarm.fetchAll();
  }

  let closing: Promise<void> | undefined;
  function close({ drainMs = 0 } = {}): Promise<void> {
    closing ??= (async () => {
      folderSync[Symbol.dispose]();
      await presence?.close();
      const deadline = Date.now() + drainMs;
      while (tcp.uploads > 0 && Date.now() < deadline) {
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
      await broker?.close();
      await announcements;
      swarm[Symbol.dispose]();
      fetcher[Symbol.dispose]();
      grpcClient.close();
      await Promise.all([tcp.close(), grpc?.close(), player?.close()]);
    })();
    return closing;
  }

  return {
    store,
    port,
    grpcPort,
    httpPort,
    holders,
    fetch,
    describePeers,
    fetchAll,
    swarm,
    close,
    [Symbol.asyncDispose]: close,
  };
}

/**
 * Feeds the peers' announcements on `fragmentos` to the swarm (who to ask) and to the steering
 * (whom to point requesters at); runs until the broker client closes.
 */
async function listenForHaves(
  broker: BrokerConnection,
  { store, swarm, steering, isSelf }: {
    store: Store;
    swarm: Swarm;
    steering: Steering;
    isSelf: (holder: Holder) => boolean;
  },
): Promise<void> {
  const subscription = await broker.subscribe(ANNOUNCE_TOPIC).catch(() => undefined);
  if (!subscription) return; // closed before it began
  for await (const { message } of subscription) {
    const announcement = parseAnnouncement(message);
    // Only an announcement that gives the file's id is a HAVE: names are not unique.
    if (!announcement?.holder || announcement.fileId === undefined) continue;
    const { name, holder: { hostname, port }, fileId } = announcement;
    const holder = { host: hostname, port, grpcPort: 0 };
    if (isSelf(holder)) continue; // our own, back from the broker
    swarm.have(name, holder, fileId);
    if (fileId === store.manifest?.sha256) steering.have(name, holderAddress(hostname, port));
  }
}

/** One of the peer's servers could not listen; the message says which, and why. */
export class ListenError extends Error {
  override name = "ListenError";
}

/**
 * Throws a {@link ListenError} when the gRPC or HTTP port that follows from the TCP port (port +
 * 44050, port + 2000) was not given and would be past 65535: before anything listens.
 */
function checkDerivedPorts(port: number, options: PeerOptions) {
  if (port === 0) return; // free ports are picked for both
  const over: string[] = [];
  const flags: string[] = [];
  if (options.grpcPort === undefined && port + GRPC_PORT_OFFSET > 65535) {
    over.push(`gRPC port ${port + GRPC_PORT_OFFSET} (${port} + ${GRPC_PORT_OFFSET})`);
    flags.push("--grpc-port");
  }
  if (options.httpPort === undefined && port + HTTP_PORT_OFFSET > 65535) {
    over.push(`HTTP port ${port + HTTP_PORT_OFFSET} (${port} + ${HTTP_PORT_OFFSET})`);
    flags.push("--http-port");
  }
  if (over.length === 0) return;
  throw new ListenError(
    `The ${over.join(" and the ")} would be past 65535: choose ${
      over.length === 1 ? "it" : "them"
    } with ${flags.join(" and ")}`,
  );
}

/** Runs `start`, turning "address in use" and "not an address here" into a {@link ListenError}. */
async function listening<T>(
  server: string,
  port: number,
  hostname: string,
  start: () => T,
  waitSaying?: (line: string) => void,
): Promise<T> {
  const deadline = Date.now() + TIME_WAIT_MS;
  for (let said = false;; said = true) {
    try {
      return start();
    } catch (error) {
      // A derived port that only a recent connection holds frees itself within a minute.
      const wait = waitSaying && error instanceof Deno.errors.AddrInUse && port !== 0 &&
        Date.now() < deadline && !(await isServed(port, hostname));
      if (!wait) throw listenError(error, server, port, hostname);
      if (!said) {
        waitSaying(
          `[SERVER] Port ${port} (the peer's ${server} port) is held by a recent connection, ` +
            `not a server; waiting up to ${TIME_WAIT_MS / 1000} s for it to free itself`,
        );
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
}

/** What a failed listen means, in words: the port is taken, or the address is not ours. */
function listenError(error: unknown, server: string, port: number, hostname: string): unknown {
  if (error instanceof Deno.errors.AddrInUse) {
    return new ListenError(portTakenMessage(port, `the peer's ${server}`), { cause: error });
  }
  if (error instanceof Deno.errors.AddrNotAvailable) {
    return new ListenError(`Cannot listen on "${hostname}": it is not an address of this machine`, {
      cause: error,
    });
  }
  if (isLookupError(error)) {
    return new ListenError(lookupMessage(hostname, error), { cause: error });
  }
  return error;
}

const PROMPT = "Fragment to request (or 'exit'): ";
/** How long an `--exit-when-done` peer goes on with the uploads it has begun or queued. */
const EXIT_DRAIN_MS = 5_000;
const CONSOLE_HELP = `Commands:
  <fragment name>        fetch it (over TCP, or gRPC with --grpc) from a neighbour or any
                         holder the directory knows
  grpc <fragment name>   the same over gRPC
  all                    fetch the whole video from the swarm, then join and verify it
  list                   the fragments this peer holds
  peers                  neighbours and the peers the directory knows
  help                   this text
  exit                   leave the directory and stop`;

/** Where the console writes: its prompt and answers, and when a typed line ended. */
export interface ConsoleOutput {
  write(text: string): void;
  /** A line was typed: what the command logs goes below the prompt's line, not on it. */
  lineEnded(): void;
}

/**
 * Reads commands from `input` until `exit` or its end; resolves true when asked to exit. Once
 * `signal` aborts (the peer is stopping), a command cut short says nothing and no prompt follows.
 */
export async function runConsole(
  peer: Peer,
  input: ReadableStream<Uint8Array>,
  output: ConsoleOutput,
  { transport = "tcp", signal }: { transport?: Transport; signal?: AbortSignal } = {},
): Promise<boolean> {
  output.write(PROMPT);
  for await (const line of readLines(input)) {
    output.lineEnded();
    if (isExit(line)) return true;
    try {
      await runCommand(peer, line, output.write, transport);
    } catch (error) {
      if (signal?.aborted) return false;
      if (!isFetchFailure(error)) throw error;
      console.error(`[x] ${error.message}`);
    }
    if (signal?.aborted) return false;
    output.write(PROMPT);
  }
  return false;
}

function isExit(line: string): boolean {
  const word = line.trim();
  return word === "exit" || word === "quit";
}

/** Runs one console command. */
async function runCommand(
  peer: Peer,
  line: string,
  write: (text: string) => void,
  transport: Transport,
): Promise<void> {
  const [word = "", ...rest] = line.trim().split(/\s+/);
  if (word === "") {
    // nothing typed
  } else if (word === "help") {
    write(CONSOLE_HELP + "\n");
  } else if (word === "list") {
    const held = peer.store.list();
    write(
      held.length === 0
        ? "(no fragments yet)\n"
        : held.map((f) => `${f.name}  ${f.size} bytes\n`).join(""),
    );
  } else if (word === "peers") {
    const lines = await peer.describePeers();
    write(lines.length === 0 ? "(no neighbours, no directory)\n" : lines.join("\n") + "\n");
  } else if (word === "all" && rest.length === 0) {
    await peer.fetchAll();
  } else if ((word === "grpc" || word === "tcp") && rest.length === 1) {
    await fetchFromConsole(peer, rest[0]!, word);
  } else if (word === "grpc" || word === "tcp") {
    write(`Give one fragment name: ${word} <fragment name>\n`); // not a fragment called "grpc"
  } else if (rest.length === 0) {
    await fetchFromConsole(peer, word, transport);
  } else {
    write(`Unknown command "${line.trim()}"; type 'help'\n`);
  }
}

/** Errors a fetch may end with that are the world's fault, not a bug: shown, not thrown. */
function isFetchFailure(error: unknown): error is Error {
  return error instanceof FetchError || error instanceof StoreWriteError ||
    error instanceof SplitError;
}

/**
 * What to say when a peer starts with nothing to serve: how to fill its store (split deals the
 * sample into `fragments/<port>/` for each port it names), or how to fetch into it (typed at the
 * console, unless there is none). Whether a neighbour already holds fragments is not known yet,
 * so both are offered.
 */
function emptyStoreHint(
  dir: string,
  port: number,
  neighbours: string[],
  hasConsole: boolean,
): string {
  const ports = [port, ...neighbours.map((neighbour) => neighbour.split(":").at(-1))];
  const fill = dir === join("fragments", String(port))
    ? `deno task split --peers ${ports.join(",")}`
    : `deno task split --out ${dir}`;
  const how = hasConsole
    ? "type a fragment name or 'all', or start with --fetch-all"
    : "start with --fetch-all";
  return `The store "${dir}" is empty: split a file into it with \`${fill}\` and restart, or ` +
    `fetch from peers that have fragments (${how})`;
}

/** Draws the swarm's progress on one terminal line. */
function drawProgress(state: Progress): void {
  const width = 24;
  const filled = Math.round((state.held / Math.max(state.total, 1)) * width);
  const bar = "#".repeat(filled) + ".".repeat(width - filled);
  const rate = (state.bytesPerSecond / 1e6).toFixed(1);
  const text = `\r[${bar}] ${state.held}/${state.total} fragments  ${rate} MB/s  ` +
    `${state.peers} peer(s)\x1b[K`;
  Deno.stdout.writeSync(new TextEncoder().encode(text));
}

async function fetchFromConsole(peer: Peer, name: string, transport: Transport): Promise<void> {
  // Opening it, not asking the index: a fragment deleted behind the peer's back is fetched anew.
  const held = await peer.store.open(name);
  if (held) {
    held.file.close();
    console.log(`[=] Fragment '${name}' is already here`);
    return;
  }
  await peer.fetch(name, transport);
}

async function* readLines(input: ReadableStream<Uint8Array>): AsyncGenerator<string> {
  let pending = "";
  for await (const text of input.pipeThrough(new TextDecoderStream())) {
    pending += text;
    let newline;
    while ((newline = pending.indexOf("\n")) !== -1) {
      yield pending.slice(0, newline).replace(/\r$/, "");
      pending = pending.slice(newline + 1);
    }
  }
  if (pending !== "") yield pending;
}

const USAGE = `Usage: deno task peer PORT [NEIGHBOUR ...] [options]

A P2P node: serves the fragments in its store over TCP (PORT) and gRPC, fetches what it lacks
from NEIGHBOURs (host:port) or any holder the directory knows, verifying every byte.

Options:
  --dir DIR              fragment store (default fragments/PORT)
  --directory URL[,URL...]
                         directory, or replicas to fail over between, comma-separated
                         (default $DIRECTORY_URL or http://localhost:5000)
  --broker ADDRESS       pub/sub broker: host:port, or nats://host:4222[,...] for NATS
                         (default $BROKER_ADDR or localhost:5555)
  --advertise HOST       the host other machines reach this peer at (default: as the directory sees it)
  --hostname HOST        interface to listen on (default 0.0.0.0)
  --grpc-port PORT       gRPC port (default PORT + 44050)
  --http-port PORT       HTTP player port (default PORT + 2000)
  --player-url URL       the player's address as printed, e.g. the one a container publishes
                         (default http://ADVERTISE:HTTP_PORT/)
  --max-upload RATE      upload limit, e.g. 20MB/s or 512KiB/s
  --max-fragment SIZE    the largest fragment fetched without a manifest, e.g. 4GiB (default 1GiB)
  --fetch-all            fetch the whole video from the swarm, join and verify it, keep seeding
  --exit-when-done       with --fetch-all: exit 0 once the video is complete instead of seeding
  --file NAME|ID         the file to fetch when the store has none yet: its name, or its id (the
                         whole-file SHA-256) or 6+ of its first hex digits when several files
                         share the name (default: the directory's only file)
  --grpc                 fetch over gRPC instead of TCP at the console
  --no-console           no prompt: serve until SIGINT or SIGTERM (for containers)
  -h, --help             show this help

At the prompt, type a fragment name to fetch it, or 'help' for the other commands.`;

async function main(args = Deno.args): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      dir: { type: "string" },
      directory: { type: "string" },
      broker: { type: "string" },
      advertise: { type: "string" },
      hostname: { type: "string" },
      "grpc-port": { type: "string" },
      "http-port": { type: "string" },
      "player-url": { type: "string" },
      "max-upload": { type: "string" },
      "max-fragment": { type: "string" },
      grpc: { type: "boolean" },
      "fetch-all": { type: "boolean" },
      "exit-when-done": { type: "boolean" },
      file: { type: "string" },
      "no-console": { type: "boolean" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const [portText, ...neighbours] = positionals;
  if (portText === undefined) {
    throw new UserError("Missing the TCP port, e.g. 'deno task peer 6001'");
  }
  for (const neighbour of neighbours) {
    try {
      parseAddress(neighbour);
    } catch {
      throw new UserError(
        `Invalid neighbour "${neighbour}": expected host:port, e.g. localhost:6002`,
      );
    }
  }
  let maxUpload, maxFragment;
  try {
    maxUpload = values["max-upload"] === undefined ? undefined : parseRate(values["max-upload"]);
    maxFragment = values["max-fragment"] === undefined
      ? undefined
      : parseSize(values["max-fragment"]);
  } catch (error) {
    throw new UserError((error as Error).message);
  }
  if (values["exit-when-done"] && !values["fetch-all"]) {
    throw new UserError("--exit-when-done goes with --fetch-all");
  }
  if (values.file !== undefined && !isValidName(values.file)) {
    throw new UserError(
      `Invalid --file "${values.file}": expected a file name such as sample.webm, or its id`,
    );
  }
  const directory = values.directory ?? envIfGranted("DIRECTORY_URL") ?? "http://localhost:5000";
  try {
    parseDirectoryUrls(directory);
  } catch {
    throw new UserError(
      `Invalid directory "${directory}": expected an http:// URL, or several separated by ` +
        `commas, e.g. http://localhost:5000`,
    );
  }
  const playerUrl = values["player-url"];
  if (playerUrl !== undefined && !/^https?:$/.test(URL.parse(playerUrl)?.protocol ?? "")) {
    throw new UserError(
      `Invalid --player-url "${playerUrl}": expected an http:// URL, e.g. http://localhost:8004/`,
    );
  }
  const broker = values.broker ?? envIfGranted("BROKER_ADDR") ?? "localhost:5555";
  try {
    checkBrokerAddress(broker);
  } catch {
    throw new UserError(
      `Invalid broker "${broker}": expected host:port or nats://host:port, e.g. localhost:5555`,
    );
  }
  if (values.advertise !== undefined && !HOST_PATTERN.test(values.advertise)) {
    throw new UserError(
      `Invalid --advertise "${values.advertise}": expected a hostname or an IP address`,
    );
  }
  const port = parsePort(portText, "port");
  const dir = values.dir ?? join("fragments", String(port));
  // `deno run peer.ts 6001 localhost:6002`, as the design card has it: one question per kind.
  await askOncePerKind([
    { name: "read", path: dir },
    { name: "write", path: dir },
    { name: "net", host: `0.0.0.0:${port}` },
    { name: "run", command: Deno.execPath() }, // the gRPC server's child, at its first client
  ]);
  const dirInfo = await Deno.stat(dir).catch(() => undefined);
  if (dirInfo && !dirInfo.isDirectory) {
    throw new UserError(`The store "${dir}" is a file, not a folder: give --dir a folder`);
  }
  const showProgress = values["fetch-all"] && Deno.stdout.isTerminal();
  let barShown = false;
  let promptLast = false; // the console's prompt was the last thing written: no newline after it
  const write = (text: string) => {
    Deno.stdout.writeSync(new TextEncoder().encode(text));
    promptLast = text.endsWith(PROMPT);
  };
  let peer: Peer;
  try {
    peer = await startPeer({
      port,
      neighbours,
      dir,
      directory,
      broker,
      advertise: values.advertise,
      hostname: values.hostname,
      grpcPort: values["grpc-port"] === undefined
        ? undefined
        : parsePort(values["grpc-port"], "gRPC port"),
      httpPort: values["http-port"] === undefined
        ? undefined
        : parsePort(values["http-port"], "HTTP port"),
      playerUrl: values["player-url"],
      maxUpload,
      maxFragment,
      file: values.file,
      progress: showProgress ? (state) => (drawProgress(state), barShown = true) : undefined,
      // A line logged while the bar or the prompt is drawn goes below it, not glued to it, and
      // the prompt is drawn again below the line (what was typed stays typed).
      log: (line) => {
        const prompted = promptLast;
        if (barShown || prompted) console.log();
        barShown = promptLast = false;
        console.log(line);
        if (prompted) write(PROMPT);
      },
    });
  } catch (error) {
    if (error instanceof ListenError) throw new UserError(error.message);
    throw error;
  }
  if (!values["fetch-all"] && !peer.store.manifest && peer.store.list().length === 0) {
    console.log(`[SERVER] ${emptyStoreHint(dir, port, neighbours, !values["no-console"])}`);
  }
  // Before the fetch-all, so that Ctrl-C during it still leaves the directory.
  const stop = Promise.withResolvers<void>();
  const stopping = new AbortController();
  for (const signal of ["SIGINT", "SIGTERM"] as const) {
    Deno.addSignalListener(signal, () => stop.resolve());
  }
  if (values["fetch-all"]) {
    try {
      const interrupted = await Promise.race([peer.fetchAll(), stop.promise.then(() => true)]);
      if (interrupted === true) {
        await peer.close();
        return 130;
      }
    } catch (error) {
      if (!isFetchFailure(error)) throw error;
      // Out of disk: what is held is whole and verified, so the peer goes on seeding it.
      if (isDiskFull(error.cause) && !values["exit-when-done"]) {
        console.log(`[!] ${error.message}; seeding the ${peer.store.list().length} fragments held`);
      } else {
        await peer.close();
        throw new UserError(error.message);
      }
    }
    if (values["exit-when-done"]) {
      // Leaving in the middle of uploads would cut off the crowd that counts on them.
      await peer.close({ drainMs: EXIT_DRAIN_MS });
      return 0;
    }
  }
  if (!values["no-console"]) {
    const output = {
      write,
      // A terminal echoed the Enter that ended the prompt's line; from a pipe, it is ended here.
      lineEnded: () => {
        if (promptLast && !Deno.stdin.isTerminal()) write("\n");
        promptLast = false;
      },
    };
    const transport = values.grpc ? "grpc" : "tcp";
    runConsole(peer, Deno.stdin.readable, output, { transport, signal: stopping.signal }).then(
      (exit) => {
        if (exit) return stop.resolve();
        if (stopping.signal.aborted) return;
        if (promptLast) write("\n"); // the line below would end up on the prompt's
        console.error("[CONSOLE] Input ended; still serving (Ctrl-C to stop)");
      },
      (error) => {
        if (!isUserError(error)) stop.reject(error);
      },
    );
  }
  await stop.promise;
  stopping.abort();
  await peer.close();
  return 0;
}

if (import.meta.main) await runMain(main);
