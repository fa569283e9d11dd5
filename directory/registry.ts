/**
 * The directory's state: soft, in memory, and indexed for the hot paths (locate and heartbeat).
 * Peers are forgotten a ttl after their last heartbeat, and files a ttl after no live peer of
 * theirs holds any of their fragments.
 * @module
 */
import {
  DEFAULT_MAX_FILE_FRAGMENTS,
  DEFAULT_MAX_FILES,
  DEFAULT_MAX_INDEXED_FRAGMENTS,
  DEFAULT_MAX_PEERS,
  DEFAULT_MAX_PEERS_PER_ADDRESS,
  DEFAULT_PAGE_LIMIT,
  DEFAULT_TTL,
  type FileDetail,
  type FileSummary,
  type FragmentHolders,
  type Holder,
  MAX_FILE_HOLDERS,
  MAX_PAGE_ITEMS,
  MAX_TTL,
  type PeerInfo,
  type PeerState,
} from "./schemas.ts";
import type { Manifest } from "../split.ts";
import { FILE_ID_PATTERN, isIdPrefix } from "../common/file_ref.ts";

/** The `file` of a peer whose state gives no file id: its fragments belong to no file it says. */
const UNKNOWN = "";

interface PeerRecord {
  id: string;
  address: string;
  /** Who may change or remove it: whoever has the secret of its registration. */
  secret: string;
  /** The client address its last registration or heartbeat came from ("" when unknown). */
  source: string;
  holder: Holder;
  /** As last sent, without duplicates: the next heartbeat usually sends the same list. */
  fragments: string[];
  /**
   * The id of the file its fragments belong to, as its state says; {@link UNKNOWN} when it says
   * none. What groups it among a fragment's holders.
   */
  file: string;
  /** That file's name, as its state says: shown, never matched. */
  fileName: string | undefined;
  expiresAt: number;
  /** The body of its last registration or heartbeat, which {@link Registry.refresh} compares. */
  body: string | undefined;
  /** Its place in the list of peers. */
  place: Place<PeerRecord>;
}

/** Who registers or heartbeats a peer: its owner, and the client address the request came from. */
export interface Claim {
  /** The secret the request carries: what makes it the peer's owner. */
  secret: string;
  /** The request's client address; "" (the default) when unknown. */
  source?: string;
  /** The body as sent, byte for byte, so {@link Registry.refresh} knows it again. */
  body?: string;
}

/**
 * Whether two secrets are the same, in a time that depends on their length only: no answer
 * tells a client how much of a guess was right.
 */
export function sameSecret(a: string, b: string): boolean {
  if (a.length !== b.length) return false;
  let difference = 0;
  for (let i = 0; i < a.length; i++) difference |= a.charCodeAt(i) ^ b.charCodeAt(i);
  return difference === 0;
}

/** A peer's state with its host known (from the body, or the request's remote address). */
export type KnownPeerState = Omit<PeerState, "host"> & { host: string };

/** A locate answer, kept until the holders it lists change. */
interface Answer {
  /**
   * The live holders as JSON, as {@link Registry.locateJson} last built them, or undefined once
   * they change. Locates far outnumber changes (a heartbeat that repeats its state changes
   * nothing), and serializing holders scattered over the heap is most of a locate's cost.
   */
  json: string | undefined;
  /** When the first holder in `json` expires, and `json` with it. */
  jsonUntil: number;
}

/** Some holders, and the locate answer built from them. */
interface Holders extends Answer {
  peers: Set<PeerRecord>;
}

/**
 * A fragment name's holders, grouped by the file their state names: every file split.ts makes
 * names its fragments fragment_<i>.bin, so one name is usually held for many files. A group
 * keeps its own locate answer, so a change in one file's holders leaves the others' answers be.
 */
interface FragmentRecord {
  /** File -> its peers that hold this name; never an empty group. */
  groups: Map<string, Holders>;
  /** The one group, while there is only one (the usual case): what a locate answers with. */
  only: Holders | undefined;
  /** The answer with every group's holders, when there are several groups. */
  all: Answer;
  /** Its place in the list of fragments. */
  place: Place<string>;
}

interface FileRecord {
  manifest: Manifest;
  /** Its fragment names, to know at once whether a name a peer lets go is one of them. */
  names: Set<string>;
  /**
   * The last moment a live peer of this file was known to hold one of its fragments, or when it
   * was last published: the file is dropped one ttl later unless a live holder turns up.
   */
  backedAt: number;
  /** The last moment a peer of this file stopped holding one of its fragments. */
  releasedAt: number;
}

/**
 * What {@link Registry.upsert} did: a new peer, a known one refreshed; or it refused: the id is
 * another owner's live peer, a live peer of another owner is at that host and port, or a bound
 * was met (live peers, live peers from the client's address, fragments in the index).
 */
export type UpsertOutcome =
  | "created"
  | "refreshed"
  | "forbidden"
  | "address taken"
  | "too many peers"
  | "too many from address"
  | "too many fragments";

/** Where a page of a list starts, and how many entries it may hold. */
export interface Page {
  /** The `next` of the page before; the first page without it. */
  cursor?: number;
  /** @default 100 */
  limit?: number;
}

/** A page of a list, and the cursor of the next one (undefined on the last). */
export interface Paged<T> {
  entries: T[];
  next: number | undefined;
}

/** An entry's place in a {@link Sequence}: its number, and the entry until it is removed. */
interface Place<T> {
  readonly seq: number;
  value: T | undefined;
}

/** The place of a record until it has one. */
const UNPLACED: Place<never> = { seq: 0, value: undefined };

/**
 * Entries in the order they came, each numbered: a list's cursor is the number of the entry the
 * next page starts at, found again by binary search, so a page deep in a list costs no more
 * than the first, and an entry that comes or goes meanwhile moves no other. Removed entries
 * leave a hole until there are as many holes as entries.
 */
class Sequence<T> {
  #places: Place<T>[] = [];
  #next = 1;
  #holes = 0;

  add(value: T): Place<T> {
    const place = { seq: this.#next++, value };
    this.#places.push(place);
    return place;
  }

  remove(place: Place<T>): void {
    if (place.value === undefined) return;
    place.value = undefined;
    if (++this.#holes > 1024 && this.#holes * 2 > this.#places.length) {
      this.#places = this.#places.filter((kept) => kept.value !== undefined);
      this.#holes = 0;
    }
  }

  /** The entries from number `seq` on, with their numbers. */
  *from(seq = 0): Iterable<[number, T]> {
    const places = this.#places;
    let low = 0;
    let high = places.length;
    while (low < high) {
      const middle = (low + high) >>> 1;
      if (places[middle]!.seq < seq) low = middle + 1;
      else high = middle;
    }
    for (let i = low; i < places.length; i++) {
      const { seq, value } = places[i]!;
      if (value !== undefined) yield [seq, value];
    }
  }
}

/** Sweeps at most this often to make room for a new peer at the bound: a sweep is O(peers). */
const FULL_SWEEP_INTERVAL_MS = 1_000;

/** Options of a {@link Registry}. */
export interface RegistryOptions {
  /** Seconds a peer stays listed after its last heartbeat, at most {@link MAX_TTL}. @default 30 */
  ttl?: number;
  /** The clock in milliseconds; tests pass a fake one. @default Date.now */
  now?: () => number;
  /** Files listed at most; publishing another is refused. @default 1000 */
  maxFiles?: number;
  /** Fragments all listed files' manifests hold at most, together. @default 100000 */
  maxFileFragments?: number;
  /** Live peers listed at most; a new one is refused. @default 100000 */
  maxPeers?: number;
  /** Live peers registered from one client address at most. @default 100 */
  maxPeersPerAddress?: number;
  /** Fragments indexed at most, across all peers' lists. @default 500000 */
  maxIndexedFragments?: number;
}

/** A store's ttl and limits: {@link RegistryOptions}, with their defaults. */
export type StoreLimits = Required<Omit<RegistryOptions, "now">>;

/**
 * The ttl and limits `options` give, with their defaults; a RangeError for one out of range.
 * Every store takes them so (memory and Redis alike).
 */
export function storeLimits(options: Omit<RegistryOptions, "now">): StoreLimits {
  const ttl = options.ttl ?? DEFAULT_TTL;
  if (!(ttl > 0 && ttl <= MAX_TTL)) {
    throw new RangeError(`The ttl must be more than 0 and at most ${MAX_TTL} seconds`);
  }
  return {
    ttl,
    maxFiles: positive(options.maxFiles ?? DEFAULT_MAX_FILES, "maxFiles"),
    maxFileFragments: positive(
      options.maxFileFragments ?? DEFAULT_MAX_FILE_FRAGMENTS,
      "maxFileFragments",
    ),
    maxPeers: positive(options.maxPeers ?? DEFAULT_MAX_PEERS, "maxPeers"),
    maxPeersPerAddress: positive(
      options.maxPeersPerAddress ?? DEFAULT_MAX_PEERS_PER_ADDRESS,
      "maxPeersPerAddress",
    ),
    maxIndexedFragments: positive(
      options.maxIndexedFragments ?? DEFAULT_MAX_INDEXED_FRAGMENTS,
      "maxIndexedFragments",
    ),
  };
}

/**
 * Which file a reference names ({@link Registry.resolve}): one file's id, or several files that
 * share the name (or the id prefix) it gives.
 */
export type Resolution = { id: string } | { ambiguous: FileSummary[] };

/**
 * What {@link Registry.publish} did with a manifest: stored a new file, found the same one
 * (which gets another ttl to be backed), found the same id split another way, or refused it: the directory lists `maxFiles` files already, or the files'
 * manifests would hold more than `maxFileFragments` fragments.
 */
export type PublishOutcome =
  | "created"
  | "unchanged"
  | "conflict"
  | "too many files"
  | "too many fragments";

/** A value, or a promise of it: the in-memory store answers at once, one in Redis later. */
export type Awaitable<T> = T | Promise<T>;

/** The sizes of a store's state, as `GET /health` shows them. */
export interface StoreCounts {
  peers: number;
  fragments: number;
  files: number;
}

/**
 * What the directory's app serves from: the in-memory {@link Registry} (the default), or the
 * state that replicas share in Redis (`directory/redis_store.ts`). Every method means what the
 * {@link Registry}'s of the same name means.
 */
export interface DirectoryStore {
  readonly ttl: number;
  readonly maxFiles: number;
  readonly maxFileFragments: number;
  readonly maxPeers: number;
  readonly maxPeersPerAddress: number;
  readonly maxIndexedFragments: number;
  counts(): Awaitable<StoreCounts>;
  /** Frees the memory of the expired; a store whose state expires by itself does nothing. */
  sweep(): void;
  owns(id: string, secret: string): Awaitable<boolean | undefined>;
  refresh(
    id: string,
    secret: string,
    body: string | undefined,
    source: () => string,
  ): Awaitable<boolean>;
  upsert(id: string, state: KnownPeerState, claim: Claim): Awaitable<UpsertOutcome>;
  remove(id: string): Awaitable<boolean>;
  locateJson(name: string, file?: string): Awaitable<string | undefined>;
  peers(page?: Page): Awaitable<Paged<PeerInfo>>;
  fragments(file?: string, page?: Page): Awaitable<Paged<FragmentHolders>>;
  publish(manifest: Manifest): Awaitable<PublishOutcome>;
  files(): Awaitable<FileSummary[]>;
  resolve(ref: string): Awaitable<Resolution | undefined>;
  file(id: string): Awaitable<FileDetail | undefined>;
  /** Lets go of what it holds open (a connection); nothing for the in-memory one. */
  close?(): Promise<void>;
  /**
   * Resolves once its backing service answers, or rejects after `timeoutMs`; none for the
   * in-memory one, which is ready at once.
   */
  ready?(timeoutMs?: number): Promise<void>;
}

/**
 * What a store throws while its backing service is unreachable: the app answers 503, and the
 * store recovers by itself.
 */
export class StoreUnavailableError extends Error {
  override name = "StoreUnavailableError";
}

/**
 * The directory's in-memory state: peers, which of them holds which fragment of which file, and
 * files. Reads skip expired peers, so answers hold only live ones; {@link Registry.sweep} (run
 * on a timer by `startDirectory()`) frees the memory of the dead.
 *
 * Files are content-addressed: a file's id is its whole-file SHA-256, and files that share a
 * name are listed side by side. A peer's state may give the id of the file its fragments belong
 * to (its store's manifest's). A file's holders are the peers that give its id: fragment names
 * are not unique across files
 * (split.ts names every file's fragments fragment_<i>.bin). A locate without a file lists every
 * holder of the name.
 *
 * A file is soft state too: it stays listed while a live peer of that file holds any of its
 * fragments, and is dropped once none has for one ttl. Publishing it (again) counts as backing
 * it, so a peer may publish before it registers its first fragment.
 */
export class Registry implements DirectoryStore {
  /** Seconds a peer stays listed after its last heartbeat. */
  readonly ttl: number;
  /** Files listed at most. */
  readonly maxFiles: number;
  /** Fragments all listed files' manifests hold at most, together. */
  readonly maxFileFragments: number;
  /** Live peers listed at most. */
  readonly maxPeers: number;
  /** Live peers registered from one client address at most. */
  readonly maxPeersPerAddress: number;
  /** Fragments indexed at most, across all peers' lists. */
  readonly maxIndexedFragments: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  /** Every peer heard from within a ttl, and any expired since the last sweep. */
  readonly #peers = new Map<string, PeerRecord>();
  /** The same, in the order they came: what `GET /peers` pages through. */
  readonly #peerList = new Sequence<PeerRecord>();
  /** The names of the fragment index, in the order they came: what `GET /fragments` pages. */
  readonly #fragmentList = new Sequence<string>();
  /** Fragment name -> its holders, kept in step with every heartbeat: locate is O(holders). */
  readonly #fragments = new Map<string, FragmentRecord>();
  /** "host:port" -> peer id, so a peer that restarted and registered again has one entry. */
  readonly #byAddress = new Map<string, string>();
  readonly #files = new Map<string, FileRecord>();
  /** Fragments of all files' manifests, together. */
  #fileFragments = 0;
  /** Client address -> peers registered from it (live, or expired and not swept yet). */
  readonly #bySource = new Map<string, number>();
  /** Fragment names in all peers' lists, together: the size of the index. */
  #indexed = 0;
  #sweptAt = -Infinity;

  constructor(options: RegistryOptions = {}) {
    ({
      ttl: this.ttl,
      maxFiles: this.maxFiles,
      maxFileFragments: this.maxFileFragments,
      maxPeers: this.maxPeers,
      maxPeersPerAddress: this.maxPeersPerAddress,
      maxIndexedFragments: this.maxIndexedFragments,
    } = storeLimits(options));
    this.#ttlMs = this.ttl * 1000;
    this.#now = options.now ?? Date.now;
  }

  /** Live peers, fragment names with a live holder, and listed files. */
  counts(): StoreCounts {
    return { peers: this.peerCount, fragments: this.fragmentCount, files: this.fileCount };
  }

  /** Live peers. */
  get peerCount(): number {
    this.sweep();
    return this.#peers.size;
  }

  /** Fragment names with at least one live holder. */
  get fragmentCount(): number {
    this.sweep();
    return this.#fragments.size;
  }

  /** Published files that are still listed. */
  get fileCount(): number {
    this.#sweepFiles(this.#now());
    return this.#files.size;
  }

  /**
   * Forgets every peer whose ttl has run out, and its place in the fragment index, and every
   * file no live peer has backed for a ttl: O(peers + files).
   */
  sweep(): void {
    const now = this.#now();
    this.#sweptAt = now;
    for (const peer of this.#peers.values()) {
      if (peer.expiresAt <= now) this.#remove(peer, now);
    }
    this.#sweepFiles(now);
  }

  /**
   * Whether `secret` is that of live peer `id`: undefined when the directory does not know the
   * peer (or it expired), so that nobody owns it.
   */
  owns(id: string, secret: string): boolean | undefined {
    const peer = this.#peers.get(id);
    if (peer === undefined || peer.expiresAt <= this.#now()) return undefined;
    return sameSecret(peer.secret, secret);
  }

  /**
   * Refreshes live peer `id` of `secret` when `body` repeats its last registration or heartbeat
   * byte for byte, which would parse to the state it has, from the client address it came from
   * (asked only then). False when it does not refresh, and the caller parses the body and calls
   * {@link Registry.upsert}.
   */
  refresh(id: string, secret: string, body: string | undefined, source: () => string): boolean {
    const now = this.#now();
    const peer = this.#peers.get(id);
    if (body === undefined || peer === undefined || peer.expiresAt <= now) return false;
    if (peer.body !== body || peer.source !== source() || !sameSecret(peer.secret, secret)) {
      return false;
    }
    peer.expiresAt = now + this.#ttlMs; // only later: no cached locate answer goes stale
    return true;
  }

  /**
   * Registers or refreshes peer `id` with its full state, for `claim`'s owner (see
   * {@link UpsertOutcome} for what it refuses). A peer the directory does not know, or that
   * expired, is anyone's: it is created with the claim's owner. Another live peer at the same
   * host and port is replaced when it has the same owner (the peer restarted), and refused
   * otherwise. A known peer whose new list would take the index past its bound keeps its last
   * state, refreshed. Only a directory at a bound pays for a sweep (at most once a second): a
   * peer that expired makes room.
   */
  upsert(id: string, state: KnownPeerState, claim: Claim): UpsertOutcome {
    const now = this.#now();
    const { secret, source = "", body } = claim;
    const known = this.#peers.get(id);
    const live = known !== undefined && known.expiresAt > now;
    if (live && !sameSecret(known.secret, secret)) return "forbidden";
    const file = state.fileId ?? UNKNOWN;
    // The usual heartbeat repeats the peer's state: only the expiry moves, and only later, so
    // no cached locate answer goes stale. (Same host and port means same address, which
    // #byAddress already maps to this id.)
    if (
      live && known.source === source && sameHolder(known.holder, state) &&
      known.file === file && known.fileName === state.file &&
      sameList(known.fragments, state.fragments)
    ) {
      known.expiresAt = now + this.#ttlMs;
      known.body = body;
      return "refreshed";
    }
    const address = `${state.host}:${state.port}`;
    const sameAddress = this.#byAddress.get(address);
    const other = sameAddress === undefined || sameAddress === id
      ? undefined
      : this.#peers.get(sameAddress);
    // Another id at the same address: this peer before a restart, if the owner is the same.
    if (other !== undefined && other.expiresAt > now && !sameSecret(other.secret, secret)) {
      return "address taken";
    }
    const refusal = this.#bound(known, other, state, source);
    if (refusal !== undefined) {
      if (now - this.#sweptAt >= FULL_SWEEP_INTERVAL_MS) {
        this.sweep(); // a peer that expired makes room
        return this.upsert(id, state, claim);
      }
      // A live peer keeps its place, and its last state, while the index is full.
      if (live && refusal === "too many fragments") known.expiresAt = now + this.#ttlMs;
      return refusal;
    }
    if (other !== undefined) this.#remove(other, now);
    let peer = known;
    if (peer === undefined) {
      const holder = toHolder(id, state);
      const fragments: string[] = [];
      peer = {
        id,
        address,
        secret,
        source,
        holder,
        fragments,
        file,
        fileName: state.file,
        expiresAt: 0,
        body,
        place: UNPLACED,
      };
      peer.place = this.#peerList.add(peer);
      this.#peers.set(id, peer);
      this.#count(source, 1);
    } else {
      if (peer.address !== address) this.#byAddress.delete(peer.address);
      if (!sameHolder(peer.holder, state)) peer.holder = toHolder(id, state);
      peer.address = address;
      peer.secret = secret;
      peer.fileName = state.file;
      if (peer.source !== source) {
        this.#count(peer.source, -1);
        this.#count(source, 1);
        peer.source = source;
      }
      // Its holder may have changed, or it was expired and left out of the answers: rebuild them.
      for (const name of peer.fragments) this.#changed(this.#fragments.get(name)!, peer.file);
    }
    this.#index(peer, state.fragments, file, now);
    peer.expiresAt = now + this.#ttlMs;
    peer.body = body;
    this.#byAddress.set(address, id);
    return live ? "refreshed" : "created";
  }

  /**
   * The bound that taking `state` for `known` (undefined for a new peer), replacing `other`,
   * would break; undefined when none.
   */
  #bound(
    known: PeerRecord | undefined,
    other: PeerRecord | undefined,
    state: KnownPeerState,
    source: string,
  ): UpsertOutcome | undefined {
    if (known === undefined && other === undefined && this.#peers.size >= this.maxPeers) {
      return "too many peers";
    }
    if (known?.source !== source) {
      const freed = other?.source === source ? 1 : 0;
      if ((this.#bySource.get(source) ?? 0) - freed >= this.maxPeersPerAddress) {
        return "too many from address";
      }
    }
    const count = state.fragments.length;
    const distinct = count > 1 && !(known && sameList(known.fragments, state.fragments))
      ? new Set(state.fragments).size
      : count;
    const freed = (known?.fragments.length ?? 0) + (other?.fragments.length ?? 0);
    if (this.#indexed - freed + distinct > this.maxIndexedFragments) return "too many fragments";
    return undefined;
  }

  #count(source: string, delta: number): void {
    const count = (this.#bySource.get(source) ?? 0) + delta;
    if (count > 0) this.#bySource.set(source, count);
    else this.#bySource.delete(source);
  }

  /** Removes peer `id`; false when it was not known (or had already expired). */
  remove(id: string): boolean {
    const peer = this.#peers.get(id);
    if (peer === undefined) return false;
    const now = this.#now();
    this.#remove(peer, now);
    return peer.expiresAt > now;
  }

  /**
   * The live holders of fragment `name` (empty when none): of any file, or of `file` only (the
   * peers whose state names it).
   */
  locate(name: string, file?: string): Holder[] {
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return [];
    return this.#live(this.#holders(fragment, file), this.#now()).holders;
  }

  /** {@link Registry.locate} as JSON text, kept until the holders change; undefined when none. */
  locateJson(name: string, file?: string): string | undefined {
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return undefined;
    // The answer of the one group there is, or of the file asked for, is that group's own.
    const answer = file !== undefined ? fragment.groups.get(file) : fragment.only ?? fragment.all;
    if (answer === undefined) return undefined;
    const now = this.#now();
    if (answer.json === undefined || answer.jsonUntil <= now) {
      const live = this.#live(this.#holders(fragment, file), now);
      answer.json = live.holders.length === 0 ? undefined : JSON.stringify(live.holders);
      answer.jsonUntil = live.until;
    }
    return answer.json;
  }

  /**
   * A page of the live peers with their fragments, and the file they belong to when it said: at
   * most `limit` of them, ending early once they name {@link MAX_PAGE_ITEMS} fragments.
   */
  peers(page: Page = {}): Paged<PeerInfo> {
    const now = this.#now();
    return paginate(
      this.#peerList.from(page.cursor),
      page,
      (peer) => peer.expiresAt > now,
      (peer) => ({
        entry: {
          ...peer.holder,
          fragments: peer.fragments,
          ...(peer.fileName === undefined ? {} : { file: peer.fileName }),
        },
        items: peer.fragments.length,
      }),
    );
  }

  /**
   * A page of the fragments with at least one live holder (of `file`, when given), and their
   * holders: at most `limit` of them, ending early once they list {@link MAX_PAGE_ITEMS} holders.
   */
  fragments(file?: string, page: Page = {}): Paged<FragmentHolders> {
    const now = this.#now();
    const held = (name: string) => {
      const fragment = this.#fragments.get(name)!;
      if (file !== undefined) return this.#anyLive(fragment.groups.get(file), now);
      for (const group of fragment.groups.values()) if (this.#anyLive(group, now)) return true;
      return false;
    };
    return paginate(this.#fragmentList.from(page.cursor), page, held, (name) => {
      const { holders } = this.#live(this.#holders(this.#fragments.get(name)!, file), now);
      return { entry: { name, holders }, items: holders.length };
    });
  }

  /**
   * Stores a manifest under its id (its whole-file SHA-256), unless the same id is split another
   * way or the directory is full (see {@link PublishOutcome}). The same manifest again gives the
   * file another ttl to be backed. Files that share a name are listed side by side.
   */
  publish(manifest: Manifest): PublishOutcome {
    const now = this.#now();
    let known = this.#files.get(manifest.sha256);
    if (known !== undefined && this.#expired(known, now)) {
      this.#drop(known);
      known = undefined;
    }
    if (known !== undefined) {
      // The same file split another way (other fragments) is not the same publication.
      const same = known.manifest.file === manifest.file &&
        JSON.stringify(known.manifest.fragments) === JSON.stringify(manifest.fragments);
      if (!same) return "conflict";
      known.backedAt = Math.max(known.backedAt, now);
      return "unchanged";
    }
    const full = () =>
      this.#files.size >= this.maxFiles
        ? "too many files"
        : this.#fileFragments + manifest.fragments.length > this.maxFileFragments
        ? "too many fragments"
        : undefined;
    // Only a full directory pays for a sweep: a dropped file may make room.
    if (full() !== undefined) this.#sweepFiles(now);
    const refused = full();
    if (refused !== undefined) return refused;
    const names = new Set(manifest.fragments.map((fragment) => fragment.name));
    this.#files.set(manifest.sha256, { manifest, names, backedAt: now, releasedAt: -Infinity });
    this.#fileFragments += manifest.fragments.length;
    return "created";
  }

  /**
   * Every listed file with its id, its fragment count, whether all fragments are held, and how
   * many live peers of it hold them all.
   */
  files(): FileSummary[] {
    const now = this.#now();
    this.#sweepFiles(now);
    return [...this.#files.values()].map((record) => this.#summary(record, now));
  }

  /**
   * The file `ref` names: a listed file's id, or any id (64 hex digits, listed or not: holders
   * may give it before its manifest is published); the name of listed files; or a prefix of
   * listed files' ids ({@link isIdPrefix}). Undefined when none.
   */
  resolve(ref: string): Resolution | undefined {
    if (FILE_ID_PATTERN.test(ref)) return { id: ref };
    const now = this.#now();
    this.#sweepFiles(now);
    let matches = [...this.#files.values()].filter(({ manifest }) => manifest.file === ref);
    if (matches.length === 0 && isIdPrefix(ref)) {
      matches = [...this.#files.values()].filter(({ manifest }) => manifest.sha256.startsWith(ref));
    }
    if (matches.length === 0) return undefined;
    if (matches.length === 1) return { id: matches[0]!.manifest.sha256 };
    return { ambiguous: matches.map((record) => this.#summary(record, now)) };
  }

  #summary({ manifest, names }: FileRecord, now: number): FileSummary {
    const groups = manifest.fragments.map((fragment) =>
      this.#fragments.get(fragment.name)?.groups.get(manifest.sha256)
    );
    let seeders = 0;
    for (const peer of groups[0]?.peers ?? []) {
      if (peer.expiresAt <= now || peer.fragments.length < names.size) continue;
      if (groups.every((group) => group?.peers.has(peer))) seeders++;
    }
    return fileSummary(manifest, groups.every((group) => this.#anyLive(group, now)), seeders);
  }

  /**
   * The manifest of file `id` with each fragment's live holders of that file, or undefined when
   * not listed.
   */
  file(id: string): FileDetail | undefined {
    const record = this.#files.get(id);
    if (record === undefined) return undefined;
    if (this.#expired(record, this.#now())) {
      this.#drop(record);
      return undefined;
    }
    const fragments = record.manifest.fragments.map((fragment) => {
      const holders = this.locate(fragment.name, id);
      return {
        ...fragment,
        holders: sample(holders, MAX_FILE_HOLDERS),
        holderCount: holders.length,
      };
    });
    return { ...record.manifest, id, fragments };
  }

  /** The holders of `fragment` (of `file`, when given), whether live or not. */
  #holders(fragment: FragmentRecord, file?: string): Iterable<PeerRecord> {
    if (file !== undefined) return fragment.groups.get(file)?.peers ?? [];
    if (fragment.only !== undefined) return fragment.only.peers;
    return everyPeer(fragment.groups.values()); // a peer is in one group of a name at most
  }

  /** Drops the answers of `fragment` that list the peers of `file`: they changed. */
  #changed(fragment: FragmentRecord, file: string): void {
    const group = fragment.groups.get(file);
    if (group !== undefined) group.json = undefined;
    fragment.all.json = undefined;
  }

  /**
   * True when no live peer of `file` has held any of its fragments for a ttl; otherwise moves
   * its `backedAt` up to the last moment one is known to have. O(its fragments) at worst, and
   * O(1) for a file known to be backed less than a ttl ago.
   */
  #expired(file: FileRecord, now: number): boolean {
    if (now - file.backedAt < this.#ttlMs) return false;
    // A peer swept (or that moved to another file) held it until releasedAt.
    let backedAt = Math.max(file.backedAt, file.releasedAt);
    for (const { name } of file.manifest.fragments) {
      // A peer expired but not swept yet held it until its expiry.
      for (const peer of this.#fragments.get(name)?.groups.get(file.manifest.sha256)?.peers ?? []) {
        if (peer.expiresAt > now) {
          file.backedAt = now;
          return false;
        }
        backedAt = Math.max(backedAt, peer.expiresAt);
      }
    }
    file.backedAt = backedAt;
    return now - backedAt >= this.#ttlMs;
  }

  #sweepFiles(now: number): void {
    for (const file of this.#files.values()) {
      if (this.#expired(file, now)) this.#drop(file);
    }
  }

  #drop(file: FileRecord): void {
    this.#files.delete(file.manifest.sha256);
    this.#fileFragments -= file.manifest.fragments.length;
  }

  /**
   * Brings the fragment index in step with `peer`'s new list and file, touching only what
   * changed.
   */
  #index(peer: PeerRecord, names: string[], file: string, now: number): void {
    if (peer.file === file && sameList(peer.fragments, names)) return; // nothing changed
    const next = new Set(names);
    for (const name of peer.fragments) {
      // A peer whose store now holds another file lets go of all it held for the old one.
      if (peer.file !== file || !next.has(name)) this.#unindex(name, peer, now);
    }
    peer.file = file;
    for (const name of next) {
      let fragment = this.#fragments.get(name);
      if (fragment === undefined) {
        const all = { json: undefined, jsonUntil: 0 };
        fragment = { groups: new Map(), only: undefined, all, place: this.#fragmentList.add(name) };
        this.#fragments.set(name, fragment);
      }
      let group = fragment.groups.get(file);
      if (group === undefined) {
        group = holders();
        fragment.groups.set(file, group);
        fragment.only = fragment.groups.size === 1 ? group : undefined;
      } else if (group.peers.has(peer)) continue;
      group.peers.add(peer);
      this.#changed(fragment, file);
    }
    this.#indexed += next.size - peer.fragments.length;
    peer.fragments = [...next];
  }

  /** Takes `peer` out of fragment `name`'s holders, noting until when it held it for its file. */
  #unindex(name: string, peer: PeerRecord, now: number): void {
    const file = this.#files.get(peer.file);
    if (file !== undefined && file.names.has(name)) {
      file.releasedAt = Math.max(file.releasedAt, Math.min(now, peer.expiresAt));
    }
    const fragment = this.#fragments.get(name);
    const group = fragment?.groups.get(peer.file);
    if (fragment === undefined || group === undefined) return;
    group.peers.delete(peer);
    this.#changed(fragment, peer.file);
    if (group.peers.size > 0) return;
    fragment.groups.delete(peer.file); // no empty groups or records left behind
    if (fragment.groups.size === 0) {
      this.#fragments.delete(name);
      this.#fragmentList.remove(fragment.place);
    } else if (fragment.groups.size === 1) fragment.only = fragment.groups.values().next().value;
  }

  /** True when one of `holders` is live. */
  #anyLive(holders: Holders | undefined, now: number): boolean {
    for (const peer of holders?.peers ?? []) if (peer.expiresAt > now) return true;
    return false;
  }

  /** The live ones of `peers` as holders, and when the first of them expires. */
  #live(peers: Iterable<PeerRecord>, now: number): { holders: Holder[]; until: number } {
    const holders: Holder[] = [];
    let until = Infinity;
    for (const peer of peers) {
      if (peer.expiresAt <= now) continue;
      holders.push(peer.holder);
      until = Math.min(until, peer.expiresAt);
    }
    return { holders, until };
  }

  #remove(peer: PeerRecord, now: number): void {
    for (const name of peer.fragments) this.#unindex(name, peer, now);
    this.#indexed -= peer.fragments.length;
    peer.fragments = [];
    this.#peers.delete(peer.id);
    this.#peerList.remove(peer.place);
    this.#count(peer.source, -1);
    if (this.#byAddress.get(peer.address) === peer.id) this.#byAddress.delete(peer.address);
  }
}

/**
 * A page of `entries` (numbered, from the page's cursor on): those that `listed` keeps (not an
 * expired peer, say), each as `describe` has it, with the number of items it holds. O(limit +
 * left out).
 */
function paginate<E, T>(
  entries: Iterable<[number, E]>,
  { limit = DEFAULT_PAGE_LIMIT }: Page,
  listed: (entry: E) => boolean,
  describe: (entry: E) => { entry: T; items: number },
): Paged<T> {
  const page: T[] = [];
  let items = 0;
  for (const [seq, entry] of entries) {
    if (!listed(entry)) continue;
    // Full: the next page starts here, at an entry that is there.
    if (page.length >= limit || items >= MAX_PAGE_ITEMS) return { entries: page, next: seq };
    const described = describe(entry);
    page.push(described.entry);
    items += described.items;
  }
  return { entries: page, next: undefined };
}

/** `count` of `items` from a random place on (all of them when there are no more). */
function sample<T>(items: T[], count: number): T[] {
  if (items.length <= count) return items;
  const start = Math.floor(Math.random() * items.length);
  const taken = items.slice(start, start + count);
  return taken.length === count ? taken : taken.concat(items.slice(0, count - taken.length));
}

function holders(): Holders {
  return { peers: new Set(), json: undefined, jsonUntil: 0 };
}

function* everyPeer(groups: Iterable<Holders>): Iterable<PeerRecord> {
  for (const group of groups) yield* group.peers;
}

/** `value` when it is a whole number of at least 1; a RangeError naming `option` otherwise. */
function positive(value: number, option: string): number {
  if (Number.isInteger(value) && value >= 1) return value;
  throw new RangeError(`${option} must be a whole number of at least 1, not ${value}`);
}

function sameList(a: string[], b: string[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

/** How a file is listed: its manifest's fields, whether it is available, and its seeders. */
export function fileSummary(manifest: Manifest, available: boolean, seeders: number): FileSummary {
  return {
    id: manifest.sha256,
    file: manifest.file,
    mime: manifest.mime,
    size: manifest.size,
    sha256: manifest.sha256,
    fragments: manifest.fragments.length,
    available,
    seeders,
  };
}

/** The holder a peer's state makes of it, as locate lists it. */
export function toHolder(id: string, state: KnownPeerState): Holder {
  const { host, port, grpcPort, httpPort, fileId } = state;
  return { id, host, port, grpcPort, httpPort, ...(fileId === undefined ? {} : { fileId }) };
}

function sameHolder(holder: Holder, state: KnownPeerState): boolean {
  return holder.host === state.host && holder.port === state.port &&
    holder.grpcPort === state.grpcPort && holder.httpPort === state.httpPort &&
    holder.fileId === state.fileId;
}
