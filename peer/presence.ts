/**
 * A peer's presence in the directory: it registers, heartbeats with its full state every ttl/3
 * (saying which file its fragments belong to), publishes its manifest and again when the
 * directory had forgotten it (after a restart), and leaves on close. Every call carries the
 * peer's secret, which it chooses once: a restarted directory adopts the peer's id with it, and
 * a registration whose answer was lost is not refused as another owner's when tried again.
 * When the directory is unreachable it says so once and keeps trying in the background; when it
 * refuses the manifest it says so once, keeps heartbeating, and tries the manifest again from
 * time to time.
 * @module
 */
import { type DirectoryClient, DirectoryError } from "../directory/client.ts";
import { newSecret } from "../directory/protocol.ts";
import type { PeerKey, PeerState } from "../directory/schemas.ts";
import type { Manifest } from "../split.ts";
import { escapeControl } from "../common/cli.ts";

export interface PresenceOptions {
  /** The peer's state as the directory should see it now. */
  state: () => PeerState;
  /**
   * The manifest to publish, when the peer has one. Its `file` is what the state says the
   * fragments belong to, unless the state names one itself.
   */
  manifest: () => Manifest | undefined;
  /** Diagnostics, one line each; what the directory said in them is escaped (see escapeControl). */
  log: (line: string) => void;
  /**
   * Retry delay while the directory is unreachable; the first of the delays, doubling up to
   * ttl/3, while it answers with a refusal (or something that is not a directory). @default 1000
   */
  retryMs?: number;
}

/**
 * The ttl a directory answers is taken between these bounds (seconds), and as the default when it
 * is missing or not a number: the directory's own --ttl range (0 becomes 1). A ttl of 0 (a heartbeat loop with
 * no pause) or of years (a peer that never heartbeats) would come from a broken or hostile server.
 */
export const MIN_TTL = 1;
export const MAX_TTL = 86_400;
export const DEFAULT_TTL = 30;

/** `ttl` as the directory answered it, made safe to heartbeat by: see {@link MIN_TTL}. */
export function clampTtl(ttl: unknown): number {
  if (typeof ttl !== "number" || Number.isNaN(ttl)) return DEFAULT_TTL;
  return Math.min(MAX_TTL, Math.max(MIN_TTL, ttl));
}

/** The longest wait between two tries of a publication the directory refused. */
const MAX_PUBLISH_RETRY_MS = 10 * 60_000;

/** A manifest the directory refused to list, and when to try it again. */
interface Refusal {
  sha256: string;
  status: number;
  delayMs: number;
  retryAt: number;
}

/** Keeps a peer registered in a directory until closed. */
export class Presence implements AsyncDisposable {
  readonly client: DirectoryClient;
  readonly #options: PresenceOptions;
  /** The secret this peer registers with, for as long as the process lives. */
  readonly #secret = newSecret();
  /** Its id and secret, as the directory's registration answered them. */
  #key: PeerKey | undefined;
  /** The host the directory listed this peer at, when it was not the one it advertised. */
  #saidHost: string | undefined;
  #ttl = DEFAULT_TTL;
  #reachable: boolean | undefined;
  #published: string | undefined;
  // Whether the peer held fragments when it last published: the directory drops a file no live
  // peer has backed for a ttl, so one published from an empty store is published again later.
  #publishedBacked = false;
  #refusal: Refusal | undefined;
  /** Tries in a row that the directory answered with a refusal, or that failed unexpectedly. */
  #failures = 0;
  #saidUnexpected = false;
  /** Set by poke(): the state changed since the last heartbeat began. */
  #dirty = false;
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
    return this.#key?.id;
  }

  /** True once the directory has answered; false while it is unreachable. */
  get reachable(): boolean {
    return this.#reachable === true;
  }

  /**
   * Sends a heartbeat now (the peer's fragments changed) instead of at the next tick; during
   * one in flight, right after it. While the directory refuses the peer, at the next try.
   */
  poke(): void {
    this.#dirty = true;
    if (this.#failures === 0) this.#wake?.();
  }

  async #run(): Promise<void> {
    while (!this.#closed) {
      this.#dirty = false;
      const { ok, delay } = await this.#try();
      if (this.#closed) break;
      if (ok && this.#dirty) continue; // poked while the heartbeat was in flight
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

  /** One heartbeat (or registration) and publication; never throws: the loop must go on. */
  async #try(): Promise<{ ok: boolean; delay: number }> {
    const retryMs = this.#options.retryMs ?? 1_000;
    try {
      await this.#beat();
      if (this.#reachable === false) {
        this.#options.log(`[DIRECTORY] Connected to ${this.client.url}`);
      }
      this.#reachable = true;
      this.#failures = 0;
      this.#saidUnexpected = false;
      return { ok: true, delay: (this.#ttl * 1000) / 3 };
    } catch (error) {
      if (error instanceof DirectoryError) {
        if (this.#reachable !== false) {
          const retrying = error.status === 0
            ? "working with neighbours only, retrying in the background"
            : "retrying";
          this.#options.log(`[DIRECTORY] ${escapeControl(error.message)}; ${retrying}`);
          this.#reachable = false;
        }
        // Unreachable: try again soon, it costs a refused connection. An answer that refuses
        // (or is not a directory's) will not change at once: back off.
        if (error.status === 0) {
          this.#failures = 0;
          return { ok: false, delay: retryMs };
        }
      } else if (!this.#saidUnexpected) {
        // A bug, not the directory: say so (once), and keep the peer in the directory anyway.
        const what = error instanceof Error ? error.stack ?? String(error) : String(error);
        this.#options.log(`[DIRECTORY] Unexpected error: ${what}; retrying`);
        this.#saidUnexpected = true;
      }
      this.#failures++;
      const most = Math.max(retryMs, (this.#ttl * 1000) / 3);
      return { ok: false, delay: jitter(Math.min(most, retryMs * 2 ** (this.#failures - 1))) };
    }
  }

  async #beat(): Promise<void> {
    const manifest = this.#options.manifest();
    const given = this.#options.state();
    // The file the fragments belong to, by its id (split files all name theirs
    // fragment_<i>.bin), unless the directory lists that id split another way: these fragments
    // are not its.
    const claim = () =>
      given.fileId === undefined && manifest && !this.#conflicts(manifest)
        ? { ...given, fileId: manifest.sha256, file: manifest.file }
        : given;
    const state = claim();
    if (this.#key !== undefined) {
      try {
        const heartbeat = await this.client.heartbeat(this.#key, state);
        this.#ttl = clampTtl(heartbeat?.ttl);
        if (heartbeat?.recreated) { // a new directory knows no files, and may have room
          this.#published = undefined;
          this.#refusal = undefined;
        }
      } catch (error) {
        // The directory forgot this peer and another owner took its id since: start afresh.
        if (!(error instanceof DirectoryError) || error.status !== 403) throw error;
        this.#options.log(`[DIRECTORY] ${escapeControl(error.detail)}; registering again`);
        this.#key = undefined;
      }
    }
    if (this.#key === undefined) {
      const registration = await this.client.register(state, { secret: this.#secret });
      this.#key = { id: registration.id, secret: registration.secret };
      this.#ttl = clampTtl(registration.ttl);
      this.#published = undefined;
      if (state.host !== undefined && registration.host !== state.host) {
        this.#sayListedAt(registration.host, state.host);
      }
    }
    const backed = (state.fragments?.length ?? 0) > 0;
    if (manifest && (this.#published !== manifest.sha256 || (backed && !this.#publishedBacked))) {
      await this.#publish(manifest, backed);
      // Refused as that id split another way just now: take back the claim at once.
      if (state.fileId !== undefined && this.#conflicts(manifest)) {
        await this.client.heartbeat(this.#key!, claim());
      }
    }
  }

  /** Says (once per host) that the directory lists this peer elsewhere than it advertised. */
  #sayListedAt(host: string, advertised: string): void {
    if (this.#saidHost === host) return;
    this.#saidHost = host;
    const listed = escapeControl(String(host)); // the directory's word
    this.#options.log(
      `[DIRECTORY] Listed at "${listed}", not at the advertised "${advertised}": the directory ` +
        "takes the address a peer registers from, unless started with --trust-advertise",
    );
  }

  /** Whether the directory refused `manifest` because it lists its id split another way. */
  #conflicts(manifest: Manifest): boolean {
    return this.#refusal?.status === 409 && this.#refusal.sha256 === manifest.sha256;
  }

  /**
   * Publishes `manifest`, unless the directory refused it lately. A refusal is said once and
   * tried again after one ttl, then twice as long each time: a full directory makes room
   * within a ttl of a file losing its last holder, and another split of the same file goes that
   * way.
   */
  async #publish(manifest: Manifest, backed: boolean): Promise<void> {
    const now = Date.now();
    const refused = this.#refusal?.sha256 === manifest.sha256 ? this.#refusal : undefined;
    if (refused && now < refused.retryAt) return;
    try {
      await this.client.publishFile(manifest);
    } catch (error) {
      // No answer: the directory is down, and the heartbeat's retry covers it.
      if (!(error instanceof DirectoryError) || error.status === 0) throw error;
      const delayMs = refused
        ? Math.min(refused.delayMs * 2, MAX_PUBLISH_RETRY_MS)
        : Math.min(this.#ttl * 1000, MAX_PUBLISH_RETRY_MS);
      if (refused?.status !== error.status) {
        this.#options.log(
          `[DIRECTORY] Cannot publish "${manifest.file}": ${refusalMeaning(error)}; ` +
            "heartbeats go on, and it is tried again from time to time",
        );
      }
      this.#refusal = {
        sha256: manifest.sha256,
        status: error.status,
        delayMs,
        retryAt: now + jitter(delayMs),
      };
      return;
    }
    if (refused) this.#options.log(`[DIRECTORY] Published "${manifest.file}"`);
    this.#refusal = undefined;
    this.#published = manifest.sha256;
    this.#publishedBacked = backed;
  }

  /** Stops heartbeating and leaves the directory (best effort: it may be gone). */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.#wake?.();
    await this.#loop.catch(() => {});
    if (this.#key !== undefined) await this.client.leave(this.#key).catch(() => {});
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** What a refused publication means for the peer, in words. */
function refusalMeaning(error: DirectoryError): string {
  if (error.status === 409) {
    return "the same file (its id, the whole-file SHA-256) is published split another way";
  }
  if (error.status === 429) return "the directory lists as many files as it may";
  if (error.status >= 500) return `the directory failed: ${escapeControl(error.detail)}`;
  return `the directory refused it: ${escapeControl(error.detail)}`;
}

/** `ms` give or take a fifth, so that peers refused together do not all come back together. */
function jitter(ms: number): number {
  return ms * (0.8 + 0.4 * Math.random());
}
