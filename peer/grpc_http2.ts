/**
 * The gRPC server's own HTTP/2 port: `p2p.FileTransfer/Download` is served here, straight onto
 * the HTTP/2 stream, and every other call is passed on to grpc-js on a loopback port. Why:
 * grpc-js copies each message it sends into a fresh buffer behind its 5-byte head (grpc-node has
 * no way around it: grpc/grpc-node#2652 asked and was closed), which for a Download means a fresh
 * MiB and a copy of it per chunk. Here each chunk is read from the file into a reused buffer that
 * already has room for its head, and written as it is. The calls passed on (Upload, ListFiles,
 * Locate, Echo, health, reflection) cross this port unchanged: headers, messages and trailers.
 * @module
 */
import { Buffer } from "node:buffer";
import http2 from "node:http2";
import zlib from "node:zlib";
import * as grpc from "@grpc/grpc-js";

// The path of the one call served here; the others go to grpc-js.
const DOWNLOAD_PATH = "/p2p.FileTransfer/Download";
// A gRPC message's head: a compressed flag, then the length (32-bit big-endian).
const MESSAGE_HEAD = 5;
// A Download request is a name (200 bytes at most) and a peer's address: 4 KiB is ample, and
// what waits for a request is held per stream, up to 100 streams a connection.
const MAX_REQUEST = 4 * 1024;
const REQUEST_TIMEOUT_MS = 10_000;
// A Download whose client reads nothing for this long is cut, as the TCP server cuts one.
const STALL_TIMEOUT_MS = 60_000;
// Calls at once on one connection (the front caps the connections: 256, 64 per address).
const MAX_STREAMS = 100;
// setTimeout fires at once past this; a deadline further off is no deadline.
const MAX_TIMER_MS = 2 ** 31 - 1;
const GRPC_CONTENT_TYPE = /^application\/grpc(\+|;|$)/;
const { HTTP2_HEADER_STATUS, NGHTTP2_CANCEL, NGHTTP2_INTERNAL_ERROR, NGHTTP2_NO_ERROR } =
  http2.constants;
// A compressed request message, as gRPC clients may send one; never inflated past MAX_REQUEST.
const INFLATE: Record<string, (bytes: Buffer) => Buffer> = {
  gzip: (bytes) => zlib.gunzipSync(bytes, { maxOutputLength: MAX_REQUEST }),
  deflate: (bytes) => zlib.inflateSync(bytes, { maxOutputLength: MAX_REQUEST }),
};

/** A finished call's status, as the trailers carry it. */
export interface CallStatus {
  code: grpc.status;
  details: string;
  /** More trailers, e.g. where else a fragment is held. */
  trailers?: Record<string, string>;
}

/** A Download as its handler sees it: the request, and the stream its messages go to. */
export interface DownloadCall {
  readonly request: { name: string; peer: string };
  /** Aborted when the client cancelled or went away, or the call's deadline passed. */
  readonly cancelled: AbortSignal;
  /** Sends the response headers: the call is taken, its messages follow. */
  accept(): void;
  /**
   * Sends `message`, a gRPC message with MESSAGE_HEAD bytes of room before it in its buffer
   * (written there); `sent` runs once the buffer may be used again.
   */
  write(message: Uint8Array, sent: () => void): void;
  /** Ends the call with `status` (OK when omitted). */
  end(status?: CallStatus): void;
}

/** What {@link listenHttp2} serves on. */
export interface Http2Options {
  port: number;
  hostname: string;
  /** The loopback port grpc-js serves the other calls on. */
  upstreamPort: number;
  /** Serves one Download. */
  download: (call: DownloadCall) => void;
  /** How long a Download's request may take to arrive whole. @default 10_000 */
  requestTimeoutMs?: number;
  /** How long a Download's client may read nothing while chunks wait for it. @default 60_000 */
  stallTimeoutMs?: number;
  /** Decodes a request message (throws when it cannot), e.g. the proto's deserializer. */
  decodeRequest: (bytes: Buffer) => { name: string; peer: string };
}

/** The running port. */
export interface Http2Port {
  readonly port: number;
  /** Stops listening and closes every session, which cancels the calls in flight. */
  close(): Promise<void>;
}

/** Listens on `options.port`; rejects as `listen` does (EADDRINUSE...). */
export async function listenHttp2(options: Http2Options): Promise<Http2Port> {
  const server = http2.createServer({ settings: { maxConcurrentStreams: MAX_STREAMS } });
  const sessions = new Set<http2.ServerHttp2Session>();
  let upstream: http2.ClientHttp2Session | undefined;
  /** The session to grpc-js, made again when the last one closed. */
  function upstreamSession(): http2.ClientHttp2Session {
    if (upstream && !upstream.closed && !upstream.destroyed) return upstream;
    const session = http2.connect(`http://127.0.0.1:${options.upstreamPort}`);
    session.on("error", () => {}); // each call passed on fails on its own stream
    session.on("close", () => upstream === session && (upstream = undefined));
    return upstream = session;
  }
  server.on("session", (session: http2.ServerHttp2Session) => {
    sessions.add(session);
    session.on("error", () => {}); // a client that broke the protocol: its streams close
    session.on("close", () => sessions.delete(session));
  });
  server.on("stream", (stream: http2.ServerHttp2Stream, headers) => {
    stream.on("error", () => {}); // a client that went away: its call ends with the stream
    try {
      // gRPC is a POST of application/grpc; anything else (a CONNECT, a browser) is not passed on.
      const refusal = headers[":method"] !== "POST"
        ? 405
        : GRPC_CONTENT_TYPE.test(String(headers["content-type"]))
        ? undefined
        : 415;
      if (refusal) {
        stream.respond({ [HTTP2_HEADER_STATUS]: refusal }, { endStream: true });
        stopReading(stream);
      } else if (headers[":path"] === DOWNLOAD_PATH) serveDownload(stream, headers, options);
      else passOn(stream, headers, upstreamSession);
    } catch (error) {
      // One odd stream must not end the process, and every call in it.
      console.error(`[gRPC] Cannot answer a stream: ${error}`);
      if (!stream.closed) stream.close(NGHTTP2_INTERNAL_ERROR);
    }
  });
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(options.port, options.hostname, () => {
      server.off("error", reject);
      resolve();
    });
  });
  const port = (server.address() as { port: number }).port;
  let closing: Promise<void> | undefined;
  function close() {
    closing ??= new Promise<void>((resolve) => {
      server.close(() => resolve());
      for (const session of sessions) session.destroy();
      upstream?.destroy();
    });
    return closing;
  }
  return { port, close };
}

/**
 * Tells a client still sending that its answer is complete and it may stop (RST_STREAM NO_ERROR,
 * RFC 9113 §8.1), so a stream answered early does not sit open with what it goes on sending.
 */
function stopReading(stream: http2.ServerHttp2Stream) {
  if (!stream.closed && !stream.readableEnded) stream.close(NGHTTP2_NO_ERROR);
}

/** Reads a Download's one request message, then hands the call to `options.download`. */
function serveDownload(
  stream: http2.ServerHttp2Stream,
  headers: http2.IncomingHttpHeaders,
  options: Http2Options,
) {
  const call = new StreamCall(
    stream,
    deadlineMs(headers["grpc-timeout"]),
    options.stallTimeoutMs ?? STALL_TIMEOUT_MS,
  );
  // A request is one small message: a client that does not finish it soon is not waited for.
  const timer = setTimeout(() => {
    call.end({ code: grpc.status.DEADLINE_EXCEEDED, details: "No whole request in time" });
  }, options.requestTimeoutMs ?? REQUEST_TIMEOUT_MS);
  stream.on("close", () => clearTimeout(timer));
  const received: Buffer[] = [];
  let length = 0;
  stream.on("data", (data: Buffer) => {
    if (length > MAX_REQUEST) return; // answered already
    length += data.length;
    received.push(data);
    if (length > MAX_REQUEST) {
      received.length = 0;
      call.end({ code: grpc.status.RESOURCE_EXHAUSTED, details: "Request too large" });
    }
  });
  stream.on("end", () => {
    clearTimeout(timer);
    if (call.ended) return;
    const message = requestMessage(Buffer.concat(received), headers["grpc-encoding"]);
    if ("code" in message) return call.end(message);
    try {
      call.received(options.decodeRequest(message));
    } catch {
      return call.end({ code: grpc.status.INTERNAL, details: "Cannot decode the request" });
    }
    try {
      options.download(call);
    } catch (error) { // a bug in the handler fails its call, not the process
      console.error(`[gRPC] Download failed: ${error}`);
      call.end({ code: grpc.status.INTERNAL, details: "Download failed" });
    }
  });
}

/** The one message a request `body` holds, inflated; or the status that refuses it. */
function requestMessage(body: Buffer, encoding: unknown): Buffer | CallStatus {
  const length = body.length >= MESSAGE_HEAD ? body.readUInt32BE(1) : -1;
  if (length !== body.length - MESSAGE_HEAD) {
    return { code: grpc.status.UNIMPLEMENTED, details: "Expected one request message" };
  }
  const message = body.subarray(MESSAGE_HEAD);
  if (body[0] === 0) return message;
  // Compressed (flag 1) needs a grpc-encoding that says how; any other flag is malformed.
  const name = String(encoding ?? "identity");
  if (body[0] !== 1 || name === "identity") {
    return { code: grpc.status.INTERNAL, details: "Malformed message flag" };
  }
  const inflate = INFLATE[name];
  if (!inflate) {
    const details = `Unsupported grpc-encoding ${JSON.stringify(name.slice(0, 64))}`;
    return { code: grpc.status.UNIMPLEMENTED, details };
  }
  try {
    return inflate(message);
  } catch (error) {
    return (error as { code?: string }).code === "ERR_BUFFER_TOO_LARGE" // past MAX_REQUEST
      ? { code: grpc.status.RESOURCE_EXHAUSTED, details: "Request too large" }
      : { code: grpc.status.INTERNAL, details: "Cannot decompress the request" };
  }
}

/** A {@link DownloadCall} on one HTTP/2 stream. */
class StreamCall implements DownloadCall {
  readonly #stream: http2.ServerHttp2Stream;
  readonly #cancel = new AbortController();
  #request = { name: "", peer: "" };
  #responded = false;
  #ended = false;
  #trailers: Record<string, string> = {};
  readonly #stallMs: number;
  #writing = 0; // writes not yet called back
  #stall: ReturnType<typeof setTimeout> | undefined;

  /**
   * A call on `stream` whose client gives up after `deadlineMs`, when it says, and which is cut
   * when its client reads nothing for `stallMs` while chunks wait.
   */
  constructor(stream: http2.ServerHttp2Stream, deadlineMs: number | undefined, stallMs: number) {
    this.#stream = stream;
    this.#stallMs = stallMs;
    stream.on("close", () => {
      clearTimeout(this.#stall);
      if (!this.#ended) this.#cancel.abort();
    });
    stream.on("wantTrailers", () => stream.sendTrailers(this.#trailers));
    if (deadlineMs === undefined) return;
    const timer = setTimeout(() => {
      // Chunks still queued would hold the status behind them for a client that stopped
      // reading: drop them, as its own deadline has passed too.
      if (stream.writableLength > 0) stream.close(NGHTTP2_CANCEL);
      else this.end({ code: grpc.status.DEADLINE_EXCEEDED, details: "Deadline exceeded" });
      this.#cancel.abort();
    }, deadlineMs);
    stream.on("close", () => clearTimeout(timer));
  }

  get request(): { name: string; peer: string } {
    return this.#request;
  }

  get cancelled(): AbortSignal {
    return this.#cancel.signal;
  }

  /** Whether the call has its status already. */
  get ended(): boolean {
    return this.#ended;
  }

  /** The request, once read whole. */
  received(request: { name: string; peer: string }): void {
    this.#request = request;
  }

  accept(): void {
    if (this.#responded || this.#ended || this.#stream.closed) return;
    this.#responded = true;
    this.#stream.respond(responseHeaders(), { waitForTrailers: true });
  }

  write(message: Uint8Array, sent: () => void): void {
    if (this.#ended || this.#stream.closed) return sent();
    if (message.byteOffset < MESSAGE_HEAD) throw new RangeError("No room for the message head");
    const framed = Buffer.from(
      message.buffer,
      message.byteOffset - MESSAGE_HEAD,
      message.length + MESSAGE_HEAD,
    );
    framed[0] = 0; // not compressed
    framed.writeUInt32BE(message.length, 1);
    this.accept();
    this.#writing++;
    this.#watchStall();
    this.#stream.write(framed, () => {
      this.#writing--;
      this.#watchStall();
      sent();
    });
  }

  /** While writes wait, one must be called back within the stall time, or the call is cut. */
  #watchStall() {
    clearTimeout(this.#stall);
    if (this.#writing === 0 || this.#stream.closed) return;
    this.#stall = setTimeout(() => {
      this.#stream.close(NGHTTP2_CANCEL);
      this.#cancel.abort();
    }, this.#stallMs);
  }

  end(status: CallStatus = { code: grpc.status.OK, details: "" }): void {
    if (this.#ended) return;
    this.#ended = true;
    if (this.#stream.closed) return;
    const trailers = {
      ...status.trailers,
      "grpc-status": String(status.code),
      "grpc-message": encodeMessage(status.details),
    };
    if (this.#responded) {
      this.#trailers = trailers;
      this.#stream.end();
    } else { // nothing sent yet: one HEADERS frame carries the status ("trailers-only")
      this.#responded = true;
      this.#stream.respond({ ...responseHeaders(), ...trailers }, { endStream: true });
      stopReading(this.#stream);
    }
  }
}

function responseHeaders(): http2.OutgoingHttpHeaders {
  return {
    [HTTP2_HEADER_STATUS]: 200,
    "content-type": "application/grpc+proto",
    "grpc-accept-encoding": "identity,deflate,gzip",
  };
}

/** A `grpc-timeout` header ("100m", "5S"...) in milliseconds; undefined when absent or bad. */
function deadlineMs(header: string | string[] | undefined): number | undefined {
  const match = typeof header === "string" ? header.match(/^(\d{1,8})([HMSmun])$/) : null;
  if (!match) return undefined;
  const unitMs = { H: 3_600_000, M: 60_000, S: 1000, m: 1, u: 1e-3, n: 1e-6 }[match[2]!]!;
  const ms = Number(match[1]) * unitMs;
  return ms <= MAX_TIMER_MS ? ms : undefined;
}

/** `grpc-message` as the gRPC spec has it: percent-encoded UTF-8 outside printable ASCII. */
function encodeMessage(details: string): string {
  return Array.from(
    new TextEncoder().encode(details),
    (byte) =>
      byte >= 0x20 && byte <= 0x7e && byte !== 0x25
        ? String.fromCharCode(byte)
        : `%${byte.toString(16).toUpperCase().padStart(2, "0")}`,
  ).join("");
}

/**
 * Passes one call on to grpc-js and its answer back, unchanged: headers, messages both ways, and
 * trailers; a cancel on either side cancels the other.
 */
function passOn(
  stream: http2.ServerHttp2Stream,
  headers: http2.IncomingHttpHeaders,
  session: () => http2.ClientHttp2Session,
) {
  const outgoing: http2.OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) {
    if (name !== ":authority" && name !== ":scheme") outgoing[name] = value;
  }
  let request: http2.ClientHttp2Stream;
  try {
    request = session().request(outgoing);
  } catch {
    return unavailable(stream);
  }
  request.on("error", () => {}); // its close below ends the client's stream
  stream.pipe(request);
  let upstreamHeaders: http2.IncomingHttpHeaders | undefined;
  let trailers: http2.IncomingHttpHeaders | undefined;
  let finished = false;
  // Deno 2.9.6's client can emit a message's data before the headers it came after: held here.
  const early: Buffer[] = [];
  const send = (data: Buffer) => {
    if (!stream.write(data)) request.pause();
  };
  const respond = () => {
    if (!upstreamHeaders || stream.headersSent || stream.closed) return;
    stream.respond(withoutPseudo(upstreamHeaders, true), { waitForTrailers: true });
    early.splice(0).forEach(send);
  };
  /** Ends the client's stream once grpc-js's answer has come whole: messages and status. */
  const finish = () => {
    if (finished || stream.closed || !request.readableEnded || !upstreamHeaders) return;
    const trailersOnly = !stream.headersSent && upstreamHeaders["grpc-status"] !== undefined;
    if (!trailers && !trailersOnly) return; // its trailers are still to come
    finished = true;
    if (trailersOnly) { // a status and no message: one HEADERS frame, as grpc-js sent it
      stream.respond(withoutPseudo(upstreamHeaders, true), { endStream: true });
      stopReading(stream);
    } else {
      respond();
      stream.end(); // the trailers follow (wantTrailers)
    }
  };
  stream.on("wantTrailers", () => {
    stream.sendTrailers(withoutPseudo(trailers ?? {}));
    stopReading(stream);
  });
  request.on("response", (received) => {
    upstreamHeaders = received;
    if (early.length > 0) respond();
    finish(); // in case its end came first
  });
  request.on("data", (data: Buffer) => {
    if (!upstreamHeaders) early.push(data);
    else {
      respond();
      send(data);
    }
  });
  stream.on("drain", () => request.resume());
  request.on("trailers", (received) => {
    trailers = received;
    finish();
  });
  request.on("end", finish);
  // Closed before its answer came whole: grpc-js reset it, or went away. (Deno's client says
  // rstCode 0 whatever the reset's code, so the client is told UNAVAILABLE, in a status.)
  request.on("close", () => {
    if (finished || stream.closed) return;
    finished = true;
    if (!stream.headersSent) return unavailable(stream);
    trailers = unavailableStatus();
    stream.end(); // the trailers follow (wantTrailers)
  });
  stream.on("close", () => {
    if (!request.closed) request.close(NGHTTP2_CANCEL);
  });
}

/** Answers, with no message, a call grpc-js could not take (it is restarting or gone). */
function unavailable(stream: http2.ServerHttp2Stream) {
  if (stream.closed || stream.headersSent) return;
  stream.respond({ ...responseHeaders(), ...unavailableStatus() }, { endStream: true });
  stopReading(stream);
}

/** UNAVAILABLE, which clients may retry. */
function unavailableStatus(): Record<string, string> {
  return {
    "grpc-status": String(grpc.status.UNAVAILABLE),
    "grpc-message": "The server dropped the call",
  };
}

/** Headers to send on: without the pseudo-headers, but for `:status` when `status`. */
function withoutPseudo(
  headers: http2.IncomingHttpHeaders,
  status = false,
): http2.OutgoingHttpHeaders {
  const kept: http2.OutgoingHttpHeaders = {};
  for (const [name, value] of Object.entries(headers)) {
    if (!name.startsWith(":") || (status && name === HTTP2_HEADER_STATUS)) kept[name] = value;
  }
  return kept;
}
