#!/usr/bin/env -S deno run --allow-net --allow-read --allow-write
/**
 * The peer's gRPC half (DESIGN.md "gRPC", proto/file_transfer.proto): the `FileTransfer` server
 * over a fragment store, the client peer.ts fetches and pushes with, and a supervisor that runs
 * the server as a child process. Why a child: Deno 2.9.6's `node:http2` can abort the whole
 * process inside nghttp2 when a client closes its connection (denoland/deno#36788), so a remote
 * client must only ever be able to cost a restart of this child, never the peer.
 *
 * Usage: `deno task grpc fragments/6001 --port 50051 [--hostname 0.0.0.0] [--directory URL]`
 * @module
 */
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { Buffer } from "node:buffer";
import { fileURLToPath } from "node:url";
import { parseArgs } from "node:util";
import { runMain, UserError } from "./_cli.ts";
import { LineBuffer } from "./_lines.ts";
import { createThrottle, parseRate } from "./_throttle.ts";
import {
  BadNameError,
  type FragmentInfo,
  IntegrityError,
  isFragmentName,
  Store,
} from "./_store.ts";
import type { Holder as DirectoryHolder } from "./directory.ts";

export type { FragmentInfo };

/** A peer that holds a fragment, as the directory names it. */
export type Holder = Pick<DirectoryHolder, "host" | "port" | "grpcPort" | "httpPort">;

/** Where the service is declared; the supervised child may read it and the store, nothing else. */
export const PROTO_PATH = fileURLToPath(new URL("./proto/file_transfer.proto", import.meta.url));
const SCRIPT_PATH = fileURLToPath(import.meta.url);
const CONFIG_PATH = fileURLToPath(new URL("./deno.json", import.meta.url));

/**
 * The environment variables grpc-js reads (logging, tracing, proxies): a process that loads it
 * needs `--allow-env` for these names, as the `grpc` permission set in deno.json grants.
 */
export const GRPC_ENV = [
  "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
  "GRPC_EXPERIMENTAL_ENABLE_OUTLIER_DETECTION",
  "GRPC_NODE_DEBUG_SEND_ERROR_DETAILS",
  "GRPC_NODE_TRACE",
  "GRPC_NODE_USE_ALTERNATIVE_RESOLVER",
  "GRPC_NODE_VERBOSITY",
  "GRPC_SSL_CIPHER_SUITES",
  "GRPC_TRACE",
  "GRPC_VERBOSITY",
  "grpc_proxy",
  "http_proxy",
  "https_proxy",
  "no_grpc_proxy",
  "no_proxy",
];

/** The largest piece of a fragment in one message. */
export const CHUNK_SIZE = 1024 * 1024;
// A chunk plus room for the other fields: a bigger message is refused with RESOURCE_EXHAUSTED.
const MAX_MESSAGE = CHUNK_SIZE + 64 * 1024;
// The largest fragment an Upload may announce (the splitter's fragments are far smaller).
const MAX_UPLOAD_SIZE = 4 * 1024 ** 3;
const SHA256_HEX = /^[0-9a-f]{64}$/;
// Unacknowledged chunks one Download may have queued: bounds its memory at a few MiB.
const DOWNLOAD_WINDOW = 4;
const DEFAULT_PORT = 50051;
const DEFAULT_DEADLINE_MS = 10_000;
const DEFAULT_IDLE_MS = 30_000;
// The client's HTTP/2 receive window: the default 64 KiB stalls 1 MiB messages at every step.
const FLOW_CONTROL_WINDOW = 8 * 1024 * 1024;
const LISTENING = /^\[gRPC\] Listening on port (\d+)$/;
const STORED = /^STORED (\S+)$/;
const encoder = new TextEncoder();

// ---------------------------------------------------------------------------------------------
// Wire types and the service definition

/** `FileTransfer.ListFiles`: what a peer holds, and the file its manifest describes. */
export interface FileList {
  /** The manifest's file name; empty when the peer has no manifest. */
  file: string;
  fragments: FragmentInfo[];
}

/** `FileTransfer.Locate`: whether a peer holds a fragment, and the holders it knows of. */
export interface Location {
  held: boolean;
  fragment?: FragmentInfo;
  holders: Holder[];
}

/** A fragment arriving: its announced size and hash, and its bytes (feed them to Store.write). */
export interface Download {
  size: number;
  sha256: string;
  chunks: AsyncIterable<Uint8Array>;
}

interface WireFragment {
  name: string;
  size: number;
  sha256: string;
}
interface WireHolder {
  host: string;
  port: number;
  grpc_port: number;
  http_port: number;
}
interface Chunk {
  size?: number;
  sha256?: string;
  data: Uint8Array;
}
interface UploadChunk extends Chunk {
  name?: string;
}

let service: grpc.ServiceClientConstructor | undefined;

/** The `p2p.FileTransfer` service, loaded from the proto on first use only. */
function fileTransfer(): grpc.ServiceClientConstructor {
  if (!service) {
    const definition = protoLoader.loadSync(PROTO_PATH, {
      keepCase: true,
      longs: Number, // sizes are uint64 on the wire, but a fragment fits a JS number
      defaults: true,
    });
    const p2p = grpc.loadPackageDefinition(definition).p2p as grpc.GrpcObject;
    service = p2p.FileTransfer as grpc.ServiceClientConstructor;
  }
  return service;
}

/**
 * The service as the server registers it: Download's chunks arrive already encoded (see
 * {@link encodeChunk}), so protobufjs does not copy each MiB once more; other messages as usual.
 */
function serverDefinition(): grpc.ServiceDefinition {
  const definition = fileTransfer().service;
  const download = definition.Download!;
  return {
    ...definition,
    Download: {
      ...download,
      responseSerialize: (message: unknown) =>
        message instanceof Uint8Array
          ? Buffer.from(message.buffer, message.byteOffset, message.length) // a view: no copy
          : download.responseSerialize(message),
    },
  };
}

/** A failed call with its gRPC status name (`NOT_FOUND`, `DATA_LOSS`, `UNAVAILABLE`...). */
export class GrpcError extends Error {
  override name = "GrpcError";
  constructor(readonly code: string, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

function statusError(code: grpc.status, details: string): Partial<grpc.ServiceError> {
  return { code, details, message: details };
}

/** A name shown in an error: quoted, and cut short so a 1 MB name cannot flood a log. */
function quote(name: string): string {
  return JSON.stringify(name.length > 64 ? `${name.slice(0, 64)}…` : name);
}

// ---------------------------------------------------------------------------------------------
// The server

export interface GrpcServerOptions {
  /** 0 picks a free port. @default 50051 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /** Who else holds a fragment (e.g. the directory's answer); Locate returns no holders without. */
  locate?: (name: string) => Promise<Holder[]>;
  /** Called after an Upload stored a verified fragment. */
  onStored?: (info: FragmentInfo) => void;
  /** Downloads served at once; more are refused with RESOURCE_EXHAUSTED. @default 64 */
  maxDownloads?: number;
  /** Uploads received at once; more are refused with RESOURCE_EXHAUSTED. @default 4 */
  maxUploads?: number;
  /** Download bytes per second, across all calls (a peer's `--max-upload`). */
  maxUpload?: number;
}

/** A running gRPC FileTransfer server. */
export interface GrpcServer extends AsyncDisposable {
  readonly port: number;
  /** Stops listening and cancels the calls in flight. */
  close(): Promise<void>;
}

/**
 * Serves `store` as `p2p.FileTransfer` until closed.
 * @example
 * ```ts
 * await using server = await startGrpcServer(await Store.open("fragments/6001"), { port: 0 });
 * ```
 */
export async function startGrpcServer(
  store: Store,
  options: GrpcServerOptions = {},
): Promise<GrpcServer> {
  const server = new grpc.Server({
    "grpc.max_receive_message_length": MAX_MESSAGE,
  });
  const active = new Set<Promise<void>>();
  server.addService(serverDefinition(), fileTransferHandlers(store, options, active));
  const host = options.hostname ?? "0.0.0.0";
  const address = `${host.includes(":") ? `[${host}]` : host}:${options.port ?? DEFAULT_PORT}`;
  const port = await new Promise<number>((resolve, reject) => {
    server.bindAsync(address, grpc.ServerCredentials.createInsecure(), (error, port) => {
      if (error) reject(new UserError(`Cannot listen on ${quote(address)}: ${error.message}`));
      else resolve(port);
    });
  });
  let closing: Promise<void> | undefined;
  function close() {
    closing ??= (async () => {
      server.forceShutdown();
      // Let cancelled uploads remove their temporary files before the caller moves on.
      await Promise.allSettled(active);
    })();
    return closing;
  }
  return { port, close, [Symbol.asyncDispose]: close };
}

/** The handlers of `p2p.FileTransfer`, one named function per RPC. */
function fileTransferHandlers(
  store: Store,
  options: GrpcServerOptions,
  active: Set<Promise<void>>,
): grpc.UntypedServiceImplementation {
  const { maxDownloads = 64, maxUploads = 4 } = options;
  let downloads = 0, uploads = 0;
  const throttle = options.maxUpload ? createThrottle(options.maxUpload) : undefined;

  /** Runs a streaming handler, tracked so close() can wait for its cleanup. */
  function track(work: Promise<void>) {
    const done = work.finally(() => active.delete(done));
    active.add(done);
  }

  function ListFiles(
    _call: grpc.ServerUnaryCall<unknown, unknown>,
    callback: grpc.sendUnaryData<unknown>,
  ) {
    // The peer stores what it fetches in the same folder: pick that up first.
    store.adoptAll().then(
      () => callback(null, { fragments: store.list(), file: store.manifest?.file ?? "" }),
      (error) => callback(statusError(grpc.status.INTERNAL, String(error))),
    );
  }

  async function Locate(
    call: grpc.ServerUnaryCall<{ name: string }, unknown>,
    callback: grpc.sendUnaryData<unknown>,
  ) {
    const { name } = call.request;
    if (!isFragmentName(name)) {
      return callback(statusError(grpc.status.INVALID_ARGUMENT, `Invalid name ${quote(name)}`));
    }
    const fragment = store.get(name) ?? await store.adopt(name);
    // The directory being down is no reason to fail: the answer just knows fewer holders.
    const holders = await options.locate?.(name).catch(() => []) ?? [];
    callback(null, { held: fragment !== undefined, fragment, holders: holders.map(toWireHolder) });
  }

  // Its messages are Chunks encoded by encodeChunk (see serverDefinition).
  function Download(call: grpc.ServerWritableStream<{ name: string }, Uint8Array>) {
    const { name } = call.request;
    if (!isFragmentName(name)) {
      call.emit("error", statusError(grpc.status.INVALID_ARGUMENT, `Invalid name ${quote(name)}`));
      return;
    }
    if (downloads >= maxDownloads) {
      call.emit("error", statusError(grpc.status.RESOURCE_EXHAUSTED, "Too many downloads"));
      return;
    }
    downloads++;
    track(sendFragment(store, name, call, throttle).finally(() => downloads--));
  }

  function Upload(
    call: grpc.ServerReadableStream<UploadChunk, unknown>,
    callback: grpc.sendUnaryData<unknown>,
  ) {
    if (uploads >= maxUploads) {
      call.destroy(); // stop reading what it sends; the status below is the answer
      return callback(statusError(grpc.status.RESOURCE_EXHAUSTED, "Too many uploads"));
    }
    uploads++;
    track(
      receiveFragment(store, call).then(
        (info) => {
          callback(null, info);
          options.onStored?.(info);
        },
        (error) => callback(uploadStatus(error)),
      ).finally(() => uploads--),
    );
  }

  function Echo(
    call: grpc.ServerUnaryCall<{ message: string }, unknown>,
    callback: grpc.sendUnaryData<unknown>,
  ) {
    callback(null, { message: call.request.message });
  }

  return { ListFiles, Locate, Download, Upload, Echo };
}

function toWireHolder(holder: Holder): WireHolder {
  return {
    host: holder.host,
    port: holder.port,
    grpc_port: holder.grpcPort,
    http_port: holder.httpPort,
  };
}

/** Streams fragment `name`: the first chunk carries size and sha256, none is over 1 MiB. */
async function sendFragment(
  store: Store,
  name: string,
  call: grpc.ServerWritableStream<{ name: string }, Uint8Array>,
  throttle?: ReturnType<typeof createThrottle>,
): Promise<void> {
  // A fragment the peer fetched after this process started is in the folder, not yet held here.
  const opened = await store.open(name) ??
    (await store.adopt(name) ? await store.open(name) : undefined);
  if (!opened) {
    call.emit("error", statusError(grpc.status.NOT_FOUND, `No fragment ${quote(name)} here`));
    return;
  }
  using file = opened.file;
  const { size, sha256 } = opened.info;
  let cancelled = false;
  // A cancelled call may never run the callbacks of its queued writes: stop waiting for them.
  const { promise: whenCancelled, resolve: onCancelled } = Promise.withResolvers<void>();
  call.on("cancelled", () => {
    cancelled = true;
    onCancelled();
  });
  // Each message is read from the file straight into its encoded place in one of these buffers;
  // a buffer is used again only once grpc-js called back for the message it held (by then
  // grpc-js has copied it into its own frame), so the download allocates nothing per chunk.
  const spare = Array.from(
    { length: DOWNLOAD_WINDOW + 1 },
    () => new Uint8Array(CHUNK_HEAD_ROOM + Math.min(CHUNK_SIZE, size)),
  );
  // Writes complete in order; waiting on the oldest keeps at most DOWNLOAD_WINDOW queued.
  const pending: Promise<Uint8Array<ArrayBuffer>>[] = [];
  let sent = 0, first = true;
  while (!cancelled && (first || sent < size)) {
    const buffer = spare.pop()!;
    const data = buffer.subarray(
      CHUNK_HEAD_ROOM,
      CHUNK_HEAD_ROOM + Math.min(CHUNK_SIZE, size - sent),
    );
    let filled = 0;
    while (filled < data.length) {
      const n = await file.read(data.subarray(filled));
      if (n === null) break;
      filled += n;
    }
    if (filled < data.length) {
      // The file shrank behind the store's back: fail loudly rather than send short bytes.
      call.emit("error", statusError(grpc.status.DATA_LOSS, `Fragment ${quote(name)} is short`));
      return;
    }
    if (throttle) await throttle(data.length).catch(() => {});
    const message = encodeChunk(buffer, data.length, first ? { size, sha256 } : undefined);
    pending.push(new Promise((resolve) => call.write(message, () => resolve(buffer))));
    if (pending.length >= DOWNLOAD_WINDOW) {
      const done = await Promise.race([pending.shift()!, whenCancelled]);
      if (done) spare.push(done);
    }
    sent += filled;
    first = false;
  }
  await Promise.race([Promise.all(pending), whenCancelled]);
  if (!cancelled) call.end();
}

// Room before a chunk's bytes for its encoded fields: the largest head is 83 bytes.
const CHUNK_HEAD_ROOM = 96;

/**
 * Encodes a `Chunk` in place: `buffer` holds `length` data bytes from CHUNK_HEAD_ROOM on, and the
 * fields go just before them. The same bytes protobufjs writes (fields 1, 2, 3 in order), plus
 * `size` even when it is 0, which every decoder reads alike.
 */
function encodeChunk(
  buffer: Uint8Array,
  length: number,
  head?: { size: number; sha256: string },
): Uint8Array {
  const fields: number[] = [];
  if (head) {
    fields.push(0x08, ...varint(head.size)); // field 1, varint
    fields.push(0x12, ...varint(head.sha256.length), ...encoder.encode(head.sha256)); // field 2
  }
  if (length > 0) fields.push(0x1a, ...varint(length)); // field 3, length-delimited
  const start = CHUNK_HEAD_ROOM - fields.length;
  buffer.set(fields, start);
  return buffer.subarray(start, CHUNK_HEAD_ROOM + length);
}

/** A protobuf varint; sizes go past 2^32, so by division rather than bit shifts. */
function varint(value: number): number[] {
  const bytes: number[] = [];
  while (value >= 0x80) {
    bytes.push((value % 0x80) | 0x80);
    value = Math.floor(value / 0x80);
  }
  bytes.push(value);
  return bytes;
}

/** Reads an Upload's messages into the store: verified by Store.write before it is kept. */
async function receiveFragment(
  store: Store,
  call: grpc.ServerReadableStream<UploadChunk, unknown>,
): Promise<FragmentInfo> {
  const messages = call[Symbol.asyncIterator]() as AsyncIterator<UploadChunk>;
  const head = await messages.next();
  if (head.done) throw new UploadError(grpc.status.INVALID_ARGUMENT, "Empty upload");
  const { name = "", size = -1, sha256 = "", data } = head.value;
  if (!isFragmentName(name)) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid name ${quote(name)}`);
  }
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_UPLOAD_SIZE) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid size for ${quote(name)}`);
  }
  if (!SHA256_HEX.test(sha256)) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid sha256 for ${quote(name)}`);
  }
  async function* chunks() {
    if (data.length > 0) yield data;
    for (let next; !(next = await messages.next()).done;) yield next.value.data;
  }
  return await store.write(name, { size, sha256 }, chunks());
}

/** A refusal of an Upload with the status it deserves. */
class UploadError extends Error {
  constructor(readonly code: grpc.status, message: string) {
    super(message);
  }
}

function uploadStatus(error: unknown): Partial<grpc.ServiceError> {
  if (error instanceof UploadError) return statusError(error.code, error.message);
  if (error instanceof BadNameError) {
    return statusError(grpc.status.INVALID_ARGUMENT, error.message);
  }
  if (error instanceof IntegrityError) return statusError(grpc.status.DATA_LOSS, error.message);
  if ((error as { code?: unknown })?.code === grpc.status.CANCELLED) {
    return statusError(grpc.status.CANCELLED, "Upload cancelled");
  }
  // A disk error: say so without leaking paths to a remote client.
  console.error(`[gRPC] Upload failed: ${error}`);
  return statusError(grpc.status.INTERNAL, "Could not store the fragment");
}

// ---------------------------------------------------------------------------------------------
// The client

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
  Download(request: { name: string }): grpc.ClientReadableStream<Chunk>;
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
    const reply = await this.#unary<{ file: string; fragments: WireFragment[] }>(
      address,
      "ListFiles",
      {},
    );
    return { file: reply.file, fragments: reply.fragments.map(fromWireFragment) };
  }

  /** Whether the peer at `address` holds fragment `name`, and which holders it knows of. */
  async locate(address: string, name: string): Promise<Location> {
    const reply = await this.#unary<
      { held: boolean; fragment: WireFragment | null; holders: WireHolder[] }
    >(address, "Locate", { name });
    return {
      held: reply.held,
      ...reply.fragment && reply.held ? { fragment: fromWireFragment(reply.fragment) } : {},
      holders: reply.holders.map((h) => ({
        host: h.host,
        port: h.port,
        grpcPort: h.grpc_port,
        httpPort: h.http_port,
      })),
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
    options: { signal?: AbortSignal } = {},
  ): Promise<Download> {
    try {
      return await this.#download(address, name, options.signal);
    } catch (error) {
      if (!(error instanceof GrpcError) || error.code !== "UNAVAILABLE") throw error;
      return await this.#download(address, name, options.signal); // once, on a fresh channel
    }
  }

  async #download(address: string, name: string, signal?: AbortSignal): Promise<Download> {
    signal?.throwIfAborted();
    const client = this.#channel(address);
    const call = client.Download({ name });
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
    return { size, sha256, chunks: chunks() };
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

// ---------------------------------------------------------------------------------------------
// The supervisor

export interface SupervisorOptions {
  /** The store's folder: the child may read and write there only. */
  dir: string;
  /** 0 picks a free port once; restarts reuse the port it got. @default 50051 */
  port?: number;
  hostname?: string;
  /** The directory's URL, so Locate can name other holders. */
  directory?: string;
  /** Download bytes per second (the peer's `--max-upload`). */
  maxUpload?: number;
  /** Called with the name of each fragment an Upload stored (then `store.adopt(name)` it). */
  onStored?: (name: string) => void;
  /** Called with the child's stderr lines and the supervisor's own news (a restart...). */
  onLog?: (line: string) => void;
}

/** A gRPC server running in a child process that is restarted whenever it dies. */
export interface GrpcSupervisor extends AsyncDisposable {
  /** The port the server listens on (the same across restarts). */
  readonly port: number;
  /** The child's process id, while one runs. */
  readonly pid: number | undefined;
  /** How many times the child was restarted. */
  readonly restarts: number;
  /** Resolves when the server is listening again (at once when it is). */
  ready(): Promise<void>;
  /** Stops the child for good. */
  close(): Promise<void>;
}

const MIN_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5_000;
// A child that ran this long was healthy: the next restart starts from the shortest back-off.
const HEALTHY_MS = 10_000;
const STOP_GRACE_MS = 2_000;

/**
 * Runs `deno task grpc` for `dir` as a child process with narrow permissions, and restarts it
 * with back-off when it dies. Resolves once it listens; rejects if the first start fails (a
 * port in use...).
 * @example
 * ```ts
 * await using grpc = await superviseGrpcServer({ dir, port: 50051, onStored: (n) => store.adopt(n) });
 * ```
 */
export async function superviseGrpcServer(options: SupervisorOptions): Promise<GrpcSupervisor> {
  const supervisor = new Supervisor(options);
  await supervisor.started;
  return supervisor;
}

class Supervisor implements GrpcSupervisor {
  readonly started: Promise<void>;
  #options: SupervisorOptions;
  #port: number;
  #child: Deno.ChildProcess | undefined;
  #listening = false;
  #waiters: (() => void)[] = [];
  #restarts = 0;
  #closed = false;
  #wake = () => {};
  #loop: Promise<void>;

  constructor(options: SupervisorOptions) {
    this.#options = options;
    this.#port = options.port ?? DEFAULT_PORT;
    let started!: () => void, failed!: (error: Error) => void;
    this.started = new Promise((resolve, reject) => [started, failed] = [resolve, reject]);
    this.#loop = this.#run(started, failed);
  }

  get port(): number {
    return this.#port;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  get restarts(): number {
    return this.#restarts;
  }

  ready(): Promise<void> {
    if (this.#listening || this.#closed) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  async #run(started: () => void, failed: (error: Error) => void) {
    let backoff = MIN_BACKOFF_MS;
    let everListened = false;
    while (!this.#closed) {
      const since = Date.now();
      const { status, stderr } = await this.#runChild(() => {
        if (!everListened) started();
        everListened = true;
      });
      this.#listening = false;
      if (this.#closed) break;
      if (!everListened) {
        const reason = stderr.trim().split("\n").at(-1)?.replace(/^error: /, "") ||
          `exited with code ${status.code}`;
        failed(new UserError(`gRPC server did not start: ${reason}`));
        this.#closed = true;
        break;
      }
      if (Date.now() - since > HEALTHY_MS) backoff = MIN_BACKOFF_MS;
      const delay = backoff / 2 + Math.random() * backoff / 2; // jitter
      this.#options.onLog?.(
        `[gRPC] Server exited (${status.signal ?? `code ${status.code}`}); restarting in ` +
          `${Math.round(delay)} ms`,
      );
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      if (!this.#closed) this.#restarts++;
    }
    for (const wake of this.#waiters.splice(0)) wake();
  }

  /** Runs the child once, to its end; calls `onListening` when it prints its port. */
  async #runChild(onListening: () => void) {
    const { dir, hostname, directory, maxUpload } = this.#options;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-q",
        "--config",
        CONFIG_PATH,
        "--allow-net",
        `--allow-env=${GRPC_ENV.join(",")}`,
        `--allow-read=${dir},${PROTO_PATH}`,
        `--allow-write=${dir}`,
        SCRIPT_PATH,
        dir,
        "--port",
        String(this.#port),
        "--supervised",
        ...hostname ? ["--hostname", hostname] : [],
        ...directory ? ["--directory", directory] : [],
        ...maxUpload ? ["--max-upload", String(maxUpload)] : [],
      ],
      stdin: "piped", // the child exits when this closes, so a killed peer leaves no orphan
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    let stderr = "";
    const out = readLines(child.stdout, (line) => {
      const listening = line.match(LISTENING);
      const stored = line.match(STORED);
      if (listening) {
        this.#port = Number(listening[1]);
        this.#listening = true;
        onListening();
        for (const wake of this.#waiters.splice(0)) wake();
      } else if (stored) this.#options.onStored?.(stored[1]);
      else this.#options.onLog?.(line);
    });
    const err = readLines(child.stderr, (line) => {
      stderr = (stderr + line + "\n").slice(-4096);
      this.#options.onLog?.(line);
    });
    const [status] = await Promise.all([child.status, out, err]);
    await child.stdin.close().catch(() => {});
    this.#child = undefined;
    return { status, stderr };
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#wake();
    const child = this.#child;
    if (child) {
      try {
        child.kill("SIGTERM");
      } catch { /* already gone */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
      }, STOP_GRACE_MS);
      await this.#loop;
      clearTimeout(timer);
    }
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Calls `onLine` for each line of `stream`. */
async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void) {
  const lines = new LineBuffer(64 * 1024);
  for await (const chunk of stream) {
    lines.push(chunk);
    for (let line; (line = lines.shift()) !== undefined;) onLine(line);
  }
}

// ---------------------------------------------------------------------------------------------
// The command line

const USAGE = `Usage: deno task grpc <store dir> [options]

Serves the fragments in <store dir> over gRPC (p2p.FileTransfer, proto/file_transfer.proto).
Prints "[gRPC] Listening on port N", and "STORED <name>" for each fragment an Upload stored.

Options:
  --port P          port to listen on; 0 picks a free one (default 50051)
  --hostname H      address to listen on (default 0.0.0.0)
  --directory URL   directory whose holders Locate names (e.g. http://localhost:5000)
  --max-upload RATE download bytes per second it may send, e.g. 20MB/s
  --supervised      exit when stdin closes (set by the supervising peer)
  --help            show this help`;

async function main(args = Deno.args): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      port: { type: "string", default: String(DEFAULT_PORT) },
      hostname: { type: "string", default: "0.0.0.0" },
      directory: { type: "string" },
      "max-upload": { type: "string" },
      supervised: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (positionals.length !== 1) throw new UserError("Expected one store folder (see --help)");
  const port = Number(values.port);
  if (!/^\d+$/.test(values.port) || port > 65535) {
    throw new UserError(`Invalid port ${quote(values.port)}`);
  }
  let locate: GrpcServerOptions["locate"];
  if (values.directory !== undefined) {
    // Only loaded when asked for: it brings the REST stack along.
    const { DirectoryClient } = await import("./directory.ts");
    const directory = new DirectoryClient(values.directory);
    locate = (name) => directory.locate(name);
  }
  let maxUpload;
  try {
    maxUpload = values["max-upload"] === undefined ? undefined : parseRate(values["max-upload"]);
  } catch (error) {
    throw new UserError((error as Error).message);
  }
  const store = await Store.open(positionals[0]);
  const server = await startGrpcServer(store, {
    port,
    hostname: values.hostname,
    maxUpload,
    locate,
    onStored: (info) => console.log(`STORED ${info.name}`),
  });
  console.log(`[gRPC] Listening on port ${server.port}`);

  const { promise: stop, resolve } = Promise.withResolvers<void>();
  Deno.addSignalListener("SIGINT", resolve);
  Deno.addSignalListener("SIGTERM", resolve);
  if (values.supervised) {
    // The supervisor holds the other end: when it is gone (even SIGKILLed), so are we.
    (async () => {
      for await (const _ of Deno.stdin.readable) { /* nothing is sent; wait for the end */ }
    })().finally(resolve);
  }
  await stop;
  await server.close();
  return 0;
}

if (import.meta.main) await runMain(main);
