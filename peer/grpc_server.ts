/**
 * The `p2p.FileTransfer` server of peer_grpc.ts over a fragment store: one handler per RPC.
 * Download reads each chunk from the file straight into its encoded place in a reused buffer and
 * is served on the HTTP/2 port itself (grpc_http2.ts); the other calls, health and reflection are
 * grpc-js's, passed on by that port. Upload is kept only once Store.write verified it.
 * The peer runs this in a supervised child (see grpc_supervisor.ts), never in its own process.
 * @module
 */
import "./grpc_env_check.ts"; // before grpc-js, which reads the environment as it loads
import * as grpc from "@grpc/grpc-js";
import { UserError } from "../common/cli.ts";
import { isValidName } from "../split.ts";
import { createThrottle } from "../common/throttle.ts";
import {
  BadNameError,
  type FragmentInfo,
  IntegrityError,
  isFragmentName,
  type Store,
} from "./store.ts";
import {
  CHUNK_SIZE,
  DEFAULT_PORT,
  fileTransfer,
  type Holder,
  MAX_MESSAGE,
  portInUseMessage,
  quote,
  statusError,
  type UploadChunk,
  type WireHolder,
} from "./grpc_wire.ts";
import { ELSEWHERE_KEY } from "./grpc_wire.ts";
import type { Steering } from "./steering.ts";
import { addStandardServices } from "./grpc_services.ts";
import { type CallStatus, type DownloadCall, type Http2Port, listenHttp2 } from "./grpc_http2.ts";

// The largest fragment an Upload may announce (the splitter's fragments are far smaller).
const MAX_UPLOAD_SIZE = 4 * 1024 ** 3;
const SHA256_HEX = /^[0-9a-f]{64}$/;
// Unacknowledged chunks one Download may have: one being written, one queued behind it. Its
// memory stays at 3 MiB, and each chunk goes out from its own buffer: the HTTP/2 stream joins
// two or more queued writes into one fresh buffer (a copy of each) before writing them.
const DOWNLOAD_WINDOW = 2;
const encoder = new TextEncoder();
const LOOPBACK = "127.0.0.1";

/** How {@link startGrpcServer} serves. */
export interface GrpcServerOptions {
  /** 0 picks a free port. @default 50051 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /**
   * Who else holds a fragment of `file` (an id, id prefix or name; undefined for any file), e.g.
   * the directory's answer; Locate returns no holders without.
   */
  locate?: (name: string, file?: string) => Promise<Holder[]>;
  /** Called after an Upload stored a verified fragment. */
  onStored?: (info: FragmentInfo) => void;
  /** Downloads served at once; more are refused with RESOURCE_EXHAUSTED. @default 64 */
  maxDownloads?: number;
  /** Uploads received at once; more are refused with RESOURCE_EXHAUSTED. @default 4 */
  maxUploads?: number;
  /** Download bytes per second, across all calls (a peer's `--max-upload`). */
  maxUpload?: number;
  /** Points a requester naming itself (`peer`) at other holders, as over TCP (steering.ts). */
  steering?: Steering;
  /** A Download whose client reads nothing for this long is cut. @default 60_000 */
  stallTimeoutMs?: number;
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
  const { handlers, download } = fileTransferHandlers(store, options, active);
  server.addService(fileTransfer().service, handlers); // Download is served on the HTTP/2 port
  addStandardServices(server);
  // grpc-js serves the other calls on loopback only; the HTTP/2 port passes them on.
  const upstreamPort = await new Promise<number>((resolve, reject) => {
    server.bindAsync(`${LOOPBACK}:0`, grpc.ServerCredentials.createInsecure(), (error, port) => {
      if (error) reject(new Error(`Cannot listen on ${LOOPBACK}: ${error.message}`));
      else resolve(port);
    });
  });
  const hostname = options.hostname ?? "0.0.0.0";
  const port = options.port ?? DEFAULT_PORT;
  const requestType = fileTransfer().service.Download!;
  let http2Port: Http2Port;
  try {
    http2Port = await listenHttp2({
      port,
      hostname,
      upstreamPort,
      download,
      stallTimeoutMs: options.stallTimeoutMs,
      decodeRequest: (bytes) => requestType.requestDeserialize(bytes) as DownloadCall["request"],
    });
  } catch (error) {
    server.forceShutdown();
    const address = `${hostname.includes(":") ? `[${hostname}]` : hostname}:${port}`;
    throw new UserError(
      (error as { code?: string }).code === "EADDRINUSE"
        ? portInUseMessage(port)
        : `Cannot listen on ${quote(address)}: ${(error as Error).message}`,
      { cause: error },
    );
  }
  let closing: Promise<void> | undefined;
  function close() {
    closing ??= (async () => {
      await http2Port.close(); // cancels the Downloads and every call passed on
      server.forceShutdown();
      // Let cancelled uploads remove their temporary files before the caller moves on.
      await Promise.allSettled(active);
    })();
    return closing;
  }
  return { port: http2Port.port, close, [Symbol.asyncDispose]: close };
}

/**
 * Keeps out of grpc-js's log (stderr) the line it prints for a failed bind, which the error
 * {@link startGrpcServer} rejects with says already: a command line's mistake is one line.
 */
export function quietBindFailures(): void {
  grpc.setLogger({
    error: (message: unknown, ...rest: unknown[]) => {
      if (!String(message).startsWith("No address added")) console.error(`E ${message}`, ...rest);
    },
    info: (message: unknown, ...rest: unknown[]) => console.error(`I ${message}`, ...rest),
    debug: (message: unknown, ...rest: unknown[]) => console.error(`D ${message}`, ...rest),
  });
}

/**
 * The handlers of `p2p.FileTransfer`, one named function per RPC: Download's apart, for the
 * HTTP/2 port (grpc_http2.ts), the others for grpc-js.
 */
function fileTransferHandlers(
  store: Store,
  options: GrpcServerOptions,
  active: Set<Promise<void>>,
): { handlers: grpc.UntypedServiceImplementation; download: (call: DownloadCall) => void } {
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
      () =>
        callback(null, {
          fragments: store.list(),
          file: store.manifest?.file ?? "",
          file_id: store.manifest?.sha256 ?? "",
        }),
      (error) => callback(statusError(grpc.status.INTERNAL, String(error))),
    );
  }

  async function Locate(
    call: grpc.ServerUnaryCall<{ name: string; file: string }, unknown>,
    callback: grpc.sendUnaryData<unknown>,
  ) {
    const { name } = call.request;
    if (!isFragmentName(name)) {
      return callback(statusError(grpc.status.INVALID_ARGUMENT, `Invalid name ${quote(name)}`));
    }
    // A file id, id prefix or name; none asked for means this peer's own file.
    const file = call.request.file || store.manifest?.sha256 || undefined;
    if (file !== undefined && !isValidName(file)) {
      return callback(statusError(grpc.status.INVALID_ARGUMENT, `Invalid file ${quote(file)}`));
    }
    let fragment;
    try {
      fragment = store.get(name) ?? await store.adopt(name);
    } catch (error) {
      return callback(internal(`Locate of ${quote(name)}`, error, "Could not read the fragment"));
    }
    // The directory being down is no reason to fail: the answer just knows fewer holders.
    const holders = await options.locate?.(name, file).catch(() => []) ?? [];
    callback(null, {
      held: fragment !== undefined,
      fragment,
      holders: holders.map(toWireHolder),
      file_id: askedFileId(file, holders),
    });
  }

  function Download(call: DownloadCall) {
    const { name } = call.request;
    const peer = call.request.peer || undefined;
    if (!isFragmentName(name)) {
      call.end({ code: grpc.status.INVALID_ARGUMENT, details: `Invalid name ${quote(name)}` });
      return;
    }
    if (downloads >= maxDownloads) {
      call.end({ code: grpc.status.RESOURCE_EXHAUSTED, details: "Too many downloads" });
      return;
    }
    const pointer = options.steering?.redirect(name, peer, downloads > 0);
    if (pointer) {
      call.end({
        code: grpc.status.FAILED_PRECONDITION,
        details: `held elsewhere: ${pointer.join(" ")}`,
        trailers: { [ELSEWHERE_KEY]: pointer.join(",") },
      });
      return;
    }
    // In flight counts toward its receiver: others asking meanwhile are pointed there.
    if (peer) options.steering?.have(name, peer);
    downloads++;
    track(
      sendFragment(store, name, call, throttle)
        .catch((error) => {
          if (peer) options.steering?.lost(name, peer);
          // A disk error: it fails this call only.
          call.end(internal(`Download of ${quote(name)}`, error, "Could not read the fragment"));
        })
        .finally(() => downloads--),
    );
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

  return { handlers: { ListFiles, Locate, Upload, Echo }, download: Download };
}

function toWireHolder(holder: Holder): WireHolder {
  return {
    host: holder.host,
    port: holder.port,
    grpc_port: holder.grpcPort,
    http_port: holder.httpPort,
    file_id: holder.fileId ?? "",
  };
}

/**
 * The id of the file holders were asked for: `file` when it is a whole id, else the one id the
 * holders all carry (a prefix or a name the directory resolved), else "" (not known).
 */
function askedFileId(file: string | undefined, holders: Holder[]): string {
  if (file !== undefined && SHA256_HEX.test(file)) return file;
  const ids = new Set(holders.map((holder) => holder.fileId));
  const [only] = ids;
  return ids.size === 1 && only !== undefined && SHA256_HEX.test(only) ? only : "";
}

/** Streams fragment `name`: the first chunk carries size and sha256, none is over 1 MiB. */
async function sendFragment(
  store: Store,
  name: string,
  call: DownloadCall,
  throttle?: ReturnType<typeof createThrottle>,
): Promise<void> {
  // A fragment the peer fetched after this process started is in the folder, not yet held here.
  const opened = await store.open(name) ??
    (await store.adopt(name) ? await store.open(name) : undefined);
  if (!opened) {
    call.end({ code: grpc.status.NOT_FOUND, details: `No fragment ${quote(name)} here` });
    return;
  }
  using file = opened.file;
  const { size, sha256 } = opened.info;
  call.accept();
  // A cancelled call may never run the callbacks of its queued writes: stop waiting for them.
  const { promise: whenCancelled, resolve: onCancelled } = Promise.withResolvers<void>();
  call.cancelled.addEventListener("abort", () => onCancelled(), { once: true });
  // Each message is read from the file straight into its encoded place in one of these buffers,
  // behind room for its head; a buffer is used again only once the stream called back for the
  // message it held, so the download allocates nothing per chunk.
  const spare = Array.from(
    { length: DOWNLOAD_WINDOW + 1 },
    () => new Uint8Array(CHUNK_HEAD_ROOM + Math.min(CHUNK_SIZE, size)),
  );
  // Writes complete in order; waiting on the oldest keeps at most DOWNLOAD_WINDOW queued.
  const pending: Promise<Uint8Array<ArrayBuffer>>[] = [];
  let sent = 0, first = true;
  while (!call.cancelled.aborted && (first || sent < size)) {
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
      call.end({ code: grpc.status.DATA_LOSS, details: `Fragment ${quote(name)} is short` });
      return;
    }
    if (throttle) await throttle(data.length, call.cancelled).catch(() => {}); // ends on cancel
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
  call.end();
}

// Room before a chunk's bytes for its encoded fields (83 bytes at most) and the message head (5).
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
  if (!isFragmentName(name) || name === store.manifest?.file) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid name ${quote(name)}`);
  }
  if (!Number.isSafeInteger(size) || size < 0 || size > MAX_UPLOAD_SIZE) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid size for ${quote(name)}`);
  }
  if (!SHA256_HEX.test(sha256)) {
    throw new UploadError(grpc.status.INVALID_ARGUMENT, `Invalid sha256 for ${quote(name)}`);
  }
  // With a manifest, only what it lists (TCP's fetchers store nothing else either); without one
  // (a viewer that has not learnt it yet), any valid name, kept only once its bytes match the hash.
  if (store.manifest && !store.expected(name)) {
    throw new UploadError(
      grpc.status.FAILED_PRECONDITION,
      `${quote(name)} is not a fragment of ${quote(store.manifest.file)}`,
    );
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
  // grpc-js refused a message itself (over max_receive_message_length) and already answered
  // RESOURCE_EXHAUSTED, which ends the stream early: the client's fault, not a disk error.
  const code = (error as { code?: unknown })?.code;
  if (code === grpc.status.RESOURCE_EXHAUSTED || code === "ERR_STREAM_PREMATURE_CLOSE") {
    return statusError(grpc.status.RESOURCE_EXHAUSTED, "Upload message too large");
  }
  return internal("Upload", error, "Could not store the fragment");
}

/** A disk error, logged here and answered INTERNAL, without leaking paths to a remote client. */
function internal(
  what: string,
  error: unknown,
  answer: string,
): CallStatus & Partial<grpc.ServiceError> {
  console.error(`[gRPC] ${what} failed: ${error}`);
  return { code: grpc.status.INTERNAL, details: answer, message: answer };
}
