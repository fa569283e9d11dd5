/**
 * "Something changed": a promise for the next change, renewed each time one happens. Waiters
 * await {@link Wakeup.next} (and look again at what they wait for); the writer calls
 * {@link Wakeup.fire}.
 * @module
 */

/** A promise for the next change, renewed each time it fires. */
export class Wakeup {
  #next = Promise.withResolvers<void>();

  /** Resolves at the next {@link fire}. */
  get next(): Promise<void> {
    return this.#next.promise;
  }

  /** Wakes everyone waiting for the next change. */
  fire(): void {
    this.#next.resolve();
    this.#next = Promise.withResolvers();
  }
}
