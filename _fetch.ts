/**
 * Fetching one fragment from whichever holder can give it: holders are tried in turn, over TCP
 * (one pooled connection per holder) or gRPC; bytes are verified as the store writes them; a
 * holder that is down is skipped, and one that sent wrong bytes is avoided for a while.
 * @module
 */
import { type Download, PeerError, TcpPeerClient } from "./_peer_tcp.ts";
import { IntegrityError, type Store } from "./_store.ts";

/** A peer that may hold a fragment: its host, TCP port and gRPC port. */
export interface Holder {
  host: string;
  port: number;
  grpcPort: number;
}

/** How fragments travel: the TCP protocol or gRPC `Download`. */
export type Transport = "tcp" | "grpc";

/** Downloads `name` from a gRPC address; supplied by peer_grpc.ts. */
export type GrpcDownload = (address: string, name: string) => Promise<Download>;

export interface FetcherOptions {
  grpcDownload?: GrpcDownload;
  /** How long a holder that sent bad bytes is left alone. @default 60_000 */
  avoidMs?: number;
  /** Diagnostics, one line each (a holder down, bad bytes). */
  log?: (line: string) => void;
}

/** Nobody could provide the fragment; `reasons` says what happened with each holder. */
export class FetchError extends Error {
  override name = "FetchError";
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
export function holderAddress(host: string, port: number): string {
  return host.includes(":") ? `[${host}]:${port}` : `${host}:${port}`;
}

/** Fetches fragments into a store; close it to drop its pooled connections. */
export class Fetcher implements Disposable {
  readonly #store: Store;
  readonly #options: FetcherOptions;
  readonly #pool = new Map<string, Promise<TcpPeerClient>>();
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
   * address it came from. Throws {@link FetchError} when none could, and
   * {@link StoreWriteError} when the disk failed (trying elsewhere would not help).
   */
  async fetch(name: string, holders: Holder[], transport: Transport = "tcp"): Promise<string> {
    const reasons: string[] = [];
    for (const holder of holders) {
      const address = holderAddress(
        holder.host,
        transport === "grpc" ? holder.grpcPort : holder.port,
      );
      if (this.isAvoided(holder)) {
        reasons.push(`${address} is avoided (it sent bad bytes)`);
        continue;
      }
      let download;
      try {
        download = await this.#download(holder, name, transport);
      } catch (error) {
        if (error instanceof Deno.errors.NotCapable) throw error;
        if (error instanceof PeerError) {
          reasons.push(`${address} answered ${error.code}`);
        } else {
          this.#drop(holder);
          this.#options.log?.(`[!] ${address} failed (${message(error)}); trying the next holder`);
          reasons.push(`${address} failed`);
        }
        continue;
      }
      try {
        await this.#store.write(name, download, fromSource(download.chunks));
        return address;
      } catch (error) {
        this.#drop(holder); // the exchange may have stopped half-way
        if (error instanceof IntegrityError) {
          const avoidMs = this.#options.avoidMs ?? 60_000;
          this.#avoidUntil.set(holderAddress(holder.host, holder.port), Date.now() + avoidMs);
          this.#options.log?.(`[!] '${name}' from ${address} failed verification; avoiding it`);
          reasons.push(`${address} sent bad bytes`);
        } else if (error instanceof SourceError) {
          this.#options.log?.(
            `[!] ${address} failed (${message(error.cause)}); trying the next holder`,
          );
          reasons.push(`${address} failed mid-fragment`);
        } else {
          throw new StoreWriteError(
            `Cannot store '${name}' in "${this.#store.dir}": ${message(error)}`,
            { cause: error },
          );
        }
      }
    }
    throw new FetchError(
      holders.length === 0
        ? `No holder known for '${name}'`
        : `Could not fetch '${name}': ${reasons.join("; ")}`,
    );
  }

  async #download(holder: Holder, name: string, transport: Transport): Promise<Download> {
    if (transport === "grpc") {
      if (!this.#options.grpcDownload) throw new Error("gRPC is not available");
      return await this.#options.grpcDownload(holderAddress(holder.host, holder.grpcPort), name);
    }
    const address = holderAddress(holder.host, holder.port);
    const pooled = await this.#pool.get(address)?.catch(() => undefined);
    if (pooled && !pooled.closed) {
      try {
        return await pooled.get(name);
      } catch (error) {
        if (error instanceof PeerError) throw error;
        // A pooled connection may be stale (the holder restarted): retry once on a fresh one.
        this.#drop(holder);
      }
    }
    return await (await this.#client(holder)).get(name);
  }

  async #client(holder: Holder): Promise<TcpPeerClient> {
    const address = holderAddress(holder.host, holder.port);
    const connecting = TcpPeerClient.connect(address);
    this.#pool.set(address, connecting);
    try {
      return await connecting;
    } catch (error) {
      this.#pool.delete(address);
      throw error;
    }
  }

  #drop(holder: Holder): void {
    const address = holderAddress(holder.host, holder.port);
    this.#pool.get(address)?.then((client) => client.close(), () => {});
    this.#pool.delete(address);
  }

  [Symbol.dispose](): void {
    for (const client of this.#pool.values()) client.then((c) => c.close(), () => {});
    this.#pool.clear();
  }
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
