/**
 * The directory's state: soft, in memory, and indexed for the hot paths (locate and heartbeat).
 * Peers are forgotten a ttl after their last heartbeat, and files a ttl after no live peer holds
 * any of their fragments.
 * @module
 */
import {
  DEFAULT_MAX_FILE_FRAGMENTS,
  DEFAULT_MAX_FILES,
  DEFAULT_TTL,
  type FileDetail,
  type FileSummary,
  type FragmentHolders,
  type Holder,
  MAX_TTL,
  type PeerInfo,
  type PeerState,
} from "./_directory_schemas.ts";
import type { Manifest } from "./split.ts";

interface PeerRecord {
  id: string;
  address: string;
  holder: Holder;
  /** As last sent, without duplicates: the next heartbeat usually sends the same list. */
  fragments: string[];
  expiresAt: number;
  /** The body of its last registration or heartbeat, which {@link Registry.refresh} compares. */
  body: string | undefined;
  /** The remote host that stood in for a host that body did not name. */
  from: string | undefined;
}

/** A registration or heartbeat as it was sent, so {@link Registry.refresh} knows it again. */
export interface Sent {
  /** The body, byte for byte. */
  body?: string;
  /** The remote host that stood in for a host the body did not name. */
  from?: string;
}

/** A fragment's holders, and the locate answer built from them. */
interface FragmentRecord {
  holders: Set<PeerRecord>;
  /**
   * The live holders as JSON, as {@link Registry.locateJson} last built them, or undefined once
   * they change. Locates far outnumber changes (a heartbeat that repeats its state changes
   * nothing), and serializing holders scattered over the heap is most of a locate's cost.
   */
  json: string | undefined;
  /** When the first holder in `json` expires, and `json` with it. */
  jsonUntil: number;
}

interface FileRecord {
  manifest: Manifest;
  /**
   * The last moment a live peer was known to hold one of its fragments, or when it was last
   * published: the file is dropped one ttl later unless a live holder turns up.
   */
  backedAt: number;
}

/** A fragment name that published files list: how many, and when a holder last let it go. */
interface ListedName {
  files: number;
  /** The last moment a peer stopped holding it: it left, expired, or dropped it. */
  releasedAt: number;
}

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
}

/**
 * What {@link Registry.publish} did with a manifest: stored a new file, found the same one
 * (which gets another ttl to be backed), found another file under its name (other contents, or
 * split another way), or refused it: the directory lists `maxFiles` files already, or the files'
 * manifests would hold more than `maxFileFragments` fragments.
 */
export type PublishOutcome =
  | "created"
  | "unchanged"
  | "conflict"
  | "too many files"
  | "too many fragments";

/**
 * The directory's in-memory state: peers, which of them holds which fragment, and files. Reads
 * skip expired peers, so answers hold only live ones; {@link Registry.sweep} (run on a timer by
 * `startDirectory()`) frees the memory of the dead.
 *
 * A file is soft state too: it stays listed while a live peer holds any of its fragments, and
 * is dropped once none has for one ttl. Publishing it (again) counts as backing it, so a peer may
 * publish before it registers its first fragment.
 */
export class Registry {
  /** Seconds a peer stays listed after its last heartbeat. */
  readonly ttl: number;
  /** Files listed at most. */
  readonly maxFiles: number;
  /** Fragments all listed files' manifests hold at most, together. */
  readonly maxFileFragments: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  /** Every peer heard from within a ttl, and any expired since the last sweep. */
  readonly #peers = new Map<string, PeerRecord>();
  /** Fragment name -> its holders, kept in step with every heartbeat: locate is O(holders). */
  readonly #fragments = new Map<string, FragmentRecord>();
  /** "host:port" -> peer id, so a peer that restarted and registered again has one entry. */
  readonly #byAddress = new Map<string, string>();
  readonly #files = new Map<string, FileRecord>();
  /** The fragment names the files list: what {@link Registry.#unindex} stamps as released. */
  readonly #listed = new Map<string, ListedName>();
  /** Fragments of all files' manifests, together. */
  #fileFragments = 0;

  constructor(options: RegistryOptions = {}) {
    this.ttl = options.ttl ?? DEFAULT_TTL;
    if (!(this.ttl > 0 && this.ttl <= MAX_TTL)) {
      throw new RangeError(`The ttl must be more than 0 and at most ${MAX_TTL} seconds`);
    }
    this.maxFiles = positive(options.maxFiles ?? DEFAULT_MAX_FILES, "maxFiles");
    this.maxFileFragments = positive(
      options.maxFileFragments ?? DEFAULT_MAX_FILE_FRAGMENTS,
      "maxFileFragments",
    );
    this.#ttlMs = this.ttl * 1000;
    this.#now = options.now ?? Date.now;
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
    for (const peer of this.#peers.values()) {
      if (peer.expiresAt <= now) this.#remove(peer, now);
    }
    this.#sweepFiles(now);
  }

  /**
   * Refreshes live peer `id` when `body` repeats its last registration or heartbeat byte for
   * byte, which would parse to the state it has; if its host came from its remote address, that
   * must not have changed either (`remoteHost` is asked only then). False when it does not
   * refresh, and the caller parses the body and calls {@link Registry.upsert}.
   */
  refresh(id: string, body: string | undefined, remoteHost: () => string | undefined): boolean {
    const now = this.#now();
    const peer = this.#peers.get(id);
    if (body === undefined || peer === undefined || peer.expiresAt <= now) return false;
    if (peer.body !== body || (peer.from !== undefined && peer.from !== remoteHost())) return false;
    peer.expiresAt = now + this.#ttlMs; // only later: no cached locate answer goes stale
    return true;
  }

  /**
   * Registers or refreshes peer `id` with its full state, parsed from `sent`; true when it was
   * not known.
   */
  upsert(id: string, state: Required<PeerState>, sent: Sent = {}): boolean {
    const now = this.#now();
    const known = this.#peers.get(id);
    const created = known === undefined || known.expiresAt <= now; // expired is forgotten
    // The usual heartbeat repeats the peer's state: only the expiry moves, and only later, so
    // no cached locate answer goes stale. (Same host and port means same address, which
    // #byAddress already maps to this id.)
    if (
      !created && sameHolder(known.holder, state) && sameList(known.fragments, state.fragments)
    ) {
      known.expiresAt = now + this.#ttlMs;
      known.body = sent.body;
      known.from = sent.from;
      return false;
    }
    const address = `${state.host}:${state.port}`;
    const sameAddress = this.#byAddress.get(address);
    // Another id at the same address is this peer before a restart: keep one entry per peer.
    if (sameAddress !== undefined && sameAddress !== id) {
      this.#remove(this.#peers.get(sameAddress)!, now);
    }
    let peer = known;
    if (peer === undefined) {
      const { body, from } = sent;
      peer = { id, address, holder: toHolder(id, state), fragments: [], expiresAt: 0, body, from };
      this.#peers.set(id, peer);
    } else {
      if (peer.address !== address) this.#byAddress.delete(peer.address);
      if (!sameHolder(peer.holder, state)) peer.holder = toHolder(id, state);
      peer.address = address;
      // Its holder may have changed, or it was expired and left out of the answers: rebuild them.
      for (const name of peer.fragments) this.#fragments.get(name)!.json = undefined;
    }
    this.#index(peer, state.fragments, now);
    peer.expiresAt = now + this.#ttlMs;
    peer.body = sent.body;
    peer.from = sent.from;
    this.#byAddress.set(address, id);
    return created;
  }

  /** Removes peer `id`; false when it was not known (or had already expired). */
  remove(id: string): boolean {
    const peer = this.#peers.get(id);
    if (peer === undefined) return false;
    const now = this.#now();
    this.#remove(peer, now);
    return peer.expiresAt > now;
  }

  /** The live holders of fragment `name` (empty when none). */
  locate(name: string): Holder[] {
    return this.#live(this.#fragments.get(name), this.#now()).holders;
  }

  /** {@link Registry.locate} as JSON text, kept until the holders change; undefined when none. */
  locateJson(name: string): string | undefined {
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return undefined;
    const now = this.#now();
    if (fragment.json === undefined || fragment.jsonUntil <= now) {
      const { holders, until } = this.#live(fragment, now);
      fragment.json = holders.length === 0 ? undefined : JSON.stringify(holders);
      fragment.jsonUntil = until;
    }
    return fragment.json;
  }

  /** Every live peer with its fragments. */
  peers(): PeerInfo[] {
    const now = this.#now();
    return [...this.#peers.values()]
      .filter((peer) => peer.expiresAt > now)
      .map((peer) => ({ ...peer.holder, fragments: peer.fragments }));
  }

  /** Every fragment with at least one live holder, and its holders. */
  fragments(): FragmentHolders[] {
    return [...this.#fragments.keys()]
      .map((name) => ({ name, holders: this.locate(name) }))
      .filter((fragment) => fragment.holders.length > 0);
  }

  /**
   * Stores a manifest, unless another file has its name or the directory is full (see
   * {@link PublishOutcome}). The same manifest again gives the file another ttl to be backed.
   */
  publish(manifest: Manifest): PublishOutcome {
    const now = this.#now();
    let known = this.#files.get(manifest.file);
    if (known !== undefined && this.#expired(known, now)) {
      this.#drop(known);
      known = undefined;
    }
    if (known !== undefined) {
      // The same file split another way (other fragments) is not the same publication.
      const same = known.manifest.sha256 === manifest.sha256 &&
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
    this.#files.set(manifest.file, { manifest, backedAt: now });
    this.#fileFragments += manifest.fragments.length;
    for (const { name } of manifest.fragments) {
      const listed = this.#listed.get(name);
      if (listed === undefined) this.#listed.set(name, { files: 1, releasedAt: -Infinity });
      else listed.files++;
    }
    return "created";
  }

  /** Every listed file with its fragment count and whether all fragments are held. */
  files(): FileSummary[] {
    const now = this.#now();
    this.#sweepFiles(now);
    const held = (name: string) =>
      [...this.#fragments.get(name)?.holders ?? []].some((peer) => peer.expiresAt > now);
    return [...this.#files.values()].map(({ manifest }) => ({
      file: manifest.file,
      mime: manifest.mime,
      size: manifest.size,
      sha256: manifest.sha256,
      fragments: manifest.fragments.length,
      available: manifest.fragments.every((fragment) => held(fragment.name)),
    }));
  }

  /** The manifest of `file` with each fragment's live holders, or undefined when not listed. */
  file(file: string): FileDetail | undefined {
    const record = this.#files.get(file);
    if (record === undefined) return undefined;
    if (this.#expired(record, this.#now())) {
      this.#drop(record);
      return undefined;
    }
    const fragments = record.manifest.fragments.map((fragment) => {
      const holders = this.locate(fragment.name);
      return { ...fragment, holders, holderCount: holders.length };
    });
    return { ...record.manifest, fragments };
  }

  /**
   * True when no live peer has held any of `file`'s fragments for a ttl; otherwise moves its
   * `backedAt` up to the last moment one is known to have. O(its fragments) at worst, and O(1)
   * for a file known to be backed less than a ttl ago.
   */
  #expired(file: FileRecord, now: number): boolean {
    if (now - file.backedAt < this.#ttlMs) return false;
    let backedAt = file.backedAt;
    for (const { name } of file.manifest.fragments) {
      // A peer expired but not swept yet held it until its expiry; one swept, until releasedAt.
      for (const peer of this.#fragments.get(name)?.holders ?? []) {
        if (peer.expiresAt > now) {
          file.backedAt = now;
          return false;
        }
        backedAt = Math.max(backedAt, peer.expiresAt);
      }
      backedAt = Math.max(backedAt, this.#listed.get(name)!.releasedAt);
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
    this.#files.delete(file.manifest.file);
    this.#fileFragments -= file.manifest.fragments.length;
    for (const { name } of file.manifest.fragments) {
      const listed = this.#listed.get(name)!;
      if (--listed.files === 0) this.#listed.delete(name);
    }
  }

  /** Brings the fragment index in step with `peer`'s new list, touching only what changed. */
  #index(peer: PeerRecord, names: string[], now: number): void {
    if (sameList(peer.fragments, names)) return; // the usual heartbeat: nothing changed
    const next = new Set(names);
    for (const name of peer.fragments) {
      if (!next.has(name)) this.#unindex(name, peer, now);
    }
    for (const name of next) {
      let fragment = this.#fragments.get(name);
      if (fragment === undefined) {
        fragment = { holders: new Set(), json: undefined, jsonUntil: 0 };
        this.#fragments.set(name, fragment);
      }
      if (fragment.holders.has(peer)) continue;
      fragment.holders.add(peer);
      fragment.json = undefined;
    }
    peer.fragments = [...next];
  }

  /** Takes `peer` out of fragment `name`'s holders, noting until when it held it. */
  #unindex(name: string, peer: PeerRecord, now: number): void {
    const listed = this.#listed.get(name);
    if (listed !== undefined) {
      listed.releasedAt = Math.max(listed.releasedAt, Math.min(now, peer.expiresAt));
    }
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return;
    fragment.holders.delete(peer);
    fragment.json = undefined;
    if (fragment.holders.size === 0) this.#fragments.delete(name); // no empty sets left behind
  }

  /** The live holders of `fragment`, and when the first of them expires. */
  #live(fragment: FragmentRecord | undefined, now: number): { holders: Holder[]; until: number } {
    const holders: Holder[] = [];
    let until = Infinity;
    for (const peer of fragment?.holders ?? []) {
      if (peer.expiresAt <= now) continue;
      holders.push(peer.holder);
      until = Math.min(until, peer.expiresAt);
    }
    return { holders, until };
  }

  #remove(peer: PeerRecord, now: number): void {
    for (const name of peer.fragments) this.#unindex(name, peer, now);
    this.#peers.delete(peer.id);
    if (this.#byAddress.get(peer.address) === peer.id) this.#byAddress.delete(peer.address);
  }
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

function toHolder(id: string, state: Required<PeerState>): Holder {
  const { host, port, grpcPort, httpPort } = state;
  return { id, host, port, grpcPort, httpPort };
}

function sameHolder(holder: Holder, state: Required<PeerState>): boolean {
  return holder.host === state.host && holder.port === state.port &&
    holder.grpcPort === state.grpcPort && holder.httpPort === state.httpPort;
}
