/**
 * The `p2p.FileTransfer` client of peer_grpc.ts: one channel per peer, made again when a peer
 * restarted, and Download, Upload, ListFiles, Locate and Echo as promises and async iterables.
 * @module
 */
import "./grpc_env_check.ts"; // before grpc-js, which reads the environment as it loads
import * as grpc from "@grpc/grpc-js";
import type { FragmentInfo } from "./store.ts";
import {
  type Chunk,
  CHUNK_SIZE,
  type Download,
  type FileList,
  fileTransfer,
  GrpcError,
  type Location,
  MAX_MESSAGE,
  quote,
  statusError,
  type UploadChunk,
  type WireFragment,
  type WireHolder,
} from "./grpc_wire.ts";
import { ELSEWHERE_KEY } from "./grpc_wire.ts";
import { PeerError } from "./tcp.ts";

const DEFAULT_DEADLINE_MS = 10_000;
const DEFAULT_IDLE_MS = 30_000;
// The client's HTTP/2 receive window: the default 64 KiB stalls 1 MiB messages at every step.
const FLOW_CONTROL_WINDOW = 8 * 1024 * 1024;

/** How long a {@link GrpcClient} waits. */
export interface GrpcClientOptions {
  /** Deadline of a unary call (ListFiles, Locate, Echo, Upload's answer). @default 10000 */
  deadlineMs?: number;
  /** A stream with no message for this long is cancelled as DEADLINE_EXCEEDED. @default 30000 */
  idleMs?: number;
}

type Callback<T> = (error: grpc.ServiceError | null, reply: T) => void;
/** The stub grpc-js makes from the proto, typed by hand (the proto is loaded at run time). */
interface FileTransferClient extends grpc.Client {
  ListFiles: UnaryMethod;
  Locate: UnaryMethod;
  Echo: UnaryMethod;
  Download(request: { name: string; peer?: string }): grpc.ClientReadableStream<Chunk>;
  Upload(callback: Callback<WireFragment>): grpc.ClientWritableStream<UploadChunk>;
}

type UnaryMethod = (
  request: unknown,
  options: grpc.CallOptions,
  callback: Callback<unknown>,
) => void;

/**
 * A FileTransfer client for many peers: one channel per address, reused across calls, and
 * dropped (to be made anew) after UNAVAILABLE or DEADLINE_EXCEEDED, since grpc-js in Deno may
 * not notice that a server restarted (denoland/deno#26907). Idempotent calls that meet
 * UNAVAILABLE are retried once on a fresh channel.
 * @example
 * ```ts
 * using client = new GrpcClient();
 * const { size, sha256, chunks } = await client.download("localhost:50051", "fragment_5.bin");
 * await store.write("fragment_5.bin", { size, sha256 }, chunks);
 * ```
 */
export class GrpcClient implements Disposable {
  readonly #channels = new Map<string, grpc.Client>();
  readonly #deadlineMs: number;
  readonly #idleMs: number;

  constructor(options: GrpcClientOptions = {}) {
    this.#deadlineMs = options.deadlineMs ?? DEFAULT_DEADLINE_MS;
    this.#idleMs = options.idleMs ?? DEFAULT_IDLE_MS;
  }

  /** What the peer at `address` (`host:port`) holds. */
  async listFiles(address: string): Promise<FileList> {
    const reply = await this.#unary<{ file: string; file_id: string; fragments: WireFragment[] }>(
      address,
      "ListFiles",
      {},
    );
    return {
      file: reply.file,
      fileId: reply.file_id,
      fragments: reply.fragments.map(fromWireFragment),
    };
  }

  /**
   * Whether the peer at `address` holds fragment `name`, and which holders of it it knows of:
   * of the file `file` names (an id, id prefix or name), else of the peer's own file.
   */
  async locate(address: string, name: string, options: { file?: string } = {}): Promise<Location> {
    const reply = await this.#unary<
      { held: boolean; fragment: WireFragment | null; holders: WireHolder[]; file_id: string }
    >(address, "Locate", { name, file: options.file ?? "" });
    return {
      held: reply.held,
      ...reply.fragment && reply.held ? { fragment: fromWireFragment(reply.fragment) } : {},
      holders: reply.holders.map((h) => ({
        host: h.host,
        port: h.port,
        grpcPort: h.grpc_port,
        httpPort: h.http_port,
        ...h.file_id ? { fileId: h.file_id } : {},
      })),
      ...reply.file_id ? { fileId: reply.file_id } : {},
    };
  }

  /** The liveness check: the peer answers with `message`. */
  async echo(address: string, message: string): Promise<string> {
    return (await this.#unary<{ message: string }>(address, "Echo", { message })).message;
  }

  /**
   * Starts downloading fragment `name`: resolves on the first message with the announced size
   * and hash; the bytes follow through `chunks` (unverified: Store.write verifies them).
   */
  async download(
    address: string,
    name: string,
    options: { signal?: AbortSignal; peer?: string } = {},
  ): Promise<Download> {
    try {
      return await this.#download(address, name, options);
    } catch (error) {
      if (!(error instanceof GrpcError) || error.code !== "UNAVAILABLE") throw error;
      return await this.#download(address, name, options); // once, on a fresh channel
    }
  }

  async #download(
    address: string,
    name: string,
    { signal, peer = "" }: { signal?: AbortSignal; peer?: string },
  ): Promise<Download> {
    signal?.throwIfAborted();
    const client = this.#channel(address);
    const call = client.Download({ name, peer });
    const onAbort = () => call.cancel();
    signal?.addEventListener("abort", onAbort, { once: true });
    const messages = call[Symbol.asyncIterator]() as AsyncIterator<Chunk>;
    const next = () => this.#withIdleTimeout(address, client, messages.next(), call);
    const stop = () => {
      signal?.removeEventListener("abort", onAbort);
      call.cancel();
    };
    let head;
    try {
      head = await next();
    } catch (error) {
      stop();
      throw signal?.aborted ? signal.reason : this.#failed(address, client, error);
    }
    if (head.done) {
      stop();
      throw new GrpcError("DATA_LOSS", `Peer at ${quote(address)} sent no data for ${quote(name)}`);
    }
    const { size = 0, sha256 = "", data } = head.value;
    const failed = (error: unknown) =>
      signal?.aborted ? signal.reason : this.#failed(address, client, error);
    async function* chunks() {
      try {
        if (data.length > 0) yield data;
        for (let message; !(message = await next()).done;) yield message.value.data;
      } catch (error) {
        throw failed(error);
      } finally {
        stop(); // a consumer that stopped early (a hash mismatch) ends the stream
      }
    }
    return { size, sha256, chunks: chunks(), cancel: stop };
  }

  /**
   * Pushes fragment `name` to the peer at `address`; resolves with what it stored. `source` is
   * the bytes, or a {@link Download}-shaped stream (e.g. a held fragment: `{...info, chunks}`).
   */
  async upload(
    address: string,
    name: string,
    source: Uint8Array | Download,
  ): Promise<FragmentInfo> {
    const { size, sha256, chunks } = source instanceof Uint8Array
      ? { size: source.length, sha256: await sha256Hex(source), chunks: [source] }
      : source;
    if (!Number.isSafeInteger(size) || size < 0) throw new RangeError(`Invalid size ${size}`);
    const client = this.#channel(address);
    let call!: grpc.ClientWritableStream<UploadChunk>;
    const reply = new Promise<WireFragment>((resolve, reject) => {
      call = client.Upload((error, reply) => error ? reject(error) : resolve(reply));
    });
    const settled = reply.then(() => {}, () => {});
    try {
      let head: UploadChunk | undefined = { name, size, sha256, data: new Uint8Array() };
      for await (const data of rechunk(chunks, CHUNK_SIZE)) {
        const message: UploadChunk = head ? { ...head, data } : { data };
        head = undefined;
        // Respect back-pressure, but stop at once if the server already answered (an error).
        if (!call.write(message)) {
          const drained = new Promise((resolve) => call.once("drain", resolve));
          if (await Promise.race([drained.then(() => false), settled.then(() => true)])) break;
        }
      }
      if (head) call.write(head); // an empty fragment is just the announcement
      call.end();
      return fromWireFragment(await reply);
    } catch (error) {
      call.cancel();
      throw this.#failed(address, client, error);
    }
  }

  /** Closes every channel; the client may still be used (channels are made again). */
  close(): void {
    for (const client of this.#channels.values()) client.close();
    this.#channels.clear();
  }

  [Symbol.dispose](): void {
    this.close();
  }

  #channel(address: string): FileTransferClient {
    let client = this.#channels.get(address);
    if (!client) {
      const FileTransfer = fileTransfer();
      client = new FileTransfer(address, grpc.credentials.createInsecure(), {
        "grpc.max_receive_message_length": MAX_MESSAGE,
        "grpc-node.flow_control_window": FLOW_CONTROL_WINDOW,
        // Its own connection, not one from grpc-js's process-wide pool: closing a dead channel
        // must really drop its connection, and close() must not reach other clients' calls.
        "grpc.use_local_subchannel_pool": 1,
      });
      this.#channels.set(address, client);
    }
    return client as FileTransferClient;
  }

  /** Turns a call's failure into a GrpcError, dropping the channel when it looks dead. */
  #failed(address: string, client: grpc.Client, error: unknown): unknown {
    const code = (error as Partial<grpc.ServiceError>)?.code;
    if (typeof code !== "number") return error;
    // Pointed elsewhere: the same answer as TCP's ERR ELSEWHERE, so a fetch treats both alike.
    const elsewhere = (error as grpc.ServiceError).metadata?.get(ELSEWHERE_KEY)[0];
    if (code === grpc.status.FAILED_PRECONDITION && typeof elsewhere === "string") {
      return new PeerError("ELSEWHERE", elsewhere.split(",").join(" "));
    }
    if (code === grpc.status.UNAVAILABLE || code === grpc.status.DEADLINE_EXCEEDED) {
      if (this.#channels.get(address) === client) this.#channels.delete(address);
      client.close();
    }
    const details = (error as grpc.ServiceError).details || grpc.status[code];
    return new GrpcError(grpc.status[code], `${details} (peer at ${quote(address)})`, {
      cause: error,
    });
  }

  async #unary<T>(
    address: string,
    method: "ListFiles" | "Locate" | "Echo",
    request: unknown,
    retry = true,
  ): Promise<T> {
    const client = this.#channel(address);
    try {
      return await new Promise<T>((resolve, reject) => {
        client[method](request, { deadline: Date.now() + this.#deadlineMs }, (error, reply) => {
          if (error) reject(error);
          else resolve(reply as T);
        });
      });
    } catch (error) {
      const failure = this.#failed(address, client, error);
      if (retry && failure instanceof GrpcError && failure.code === "UNAVAILABLE") {
        return await this.#unary(address, method, request, false);
      }
      throw failure;
    }
  }

  /** Awaits `step`, cancelling the call when no message came for the idle time. */
  async #withIdleTimeout<T>(
    address: string,
    client: grpc.Client,
    step: Promise<T>,
    call: grpc.ClientReadableStream<Chunk>,
  ): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const idle = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        call.cancel();
        reject(statusError(grpc.status.DEADLINE_EXCEEDED, "No data for too long"));
      }, this.#idleMs);
    });
    try {
      return await Promise.race([step, idle]);
    } catch (error) {
      throw this.#failed(address, client, error);
    } finally {
      clearTimeout(timer);
    }
  }
}

function fromWireFragment(fragment: WireFragment): FragmentInfo {
  return { name: fragment.name, size: Number(fragment.size), sha256: fragment.sha256 };
}

async function sha256Hex(bytes: Uint8Array): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", bytes as Uint8Array<ArrayBuffer>);
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, "0")).join("");
}

/** Regroups byte chunks into pieces of exactly `size` bytes (the last one shorter). */
async function* rechunk(
  chunks: AsyncIterable<Uint8Array> | Iterable<Uint8Array>,
  size: number,
): AsyncGenerator<Uint8Array> {
  let buffer = new Uint8Array(size), filled = 0;
  for await (const chunk of chunks) {
    for (let offset = 0; offset < chunk.length;) {
      if (filled === 0 && chunk.length - offset >= size) {
        yield chunk.slice(offset, offset + size); // a copy: the caller may reuse its buffer
        offset += size;
        continue;
      }
      const n = Math.min(size - filled, chunk.length - offset);
      buffer.set(chunk.subarray(offset, offset + n), filled);
      filled += n;
      offset += n;
      if (filled === size) {
        yield buffer;
        buffer = new Uint8Array(size);
        filled = 0;
      }
    }
  }
  if (filled > 0) yield buffer.subarray(0, filled);
}
