/**
 * The directory's typed client, as peers use it: register, heartbeat, leave, locate, publish
 * and read files, each call with a timeout and one {@link DirectoryError} for every failure.
 * Given several directories (replicas on one Redis), it fails over to the next when one is
 * unreachable or answers 503, and goes back to the first a while later.
 * @module
 */
// Types only from the schemas: a peer that loads this client loads no zod (see protocol.ts).
import type {
  FileDetail,
  FileSummary,
  FragmentHolders,
  Health,
  Heartbeat,
  Holder,
  PeerInfo,
  PeerKey,
  PeerState,
  Registration,
} from "./schemas.ts";
import { MAX_PAGE_LIMIT } from "./limits.ts";
import { errorCode } from "./protocol.ts";
import type { Manifest } from "../split.ts";

const DEFAULT_CLIENT_TIMEOUT_MS = 5_000;
/** How long a client that failed over keeps to the directory it found, then tries the first. */
export const DEFAULT_FAILBACK_MS = 30_000;
/**
 * The largest answer a directory call reads: a directory's biggest (a page of 10,000 names or
 * holders, a 5,000-fragment manifest with 50 holders each) stays far below it, and a hostile or
 * broken server answering an endless body is cut off here instead of filling memory.
 */
export const DEFAULT_MAX_RESPONSE_BYTES = 8 * 1024 * 1024;

/** A failed directory call: `status` is the HTTP status, 0 when there was no answer. */
export class DirectoryError extends Error {
  override name = "DirectoryError";
  /** What the directory said (its error's message), or why there was no usable answer. */
  readonly detail: string;
  constructor(
    message: string,
    /** The HTTP status, or 0 when the directory was unreachable or too slow. */
    readonly status: number,
    /**
     * The error code from the body (e.g. `NOT_FOUND`), `UNREACHABLE` / `TIMEOUT` without an
     * answer, or `BAD_RESPONSE` for a success that is not JSON (not a directory, then) or an
     * answer over the size limit.
     */
    readonly code: string,
    options?: ErrorOptions & { detail?: string },
  ) {
    super(message, options);
    this.detail = options?.detail ?? message;
  }
}

/** Options of {@link DirectoryClient.locate} and {@link DirectoryClient.listFragments}. */
export interface LocateOptions {
  /**
   * Only holders whose fragments belong to this file (as their state says): fragment names are
   * not unique across files. Its id; or 6 or more of its id's first hex digits, or its name, when
   * only one listed file has them (else status 409, code AMBIGUOUS_FILE).
   */
  file?: string;
}

/** Options of {@link DirectoryClient.register}. */
export interface RegisterOptions {
  /**
   * The secret to register with, instead of one the directory makes up: a peer that sends the
   * same one again (its registration's answer was lost, or it restarted) replaces its own entry
   * rather than being refused as another owner. 32 to 128 letters, digits, `-` or `_`.
   */
  secret?: string;
}

/** Options of {@link DirectoryClient}. */
export interface DirectoryClientOptions {
  /** Give up on a call after this long. @default 5000 */
  timeoutMs?: number;
  /** Give up on an answer whose body is longer than this many bytes. @default 8 MiB */
  maxResponseBytes?: number;
  /**
   * Having failed over from the first directory, try it again after this long. @default 30000
   */
  failbackMs?: number;
}

/** A directory's URL as calls are made on it: no spaces around it, no trailing slash. */
const baseUrl = (url: string) => url.trim().replace(/\/+$/, "");

/**
 * The directories of `text`: one URL, or several separated by commas (`--directory URL1,URL2`,
 * or `DIRECTORY_URL`), each http:// or https://, without trailing slashes. A RangeError naming
 * the first that is not one.
 */
export function parseDirectoryUrls(text: string): string[] {
  const urls = text.split(",").map(baseUrl);
  for (const url of urls) {
    if (!/^https?:$/.test(URL.parse(url)?.protocol ?? "")) {
      throw new RangeError(`"${url}" is not an http:// URL, e.g. http://localhost:5000`);
    }
  }
  return urls;
}

/**
 * A typed client of the directory's REST API. Every call throws a {@link DirectoryError} on a
 * non-2xx answer, on a timeout, or when the directory cannot be reached.
 * @example
 * ```ts
 * const directory = new DirectoryClient("http://localhost:5000");
 * const me = await directory.register({ port: 6001, grpcPort: 50051, httpPort: 8001, fragments: [] });
 * await directory.heartbeat(me, { port: 6001, grpcPort: 50051, httpPort: 8001, fragments: [] });
 * const holders = await directory.locate("fragment_5.bin", { file: "sample.webm" });
 * await directory.leave(me);
 * ```
 */
export class DirectoryClient {
  /** Every directory it may call, in order of preference, without trailing slashes. */
  readonly urls: readonly string[];
  readonly #timeoutMs: number;
  readonly #maxResponseBytes: number;
  readonly #failbackMs: number;
  /** The directory calls go to now: an index in {@link urls}. */
  #current = 0;
  /** When to try the first directory again, having failed over from it. */
  #failbackAt = Infinity;

  /**
   * @param url a directory's base URL; several (replicas), as a list or separated by commas,
   * are called in turn while one fails.
   */
  constructor(url: string | URL | (string | URL)[], options: DirectoryClientOptions = {}) {
    const list = Array.isArray(url) ? url.map(String) : String(url).split(",");
    this.urls = list.map(baseUrl);
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_CLIENT_TIMEOUT_MS;
    this.#maxResponseBytes = options.maxResponseBytes ?? DEFAULT_MAX_RESPONSE_BYTES;
    this.#failbackMs = options.failbackMs ?? DEFAULT_FAILBACK_MS;
  }

  /** The base URL of the directory calls go to now. */
  get url(): string {
    return this.urls[this.#current]!;
  }

  /** Liveness, with the sizes of the directory's state. */
  health(): Promise<Health> {
    return this.#call("GET", "/health");
  }

  /**
   * Registers this peer; heartbeat every `ttl / 3` seconds with the returned id and secret.
   * Its `file` is the file its fragments belong to, when it knows (its store's manifest's
   * `file`). Status 409 when a live peer of another owner is listed at its address.
   */
  register(state: PeerState, options: RegisterOptions = {}): Promise<Registration> {
    return this.#call("POST", "/peers", state, options.secret);
  }

  /**
   * Refreshes this peer with its full state; re-creates it if the directory forgot it (after a
   * restart). Status 403 when the id is another owner's now.
   */
  heartbeat(peer: PeerKey, state: PeerState): Promise<Heartbeat> {
    return this.#call("PUT", `/peers/${encodeURIComponent(peer.id)}`, state, peer.secret);
  }

  /** Leaves the directory (status 404 when it did not know the peer, 403 when another owns it). */
  async leave(peer: PeerKey): Promise<void> {
    await this.#call("DELETE", `/peers/${encodeURIComponent(peer.id)}`, undefined, peer.secret);
  }

  /**
   * The live holders of a fragment (of one file, with `file`); an empty list when no live peer
   * holds it.
   */
  async locate(name: string, options: LocateOptions = {}): Promise<Holder[]> {
    try {
      const found = await this.#call<FragmentHolders>(
        "GET",
        `/fragments/${encodeURIComponent(name)}${fileQuery(options)}`,
      );
      return found.holders;
    } catch (error) {
      if (error instanceof DirectoryError && error.status === 404) return [];
      throw error;
    }
  }

  /** Every live peer with its fragments, page after page. */
  listPeers(): Promise<PeerInfo[]> {
    return this.#all<{ peers: PeerInfo[]; next?: string }, PeerInfo>(
      "/peers?",
      (page) => page.peers,
    );
  }

  /** Every fragment with its live holders (of one file, with `file`), page after page. */
  listFragments(options: LocateOptions = {}): Promise<FragmentHolders[]> {
    const query = fileQuery(options);
    return this.#all<{ fragments: FragmentHolders[]; next?: string }, FragmentHolders>(
      `/fragments${query === "" ? "?" : `${query}&`}`,
      (page) => page.fragments,
    );
  }

  /** The entries of every page of a list, from `path` (which ends in `?` or `&`) on. */
  async #all<P extends { next?: string }, T>(
    path: string,
    entries: (page: P) => T[],
  ): Promise<T[]> {
    const all: T[] = [];
    let cursor: string | undefined;
    do {
      const at = cursor === undefined ? "" : `&cursor=${encodeURIComponent(cursor)}`;
      const page = await this.#call<P>("GET", `${path}limit=${MAX_PAGE_LIMIT}${at}`);
      all.push(...entries(page));
      cursor = page.next;
    } while (cursor !== undefined);
    return all;
  }

  /**
   * Publishes a file's manifest (status 409 when its id is published split another way or under
   * another name).
   */
  async publishFile(manifest: Manifest): Promise<void> {
    await this.#call("POST", "/files", manifest);
  }

  /** Every published file. */
  async listFiles(): Promise<FileSummary[]> {
    return (await this.#call<{ files: FileSummary[] }>("GET", "/files")).files;
  }

  /**
   * A file's manifest with each fragment's live holders of that file (status 404 when unknown).
   */
  getFile(file: string): Promise<FileDetail> {
    return this.#call("GET", `/files/${encodeURIComponent(file)}`);
  }

  /**
   * One call, to the directory of the moment, then to the next while one is unreachable or
   * answers 503 (too slow counts too, but for a registration, which may have gone through).
   * The directory that answers is the one of the next calls; the first gets another try once
   * `failbackMs` has passed since the client left it.
   */
  async #call<T>(method: string, path: string, body?: unknown, secret?: string): Promise<T> {
    if (this.#current !== 0 && Date.now() >= this.#failbackAt) this.#current = 0;
    const start = this.#current;
    for (let tried = 0;; tried++) {
      const index = (start + tried) % this.urls.length;
      try {
        const answer = await this.#callOne<T>(this.urls[index]!, method, path, body, secret);
        if (index !== this.#current) {
          if (this.#current === 0) this.#failbackAt = Date.now() + this.#failbackMs;
          this.#current = index;
        }
        return answer;
      } catch (error) {
        const next = tried + 1 < this.urls.length && error instanceof DirectoryError &&
          (error.code === "UNREACHABLE" || error.status === 503 ||
            (error.code === "TIMEOUT" && !(method === "POST" && path === "/peers")));
        if (!next) throw error;
      }
    }
  }

  async #callOne<T>(
    base: string,
    method: string,
    path: string,
    body?: unknown,
    secret?: string,
  ): Promise<T> {
    const controller = new AbortController();
    // A timer of our own, not AbortSignal.timeout(), so it is cleared the moment we are done.
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
    const headers: Record<string, string> = {};
    if (body !== undefined) headers["content-type"] = "application/json";
    if (secret !== undefined) headers.authorization = `Bearer ${secret}`;
    let response: Response;
    let text: string;
    let status = 0;
    try {
      response = await fetch(base + path, {
        method,
        headers,
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: controller.signal,
      });
      status = response.status;
      text = await readCapped(response, this.#maxResponseBytes);
    } catch (error) {
      if (error instanceof TooLarge) {
        const max = this.#maxResponseBytes;
        const limit = max % 1024 ** 2 === 0 ? `${max / 1024 ** 2} MiB` : `${max} bytes`;
        const message = `${method} ${path} answered more than ${limit}: ` +
          `is "${base}" a directory?`;
        throw new DirectoryError(message, status, "BAD_RESPONSE");
      }
      if (controller.signal.aborted) {
        const message = `Directory at "${base}" did not answer within ${this.#timeoutMs} ms`;
        throw new DirectoryError(message, 0, "TIMEOUT", { cause: error });
      }
      const message = `Cannot reach directory at "${base}": ${fetchFailure(error)}`;
      throw new DirectoryError(message, 0, "UNREACHABLE", { cause: error });
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      const { code, message } = parseError(text, response.status, base);
      throw new DirectoryError(`${method} ${path} failed: ${message}`, response.status, code, {
        detail: message,
      });
    }
    if (text === "") return undefined as T;
    try {
      return JSON.parse(text) as T;
    } catch (error) {
      // Some other web server at that address, most likely.
      const message = `${method} ${path} did not answer JSON: is "${base}" a directory?`;
      throw new DirectoryError(message, response.status, "BAD_RESPONSE", { cause: error });
    }
  }
}

class TooLarge extends Error {}

/**
 * The body as text, read as a stream and dropped as soon as it passes `max` bytes (a declared
 * `content-length` over it is refused before a byte is read).
 */
async function readCapped(response: Response, max: number): Promise<string> {
  const declared = Number(response.headers.get("content-length") ?? NaN);
  if (declared > max) {
    await response.body?.cancel().catch(() => {});
    throw new TooLarge();
  }
  if (!response.body) return "";
  const chunks: Uint8Array[] = [];
  let size = 0;
  const reader = response.body.getReader();
  try {
    for (let read; !(read = await reader.read()).done;) {
      size += read.value.length;
      if (size > max) throw new TooLarge();
      chunks.push(read.value);
    }
  } catch (error) {
    await reader.cancel().catch(() => {});
    throw error;
  } finally {
    reader.releaseLock();
  }
  const bytes = new Uint8Array(size);
  let at = 0;
  for (const chunk of chunks) bytes.set(chunk, (at += chunk.length) - chunk.length);
  return new TextDecoder().decode(bytes);
}

/** Why fetch failed, short: Deno hides the reason in `cause`, in a long sentence. */
function fetchFailure(error: unknown): string {
  const inner = error instanceof Error && error.cause instanceof Error ? error.cause : error;
  const text = inner instanceof Error ? inner.message : String(inner);
  if (/connection refused/i.test(text)) return "connection refused";
  // Something listens there, but does not speak HTTP (a broker's or a peer's TCP port, say).
  if (/invalid HTTP|SendRequest|message completed|unexpected EOF|ConnectionReset/i.test(text)) {
    return "it answered, but not in HTTP: is it a directory? (the directory is an http:// URL, " +
      "port 5000 by default)";
  }
  return text;
}

/**
 * The code and message of an error body; when the body is not one, the status and a hint: a
 * directory always answers its errors in that shape.
 */
function parseError(text: string, status: number, url: string): { code: string; message: string } {
  try {
    const { error } = JSON.parse(text);
    if (typeof error?.code === "string" && typeof error?.message === "string") {
      // A directory has every route and method this client calls: a server that lacks one (a
      // peer's player, say, which answers in the same shape) is something else.
      if (status !== 405 && status !== 501) return error;
      return { code: error.code, message: `${error.message}: is "${url}" a directory?` };
    }
  } catch {
    // not our error shape: another web server at that address, or a proxy in between
  }
  return { code: errorCode(status), message: `HTTP ${status}: is "${url}" a directory?` };
}

/** `?file=<file>`, or nothing. */
function fileQuery({ file }: LocateOptions): string {
  return file === undefined ? "" : `?file=${encodeURIComponent(file)}`;
}
