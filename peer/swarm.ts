/**
 * The swarm download: every missing fragment of a file, from many holders at once. Fragments the
 * player needs next go first, in playback order; the rest go rarest first, from the directory's
 * holder counts and the peers' HAVE announcements ({@link Swarm.have}), with ties broken at
 * random (each peer its own order), and the first fragments wholly at random, so a crowd that
 * starts together spreads over the file instead of all asking for the same fragment.
 *
 * Seeders' upload is scarce: a fragment another viewer holds is asked of a viewer, and a seeder
 * only for what no viewer holds; a holder that points elsewhere (`ERR ELSEWHERE`) is not asked for
 * that fragment again for a while, and the peers it names are. In flight at once: at most
 * `perHolder` per holder and `total` overall. A failed fragment is retried elsewhere; a holder
 * that sent bad bytes of a fragment is never asked for it again, and for other fragments only
 * when no one else has them; one that is down is left alone for a moment. Only in the endgame,
 * when every missing fragment is in flight, is one that is clearly late asked of a second,
 * idle holder too, so a download never sits at 99% behind one slow peer. Before that, a request
 * still waiting for a slot at a busy holder after HEDGE_MS is asked of an idle viewer too,
 * and the first to begin sending keeps it. The player's fragments are asked for `URGENT`, which
 * holders serve first.
 * @module
 */
import { AsyncLocalStorage } from "node:async_hooks";
import { join } from "node:path";
import {
  type Fetcher,
  FetchError,
  type Holder,
  holderAddress,
  holderKey,
  StoreWriteError,
} from "./fetch.ts";
import type { Store } from "./store.ts";
import { parseAddress } from "../broker.ts";
import { type DirectoryClient, DirectoryError } from "../directory/client.ts";
import { AMBIGUOUS_FILE } from "../directory/protocol.ts";
import type { FileSummary } from "../directory/schemas.ts";
import { escapeControl, nameList } from "../common/cli.ts";
import { refersTo, shortId } from "../common/file_ref.ts";
import { Wakeup } from "../common/wakeup.ts";
import { type FragmentEntry, joinFragments, type Manifest } from "../split.ts";

/** A change on the fragment map: held, in flight (and from whom), missing, or failed. */
export interface FragmentEvent {
  name: string;
  index: number;
  state: "held" | "inflight" | "missing" | "failed";
  from?: string;
}

export interface SwarmOptions {
  /** Most fragments in flight from one holder. @default 2 */
  perHolder?: number;
  /**
   * Most in flight from one seeder (a holder of the whole file): each viewer asks a seeder for
   * one fragment at a time, so its queue stays short and its upload is shared round the crowd.
   * @default 1
   */
  perSeed?: number;
  /** Most fragments in flight overall. @default 6 */
  total?: number;
  /**
   * In the endgame, a fragment in flight longer than this is asked of a second, idle holder.
   * @default 4000
   */
  lateMs?: number;
  /** Fragments fetched in random order before rarest-first begins. @default 2 */
  randomFirst?: number;
  /** How long a holder that pointed elsewhere is not asked for that fragment. @default 10000 */
  pointedMs?: number;
  /** How long a holder that failed (down, cut) is left alone. @default 2000 */
  downMs?: number;
  /** Give up when nothing could be fetched (or no manifest found) for this long. @default 60000 */
  stallMs?: number;
  /**
   * The file to fetch when the store has no manifest yet (a store that has one holds its file,
   * and no other). Without it the directory must list exactly one file.
   */
  file?: string;
  /** Where progress lines go; `progress` gets the live state for a progress bar. */
  log?: (line: string) => void;
  progress?: (state: Progress) => void;
}

/** Where a download stands, for a progress bar. */
export interface Progress {
  file: string;
  held: number;
  total: number;
  bytesPerSecond: number;
  peers: number;
}

interface Attempt {
  /** The holder's address, as shown. */
  holder: string;
  /** The holder, however it is named ({@link holderKey}: localhost and 127.0.0.1 are one). */
  key: string;
  started: number;
  controller: AbortController;
  /** Asked for as the player's (`GET <name> URGENT`). */
  urgent: boolean;
  /** The holder has begun to send. */
  sending: boolean;
  /** Cancelled to be asked for again as urgent: not a failure of its holder. */
  superseded: boolean;
}

/** How long a request waits for a slot before a second holder is asked too. */
const HEDGE_MS = 300;
// How long #settle waits before restarting a scheduler that stopped with work left.
const RESTART_MS = 250;
/** How often a swarm that waits for holders says so, when no progress bar shows it. */
const WAIT_LINE_MS = 5_000;
// How long a holder heard of through HAVE counts without the directory confirming it.
const HEARD_MS = 10_000;

// The attempt whose fetch is running. The store tells of an arrival from inside the write that
// stored it, so this says which attempt (and holder) the fragment came from.
const currentAttempt = new AsyncLocalStorage<Attempt>();

/** Why a swarm with neighbours still needs a directory to start a whole file. */
const NEIGHBOURS_HAVE_NO_MANIFEST =
  " (neighbours serve fragments by name, not the file's manifest)";

/** Downloads files from many holders at once into a peer's store. */
export class Swarm implements Disposable {
  readonly #store: Store;
  readonly #fetcher: Fetcher;
  readonly #directory: DirectoryClient | undefined;
  readonly #neighbours: () => Holder[];
  readonly #isSelf: (holder: Holder) => boolean;
  readonly #options: Required<Omit<SwarmOptions, "log" | "progress" | "file">> & SwarmOptions;
  #holders = new Map<string, Holder[]>(); // fragment -> holders, from the directory
  // fragment -> holders announced through HAVE (holderKey -> holder, when heard)
  #heard = new Map<string, Map<string, { holder: Holder; at: number }>>();
  #seeds = new Set<string>(); // holderKey of peers known to hold every fragment
  #rank = new Map<string, number>(); // fragment -> this peer's random tie-break
  // Holders below are keyed by holderKey(): the directory lists a peer at 127.0.0.1 where its
  // HELLO, pointers and HAVEs say localhost, and both are one holder with one upload.
  #pointedAway = new Map<string, Map<string, number>>(); // fragment -> holder -> until
  // Every peer the directory lists for the file (holderKey): for these, it says what they hold.
  readonly #listed = new Set<string>();
  #refreshed = 0;
  #urgent: string[] = []; // fragments the player waits for, in the order asked
  #fetchingAll = 0; // fetch-alls running: while any is, every fragment the store lacks is wanted
  #inflight = new Map<string, Attempt[]>();
  #load = new Map<string, number>(); // holder -> fragments in flight from it
  #downUntil = new Map<string, number>();
  #tried = new Map<string, Set<string>>(); // fragment -> holders that failed it, until a refresh
  #lied = new Map<string, Set<string>>(); // fragment -> holders that sent bad bytes of it, for good
  #announced = new Set<string>(); // fragments whose "held" event went out
  #liars = new Set<string>(); // holders that ever sent bad bytes
  #listeners = new Set<(event: FragmentEvent) => void>();
  #wake: (() => void) | undefined;
  #running: Promise<Error | undefined> | undefined;
  // Wakes whoever waits in #settle: a fragment arrived or the scheduler stopped.
  readonly #changed = new Wakeup();
  #fatal: Error | undefined;
  #closed = new AbortController();
  #lastProgress = Date.now();
  /** How many waiting lines have been said since the last progress. */
  #waitLines = 0;
  #received = 0;
  #started = performance.now();
  #finding: Promise<Manifest> | undefined;
  #fetchingAllNow: Promise<Manifest> | undefined;

  constructor(
    store: Store,
    fetcher: Fetcher,
    parts: {
      directory?: DirectoryClient;
      neighbours?: () => Holder[];
      isSelf?: (holder: Holder) => boolean;
    },
    options: SwarmOptions = {},
  ) {
    this.#store = store;
    this.#fetcher = fetcher;
    this.#directory = parts.directory;
    this.#neighbours = parts.neighbours ?? (() => []);
    this.#isSelf = parts.isSelf ?? (() => false);
    this.#options = {
      perHolder: 2,
      perSeed: 1,
      total: 6,
      lateMs: 4000,
      randomFirst: 2,
      pointedMs: 10_000,
      downMs: 2000,
      stallMs: 60_000,
      ...options,
    };
    store.onFragment((info) => {
      this.#received += info.size;
      // Told here, as it lands, so a listener counting what is held counts this arrival and no
      // other: by the time its fetch resolves another may have landed too. A second copy (both
      // holders of a late fragment finished) is no news.
      if (!this.#announced.has(info.name)) {
        this.#announced.add(info.name);
        const attempt = currentAttempt.getStore();
        const ours = attempt && this.#inflight.get(info.name)?.includes(attempt);
        this.#emit(info.name, "held", ours ? attempt.holder : undefined);
      }
      this.#wake?.();
      this.#changed.fire();
    });
  }

  /** Every fragment's state now, in manifest order (for a page that just opened). */
  snapshot(): FragmentEvent[] {
    return (this.#store.manifest?.fragments ?? []).map((f) => ({
      name: f.name,
      index: f.index,
      state: this.#store.get(f.name) ? "held" : this.#inflight.has(f.name) ? "inflight" : "missing",
      from: this.#inflight.get(f.name)?.[0]?.holder,
    }));
  }

  /** Calls `listener` on each change of the map; returns a function that stops it. */
  onEvent(listener: (event: FragmentEvent) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /**
   * Fetches every fragment of the store's file that the store lacks (adopting a manifest from
   * the directory when it has none, see {@link Swarm.manifest}), asking the store afresh on each
   * pass, so a fragment that leaves it meanwhile is fetched again; then joins and verifies the
   * whole file. Resolves with its manifest.
   */
  fetchAll(): Promise<Manifest> {
    // One at a time: the console's `all`, --fetch-all and a watching player may all ask.
    return this.#fetchingAllNow ??= this.#fetchAll().finally(() =>
      this.#fetchingAllNow = undefined
    );
  }

  async #fetchAll(): Promise<Manifest> {
    const manifest = await this.manifest();
    const output = join(this.#store.dir, manifest.file);
    while (true) {
      this.#fetchingAll++;
      try {
        await this.#settle(() => this.#store.holdsAll());
      } finally {
        this.#fetchingAll--;
      }
      try {
        await joinFragments(this.#store.dir, output);
        break;
      } catch (error) {
        // A file deleted (or cut short) behind the store's back since it was stored fails the
        // join: the store forgets it, and it is fetched again. The join stats every file anyway,
        // so the store looks for such files only once it has failed.
        const lost = await this.#store.prune();
        if (lost.length === 0) throw error;
        for (const name of lost) this.#emit(name, "missing");
      }
    }
    this.#options.log?.(
      `[✓] '${manifest.file}' complete: ${manifest.fragments.length}/${manifest.fragments.length} fragments, sha256 verified`,
    );
    return manifest;
  }

  /**
   * A HAVE message: `holder` now holds fragment `name` of file `fileId` (a peer's announcement on the
   * broker). It is asked for the fragment from now on, without waiting for the directory, which
   * stays the source of truth: a holder it does not confirm within a few seconds is forgotten.
   */
  have(name: string, holder: Holder, fileId: string | undefined): void {
    const manifest = this.#store.manifest;
    if (!manifest || fileId !== manifest.sha256 || this.#isSelf(holder)) return;
    if (!manifest.fragments.some((f) => f.name === name)) return;
    const key = holderKey(holder);
    const heard = this.#heard.get(name) ?? new Map();
    heard.set(key, { holder, at: Date.now() });
    this.#heard.set(name, heard);
    // It may have said NOT_FOUND while the fragment was on its way to it.
    this.#tried.get(name)?.delete(holderKey(holder));
    this.#updateSeed(key);
    this.#wake?.();
  }

  /** Makes sure `name` is held, fetching it ahead of everything else; rejects if it cannot. */
  async need(name: string, signal?: AbortSignal): Promise<void> {
    if (this.#store.get(name)) return;
    if (!this.#urgent.includes(name)) this.#urgent.push(name);
    await this.#settle(() => this.#store.get(name) !== undefined, signal);
  }

  // Runs the scheduler until `done()` holds; rejects if the swarm stalls or the disk fails, and
  // when it is closed or `signal` aborts.
  async #settle(done: () => boolean, signal?: AbortSignal): Promise<void> {
    const cancelled = Promise.withResolvers<"cancelled">();
    const forget = this.#onCancel(() => cancelled.resolve("cancelled"), signal);
    try {
      while (!done()) {
        if (signal?.aborted || this.#closed.signal.aborted) throw new FetchError("Cancelled");
        const running = this.#running ??= this.#run().finally(() => this.#running = undefined);
        this.#wake?.();
        const outcome = await Promise.race([
          running.then((error) => ({ error })),
          this.#changed.next,
          cancelled.promise,
        ]);
        if (typeof outcome !== "object") continue; // a change, or cancelled: checked above
        if (outcome.error) throw outcome.error;
        // The run found nothing to do, yet `done()` does not hold: restarting it at once would
        // spin without ever yielding to timers, I/O or signals. Wait for a change first.
        if (!done()) await this.#pause(RESTART_MS, signal);
      }
    } finally {
      forget();
    }
  }

  // Resolves after `ms`, on a change, or once the swarm is closed or `signal` aborts.
  async #pause(ms: number, signal?: AbortSignal): Promise<void> {
    const { promise, resolve } = Promise.withResolvers<void>();
    const wake = () => resolve();
    const timer = setTimeout(wake, ms);
    const forget = this.#onCancel(wake, signal);
    if (this.#closed.signal.aborted || signal?.aborted) wake();
    this.#changed.next.then(wake);
    try {
      await promise;
    } finally {
      clearTimeout(timer);
      forget();
    }
  }

  // Calls `listener` once the swarm is closed or `signal` aborts; returns what undoes that.
  #onCancel(listener: () => void, signal?: AbortSignal): () => void {
    const signals = signal ? [this.#closed.signal, signal] : [this.#closed.signal];
    for (const s of signals) s.addEventListener("abort", listener);
    return () => {
      for (const s of signals) s.removeEventListener("abort", listener);
    };
  }

  // The scheduler: starts fetches until nothing is missing; resolves with the error that
  // stopped it, if any.
  async #run(): Promise<Error | undefined> {
    this.#lastProgress = Date.now();
    this.#waitLines = 0;
    try {
      while (!this.#closed.signal.aborted) {
        if (this.#fatal) return this.#fatal;
        let pending = this.#pending();
        if (pending.length === 0 && this.#inflight.size === 0) return undefined;
        const unknown = pending.some((n) => this.#candidates(n).length === 0);
        if (Date.now() - this.#refreshed > (unknown ? 500 : 2000)) {
          await this.#refresh();
          pending = this.#pending(); // in the order the new holder counts give
        }
        this.#hurry();
        for (const name of pending) this.#start(name);
        this.#hedge();
        this.#chaseLate(pending);
        this.#report();
        const idle = Date.now() - this.#lastProgress;
        if (this.#inflight.size === 0 && idle > this.#options.stallMs) {
          return new FetchError(`No holder could provide ${this.#nameList(pending)}`);
        }
        if (this.#inflight.size === 0) this.#sayWaiting(pending, idle);
        await new Promise<void>((resolve) => {
          const timer = setTimeout(resolve, 250);
          this.#wake = () => {
            clearTimeout(timer);
            resolve();
          };
        });
        this.#wake = undefined;
      }
      return undefined;
    } finally {
      // No #changed.fire() here: the waiters in #settle race this run itself, and a wake-up before
      // its result would restart the run, resetting the stall clock and losing the error.
      this.#fatal = undefined;
    }
  }

  /**
   * Says, every {@link WAIT_LINE_MS} while nothing is in flight, what the swarm waits for and how
   * long it still waits: a terminal shows its progress bar instead, but a log would go silent.
   */
  #sayWaiting(pending: string[], idleMs: number): void {
    if (this.#options.progress || idleMs < WAIT_LINE_MS || pending.length === 0) return;
    const step = Math.floor(idleMs / WAIT_LINE_MS);
    if (step <= this.#waitLines) return;
    this.#waitLines = step;
    const left = Math.max(0, Math.round((this.#options.stallMs - idleMs) / 1000));
    this.#options.log?.(
      `[swarm] Waiting for a holder of ${this.#nameList(pending)}; giving up in ${left} s`,
    );
  }

  /**
   * Missing fragments in the order to fetch them: urgent first, then (during a fetch-all) the
   * rest, rarest first. Asked of the store on each pass, so a fragment that left it is missing.
   */
  #pending(): string[] {
    this.#urgent = this.#urgent.filter((name) => !this.#store.get(name));
    const fragments = this.#fetchingAll > 0 ? this.#store.manifest?.fragments ?? [] : [];
    const rest = fragments.filter((f) => !this.#store.get(f.name) && !this.#urgent.includes(f.name))
      .map((f) => f.name);
    const held = fragments.length - rest.length;
    // The first few at random: something to trade soon, and no two viewers on the same one.
    if (held < this.#options.randomFirst) rest.sort((a, b) => this.#rankOf(a) - this.#rankOf(b));
    else {
      const counts = new Map(rest.map((name) => [name, this.#holdersOf(name).length]));
      rest.sort((a, b) => counts.get(a)! - counts.get(b)! || this.#rankOf(a) - this.#rankOf(b));
    }
    return [...this.#urgent, ...rest];
  }

  // This peer's random place for `name` among equals, drawn once.
  #rankOf(name: string): number {
    let rank = this.#rank.get(name);
    if (rank === undefined) this.#rank.set(name, rank = Math.random());
    return rank;
  }

  /** Every holder known of `name`: the directory's, and those heard of through HAVE. */
  #holdersOf(name: string): Holder[] {
    const listed = this.#holders.get(name) ?? [];
    const heard = this.#heard.get(name);
    if (!heard || heard.size === 0) return listed;
    const keys = new Set(listed.map(holderKey));
    return [...listed, ...[...heard].filter(([key]) => !keys.has(key)).map(([, h]) => h.holder)];
  }

  // Marks `key` a seed when it is known to hold every fragment of the file.
  #updateSeed(key: string): void {
    const fragments = this.#store.manifest?.fragments ?? [];
    const holdsAll = fragments.length > 0 &&
      fragments.every((f) => this.#holdersOf(f.name).some((h) => holderKey(h) === key));
    if (holdsAll) this.#seeds.add(key);
    else this.#seeds.delete(key);
  }

  // Fragment names in the file's order, at most five, then how many more.
  #nameList(names: string[]): string {
    const index = (name: string) =>
      this.#store.manifest?.fragments.find((f) => f.name === name)?.index ?? Infinity;
    return nameList([...names].sort((a, b) => index(a) - index(b)));
  }

  /** Holders worth asking for `name` now, least loaded first; holders that lied, last resort. */
  #candidates(name: string): Holder[] {
    const tried = this.#tried.get(name);
    const lied = this.#lied.get(name);
    const now = Date.now();
    const seen = new Set<string>();
    // A neighbour the directory lists is asked only for what the directory says it holds.
    const neighbours = this.#neighbours().filter((h) => !this.#listed.has(holderKey(h)));
    const pointed = this.#pointedAway.get(name);
    const holders = [...this.#holdersOf(name), ...neighbours].filter((holder) => {
      const key = holderKey(holder);
      if (seen.has(key) || this.#isSelf(holder) || lied?.has(key)) return false;
      seen.add(key);
      return !this.#fetcher.isAvoided(holder) && !tried?.has(key) &&
        (this.#downUntil.get(key) ?? 0) <= now && (pointed?.get(key) ?? 0) <= now;
    }).sort((a, b) =>
      // Viewers before seeders, whose upload goes to what nobody else holds; then the least
      // loaded; then at random, so a crowd's requests spread over equal holders.
      Number(this.#isSeed(a)) - Number(this.#isSeed(b)) ||
      this.#loadOf(a) - this.#loadOf(b) || Math.random() - 0.5
    );
    const honest = holders.filter((h) => !this.#liars.has(holderKey(h)));
    return honest.length > 0 ? honest : holders;
  }

  #isSeed(holder: Holder): boolean {
    return this.#seeds.has(holderKey(holder));
  }

  #loadOf(holder: Holder): number {
    return this.#load.get(holderKey(holder)) ?? 0;
  }

  // Fragments the player waits for in flight from `holder`.
  #urgentLoadOf(holder: Holder): number {
    const key = holderKey(holder);
    return this.#urgent.filter((name) => this.#inflight.get(name)?.some((a) => a.key === key))
      .length;
  }

  #start(name: string, duplicate: false | "late" | "hedge" = false): void {
    if (this.#inflightCount() >= this.#options.total) return;
    const attempts = this.#inflight.get(name) ?? [];
    if (attempts.length > 0 && !duplicate) return;
    const busy = new Set(attempts.map((a) => a.key));
    const candidates = this.#candidates(name);
    // A fragment a viewer holds waits for that viewer rather than take a seeder's upload.
    const viewerHas = candidates.some((h) => !this.#isSeed(h));
    // The player's fragment does not wait behind this peer's own request for another: a
    // seeder's load counts only the player's, and it serves them first (`GET <name> URGENT`).
    const urgent = this.#urgent.includes(name);
    const seedLoad = (h: Holder) => urgent ? this.#urgentLoadOf(h) : this.#loadOf(h);
    const holder = candidates.find((h) =>
      duplicate
        ? this.#loadOf(h) === 0 && !busy.has(holderKey(h)) &&
          (duplicate === "late" || !this.#isSeed(h))
        : this.#isSeed(h)
        ? !viewerHas && seedLoad(h) < this.#options.perSeed
        : this.#loadOf(h) < this.#options.perHolder
    );
    if (!holder) return;
    const address = holderAddress(holder.host, holder.port);
    const key = holderKey(holder);
    const attempt: Attempt = {
      holder: address,
      key,
      started: Date.now(),
      controller: new AbortController(),
      urgent,
      sending: false,
      superseded: false,
    };
    if (!duplicate) this.#announced.delete(name); // not held: the store may have lost it
    this.#inflight.set(name, [...attempts, attempt]);
    this.#load.set(key, this.#loadOf(holder) + 1);
    this.#emit(name, "inflight", address);
    currentAttempt.run(
      attempt,
      () =>
        this.#fetcher.fetch(name, [holder], {
          signal: attempt.controller.signal,
          follow: false,
          urgent,
          onSending: () => this.#sending(name, attempt),
        }),
    ).then(
      () => {
        this.#lastProgress = Date.now();
        this.#waitLines = 0;
      },
      (error) => attempt.superseded || this.#failed(name, key, error),
    ).finally(() => {
      this.#load.set(key, this.#loadOf(holder) - 1);
      const left = (this.#inflight.get(name) ?? []).filter((a) => a !== attempt);
      if (left.length > 0) this.#inflight.set(name, left);
      else this.#inflight.delete(name);
      // The first copy to arrive wins; the other attempts are cancelled.
      if (this.#store.get(name)) { for (const other of left) other.controller.abort(); }
      if (!this.#store.get(name) && left.length === 0 && !attempt.superseded) {
        this.#emit(name, "failed", address);
      }
      this.#wake?.();
    });
  }

  // `key`: the holder's holderKey.
  #failed(name: string, key: string, error: unknown): void {
    if (error instanceof StoreWriteError) {
      this.#fatal = error;
      return;
    }
    if (!(error instanceof FetchError)) {
      this.#fatal = error instanceof Error ? error : new Error(String(error));
      return;
    }
    if (this.#store.get(name)) return; // cancelled because another copy arrived
    const pointer = error.failures.find((f) => f.kind === "elsewhere");
    if (pointer) {
      // Not a failure: the holder spares its upload. Ask the peers it names, and not it for a
      // while; it serves this peer if asked again after that.
      const pointed = this.#pointedAway.get(name) ?? new Map();
      this.#pointedAway.set(name, pointed.set(key, Date.now() + this.#options.pointedMs));
      for (const peer of pointer.elsewhere ?? []) {
        try {
          const { hostname, port } = parseAddress(peer);
          this.have(name, { host: hostname, port, grpcPort: 0 }, this.#store.manifest?.sha256);
        } catch { /* not an address: ignored */ }
      }
      return;
    }
    const tried = this.#tried.get(name) ?? new Set();
    tried.add(key);
    this.#tried.set(name, tried);
    if (error.failures.some((f) => f.kind === "down")) {
      this.#downUntil.set(key, Date.now() + this.#options.downMs);
    }
    if (error.failures.some((f) => f.kind === "bad")) {
      this.#lied.set(name, (this.#lied.get(name) ?? new Set()).add(key));
      this.#liars.add(key);
    }
    // Not final: the scheduler asks the next holder (or this one again later), and gives up
    // only once nobody has had the fragment for `stallMs` ("No holder could provide ...").
    const why = error.failures.map((f) => f.text).join("; ");
    if (why === "" || this.#closed.signal.aborted) return; // cancelled: no news
    this.#options.log?.(
      `[!] ${why}; trying the next holder${why.includes(name) ? "" : ` of '${name}'`}`,
    );
  }

  /**
   * A request still waiting for a slot at its holder is asked of a second, idle viewer that
   * holds the fragment too, and the first to begin sending keeps it: the peers asking the first
   * holder of a fragment then spread to those it has sent it to, as a tree, instead of all
   * waiting in turn at the first.
   */
  #hedge(): void {
    const now = Date.now();
    for (const [name, attempts] of this.#inflight) {
      if (attempts.length !== 1 || attempts[0]!.sending) continue;
      if (now - attempts[0]!.started < HEDGE_MS) continue;
      this.#start(name, "hedge");
    }
  }

  // An attempt's holder began to send: the others waiting for a slot are no longer needed.
  #sending(name: string, attempt: Attempt): void {
    attempt.sending = true;
    for (const other of this.#inflight.get(name) ?? []) {
      if (other !== attempt && !other.sending) supersede(other);
    }
  }

  /**
   * Cancels the requests for fragments the player now waits for that were asked for before it
   * did and still wait for a slot at their holder, so they are asked for again as urgent:
   * waiting as the rest, they would be served after every other peer's urgent ones.
   */
  #hurry(): void {
    for (const name of this.#urgent) {
      const attempts = this.#inflight.get(name) ?? [];
      if (attempts.length === 0 || attempts.some((a) => a.urgent || a.sending)) continue;
      attempts.forEach(supersede);
    }
  }

  /**
   * The endgame: once every missing fragment is in flight, asks a second, idle holder for those
   * in flight for longer than `lateMs`. Before that, a second request would only take upload
   * that another fragment needs.
   */
  #chaseLate(pending: string[]): void {
    if (pending.some((name) => !this.#inflight.has(name))) return;
    const now = Date.now();
    for (const [name, attempts] of this.#inflight) {
      if (this.#store.get(name)) continue; // arrived; its other attempts are being cancelled
      if (attempts.length === 1 && now - attempts[0]!.started > this.#options.lateMs) {
        this.#start(name, "late");
      }
    }
  }

  #inflightCount(): number {
    let count = 0;
    for (const attempts of this.#inflight.values()) count += attempts.length;
    return count;
  }

  async #refresh(): Promise<void> {
    this.#refreshed = Date.now();
    const id = this.#store.manifest?.sha256;
    if (!this.#directory || !id) return;
    try {
      const detail = await this.#directory.getFile(id);
      this.#listed.clear();
      for (const f of detail.fragments) {
        const holders = f.holders.map((h) => ({
          host: h.host,
          port: h.port,
          grpcPort: h.grpcPort,
        }));
        for (const holder of holders) this.#listed.add(holderKey(holder));
        this.#holders.set(f.name, holders);
        // What the directory now confirms needs no HAVE; what it never confirms is forgotten.
        const heard = this.#heard.get(f.name);
        const keys = new Set(holders.map(holderKey));
        for (const [key, { at }] of heard ?? []) {
          if (keys.has(key) || Date.now() - at > HEARD_MS) heard!.delete(key);
        }
      }
      this.#seeds.clear();
      for (const key of this.#listed) this.#updateSeed(key);
      // Holders that failed a fragment may have it again later (a restarted seeder).
      this.#tried.clear();
    } catch {
      // The directory is down (or restarting): keep the holders we knew and the neighbours.
    }
  }

  /**
   * The store's manifest; when it has none, the manifest of the file `ref` names (by default
   * the `file` option: a name, an id or an id prefix; else the directory's only file), adopted.
   * Rejects when the store holds another file than the one named, when the name is several
   * files', and when the directory lists several files and none is named.
   */
  manifest(ref = this.#options.file): Promise<Manifest> {
    const held = this.#store.manifest;
    if (held && ref !== undefined && !refersTo(ref, held)) {
      return Promise.reject(
        new FetchError(
          `The store "${this.#store.dir}" holds fragments of "${held.file}" (${
            shortId(held.sha256)
          }), not "${ref}": use another store for it`,
        ),
      );
    }
    if (held) return Promise.resolve(held);
    // One search at a time: the player and a fetch-all may both ask.
    return this.#finding ??= this.#findManifest(ref).finally(() => this.#finding = undefined);
  }

  async #findManifest(wanted: string | undefined): Promise<Manifest> {
    const directory = this.#directory;
    if (!directory) throw new FetchError("No manifest here and no directory to ask for one");
    const deadline = Date.now() + this.#options.stallMs;
    let said = false; // that it waits
    let saidAt = 0; // ms into the wait
    while (true) {
      if (this.#closed.signal.aborted) throw new FetchError("Cancelled");
      let problem;
      try {
        const file = wanted ?? await this.#onlyFile(directory);
        if (file !== undefined) {
          const detail = await directory.getFile(file);
          // The directory resolved the reference; an answer for another file is not taken.
          if (wanted !== undefined && !refersTo(wanted, detail)) {
            throw new FetchError(`The directory answered "${wanted}" with another file`);
          }
          const { version, mime, size, sha256 } = detail;
          const fragments: FragmentEntry[] = detail.fragments.map((
            { index, name, offset, size, sha256 },
          ) => ({ index, name, offset, size, sha256 }));
          await this.#store.setManifest(
            { version, file: detail.file, mime, size, sha256, fragments } as Manifest,
          );
          for (const f of fragments) this.#emit(f.name, "missing");
          return this.#store.manifest!;
        }
        problem = `The directory at "${directory.url}" knows no file to fetch`;
      } catch (error) {
        if (!(error instanceof DirectoryError)) throw error;
        // A name several files share: waiting will not tell them apart.
        if (error.code === AMBIGUOUS_FILE) throw new FetchError(escapeControl(error.detail));
        problem = error.status === 404 && wanted !== undefined
          ? `The directory at "${directory.url}" does not list "${wanted}"`
          : error.status === 0
          ? `Cannot reach the directory at "${directory.url}" to find a file to fetch` +
            (this.#neighbours().length > 0 ? NEIGHBOURS_HAVE_NO_MANIFEST : "")
          : error.message;
      }
      // Said at once, then every few seconds when no terminal shows that it still waits.
      const waited = Date.now() - (deadline - this.#options.stallMs);
      if (!said || (!this.#options.progress && waited >= saidAt + WAIT_LINE_MS)) {
        const seconds = Math.max(0, Math.round((deadline - Date.now()) / 1000));
        this.#options.log?.(`[swarm] ${problem}; waiting up to ${seconds} s more`);
        said = true;
        saidAt = waited;
      }
      if (Date.now() > deadline) {
        const others = wanted === undefined ? [] : await directory.listFiles().catch(() => []);
        const listed = others.map(describeFile).sort().join(", ");
        throw new FetchError(problem + (listed ? ` (it lists ${listed})` : ""));
      }
      // The seeders may not have published yet, or the directory may be restarting.
      await this.#pause(500);
    }
  }

  // The id of the directory's only file, undefined when it lists none; several are not guessed
  // between.
  async #onlyFile(directory: DirectoryClient): Promise<string | undefined> {
    const files = await directory.listFiles();
    if (files.length > 1) {
      const listed = files.map(describeFile).sort().join(", ");
      throw new FetchError(
        `The directory lists ${files.length} files (${listed}): choose one with --file NAME ` +
          "or --file ID (the first 6 or more hex digits of its id)",
      );
    }
    return files[0]?.id;
  }

  #emit(name: string, state: FragmentEvent["state"], from?: string): void {
    const index = this.#store.manifest?.fragments.find((f) => f.name === name)?.index ?? -1;
    for (const listener of this.#listeners) {
      // As EventTarget does: a listener that throws is reported, and never fails the store's
      // write this may be called from, nor the listeners after it.
      try {
        listener({ name, index, state, from });
      } catch (error) {
        reportError(error);
      }
    }
  }

  #report(): void {
    const manifest = this.#store.manifest;
    if (!manifest || !this.#options.progress) return;
    const seconds = (performance.now() - this.#started) / 1000;
    this.#options.progress({
      file: manifest.file,
      held: manifest.fragments.filter((f) => this.#store.get(f.name)).length,
      total: manifest.fragments.length,
      bytesPerSecond: this.#received / Math.max(seconds, 0.001),
      peers: new Set([...this.#inflight.values()].flat().map((a) => a.key)).size,
    });
  }

  /** Stops fetching: attempts in flight are cancelled. */
  [Symbol.dispose](): void {
    this.#closed.abort();
    for (const attempts of this.#inflight.values()) attempts.forEach((a) => a.controller.abort());
    this.#wake?.();
  }
}

/** Cancels an attempt that another replaces: its end is no failure of its holder. */
function supersede(attempt: Attempt): void {
  attempt.superseded = true;
  attempt.controller.abort();
}

/** A listed file for a console line: its name, the start of its id, and its seeders. */
function describeFile(file: FileSummary): string {
  const seeders = `${file.seeders} seeder${file.seeders === 1 ? "" : "s"}`;
  return escapeControl(`${file.file} ${shortId(file.id)} (${seeders})`);
}
