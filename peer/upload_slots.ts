/**
 * Upload slots, shared fairly between the peers fetching from this one (BitTorrent's unchoke
 * slots, without the tit-for-tat): at most `slots` fragments are sent at once, each at a fair
 * share of `--max-upload`, and when a slot frees it goes to the waiting peer served least
 * recently. A peer with many connections gets no more turns than a peer with one, and a few
 * sends at full pace finish sooner than many at a trickle, so what they carry can be passed on.
 *
 * Not every request is worth the same, though: each says how many places back in the line it
 * stands (`place`), and counts as having waited {@link PLACE_STEP_MS} less for each. The TCP
 * server puts what a player waits for first, and a seeder puts what only it holds before what
 * others can give (tcp.ts). The handicap is bounded ({@link MAX_LEAD_MS}), so no request waits
 * forever behind others, however they are placed. A peer's own urgent requests (a player waits
 * for them) go ahead of its others.
 * @module
 */

interface Waiter {
  urgent: boolean;
  place: () => number;
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal?: AbortSignal;
  onAbort: () => void;
}

/** A peer's waiting requests, urgent ones first, and since when it has been next in turn. */
interface PeerQueue {
  turnSince: number;
  waiters: Waiter[];
}

/** How much longer a request waits for each place it stands back. */
export const PLACE_STEP_MS = 2_000;
/** The most a request's place makes it wait behind requests that came later. */
export const MAX_LEAD_MS = 20_000;

/** Where a request stands among the waiting ones. */
export interface SlotRequest {
  /**
   * How many places back it stands (0 is the front), asked afresh whenever a slot frees, as
   * what others hold changes meanwhile. @default 0
   */
  place?: () => number;
  /** A player waits for it: ahead of the same peer's other requests. @default false */
  urgent?: boolean;
}

/** Timings, for tests. */
export interface UploadSlotsOptions {
  /** @default PLACE_STEP_MS */
  placeStepMs?: number;
  /** @default MAX_LEAD_MS */
  maxLeadMs?: number;
}

/** A fair semaphore keyed by peer; `acquire` resolves with the function that releases. */
export class UploadSlots {
  readonly #slots: number;
  readonly #placeStepMs: number;
  readonly #maxLeadMs: number;
  #active = 0;
  // Waiting peers, in the order they began waiting for their turn.
  readonly #queues = new Map<string, PeerQueue>();

  constructor(slots: number, options: UploadSlotsOptions = {}) {
    if (!Number.isInteger(slots) || slots < 1) throw new RangeError(`Bad slot count ${slots}`);
    this.#slots = slots;
    this.#placeStepMs = options.placeStepMs ?? PLACE_STEP_MS;
    this.#maxLeadMs = options.maxLeadMs ?? MAX_LEAD_MS;
  }

  /** Sends in progress. */
  get active(): number {
    return this.#active;
  }

  /** Requests waiting for a slot. */
  get waiting(): number {
    let count = 0;
    for (const queue of this.#queues.values()) count += queue.waiters.length;
    return count;
  }

  /** Waits for a slot for `peer`; rejects when `signal` aborts first. */
  acquire(
    peer: string,
    signal?: AbortSignal,
    { place = () => 0, urgent = false }: SlotRequest = {},
  ): Promise<() => void> {
    signal?.throwIfAborted();
    if (this.#active < this.#slots && this.#queues.size === 0) {
      this.#active++;
      return Promise.resolve(this.#releaser());
    }
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        urgent,
        place,
        resolve: () => resolve(this.#releaser()),
        reject,
        signal,
        onAbort: () => {
          this.#remove(peer, waiter);
          reject(signal!.reason);
        },
      };
      signal?.addEventListener("abort", waiter.onAbort, { once: true });
      const queue = this.#queues.get(peer) ??
        { turnSince: performance.now(), waiters: [] };
      // Behind the peer's own urgent requests, ahead of its others when urgent.
      const at = urgent ? queue.waiters.findIndex((w) => !w.urgent) : -1;
      queue.waiters.splice(at === -1 ? queue.waiters.length : at, 0, waiter);
      this.#queues.set(peer, queue);
    });
  }

  #releaser(): () => void {
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#active--;
      this.#next();
    };
  }

  // Gives free slots to the peers whose turn comes first, each going to the back once served.
  #next(): void {
    while (this.#active < this.#slots) {
      const peer = this.#first();
      if (peer === undefined) return;
      const queue = this.#queues.get(peer)!;
      const waiter = queue.waiters.shift()!;
      this.#queues.delete(peer);
      if (queue.waiters.length > 0) {
        // Re-inserted: now last in turn.
        this.#queues.set(peer, { turnSince: performance.now(), waiters: queue.waiters });
      }
      waiter.signal?.removeEventListener("abort", waiter.onAbort);
      this.#active++;
      waiter.resolve();
    }
  }

  // The peer whose turn comes first: the longest in turn, each place back counting as having
  // waited placeStepMs less.
  #first(): string | undefined {
    let first: string | undefined;
    let best = Infinity;
    for (const [peer, { turnSince, waiters }] of this.#queues) {
      const at = turnSince + Math.min(waiters[0]!.place() * this.#placeStepMs, this.#maxLeadMs);
      if (at < best) [first, best] = [peer, at];
    }
    return first;
  }

  #remove(peer: string, waiter: Waiter): void {
    const queue = this.#queues.get(peer);
    if (!queue) return;
    const at = queue.waiters.indexOf(waiter);
    if (at !== -1) queue.waiters.splice(at, 1);
    if (queue.waiters.length === 0) this.#queues.delete(peer);
  }
}
