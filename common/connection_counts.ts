/**
 * Connections counted in all and per client address, for the servers that cap both: the broker,
 * the peer's TCP server and its gRPC front. (The directory's server also hands the place of an
 * idle connection to a new one, and keeps its own count for that.)
 * @module
 */

/** The per-address limit unless told otherwise: a quarter of the connection limit. */
export function defaultMaxPerAddress(maxConnections: number): number {
  return Math.max(1, Math.floor(maxConnections / 4));
}

/**
 * The key one client address counts under: an IPv4 address (also when IPv4-mapped, as a
 * dual-stack listener reports it), or the /64 prefix of an IPv6 address, which is what one
 * host or home is usually given.
 */
export function addressKey(hostname: string): string {
  const mapped = hostname.match(/^::ffff:(\d+\.\d+\.\d+\.\d+)$/i);
  if (mapped) return mapped[1]!;
  if (!hostname.includes(":")) return hostname;
  const [head, tail = ""] = hostname.split("::");
  const headGroups = head ? head.split(":") : [];
  const tailGroups = tail ? tail.split(":") : [];
  const groups = hostname.includes("::")
    ? [...headGroups, ...Array(8 - headGroups.length - tailGroups.length).fill("0"), ...tailGroups]
    : headGroups;
  return `${groups.slice(0, 4).map((group) => parseInt(group, 16).toString(16)).join(":")}::/64`;
}

/** Which limit turned a connection away: the server's, or its address's. */
export type FullAt = "server" | "address";

/**
 * The connections a server has let in, in all and per {@link addressKey}, against its limits.
 * @example
 * ```ts
 * const counts = new ConnectionCounts(1024, 256);
 * const address = addressKey(conn.remoteAddr.hostname);
 * if (counts.admit(address) !== undefined) conn.close();
 * else serve(conn).finally(() => counts.release(address));
 * ```
 */
export class ConnectionCounts {
  #open = 0;
  readonly #byAddress = new Map<string, number>();

  constructor(readonly max: number, readonly maxPerAddress: number) {}

  /** Connections let in and not yet released. */
  get open(): number {
    return this.#open;
  }

  /**
   * Counts in a connection from `address`; or, counting nothing, the limit it would go past.
   */
  admit(address: string): FullAt | undefined {
    if (this.#open >= this.max) return "server";
    const mine = this.#byAddress.get(address) ?? 0;
    if (mine >= this.maxPerAddress) return "address";
    this.#byAddress.set(address, mine + 1);
    this.#open++;
    return undefined;
  }

  /** Counts out a connection that {@link admit} let in from `address`, once it has closed. */
  release(address: string): void {
    const left = (this.#byAddress.get(address) ?? 0) - 1;
    if (left > 0) this.#byAddress.set(address, left);
    else this.#byAddress.delete(address);
    this.#open--;
  }
}
