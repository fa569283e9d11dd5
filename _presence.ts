/**
 * A peer's presence in the directory: it registers, heartbeats with its full state every ttl/3,
 * republishes its manifest when the directory had forgotten it (after a restart), and leaves on
 * close. When the directory is unreachable it says so once and keeps trying in the background.
 * @module
 */
import { type DirectoryClient, DirectoryError, type PeerState } from "./directory.ts";
import type { Manifest } from "./split.ts";

export interface PresenceOptions {
  /** The peer's state as the directory should see it now. */
  state: () => PeerState;
  /** The manifest to publish, when the peer has one. */
  manifest: () => Manifest | undefined;
  log: (line: string) => void;
  /** Retry delay while the directory is unreachable. @default 1000 */
  retryMs?: number;
}

/** Keeps a peer registered in a directory until closed. */
export class Presence implements AsyncDisposable {
  readonly client: DirectoryClient;
  readonly #options: PresenceOptions;
  #id: string | undefined;
  #ttl = 30;
  #reachable: boolean | undefined;
  #published: string | undefined;
  // Whether the peer held fragments when it last published: the directory drops a file no live
  // peer has backed for a ttl, so one published from an empty store is published again later.
  #publishedBacked = false;
  #closed = false;
  #wake: (() => void) | undefined;
  readonly #loop: Promise<void>;

  /** Registers through `client` at once, then keeps at it until closed. */
  constructor(client: DirectoryClient, options: PresenceOptions) {
    this.client = client;
    this.#options = options;
    this.#loop = this.#run();
  }

  /** The id the directory gave this peer, once registered. */
  get id(): string | undefined {
    return this.#id;
  }

  /** True once the directory has answered; false while it is unreachable. */
  get reachable(): boolean {
    return this.#reachable === true;
  }

  /** Sends a heartbeat now (the peer's fragments changed) instead of at the next tick. */
  poke(): void {
    this.#wake?.();
  }

  async #run(): Promise<void> {
    while (!this.#closed) {
      let delay = this.#options.retryMs ?? 1_000;
      try {
        await this.#beat();
        if (this.#reachable === false) {
          this.#options.log(`[DIRECTORY] Connected to ${this.client.url}`);
        }
        this.#reachable = true;
        delay = (this.#ttl * 1000) / 3;
      } catch (error) {
        if (!(error instanceof DirectoryError)) throw error;
        if (error.status === 404) this.#id = undefined; // forgotten and not recreated: register
        if (this.#reachable !== false) {
          const retrying = error.status === 0
            ? "working with neighbours only, retrying in the background"
            : "retrying";
          this.#options.log(`[DIRECTORY] ${error.message}; ${retrying}`);
          this.#reachable = false;
        }
      }
      if (this.#closed) break;
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = undefined;
    }
  }

  async #beat(): Promise<void> {
    const state = this.#options.state();
    if (this.#id === undefined) {
      const registration = await this.client.register(state);
      this.#id = registration.id;
      this.#ttl = registration.ttl;
      this.#published = undefined;
    } else {
      const heartbeat = await this.client.heartbeat(this.#id, state);
      this.#ttl = heartbeat.ttl;
      if (heartbeat.recreated) this.#published = undefined; // a new directory knows no files
    }
    const manifest = this.#options.manifest();
    const backed = (state.fragments?.length ?? 0) > 0;
    if (manifest && (this.#published !== manifest.sha256 || (backed && !this.#publishedBacked))) {
      await this.client.publishFile(manifest);
      this.#published = manifest.sha256;
      this.#publishedBacked = backed;
    }
  }

  /** Stops heartbeating and leaves the directory (best effort: it may be gone). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    await this.#loop.catch(() => {});
    if (this.#id !== undefined) await this.client.leave(this.#id).catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
