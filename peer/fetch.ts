/**
 * Fetching one fragment from whichever holder can give it: holders are tried in turn, over TCP
 * (one pooled connection per holder) or gRPC; bytes are verified as the store writes them; a
 * holder that is down is skipped, and one that sent wrong bytes is avoided for a while.
 * @module
 */
import { type Download, formatHostPort, PeerError, TcpPeerClient } from "./tcp.ts";
import { parseAddress } from "../broker.ts";
import { IntegrityError, type Store } from "./store.ts";

/** A peer that may hold a fragment: its host, TCP port and gRPC port. */
export interface Holder {
  host: string;
  port: number;
  grpcPort: number;
}

/** How fragments travel: the TCP protocol or gRPC `Download`. */
export type Transport = "tcp" | "grpc";

export interface FetchOptions {
  /** @default "tcp" */
  transport?: Transport;
  signal?: AbortSignal;
  /** Try the holders an `ERR ELSEWHERE` names. @default true */
  follow?: boolean;
}

/** Downloads `name` from a gRPC address; supplied by peer_grpc.ts. */
export type GrpcDownload = (
  address: string,
  name: string,
  signal?: AbortSignal,
) => Promise<Download>;

export interface FetcherOptions {
  grpcDownload?: GrpcDownload;
  /**
   * This peer's own `host:port`, as it announces itself: said (`HELLO`) on each new connection,
   * so holders share their upload fairly between peers and can point others at it.
   */
  self?: string;
  /** How long a holder that sent bad bytes is left alone. @default 60_000 */
  avoidMs?: number;
  /** Diagnostics, one line each (a holder down, bad bytes). */
  log?: (line: string) => void;
}

/** Nobody could provide the fragment; `failures` says what happened with each holder. */
export class FetchError extends Error {
  override name = "FetchError";
  constructor(message: string, readonly failures: Failure[] = []) {
    super(message);
  }
}

/** The disk failed while a fragment was written: nothing partial was kept. */
export class StoreWriteError extends Error {
  override name = "StoreWriteError";
}

// Wraps an error that came from the sender's side, so it is told apart from a disk error.
class SourceError extends Error {
  override name = "SourceError";
}

/** `host:port` of a holder, bracketing IPv6 hosts. */
export const holderAddress: (host: string, port: number) => string = formatHostPort;

/** Hosts that reach this machine: the loopback names, and the wildcards a peer listens on. */
export const LOOPBACK: ReadonlySet<string> = new Set([
  "localhost",
  "127.0.0.1",
  "::1",
  "0.0.0.0",
  "::",
]);

/**
 * A holder's address with every {@link LOOPBACK} name as one, so that a neighbour typed as
 * `localhost:6001` and the directory's `127.0.0.1:6001` are known to be the same peer.
 */
export function holderKey(holder: Pick<Holder, "host" | "port">): string {
  return holderAddress(LOOPBACK.has(holder.host) ? "loopback" : holder.host, holder.port);
}

/** Fetches fragments into a store; close it to drop its pooled connections. */
export class Fetcher implements Disposable {
  readonly #store: Store;
  readonly #options: FetcherOptions;
  // Idle connections per holder address: a fetch leases one, and returns it when the fragment's
  // bytes are all read, so fetches from one holder can run side by side.
  readonly #idle = new Map<string, TcpPeerClient[]>();
  readonly #leased = new Set<TcpPeerClient>();
  readonly #avoidUntil = new Map<string, number>();

  constructor(store: Store, options: FetcherOptions = {}) {
    this.#store = store;
    this.#options = options;
  }

  /** True while `holder` is being avoided for having sent bad bytes. */
  isAvoided(holder: Holder): boolean {
    return (this.#avoidUntil.get(holderAddress(holder.host, holder.port)) ?? 0) > Date.now();
  }

  /**
   * Tries `holders` in order until one provides `name` with the right bytes; resolves with the
   * address it came from. A holder that points elsewhere (`ERR ELSEWHERE`) has the peers it names
   * tried next, and is asked once more after them, unless `follow` is false (the swarm weighs
   * pointers itself). Throws {@link FetchError} when none could (or `signal` aborted), and
   * {@link StoreWriteError} when the disk failed (trying elsewhere would not help).
   */
  async fetch(name: string, holders: Holder[], options: FetchOptions = {}): Promise<string> {
    const { transport = "tcp", signal, follow = true } = options;
    const failures: Failure[] = [];
    const queue = [...holders];
    const queued = new Set(queue.map(holderKey));
    for (let i = 0; i < queue.length; i++) {
      const holder = queue[i]!;
      if (signal?.aborted) break;
      const address = holderAddress(
        holder.host,
        transport === "grpc" ? holder.grpcPort : holder.port,
      );
      if (transport === "grpc" && holder.grpcPort === 0) {
        const text = `${holderAddress(holder.host, holder.port)} serves no gRPC`;
        failures.push({ address, kind: "missing", text });
        continue;
      }
      if (this.isAvoided(holder)) {
        failures.push({
          address,
          kind: "avoided",
          text: `${address} is avoided (it sent bad bytes)`,
        });
        continue;
      }
      const failure = await this.#attempt(name, holder, address, transport, signal);
      if (!failure) return address;
      failures.push(failure);
      if (failure.kind === "bad" || failure.kind === "down") {
        this.#options.log?.(`[!] ${failure.text}; trying the next holder`);
      }
      if (failure.kind === "elsewhere" && follow) {
        // The peers it names first; then itself again, as it serves a requester it pointed
        // away once the others failed it.
        for (const pointed of failure.elsewhere ?? []) {
          // Over gRPC a pointer names gRPC addresses; over TCP, TCP ones.
          const { hostname, port } = parseAddress(pointed);
          const next = { host: hostname, port, grpcPort: transport === "grpc" ? port : 0 };
          if (queued.has(holderKey(next))) continue;
          queue.push(next);
          queued.add(holderKey(next));
        }
        if (!queue.slice(i + 1).includes(holder)) queue.push(holder);
      }
    }
    const why = signal?.aborted
      ? "cancelled"
      : failures.length === 0
      ? "no holder known"
      : failures.map((f) => f.text).join("; ");
    throw new FetchError(`Could not fetch '${name}': ${why}`, failures);
  }

  // One try at one holder: undefined on success, or what went wrong.
  async #attempt(
    name: string,
    holder: Holder,
    address: string,
    transport: Transport,
    signal?: AbortSignal,
  ): Promise<Failure | undefined> {
    let client: TcpPeerClient | undefined;
    const onAbort = () => client?.close();
    signal?.addEventListener("abort", onAbort);
    try {
      let download: Download;
      try {
        if (transport === "grpc") {
          if (!this.#options.grpcDownload) throw new Error("gRPC is not available");
          download = await this.#options.grpcDownload(address, name, signal);
        } else {
          ({ client, download } = await this.#lease(address, name));
        }
      } catch (error) {
        if (error instanceof Deno.errors.NotCapable) throw error;
        if (error instanceof PeerError && error.code === "ELSEWHERE") {
          const text = `${address} points elsewhere (${error.elsewhere.join(", ")})`;
          return { address, kind: "elsewhere", text, elsewhere: error.elsewhere };
        }
        if (error instanceof PeerError) {
          return { address, kind: "missing", text: `${address} answered ${error.code}` };
        }
        return { address, kind: "down", text: `${address} failed (${message(error)})` };
      }
      // Every split names its fragments fragment_<i>.bin: a holder that announces other bytes
      // under the name holds another file's fragment. It told the truth, so it is not avoided.
      const want = this.#store.expected(name);
      if (want && (want.size !== download.size || want.sha256 !== download.sha256)) {
        client?.close(); // the bytes will not be read
        download.cancel?.();
        return { address, kind: "missing", text: `${address} holds another file's '${name}'` };
      }
      try {
        await this.#store.write(name, download, fromSource(download.chunks));
      } catch (error) {
        client?.close(); // the exchange may have stopped half-way
        if (error instanceof IntegrityError) {
          const avoidMs = this.#options.avoidMs ?? 60_000;
          this.#avoidUntil.set(holderAddress(holder.host, holder.port), Date.now() + avoidMs);
          return {
            address,
            kind: "bad",
            text: `'${name}' from ${address} failed verification; avoiding it`,
          };
        }
        if (error instanceof SourceError) {
          return {
            address,
            kind: "down",
            text: `${address} failed mid-fragment (${message(error.cause)})`,
          };
        }
        throw new StoreWriteError(
          `Cannot store '${name}' in "${this.#store.dir}": ${message(error)}`,
          {
            cause: error,
          },
        );
      }
      return undefined;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (client) this.#release(address, client);
    }
  }

  // Requests `name` on an idle connection to `address`, or a new one. An idle connection may be
  // stale (the holder restarted): a failure on one is retried once on a fresh connection.
  async #lease(
    address: string,
    name: string,
  ): Promise<{ client: TcpPeerClient; download: Download }> {
    const idle = this.#idle.get(address) ?? [];
    for (let client; (client = idle.pop());) {
      if (client.closed) continue;
      this.#leased.add(client);
      try {
        return { client, download: await client.get(name) };
      } catch (error) {
        if (error instanceof PeerError) {
          this.#release(address, client);
          throw error;
        }
        this.#leased.delete(client);
        client.close();
      }
    }
    const client = await TcpPeerClient.connect(address);
    this.#leased.add(client);
    try {
      if (this.#options.self) await client.hello(this.#options.self);
      return { client, download: await client.get(name) };
    } catch (error) {
      this.#release(address, client);
      throw error;
    }
  }

  #release(address: string, client: TcpPeerClient): void {
    this.#leased.delete(client);
    if (client.closed) return;
    const idle = this.#idle.get(address) ?? [];
    idle.push(client);
    this.#idle.set(address, idle);
  }

  [Symbol.dispose](): void {
    for (const idle of this.#idle.values()) idle.forEach((client) => client.close());
    for (const client of this.#leased) client.close();
    this.#idle.clear();
  }
}

/**
 * What went wrong with one holder: it was down, sent bad bytes, lacked the fragment, was avoided,
 * or pointed at other holders (`elsewhere`, their `host:port`) to spare its upload.
 */
export interface Failure {
  address: string;
  kind: "down" | "bad" | "missing" | "avoided" | "elsewhere";
  text: string;
  elsewhere?: string[];
}

async function* fromSource(chunks: AsyncIterable<Uint8Array>): AsyncGenerator<Uint8Array> {
  try {
    yield* chunks;
  } catch (error) {
    throw new SourceError("The sender failed", { cause: error });
  }
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
