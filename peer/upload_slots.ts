/**
 * Upload slots, shared fairly between the peers fetching from this one (BitTorrent's unchoke
 * slots, without the tit-for-tat): at most `slots` fragments are sent at once, each at a fair
 * share of `--max-upload`, and when a slot frees it goes to the waiting peer served least
 * recently. A peer with many connections gets no more turns than a peer with one, and a few
 * sends at full pace finish sooner than many at a trickle, so what they carry can be passed on.
 * @module
 */

interface Waiter {
  resolve: () => void;
  reject: (reason: unknown) => void;
  signal?: AbortSignal;
  onAbort: () => void;
}

/** A fair semaphore keyed by peer; `acquire` resolves with the function that releases. */
export class UploadSlots {
  readonly #slots: number;
  #active = 0;
  // Waiting peers in the order they get a slot: a peer served goes to the back.
  readonly #queues = new Map<string, Waiter[]>();

  constructor(slots: number) {
    if (!Number.isInteger(slots) || slots < 1) throw new RangeError(`Bad slot count ${slots}`);
    this.#slots = slots;
  }

  /** Sends in progress. */
  get active(): number {
    return this.#active;
  }

  /** Requests waiting for a slot. */
  get waiting(): number {
    let count = 0;
    for (const queue of this.#queues.values()) count += queue.length;
    return count;
  }

  /** Waits for a slot for `peer`; rejects when `signal` aborts first. */
  acquire(peer: string, signal?: AbortSignal): Promise<() => void> {
    signal?.throwIfAborted();
    if (this.#active < this.#slots && this.#queues.size === 0) {
      this.#active++;
      return Promise.resolve(this.#releaser());
    }
    return new Promise((resolve, reject) => {
      const waiter: Waiter = {
        resolve: () => resolve(this.#releaser()),
        reject,
        signal,
        onAbort: () => {
          this.#remove(peer, waiter);
          reject(signal!.reason);
        },
      };
      signal?.addEventListener("abort", waiter.onAbort, { once: true });
      const queue = this.#queues.get(peer) ?? [];
      queue.push(waiter);
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

  // Gives free slots to the peers at the front, each going to the back once served.
  #next(): void {
    while (this.#active < this.#slots) {
      const first = this.#queues.entries().next();
      if (first.done) return;
      const [peer, queue] = first.value;
      const waiter = queue.shift()!;
      this.#queues.delete(peer);
      if (queue.length > 0) this.#queues.set(peer, queue); // re-inserted: now last in turn
      waiter.signal?.removeEventListener("abort", waiter.onAbort);
      this.#active++;
      waiter.resolve();
    }
  }

  #remove(peer: string, waiter: Waiter): void {
    const queue = this.#queues.get(peer);
    if (!queue) return;
    const at = queue.indexOf(waiter);
    if (at !== -1) queue.splice(at, 1);
    if (queue.length === 0) this.#queues.delete(peer);
  }
}
