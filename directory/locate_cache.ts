/**
 * A replica's cache of locate answers (`directory/redis_store.ts`): locates far outnumber the
 * changes that alter them, so a replica on Redis keeps each answer for a short while and drops
 * it when told that it changed. Bounded in entries (the oldest goes first) and in age; calls for
 * a key that is being fetched share that fetch.
 * @module
 */

/** Entries kept at most unless told otherwise: the oldest is dropped for a new one. */
export const DEFAULT_LOCATE_CACHE_ENTRIES = 10_000;
/**
 * How long an answer is kept at most unless told otherwise. Every change that alters an answer
 * drops it at once; this bounds what is missed anyway (a message lost as the connection dies).
 */
export const DEFAULT_LOCATE_MAX_AGE_MS = 1_000;

/** A fetched answer: the holders as JSON (undefined when none), and how long it holds. */
export interface Fetched {
  json: string | undefined;
  /** Milliseconds from the fetch's start until the answer may change by itself (an expiry). */
  validMs: number;
}

/** Options of a {@link LocateCache}. */
export interface LocateCacheOptions {
  /** @default 10_000 */
  maxEntries?: number;
  /** @default 1_000 */
  maxAgeMs?: number;
  /** The clock, in milliseconds. @default performance.now */
  now?: () => number;
}

interface Entry {
  json: string | undefined;
  /** The moment it is stale; NaN while it is being fetched. */
  until: number;
  /** The fetch in flight, shared by every call that comes meanwhile. */
  pending: Promise<string | undefined> | undefined;
}

/**
 * Locate answers by key; see the module.
 *
 * @example
 * ```ts
 * const cache = new LocateCache({ maxAgeMs: 1_000 });
 * const json = await cache.get("f:fragment_1.bin", () => fetchFromRedis());
 * cache.drop(["f:fragment_1.bin"]); // it changed
 * ```
 */
export class LocateCache {
  readonly maxEntries: number;
  readonly maxAgeMs: number;
  readonly #now: () => number;
  readonly #entries = new Map<string, Entry>();

  constructor(options: LocateCacheOptions = {}) {
    this.maxEntries = options.maxEntries ?? DEFAULT_LOCATE_CACHE_ENTRIES;
    this.maxAgeMs = options.maxAgeMs ?? DEFAULT_LOCATE_MAX_AGE_MS;
    if (!(this.maxEntries >= 1)) throw new RangeError("A locate cache holds at least 1 entry");
    if (!(this.maxAgeMs >= 0)) throw new RangeError("A locate cache's max age is 0 or more");
    this.#now = options.now ?? (() => performance.now());
  }

  /** Entries held now, fresh, stale or being fetched. */
  get size(): number {
    return this.#entries.size;
  }

  /**
   * The answer for `key`: at once when it is held and fresh, else what `fetch` answers (kept
   * unless the key is dropped before it comes).
   */
  get(
    key: string,
    fetch: () => Promise<Fetched>,
  ): string | undefined | Promise<string | undefined> {
    const held = this.#entries.get(key);
    if (held !== undefined) {
      if (held.pending !== undefined) return held.pending;
      if (held.until > this.#now()) return held.json;
      this.#entries.delete(key);
    }
    const start = this.#now();
    const entry: Entry = { json: undefined, until: NaN, pending: undefined };
    entry.pending = fetch().then(
      ({ json, validMs }) => {
        // Dropped meanwhile: the answer may predate the change, so it is not kept.
        if (this.#entries.get(key) === entry) {
          entry.json = json;
          entry.until = start + Math.min(this.maxAgeMs, validMs);
          entry.pending = undefined;
        }
        return json;
      },
      (error) => {
        if (this.#entries.get(key) === entry) this.#entries.delete(key);
        throw error;
      },
    );
    if (this.#entries.size >= this.maxEntries) {
      this.#entries.delete(this.#entries.keys().next().value!);
    }
    this.#entries.set(key, entry);
    return entry.pending;
  }

  /** Forgets the answers of `keys`, and what is being fetched for them. */
  drop(keys: Iterable<string>): void {
    for (const key of keys) this.#entries.delete(key);
  }

  /** Forgets every answer. */
  clear(): void {
    this.#entries.clear();
  }
}
