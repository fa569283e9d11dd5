/**
 * Fetching one fragment from whichever holder can give it: holders are tried in turn, over TCP
 * (one pooled connection per holder) or gRPC; bytes are verified as the store writes them; a
 * holder that is down is skipped, and one that sent wrong bytes is avoided for a while.
 * @module
 */
import { type Download, formatHostPort, PeerError, TcpPeerClient } from "./tcp.ts";
import { parseAddress } from "../broker.ts";
import { IntegrityError, type Store } from "./store.ts";
import { escapeControl, isDiskFull } from "../common/cli.ts";

/**
 * The largest fragment fetched when the store has no manifest to say its size (the peer's
 * `--max-fragment`): a holder announcing more is taken for a liar, before a byte is written.
 * 1 GiB: the default split (10 fragments) of a file up to 10 GiB fits under it, and a split into
 * its most fragments (5,000) of any file up to 5 TiB; a liar costs at most that much temporary
 * disk, removed at once. With a manifest, the manifest's size rules.
 */
export const DEFAULT_MAX_FRAGMENT = 1024 ** 3;
/**
 * A fragment's bytes must arrive at least this fast (bytes per second) in each window of
 * {@link DEFAULT_RATE_WINDOW_MS} from its first line on, or its holder is left for the next:
 * the rate a peer's TCP server asks of its readers too. A holder that drips a byte every few
 * seconds is left within 20 s; a seeder at `--max-upload 20KB/s` sharing its two upload slots
 * (10 KB/s each, in 64 KiB bursts) still passes.
 */
export const DEFAULT_MIN_RATE = 8 * 1024;
/** The window {@link DEFAULT_MIN_RATE} is measured over. */
export const DEFAULT_RATE_WINDOW_MS = 20_000;

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
  /** A player waits for it: holders serve it ahead of others waiting (TCP only). */
  urgent?: boolean;
  /** Called when a holder begins to send (its answer came), before the bytes. */
  onSending?: (address: string) => void;
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
  /**
   * The largest fragment taken without a manifest (bytes); a holder announcing more is left as
   * a liar. @default DEFAULT_MAX_FRAGMENT (1 GiB)
   */
  maxFragment?: number;
  /** A holder sending slower than this (bytes per second) over a window is left. @default 8192 */
  minRate?: number;
  /** @default 20_000 */
  rateWindowMs?: number;
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
    const { transport = "tcp", signal, follow = true, urgent = false, onSending } = options;
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
      const failure = await this.#attempt(name, holder, address, {
        transport,
        signal,
        urgent,
        onSending,
      });
      if (!failure) return address;
      // Its text quotes what the holder said: shown on a terminal, it must stay plain text.
      failure.text = escapeControl(failure.text);
      failures.push(failure);
      // Not once the fetch is called off (Ctrl-C): a holder stopping with it is no news. Nor
      // after the last holder: the FetchError says it, and nothing is tried next.
      const last = i + 1 === queue.length;
      if ((failure.kind === "bad" || failure.kind === "down") && !last && !signal?.aborted) {
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
    { transport, signal, urgent, onSending }: Pick<FetchOptions, "signal" | "onSending"> & {
      transport: Transport;
      urgent: boolean;
    },
  ): Promise<Failure | undefined> {
    // Peers asking this one for the fragment meanwhile wait for its bytes, to pass them on.
    using _expecting = this.#store.expect(name);
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
          // Known before the request goes out, so a cancel closes it while the request waits
          // for the holder's answer (its upload slots may all be busy).
          const lease = (leased: TcpPeerClient) => {
            client = leased;
            if (signal?.aborted) leased.close();
          };
          download = await this.#lease(address, name, { urgent, lease, signal });
        }
      } catch (error) {
        if (error instanceof Deno.errors.NotCapable) throw error;
        if (error instanceof PeerError && error.code === "ELSEWHERE") {
          const text = `${address} points elsewhere (${error.elsewhere.join(", ")})`;
          return { address, kind: "elsewhere", text, elsewhere: error.elsewhere };
        }
        if (error instanceof PeerError) {
          const said = error.message === "" ? "" : `: ${error.message.slice(0, 200)}`;
          return { address, kind: "missing", text: `${address} answered ${error.code}${said}` };
        }
        return { address, kind: "down", text: `${address} failed (${message(error)})` };
      }
      onSending?.(address);
      // Every split names its fragments fragment_<i>.bin: a holder that announces other bytes
      // under the name holds another file's fragment. It told the truth, so it is not avoided.
      const want = this.#store.expected(name);
      if (want && (want.size !== download.size || want.sha256 !== download.sha256)) {
        client?.close(); // the bytes will not be read
        download.cancel?.();
        return { address, kind: "missing", text: `${address} holds another file's '${name}'` };
      }
      const max = this.#options.maxFragment ?? DEFAULT_MAX_FRAGMENT;
      if (!want && download.size > max) {
        client?.close(); // the bytes will not be read
        download.cancel?.();
        this.#avoid(holder);
        return {
          address,
          kind: "bad",
          text: `${address} announced '${name}' at ${formatSize(download.size)}, over the ` +
            `${formatSize(max)} a fragment may have (--max-fragment); avoiding it`,
        };
      }
      const rate = this.#watchRate(address, download, () => {
        client?.close();
        download.cancel?.();
      });
      try {
        await this.#store.write(name, download, fromSource(rate.chunks));
      } catch (error) {
        client?.close(); // the exchange may have stopped half-way
        if (rate.slow) return { address, kind: "down", text: rate.slow };
        if (error instanceof IntegrityError) {
          this.#avoid(holder);
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
        const why = isDiskFull(error)
          ? "the disk is full (no space left on device)"
          : message(error);
        throw new StoreWriteError(`Cannot store '${name}' in "${this.#store.dir}": ${why}`, {
          cause: error,
        });
      } finally {
        rate.stop();
      }
      return undefined;
    } finally {
      signal?.removeEventListener("abort", onAbort);
      if (client) this.#release(address, client);
    }
  }

  #avoid(holder: Holder): void {
    const avoidMs = this.#options.avoidMs ?? 60_000;
    this.#avoidUntil.set(holderAddress(holder.host, holder.port), Date.now() + avoidMs);
  }

  /**
   * Passes `download`'s chunks through, counting them: when a window (`rateWindowMs`) passes
   * with fewer bytes than `minRate` asks (or than were left), `giveUp` ends the download and
   * `slow` says why. Over TCP and gRPC alike, for the console and the swarm alike.
   */
  #watchRate(
    address: string,
    download: Download,
    giveUp: () => void,
  ): { chunks: AsyncIterable<Uint8Array>; readonly slow: string | undefined; stop(): void } {
    const minRate = this.#options.minRate ?? DEFAULT_MIN_RATE;
    const windowMs = this.#options.rateWindowMs ?? DEFAULT_RATE_WINDOW_MS;
    let received = 0;
    let atWindowStart = 0;
    let slow: string | undefined;
    const timer = setInterval(() => {
      const got = received - atWindowStart;
      const needed = Math.min(minRate * windowMs / 1000, download.size - atWindowStart);
      atWindowStart = received;
      if (got >= needed) return;
      clearInterval(timer);
      slow = `${address} sent too slowly (${formatSize(got)} in ` +
        `${windowMs / 1000} s, under the ${formatSize(minRate)}/s a fragment needs)`;
      giveUp();
    }, windowMs);
    async function* chunks(): AsyncGenerator<Uint8Array> {
      for await (const chunk of download.chunks) {
        received += chunk.length;
        yield chunk;
      }
    }
    return {
      chunks: chunks(),
      get slow() {
        return slow;
      },
      stop: () => clearInterval(timer),
    };
  }

  // Requests `name` on an idle connection to `address`, or a new one, telling `lease` of each
  // connection as it is taken: the caller closes it on a cancel and releases the last one. An
  // idle connection may be stale (the holder restarted): a failure on one is retried once on a
  // fresh connection, unless `signal` aborted.
  async #lease(
    address: string,
    name: string,
    { urgent, lease, signal }: {
      urgent: boolean;
      lease: (client: TcpPeerClient) => void;
      signal?: AbortSignal;
    },
  ): Promise<Download> {
    const idle = this.#idle.get(address) ?? [];
    for (let client; (client = idle.pop());) {
      if (client.closed) continue;
      this.#leased.add(client);
      lease(client);
      try {
        return await client.get(name, urgent);
      } catch (error) {
        if (error instanceof PeerError || signal?.aborted) throw error;
        this.#leased.delete(client);
        client.close();
      }
    }
    const client = await TcpPeerClient.connect(address);
    this.#leased.add(client);
    lease(client);
    if (this.#options.self) await client.hello(this.#options.self);
    return await client.get(name, urgent);
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

/** `bytes` for a person: `512 bytes`, `16 KiB`, `1.5 GiB`. */
export function formatSize(bytes: number): string {
  const units = ["bytes", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit++;
  }
  const shown = unit === 0 || Number.isInteger(value) ? String(value) : value.toFixed(1);
  return `${shown} ${bytes === 1 ? "byte" : units[unit]}`;
}

/** Parses a size: `256MiB`, `1GiB`, `500MB`, `1.5G` or a number of bytes. */
export function parseSize(text: string): number {
  const match = text.trim().match(/^(\d+(?:\.\d+)?)\s*(?:([kmgt])(i)?b?|b)?$/i);
  const power = { k: 1, m: 2, g: 3, t: 4 }[match?.[2]?.toLowerCase() ?? ""] ?? 0;
  const size = match ? Math.floor(Number(match[1]) * (match[3] ? 1024 : 1000) ** power) : NaN;
  if (!(size >= 1) || !Number.isSafeInteger(size)) {
    throw new TypeError(`Invalid size "${text}": expected e.g. 256MiB, 1GiB or 1000000`);
  }
  return size;
}

function message(error: unknown): string {
  return error instanceof Error ? error.message : String(error);
}
