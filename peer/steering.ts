/**
 * Super-seeding for a pull protocol (after BitTorrent's BEP 16). A seeder's upload is what a crowd
 * waits on: every byte it spends on a fragment that another peer could give is a byte not spent on
 * one that only it can. So while its upload is busy, a request for a fragment that another peer
 * holds, or is being sent, is answered with a pointer to those peers
 * (`ERR ELSEWHERE <host:port> ...` over TCP) instead of the bytes. A peer still getting a fragment,
 * or waiting in line for it, passes it on as it arrives (store.ts, `Store.relay`), so a pointer
 * at it costs the requester no more than the hop. As in BEP 16, this ends once every fragment is
 * out: held or being sent elsewhere, not merely asked for, as a watching crowd asks for all of
 * them in its first second.
 *
 * It learns who holds what from the peers' HAVE announcements (the broker's `fragmentos`) and
 * from its own uploads: a fragment it is sending counts toward its receiver at once, so two
 * viewers asking for the same rare fragment get it once from the seeder and once from each other.
 * A requester is pointed elsewhere at most once per fragment within `onceMs`: if it comes back,
 * the others failed it, and it is served. It also tells the TCP server's upload slots which
 * requests come first: fragments a player asked for lately ({@link Steering.wanted}), then those
 * it pointed requesters away for ({@link Steering.awaited}), and at a seeder those nobody else
 * holds ({@link Steering.othersHold}).
 * @module
 */
import type { Store } from "./store.ts";

export interface SteeringOptions {
  /** How long a requester pointed elsewhere for a fragment is served the next time. @default 30000 */
  onceMs?: number;
  /** Most holders a pointer names. @default 4 */
  pointTo?: number;
}

/** How long a fragment a player asked for here counts as wanted soon by the crowd. */
const WANTED_MS = 10_000;
// Bounds on what hostile announcements can make it remember.
const MAX_HOLDERS_PER_FRAGMENT = 256;
const MAX_REDIRECTS_REMEMBERED = 10_000;

/** Decides when this peer points a requester at other holders instead of sending. */
export class Steering {
  readonly #store: Store;
  readonly #onceMs: number;
  readonly #pointTo: number;
  readonly #holders = new Map<string, Set<string>>(); // fragment -> peers that hold or get it
  // fragment -> peers that hold it or are being sent it (not only waiting in line for it)
  readonly #out = new Map<string, Set<string>>();
  readonly #redirected = new Map<string, number>(); // "<requester> <fragment>" -> when
  // fragment (held here) -> when a player last asked for it
  readonly #wanted = new Map<string, number>();
  // fragment (held here) -> when a requester was last pointed at the peers getting it
  readonly #awaited = new Map<string, number>();

  constructor(store: Store, options: SteeringOptions = {}) {
    this.#store = store;
    this.#onceMs = options.onceMs ?? 30_000;
    this.#pointTo = options.pointTo ?? 4;
  }

  /** `peer` (its `host:port`) holds `name`, or is being sent it. */
  have(name: string, peer: string): void {
    this.asked(name, peer);
    add(this.#out, name, peer);
  }

  /**
   * `peer` asked for `name` here and waits for an upload slot: others may be pointed at it, as it
   * passes the fragment on as it arrives, but the fragment is not out yet.
   */
  asked(name: string, peer: string): void {
    add(this.#holders, name, peer);
  }

  /** A send of `name` to `peer` failed: it does not hold it after all. */
  lost(name: string, peer: string): void {
    this.#holders.get(name)?.delete(peer);
    this.#out.get(name)?.delete(peer);
  }

  /** A player waits for `name` at some peer that asked for it here (`GET <name> URGENT`). */
  wantedNow(name: string): void {
    this.#wanted.set(name, Date.now());
  }

  /** Whether a player asked for `name` here within {@link WANTED_MS}. */
  wanted(name: string): boolean {
    return Date.now() - (this.#wanted.get(name) ?? -Infinity) < WANTED_MS;
  }

  /**
   * Whether a requester was pointed elsewhere for `name` within {@link WANTED_MS}: the peers it
   * was pointed at may still be waiting here for it, while it waits for them.
   */
  awaited(name: string): boolean {
    return Date.now() - (this.#awaited.get(name) ?? -Infinity) < WANTED_MS;
  }

  /** Whether a peer other than `requester` holds `name`, or is being sent it. */
  othersHold(name: string, requester: string | undefined): boolean {
    const holders = this.#holders.get(name);
    return holders !== undefined &&
      (holders.size > 1 || (holders.size === 1 && !holders.has(requester ?? "")));
  }

  /**
   * The peers to point `requester` at instead of sending it `name`, or undefined to send.
   * Points elsewhere only when `busy` (other uploads want this peer's upload), while some
   * fragment of the file is held here alone, and once per requester and fragment.
   */
  redirect(name: string, requester: string | undefined, busy: boolean): string[] | undefined {
    if (requester === undefined || !busy) return undefined;
    const others = [...this.#holders.get(name) ?? []].filter((peer) => peer !== requester);
    if (others.length === 0 || !this.#holdsUnique()) return undefined;
    const key = `${requester} ${name}`;
    const now = Date.now();
    if (now - (this.#redirected.get(key) ?? -Infinity) < this.#onceMs) return undefined;
    if (this.#redirected.size >= MAX_REDIRECTS_REMEMBERED) this.#forgetOld(now);
    this.#redirected.set(key, now);
    this.#awaited.set(name, now);
    return shuffle(others).slice(0, this.#pointTo);
  }

  // True while this peer seeds the whole file and some fragment of it is held, or being sent, by
  // no other peer known: a request waiting in line does not count, or a crowd that asks for every
  // fragment at once would end the super-seeding before a byte went out.
  #holdsUnique(): boolean {
    if (!this.#store.holdsAll()) return false;
    const fragments = this.#store.manifest!.fragments;
    return fragments.some((f) => (this.#out.get(f.name)?.size ?? 0) === 0);
  }

  #forgetOld(now: number): void {
    for (const [key, when] of this.#redirected) {
      if (now - when >= this.#onceMs) this.#redirected.delete(key);
    }
    // Still full: a flood of requesters; forget the oldest half rather than grow.
    if (this.#redirected.size >= MAX_REDIRECTS_REMEMBERED) {
      const keys = [...this.#redirected.keys()].slice(0, MAX_REDIRECTS_REMEMBERED / 2);
      for (const key of keys) this.#redirected.delete(key);
    }
  }
}

/** Adds `peer` to the peers of fragment `name`, up to a bound hostile announcements cannot pass. */
function add(peers: Map<string, Set<string>>, name: string, peer: string): void {
  const set = peers.get(name) ?? new Set();
  if (set.size >= MAX_HOLDERS_PER_FRAGMENT) return;
  peers.set(name, set.add(peer));
}

/** A new array with `items` in random order (Fisher-Yates). */
export function shuffle<T>(items: readonly T[]): T[] {
  const out = [...items];
  for (let i = out.length - 1; i > 0; i--) {
    const j = Math.floor(Math.random() * (i + 1));
    [out[i], out[j]] = [out[j]!, out[i]!];
  }
  return out;
}
