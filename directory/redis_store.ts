/**
 * The directory's state in Redis, shared by any number of directory processes
 * (`deno task directory --store redis://host:port[/db]`): peers and their ttl and secrets, the
 * fragment index, files and the limits. Every change is one Lua script (`redis_scripts.ts`), so
 * replicas racing never corrupt it, and expiry needs no timer on any replica. While Redis is
 * unreachable every call throws a {@link StoreUnavailableError} (the app's 503) at once; the
 * client reconnects by itself, with back-off and jitter.
 *
 * Each replica keeps its locate answers for up to a second ({@link LocateCache}), so that most
 * locates never reach Redis. Every script that changes an answer publishes the keys it touched on
 * channel `<prefix>locates`; each replica listens on a second connection and drops them, and drops
 * its own at once when its own change returns. A peer that expires by its ttl needs no message:
 * an answer is kept no longer than its first holder is live. While the listening connection is
 * down the cache is emptied and bypassed, until it listens again.
 * @module
 */
import { createClient, ErrorReply } from "@redis/client";
import { createHash } from "node:crypto";
import type { Manifest } from "../split.ts";
import { FILE_ID_PATTERN, isIdPrefix } from "../common/file_ref.ts";
import {
  type Claim,
  type DirectoryStore,
  fileSummary,
  type KnownPeerState,
  type Page,
  type Paged,
  type PublishOutcome,
  type RegistryOptions,
  type Resolution,
  sameSecret,
  type StoreCounts,
  storeLimits,
  StoreUnavailableError,
  toHolder,
  type UpsertOutcome,
} from "./registry.ts";
import {
  DEFAULT_PAGE_LIMIT,
  type FileDetail,
  type FileSummary,
  type FragmentHolders,
  type Holder,
  MAX_FILE_HOLDERS,
  MAX_PAGE_ITEMS,
  type PeerInfo,
} from "./schemas.ts";
import { SCRIPTS } from "./redis_scripts.ts";
import {
  DEFAULT_LOCATE_CACHE_ENTRIES,
  DEFAULT_LOCATE_MAX_AGE_MS,
  LocateCache,
} from "./locate_cache.ts";

/** The keys' prefix unless told otherwise: one Redis may hold other things too. */
export const DEFAULT_REDIS_PREFIX = "fragmentos:directory:";
/** A call that Redis has not answered in this long counts as Redis being unreachable. */
const CALL_TIMEOUT_MS = 2_000;
/** Reconnecting waits this long at first, doubling up to the max, each with jitter. */
const RECONNECT_MS = 50;
const MAX_RECONNECT_MS = 2_000;

/** Options of a {@link RedisStore}: the ttl and limits of the in-memory store, and its own. */
export interface RedisStoreOptions extends Omit<RegistryOptions, "now"> {
  /** Prefix of every key. @default "fragmentos:directory:" */
  prefix?: string;
  /** Where the lines "Redis is unreachable" and "back" go. @default console.error */
  warn?: (line: string) => void;
  /**
   * How long a replica keeps a locate answer at most, in ms: what a change whose message is
   * lost (the connection dying as it is sent) may stay unseen for. 0 keeps none. @default 1000
   */
  locateMaxAgeMs?: number;
  /** Locate answers a replica keeps at most. @default 10_000 */
  locateCacheEntries?: number;
}

/**
 * A `--store` URL checked: `redis://host:port[/db]`; a RangeError saying what is wrong
 * otherwise.
 */
export function parseRedisUrl(text: string): URL {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new RangeError(`"${text}" is not a URL: expected memory or redis://host:port[/db]`);
  }
  if (url.protocol !== "redis:" || url.hostname === "") {
    throw new RangeError(`"${text}" is not a redis:// URL: expected redis://host:port[/db]`);
  }
  if (!/^(\/\d{0,2})?$/.test(url.pathname)) {
    throw new RangeError(`"${text}" names no database: expected redis://host:port/0 to /15`);
  }
  return url;
}

type Client = ReturnType<typeof createClient>;
type ScriptName = keyof typeof SCRIPTS;

/** A nested answer of a script, as RESP2 gives it. */
type Reply = string | number | null | Reply[];

/**
 * The directory's state in Redis; see the module. Connects at once, and keeps reconnecting
 * while Redis is away; {@link RedisStore.close} stops it.
 */
export class RedisStore implements DirectoryStore {
  readonly ttl: number;
  readonly maxFiles: number;
  readonly maxFileFragments: number;
  readonly maxPeers: number;
  readonly maxPeersPerAddress: number;
  readonly maxIndexedFragments: number;
  readonly #prefix: string;
  readonly #ttlMs: number;
  readonly #client: Client;
  /** The connection that listens for changes to locate answers, in subscriber mode. */
  readonly #subscriber: Client;
  readonly #cache: LocateCache;
  /** Whether the subscription was made once: the client restores it on each reconnection. */
  #subscribed = false;
  readonly #shas = new Map<ScriptName, string>();
  readonly #where: string;
  readonly #warn: (line: string) => void;
  /** Whether the last connection attempt failed: said once per outage. */
  #down = false;
  #closed = false;

  constructor(url: string | URL, options: RedisStoreOptions = {}) {
    const parsed = parseRedisUrl(String(url));
    ({
      ttl: this.ttl,
      maxFiles: this.maxFiles,
      maxFileFragments: this.maxFileFragments,
      maxPeers: this.maxPeers,
      maxPeersPerAddress: this.maxPeersPerAddress,
      maxIndexedFragments: this.maxIndexedFragments,
    } = storeLimits(options));
    this.#ttlMs = Math.round(this.ttl * 1000);
    this.#prefix = options.prefix ?? DEFAULT_REDIS_PREFIX;
    this.#warn = options.warn ?? ((line) => console.error(line));
    this.#where = parsed.host;
    this.#client = createClient({
      url: parsed.href,
      // A call while Redis is away fails at once (a 503), rather than waiting in a queue.
      disableOfflineQueue: true,
      socket: {
        connectTimeout: CALL_TIMEOUT_MS,
        reconnectStrategy: (retries: number) =>
          Math.min(RECONNECT_MS * 2 ** Math.min(retries, 10), MAX_RECONNECT_MS) *
          (0.5 + Math.random() / 2),
      },
    });
    this.#client.on("error", (error: Error) => {
      if (this.#down || this.#closed) return;
      this.#down = true;
      this.#warn(
        `[DIRECTORY] Redis at ${this.#where} is unreachable (${error.message}); ` +
          "answering 503 until it is back",
      );
    });
    this.#client.on("ready", () => {
      if (this.#down) this.#warn(`[DIRECTORY] Redis at ${this.#where} is back`);
      this.#down = false;
    });
    this.#cache = new LocateCache({
      maxAgeMs: options.locateMaxAgeMs ?? DEFAULT_LOCATE_MAX_AGE_MS,
      maxEntries: options.locateCacheEntries ?? DEFAULT_LOCATE_CACHE_ENTRIES,
    });
    this.#subscriber = this.#client.duplicate();
    // Messages missed while it is down are unknown: what is held may be stale. Nothing is kept
    // until it is ready again (the cache is bypassed), and it is emptied once more then.
    this.#subscriber.on("error", () => this.#cache.clear());
    this.#subscriber.on("ready", () => {
      this.#cache.clear();
      if (!this.#subscribed) this.#subscribe();
    });
    // The first connection is retried like any other; until then calls answer 503.
    this.#client.connect().catch(() => {});
    this.#subscriber.connect().catch(() => {});
  }

  /** Listens for changed locate keys; tried again on the next connection if this one fails. */
  #subscribe(): void {
    const dropKeys = (message: string) => {
      try {
        this.#cache.drop(JSON.parse(message) as string[]);
      } catch {
        this.#cache.clear();
      }
    };
    this.#subscriber.subscribe(`${this.#prefix}locates`, dropKeys).then(
      () => {
        this.#cache.clear();
        this.#subscribed = true;
      },
      () => {},
    );
  }

  /** Whether locate answers may be kept: changes are heard (see the module). */
  get #caching(): boolean {
    return this.#subscribed && this.#subscriber.isReady;
  }

  /**
   * Resolves once connected to Redis and listening for changes, or rejects after `timeoutMs`.
   */
  async ready(timeoutMs = 10_000): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#client.isReady || !this.#caching) {
      if (Date.now() > deadline) {
        throw new StoreUnavailableError(`Redis at ${this.#where} did not answer in time`);
      }
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#cache.clear();
    await Promise.all([this.#client, this.#subscriber].map(async (client) => {
      if (client.isOpen) await client.close().catch(() => client.destroy());
      else client.destroy();
    }));
  }

  /** Nothing to do: expired entries are left out of answers and reaped by the next change. */
  sweep(): void {}

  async counts(): Promise<StoreCounts> {
    const [peers, fragments, files] = await this.#run("COUNTS", []) as number[];
    return { peers: peers!, fragments: fragments!, files: files! };
  }

  async owns(id: string, secret: string): Promise<boolean | undefined> {
    const known = await this.#run("SECRET", [id]) as string | null;
    return known === null ? undefined : sameSecret(known, secret);
  }

  async refresh(
    id: string,
    secret: string,
    body: string | undefined,
    source: () => string,
  ): Promise<boolean> {
    if (body === undefined) return false;
    return await this.#run("REFRESH", [id, String(this.#ttlMs), secret, body, source()]) === 1;
  }

  async upsert(id: string, state: KnownPeerState, claim: Claim): Promise<UpsertOutcome> {
    const { host, port, fileId } = state;
    const holder = toHolder(id, state);
    return this.#changed(
      await this.#run("UPSERT", [
        id,
        String(this.#ttlMs),
        claim.secret,
        claim.source ?? "",
        claim.body ?? "",
        JSON.stringify(holder),
        `${host}:${port}`,
        fileId ?? "",
        JSON.stringify(state.file ?? null),
        JSON.stringify([...new Set(state.fragments)]),
        String(this.maxPeers),
        String(this.maxPeersPerAddress),
        String(this.maxIndexedFragments),
      ]),
    ) as UpsertOutcome;
  }

  async remove(id: string): Promise<boolean> {
    return this.#changed(await this.#run("REMOVE", [id])) === 1;
  }

  /** From the cache while it is fresh (see the module), at once; else from Redis. */
  locateJson(name: string, file?: string): string | undefined | Promise<string | undefined> {
    // While Redis is away a locate answers 503, as every other route does.
    if (!this.#client.isReady) return Promise.reject(this.#unavailable());
    const key = file === undefined ? `f:${name}` : `g:${file}:${name}`;
    if (!this.#caching) return this.#locate(key).then(({ json }) => json);
    return this.#cache.get(key, () => this.#locate(key));
  }

  /** The answer for holder set `key`, and how long it holds (until its first holder expires). */
  async #locate(key: string): Promise<{ json: string | undefined; validMs: number }> {
    const [now, soonest, holders] = await this.#run("LOCATE", [key]) as [
      number,
      number,
      string[],
    ];
    return {
      json: holders.length === 0 ? undefined : `[${holders.join(",")}]`,
      validMs: soonest === 0 ? Infinity : soonest - now,
    };
  }

  /**
   * The answer of a script that may change holder sets: the keys it touched are dropped from
   * this replica's cache before anyone hears of the change (the others drop them on its message).
   */
  #changed(reply: Reply): Reply {
    const [answer, keys] = reply as [Reply, string];
    if (keys !== "") this.#cache.drop(JSON.parse(keys) as string[]);
    return answer;
  }

  async peers(page: Page = {}): Promise<Paged<PeerInfo>> {
    const [next, rows] = await this.#run("PEERS", [
      String(page.cursor ?? 0),
      String(page.limit ?? DEFAULT_PAGE_LIMIT),
      String(MAX_PAGE_ITEMS),
    ]) as [string, [string, string, string][]];
    const entries = rows.map(([holder, fragments, name]) => {
      const file = JSON.parse(name) as string | null;
      return {
        ...JSON.parse(holder) as Holder,
        fragments: JSON.parse(fragments) as string[],
        ...(file === null ? {} : { file }),
      };
    });
    return { entries, next: next === "" ? undefined : Number(next) };
  }

  async fragments(file?: string, page: Page = {}): Promise<Paged<FragmentHolders>> {
    const [next, rows] = await this.#run("FRAGMENTS", [
      String(page.cursor ?? 0),
      String(page.limit ?? DEFAULT_PAGE_LIMIT),
      String(MAX_PAGE_ITEMS),
      file ?? "",
      file === undefined ? "0" : "1",
    ]) as [string, [string, string[]][]];
    const entries = rows.map(([name, holders]) => ({
      name,
      holders: holders.map((holder) => JSON.parse(holder) as Holder),
    }));
    return { entries, next: next === "" ? undefined : Number(next) };
  }

  async publish(manifest: Manifest): Promise<PublishOutcome> {
    // The same file split another way (other fragments) is not the same publication.
    const shape = createHash("sha256")
      .update(JSON.stringify([manifest.file, manifest.fragments])).digest("base64");
    return await this.#run("PUBLISH", [
      manifest.sha256,
      JSON.stringify(manifest),
      shape,
      String(manifest.fragments.length),
      manifest.file,
      String(this.#ttlMs),
      String(this.maxFiles),
      String(this.maxFileFragments),
    ]) as PublishOutcome;
  }

  async files(): Promise<FileSummary[]> {
    return await this.#summaries([]);
  }

  resolve(ref: string): Resolution | undefined | Promise<Resolution | undefined> {
    // A whole id needs no call: a locate by id (what peers send) stays on the cache's sync path.
    if (FILE_ID_PATTERN.test(ref)) return { id: ref };
    return this.#resolveName(ref);
  }

  async #resolveName(ref: string): Promise<Resolution | undefined> {
    const listed = await this.#run("FILE_NAMES", []) as string[];
    const ids: string[] = [];
    const prefixed: string[] = [];
    for (let i = 0; i < listed.length; i += 2) {
      const id = listed[i]!;
      if (listed[i + 1] === ref) ids.push(id);
      else if (id.startsWith(ref)) prefixed.push(id);
    }
    const matches = ids.length > 0 ? ids : isIdPrefix(ref) ? prefixed : [];
    if (matches.length === 0) return undefined;
    if (matches.length === 1) return { id: matches[0]! };
    const ambiguous = await this.#summaries(matches);
    // Dropped between the two calls: what is left decides.
    if (ambiguous.length === 0) return undefined;
    if (ambiguous.length === 1) return { id: ambiguous[0]!.id };
    return { ambiguous };
  }

  async file(id: string): Promise<FileDetail | undefined> {
    const reply = await this.#run("FILE", [id, String(MAX_FILE_HOLDERS)]) as
      | [string, [number, string[]][]]
      | null;
    if (reply === null) return undefined;
    const manifest = JSON.parse(reply[0]) as Manifest;
    const fragments = manifest.fragments.map((fragment, i) => {
      const [holderCount, holders] = reply[1][i]!;
      return {
        ...fragment,
        holders: holders.map((holder) => JSON.parse(holder) as Holder),
        holderCount,
      };
    });
    return { ...manifest, id, fragments };
  }

  async #summaries(ids: string[]): Promise<FileSummary[]> {
    const rows = await this.#run("SUMMARIES", ids) as [string, number, number][];
    return rows.map(([text, available, seeders]) => {
      return fileSummary(JSON.parse(text) as Manifest, available === 1, seeders);
    });
  }

  /**
   * Runs script `name` with `args` after the prefix: by its SHA once Redis knows it (a Redis
   * that restarted has forgotten it: then by its text again). A {@link StoreUnavailableError}
   * while Redis is unreachable or slower than {@link CALL_TIMEOUT_MS}.
   */
  async #run(name: ScriptName, args: string[]): Promise<Reply> {
    if (!this.#client.isReady) throw this.#unavailable();
    const options = { keys: [], arguments: [this.#prefix, ...args] };
    let timer: ReturnType<typeof setTimeout> | undefined;
    const late = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(this.#unavailable()), CALL_TIMEOUT_MS);
    });
    const call = async () => {
      const sha = this.#shas.get(name);
      if (sha !== undefined) {
        try {
          return await this.#client.evalSha(sha, options);
        } catch (error) {
          if (!String((error as Error).message).startsWith("NOSCRIPT")) throw error;
        }
      }
      this.#shas.set(name, await this.#client.scriptLoad(SCRIPTS[name]));
      return await this.#client.evalSha(this.#shas.get(name)!, options);
    };
    try {
      return await Promise.race([call(), late]) as Reply;
    } catch (error) {
      // A script's own error is a bug: the app answers 500. Anything else is the connection.
      if (!(error instanceof ErrorReply)) throw this.#unavailable();
      throw error;
    } finally {
      clearTimeout(timer);
    }
  }

  #unavailable(): StoreUnavailableError {
    return new StoreUnavailableError(
      "The directory's store is unreachable; try again in a second",
    );
  }
}
