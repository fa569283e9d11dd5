/**
 * A peer's fragment store: a folder of verified fragment files and the file's `manifest.json`.
 * Only verified bytes ever carry a fragment's name: a fragment is written under a hidden
 * temporary name, hashed as it is written, and renamed only when its size and SHA-256 match.
 * The TCP and gRPC servers read from it, and the fetchers write into it.
 *
 * Only regular files are ever read as fragments: a name is checked with `lstat` (a symlink, a
 * folder, a FIFO or a device is never followed) and the opened handle is checked again with
 * `fstat`, so a file swapped for a symlink in between is caught. `manifest.json`, the joined
 * file's name and hidden names (temporaries, split's staging folders) are never fragment names.
 *
 * A fragment found corrupt is quarantined in memory: the store remembers the file's identity
 * (inode, size, modification time) and never hashes it again until the file changes (a new copy
 * written over it, say). It is left on disk for `deno task split verify` to name, and never
 * served. Opening a store also removes what an interrupted write left: its own `.part-`
 * temporaries and the `.<file>.` temporaries of an interrupted `split join`.
 *
 * A fragment being written can be passed on while it arrives ({@link Store.relay}): its bytes as
 * they reach the disk, all but the last until the whole is verified. A reader gets the whole
 * fragment only when this store found it good, and an error otherwise, so nothing unverified is
 * ever passed on whole.
 * @module
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { Wakeup } from "../common/wakeup.ts";
import {
  hashReader,
  isValidName,
  type Manifest,
  MANIFEST_NAME,
  manifestProblem,
  readManifest,
  SplitError,
} from "../split.ts";

/** What a store knows of a fragment it holds. */
export interface FragmentInfo {
  name: string;
  size: number;
  sha256: string;
}

/** Bytes that did not match what they were announced as: nothing was kept. */
export class IntegrityError extends Error {
  override name = "IntegrityError";
}

/** A name that is not a valid fragment name (`../`, too long, the manifest's own name...). */
export class BadNameError extends Error {
  override name = "BadNameError";
}

const TEMP_PREFIX = ".part-";
/** The largest read when passing on an arriving fragment. */
const RELAY_CHUNK = 64 * 1024;
/** How long {@link Store.relay} waits for the bytes of a fragment asked of a holder to begin. */
export const RELAY_WAIT_MS = 10_000;

/**
 * A fragment passed on while it arrives (see {@link Store.relay}): what it must be, and its
 * bytes. Dispose of it to close its file.
 */
export interface Relay extends Disposable {
  info: FragmentInfo;
  /** Whether this store's copy failed: its bytes will never all come. */
  readonly failed: boolean;
  /**
   * The bytes as they reach this store's disk, the last only once the whole fragment is verified
   * here; throws {@link RelayError} if this store's copy fails. Read it once.
   */
  chunks: AsyncIterable<Uint8Array>;
}

/** The copy being passed on failed here (wrong bytes, or its sender stopped): do not finish it. */
export class RelayError extends Error {
  override name = "RelayError";
}

/** A fragment being written: how much of it is on disk, and how it ended. */
class Arrival {
  written = 0;
  outcome: "held" | "failed" | undefined;
  /** Fires at each {@link update}. */
  readonly changed = new Wakeup();

  constructor(readonly info: FragmentInfo, readonly temp: string) {}

  /** More bytes are on disk, or the outcome is known: wakes the readers passing it on. */
  update(written: number, outcome?: "held" | "failed"): void {
    this.written = written;
    this.outcome = outcome;
    this.changed.fire();
  }
}

/** Opens `path` only when it is a regular file (not a symlink or device); undefined otherwise. */
export async function openRegular(path: string): Promise<Deno.FsFile | undefined> {
  let before;
  try {
    before = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  if (!before.isFile) return undefined;
  let file;
  try {
    file = await Deno.open(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return undefined;
    throw error;
  }
  const after = await file.stat();
  // Swapped between lstat and open: whatever was opened is not the file that was checked.
  if (!after.isFile || after.ino !== before.ino || after.dev !== before.dev) {
    file.close();
    return undefined;
  }
  return file;
}

function identity(info: Deno.FileInfo): string {
  return `${info.dev}:${info.ino}:${info.size}:${info.mtime?.getTime()}`;
}

/** True when `name` may be stored and served as a fragment. */
export function isFragmentName(name: string): boolean {
  return isValidName(name) && name !== MANIFEST_NAME;
}

/** A folder of verified fragments; open it with {@link Store.open}. */
export class Store {
  readonly dir: string;
  #manifest: Manifest | undefined;
  /** The manifest's entries by name, made again when the manifest changes: looked up per file. */
  #entries: { of: Manifest; byName: Map<string, Manifest["fragments"][number]> } | undefined;
  #held = new Map<string, FragmentInfo>();
  #listeners = new Set<(info: FragmentInfo) => void>();
  /** Fragments found corrupt, by name: the identity of the file that was hashed. */
  #corrupt = new Map<string, string>();
  /** Fragments being written, by name (two copies may arrive at once). */
  #arriving = new Map<string, Set<Arrival>>();
  /** Fragments asked of some holder, by name: how many fetches (see {@link Store.expect}). */
  #expected = new Map<string, number>();
  /** Fires when a fragment begins to arrive, or a fetch of one ends. */
  readonly #arrivalsChanged = new Wakeup();

  private constructor(dir: string) {
    this.dir = dir;
  }

  /**
   * Opens (creating it when missing) the store in `dir`: drops temporaries an interrupted run
   * left, reads the manifest, and hashes what is there. A fragment whose bytes disagree with the
   * manifest is not held (and is reported through `onCorrupt`), so it is never served.
   */
  static async open(dir: string, onCorrupt?: (name: string) => void): Promise<Store> {
    await Deno.mkdir(dir, { recursive: true });
    const store = new Store(dir);
    try {
      store.#manifest = await readManifest(dir);
    } catch (error) {
      if (!(error instanceof SplitError)) throw error;
      // No manifest yet (an empty viewer) or a broken one: fragments are checked on arrival.
    }
    const joinTemp = store.#manifest && `.${store.#manifest.file}.`;
    for await (const entry of Deno.readDir(dir)) {
      if (
        entry.isFile &&
        (entry.name.startsWith(TEMP_PREFIX) || (joinTemp && entry.name.startsWith(joinTemp)))
      ) {
        await Deno.remove(join(dir, entry.name)).catch(() => {});
        continue;
      }
      if (!entry.isFile || !store.#isFragmentName(entry.name)) continue;
      // e.g. the joined video beside its fragments
      if (store.#manifest && !store.expected(entry.name)) continue;
      const file = await openRegular(join(dir, entry.name));
      if (!file) continue;
      using _ = file;
      const info = await store.#check(entry.name, file);
      if (info) store.#held.set(entry.name, info);
      else onCorrupt?.(entry.name);
    }
    return store;
  }

  /** The manifest of the file this store holds fragments of, when it has one. */
  get manifest(): Manifest | undefined {
    return this.#manifest;
  }

  /** Every fragment held, sorted by name (manifest order when there is a manifest). */
  list(): FragmentInfo[] {
    const order = new Map(this.#manifest?.fragments.map((f) => [f.name, f.index]));
    return [...this.#held.values()].sort((a, b) =>
      (order.get(a.name) ?? Infinity) - (order.get(b.name) ?? Infinity) ||
      a.name.localeCompare(b.name)
    );
  }

  /** Whether the store holds every fragment of its manifest (false without one). */
  holdsAll(): boolean {
    const fragments = this.#manifest?.fragments ?? [];
    return fragments.length > 0 && fragments.every((f) => this.#held.has(f.name));
  }

  /** What the store holds under `name`, if anything. */
  get(name: string): FragmentInfo | undefined {
    return this.#held.get(name);
  }

  /** What a fragment must hash to: the manifest's word, when the manifest lists it. */
  expected(name: string): FragmentInfo | undefined {
    const manifest = this.#manifest;
    if (!manifest) return undefined;
    if (this.#entries?.of !== manifest) {
      this.#entries = { of: manifest, byName: new Map(manifest.fragments.map((f) => [f.name, f])) };
    }
    const entry = this.#entries.byName.get(name);
    return entry && { name, size: entry.size, sha256: entry.sha256 };
  }

  /**
   * Picks up fragment `name` (and a manifest) that another process wrote into the folder, after
   * checking it against the manifest; returns what is now held under `name`, if anything.
   */
  async adopt(name: string): Promise<FragmentInfo | undefined> {
    if (!this.#isFragmentName(name)) return undefined;
    if (!this.#manifest) {
      this.#manifest = await readManifest(this.dir).catch(() => undefined);
      if (!this.#isFragmentName(name)) return undefined;
    }
    if (this.#held.has(name)) return this.#held.get(name);
    // Only fragments: never the joined video or another file that happens to sit in the folder.
    if (this.#manifest && !this.expected(name)) return undefined;
    const file = await openRegular(join(this.dir, name));
    if (!file) return undefined;
    using _ = file;
    const info = await this.#check(name, file);
    if (!info) return undefined;
    this.#held.set(name, info);
    for (const listener of this.#listeners) listener(info);
    return info;
  }

  /**
   * What fragment `name`'s open `file` holds, when it matches the manifest (any bytes without one);
   * undefined when it is quarantined: found corrupt now, or before and unchanged since, so that it
   * is not hashed again on every request.
   */
  async #check(name: string, file: Deno.FsFile): Promise<FragmentInfo | undefined> {
    const stat = await file.stat();
    if (this.#corrupt.get(name) === identity(stat)) return undefined;
    const want = this.expected(name);
    const quarantine = () => void this.#corrupt.set(name, identity(stat));
    // A file of the wrong size is corrupt whatever its bytes, and is not hashed: it may be huge.
    if (want && want.size !== stat.size) return quarantine();
    const sha256 = await hashReader(file);
    if (want && want.sha256 !== sha256) return quarantine();
    this.#corrupt.delete(name);
    return { name, size: stat.size, sha256 };
  }

  /** Adopts every fragment of the manifest that another process stored since. */
  async adoptAll(): Promise<void> {
    // One listing of the folder, not a stat per missing fragment: a viewer misses them all.
    if (!this.#manifest) return;
    const present = new Set<string>();
    try {
      for await (const entry of Deno.readDir(this.dir)) if (entry.isFile) present.add(entry.name);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return; // the folder went: nothing to adopt
      throw error;
    }
    for (const fragment of this.#manifest.fragments) {
      if (present.has(fragment.name) && !this.#held.has(fragment.name)) {
        await this.adopt(fragment.name);
      }
    }
  }

  /** Opens a held fragment for reading; undefined when it is not held. */
  async open(name: string): Promise<{ file: Deno.FsFile; info: FragmentInfo } | undefined> {
    const info = this.#held.get(name);
    if (!info) return undefined;
    const file = await openRegular(join(this.dir, name));
    if (!file) this.#held.delete(name); // removed, or replaced by a symlink, behind our back
    return file && { file, info };
  }

  /** True when fragment `name` was found corrupt and its file has not been replaced since. */
  isQuarantined(name: string): boolean {
    return this.#corrupt.has(name);
  }

  /** A fragment name this store may hold: never the manifest, a hidden name or the joined file. */
  #isFragmentName(name: string): boolean {
    return isFragmentName(name) && name !== this.#manifest?.file;
  }

  /**
   * Forgets every held fragment whose file has gone from the folder, or changed size, behind the
   * store's back (a stat each, no hashing); resolves with their names, in manifest order.
   */
  async prune(): Promise<string[]> {
    const lost = [];
    for (const info of this.list()) {
      const stat = await Deno.lstat(join(this.dir, info.name)).catch((error) => {
        if (error instanceof Deno.errors.NotFound) return undefined;
        throw error;
      });
      if (stat?.isFile && stat.size === info.size) continue;
      this.#held.delete(info.name);
      lost.push(info.name);
    }
    return lost;
  }

  /**
   * Says that fragment `name` is being asked of a holder, until disposed of: {@link relay} waits
   * for its bytes to begin instead of finding nothing.
   */
  expect(name: string): Disposable {
    this.#expected.set(name, (this.#expected.get(name) ?? 0) + 1);
    return {
      [Symbol.dispose]: () => {
        const left = this.#expected.get(name)! - 1;
        if (left > 0) this.#expected.set(name, left);
        else this.#expected.delete(name);
        this.#arrivalsChanged.fire();
      },
    };
  }

  /**
   * Fragment `name` while it is being written here (not yet held), to pass on as it arrives; the
   * copy furthest along when there are several. While it is only asked of a holder
   * ({@link expect}), waits for its bytes to begin, at most `waitMs` (two peers that each wait
   * for the other's copy give up) and until `signal` aborts. Undefined when it is neither
   * arriving nor expected, or is held by then.
   */
  async relay(
    name: string,
    { signal, waitMs = RELAY_WAIT_MS }: { signal?: AbortSignal; waitMs?: number } = {},
  ): Promise<Relay | undefined> {
    const gaveUp = Promise.withResolvers<void>();
    let givenUp = signal?.aborted ?? false;
    const giveUp = () => {
      givenUp = true;
      gaveUp.resolve();
    };
    const timer = setTimeout(giveUp, waitMs);
    signal?.addEventListener("abort", giveUp);
    let arrival;
    try {
      while (!(arrival = this.#furthest(name))) {
        if (givenUp || !this.#expected.has(name) || this.#held.has(name)) return undefined;
        await Promise.race([this.#arrivalsChanged.next, gaveUp.promise]);
      }
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", giveUp);
    }
    let file;
    try {
      file = await Deno.open(arrival.temp);
    } catch (error) {
      if (error instanceof Deno.errors.NotFound) return undefined; // it ended meanwhile
      throw error;
    }
    return {
      info: arrival.info,
      get failed() {
        return arrival.outcome === "failed";
      },
      chunks: relayChunks(file, arrival),
      [Symbol.dispose]: () => file.close(),
    };
  }

  #furthest(name: string): Arrival | undefined {
    const arrivals = [...this.#arriving.get(name) ?? []];
    return arrivals.sort((a, b) => b.written - a.written)[0];
  }

  /**
   * Writes `chunks` as fragment `name` if they are exactly `expected.size` bytes hashing to
   * `expected.sha256`; otherwise throws {@link IntegrityError} and keeps nothing. The manifest's
   * hash, when the manifest lists the name, overrides what the sender claimed.
   */
  async write(
    name: string,
    expected: { size: number; sha256: string },
    chunks: AsyncIterable<Uint8Array>,
  ): Promise<FragmentInfo> {
    if (!isFragmentName(name)) throw new BadNameError(`Invalid fragment name "${name}"`);
    if (name === this.#manifest?.file) {
      // The joined video sits beside its fragments: nothing may be written over it.
      throw new BadNameError(`"${name}" is the store's joined file, not a fragment`);
    }
    const want = this.expected(name) ?? { name, ...expected };
    if (want.size !== expected.size || want.sha256 !== expected.sha256) {
      throw new IntegrityError(
        `Fragment "${name}" was offered with a hash the manifest disagrees with`,
      );
    }
    const temp = join(this.dir, `${TEMP_PREFIX}${name}-${crypto.randomUUID()}`);
    const info = { name, size: want.size, sha256: want.sha256 };
    const arrival = new Arrival(info, temp);
    try {
      const hash = createHash("sha256");
      let size = 0;
      {
        using file = await Deno.open(temp, { write: true, createNew: true });
        // Listed only once its temporary exists: a relay opens it by that name.
        this.#arriving.set(name, (this.#arriving.get(name) ?? new Set()).add(arrival));
        this.#arrivalsChanged.fire();
        for await (const chunk of chunks) {
          size += chunk.length;
          if (size > want.size) {
            throw new IntegrityError(`Fragment "${name}" is longer than ${want.size} bytes`);
          }
          // The write runs on Deno's I/O thread while this one hashes the same bytes: the two
          // overlap instead of adding up. Both are done before the next chunk is asked for.
          const writing = writeAll(file, chunk);
          hash.update(chunk);
          await writing;
          arrival.update(size);
        }
      }
      const sha256 = hash.digest("hex");
      if (size !== want.size || sha256 !== want.sha256) {
        throw new IntegrityError(
          `Fragment "${name}" failed verification (${size} bytes, sha256 ${sha256.slice(0, 12)}…)`,
        );
      }
      await Deno.rename(temp, join(this.dir, name));
      this.#corrupt.delete(name);
    } catch (error) {
      arrival.update(arrival.written, "failed");
      await Deno.remove(temp).catch(() => {});
      throw error;
    } finally {
      const arrivals = this.#arriving.get(name);
      arrivals?.delete(arrival);
      if (arrivals?.size === 0) this.#arriving.delete(name);
    }
    this.#held.set(name, info);
    arrival.update(arrival.written, "held");
    for (const listener of this.#listeners) listener(info);
    return info;
  }

  /** Adopts `manifest` (e.g. from the directory) when the store has none; written atomically. */
  async setManifest(manifest: Manifest): Promise<void> {
    const problem = manifestProblem(manifest);
    if (problem) throw new IntegrityError(`Invalid manifest: ${problem}`);
    if (this.#manifest) return;
    const temp = join(this.dir, `${TEMP_PREFIX}${MANIFEST_NAME}-${crypto.randomUUID()}`);
    await Deno.writeTextFile(temp, JSON.stringify(manifest, null, 2) + "\n");
    await Deno.rename(temp, join(this.dir, MANIFEST_NAME));
    this.#manifest = manifest;
    // Anything held that the manifest contradicts can no longer be trusted.
    for (const entry of manifest.fragments) {
      const held = this.#held.get(entry.name);
      if (held && (held.size !== entry.size || held.sha256 !== entry.sha256)) {
        this.#held.delete(entry.name);
        await Deno.remove(join(this.dir, entry.name)).catch(() => {});
      }
    }
  }

  /** Calls `listener` for each fragment stored from now on; returns a function that stops it. */
  onFragment(listener: (info: FragmentInfo) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
}

/**
 * An arriving fragment's bytes from `file` (its temporary, opened before it could be renamed or
 * removed) as they reach the disk: all but the last until the store holds it, then the rest.
 */
async function* relayChunks(file: Deno.FsFile, arrival: Arrival): AsyncGenerator<Uint8Array> {
  const { size, name } = arrival.info;
  const buffer = new Uint8Array(Math.min(RELAY_CHUNK, Math.max(size, 1)));
  for (let offset = 0; offset < size;) {
    if (arrival.outcome === "failed") {
      throw new RelayError(`The copy of "${name}" arriving here failed`);
    }
    const ready = arrival.outcome === "held" ? size : Math.min(arrival.written, size - 1);
    if (offset >= ready) {
      await arrival.changed.next;
      continue;
    }
    const n = await file.read(buffer.subarray(0, Math.min(buffer.length, ready - offset)));
    if (n === null) throw new RelayError(`The copy of "${name}" arriving here shrank`);
    offset += n;
    yield buffer.subarray(0, n);
  }
}

async function writeAll(file: Deno.FsFile, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await file.write(bytes.subarray(written));
  }
}
