/**
 * The gRPC server's own HTTP/2 port (peer/grpc_http2.ts): Download served on it, its status in
 * trailers, its budget and deadline; what a raw HTTP/2 client that breaks the protocol gets; and
 * the calls passed on to grpc-js, cancelled with their client.
 */
import { assert, assertEquals, assertRejects } from "./_assert.ts";
import { Buffer } from "node:buffer";
import http2 from "node:http2";
import { join } from "node:path";
import zlib from "node:zlib";
import * as grpc from "@grpc/grpc-js";
import { GrpcClient, type GrpcServerOptions, startGrpcServer } from "../peer_grpc.ts";
import { fileTransfer } from "../peer/grpc_wire.ts";
import { listenHttp2 } from "../peer/grpc_http2.ts";
import { Steering } from "../peer/steering.ts";
import { Store } from "../peer/store.ts";
import { PeerError } from "../peer/tcp.ts";
import { splitFile } from "../split.ts";
import { randomBytes, tempDir } from "./_util.ts";

/**
 * A store with the manifest of a 12 MiB file cut in 4 (3 MiB each, 3 chunks) and every fragment but
 * `without`.
 */
async function fullStore(root: string, without?: string): Promise<Store> {
  const input = join(root, "video.webm");
  const bytes = randomBytes(12 * 1024 * 1024);
  await Deno.writeFile(input, bytes);
  await splitFile(input, { out: join(root, "store"), fragments: 4 });
  if (without) await Deno.remove(join(root, "store", without));
  return await Store.open(join(root, "store"));
}

/** A grpc-js client of `address`, for what GrpcClient does not expose (deadlines, raw status). */
function rawClient(address: string, options: grpc.ChannelOptions = {}) {
  const FileTransfer = fileTransfer();
  return new FileTransfer(address, grpc.credentials.createInsecure(), options) as unknown as
    & grpc.Client
    & {
      Download(request: unknown, options?: grpc.CallOptions): grpc.ClientReadableStream<unknown>;
    };
}

/** The status a streaming call ends with, once its messages are read. */
function statusOf(call: grpc.ClientReadableStream<unknown>): Promise<grpc.StatusObject> {
  return new Promise((resolve) => {
    call.on("data", () => {});
    call.on("error", () => {}); // the status below says it
    call.on("status", resolve);
  });
}

/** Posts `body` to `path` over a raw HTTP/2 session; resolves with the headers and trailers. */
async function post(
  port: number,
  path: string,
  body: Uint8Array,
  headers: http2.OutgoingHttpHeaders = GRPC,
): Promise<Record<string, unknown>> {
  const session = http2.connect(`http://127.0.0.1:${port}`);
  try {
    const request = session.request({ ":method": "POST", ":path": path, ...headers });
    const answer: Record<string, unknown> = {};
    request.on("response", (received) => Object.assign(answer, received));
    request.on("trailers", (received) => Object.assign(answer, received));
    request.on("data", () => {});
    if (!request.writableEnded) request.end(body); // a GET ends on its own
    await new Promise((resolve, reject) => {
      request.on("close", resolve);
      request.on("error", reject);
    });
    return answer;
  } finally {
    session.close();
  }
}

/** Sends a CONNECT request (no path) over a raw HTTP/2 session; resolves with its :status. */
async function connect(port: number): Promise<unknown> {
  const session = http2.connect(`http://127.0.0.1:${port}`);
  try {
    const request = session.request({ ":method": "CONNECT", ":authority": "example.com:443" });
    request.on("error", () => {});
    return await new Promise((resolve) => {
      request.on("response", (headers) => resolve(headers[":status"]));
      request.on("close", () => resolve("closed without an answer"));
    });
  } finally {
    session.destroy();
  }
}

/** `message` behind a gRPC message head (flag `flag`). */
function framed(message: Uint8Array, flag = 0): Uint8Array {
  const bytes = Buffer.alloc(5 + message.length);
  bytes[0] = flag;
  bytes.writeUInt32BE(message.length, 1);
  bytes.set(message, 5);
  return bytes;
}

/** `promise`'s value, or `late` if `ms` pass first. */
async function within<T>(promise: Promise<T>, ms: number, late: string): Promise<T | string> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<string>((resolve) => timer = setTimeout(() => resolve(late), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/** A `DownloadRequest` for `name`, encoded (without its message head). */
function downloadRequest(name: string): Uint8Array {
  return fileTransfer().service.Download!.requestSerialize({ name });
}

/**
 * Asks the server on `port` for fragment_0.bin with `headers` and reads nothing: whether the
 * server closed the stream within 3 s, and with which code.
 */
async function unreadDownload(port: number, headers: http2.OutgoingHttpHeaders = {}) {
  const session = http2.connect(`http://127.0.0.1:${port}`);
  try {
    const stream = session.request({ ":method": "POST", ":path": DOWNLOAD, ...GRPC, ...headers });
    const closed = new Promise<string>((resolve) => stream.on("close", () => resolve("closed")));
    stream.end(framed(downloadRequest("fragment_0.bin")));
    stream.pause(); // reads nothing: its 64 KiB window fills, and the chunks queue at the server
    const outcome = await within(closed, 3000, "still open after 3 s");
    return { outcome, rstCode: stream.rstCode };
  } finally {
    session.close();
  }
}

const DOWNLOAD = "/p2p.FileTransfer/Download";
const GRPC = { "content-type": "application/grpc", te: "trailers" };

Deno.test("A busy seeder's Download points the requester at other holders, in a trailer", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path);
  const steering = new Steering(store);
  steering.have("fragment_0.bin", "10.0.0.9:50051"); // another peer holds fragment_0
  // 256 KiB/s: the first download stays in flight, so the server is busy.
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    steering,
    maxUpload: 256 * 1024,
  });
  const address = `127.0.0.1:${server.port}`;
  using client = new GrpcClient();
  const raw = rawClient(address);
  try {
    // Its first 1 MiB chunk waits 4 s for the throttle: the server is busy with it meanwhile.
    const busy = raw.Download({ name: "fragment_1.bin", peer: "10.0.0.1:6001" });
    const busyStatus = statusOf(busy);
    await taken(busy);
    const pointed = await assertRejects(
      () => client.download(address, "fragment_0.bin", { peer: "10.0.0.2:6002" }),
      PeerError,
    );
    assertEquals(pointed.code, "ELSEWHERE");
    assertEquals(pointed.elsewhere, ["10.0.0.9:50051"]);
    busy.cancel();
    await busyStatus;
  } finally {
    raw.close();
  }
});

/**
 * Resolves once the server took `call` (its response headers came: a Download sends them as it
 * begins); rejects with the status it was refused with instead.
 */
function taken(call: grpc.ClientReadableStream<unknown>): Promise<void> {
  return new Promise((resolve, reject) => {
    call.once("metadata", () => resolve());
    call.once("status", (status) => reject(new Error(`refused: ${status.code} ${status.details}`)));
  });
}

/** Whether the server takes a Download of `name` now; the call is cancelled either way. */
async function takesDownload(client: ReturnType<typeof rawClient>, name: string) {
  const call = client.Download({ name, peer: "" });
  const status = statusOf(call);
  const took = await taken(call).then(() => true, () => false);
  call.cancel();
  await status;
  return took;
}

/** Asserts that the server takes a Download again within 2 s: the place it had was freed. */
async function assertPlaceFreed(client: ReturnType<typeof rawClient>) {
  const deadline = Date.now() + 2000;
  while (!await takesDownload(client, "fragment_1.bin")) {
    assert(Date.now() <= deadline, "the place was still held 2 s on");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/**
 * A server of a full store with one download place (and `options`), and a raw client of it;
 * all of it closed and removed on dispose.
 */
async function oneSlotServer(options: GrpcServerOptions = {}) {
  const dir = await tempDir();
  try {
    const server = await startGrpcServer(await fullStore(dir.path), {
      port: 0,
      hostname: "127.0.0.1",
      maxDownloads: 1,
      ...options,
    });
    const client = rawClient(`127.0.0.1:${server.port}`);
    return {
      port: server.port,
      client,
      async [Symbol.asyncDispose]() {
        client.close();
        await server[Symbol.asyncDispose]();
        await dir[Symbol.asyncDispose]();
      },
    };
  } catch (error) {
    await dir[Symbol.asyncDispose]();
    throw error;
  }
}

// 128 KiB/s: the first 1 MiB chunk of a download waits about 7 s for the throttle, so a download
// that has begun holds its place that long unless its end is noticed at once.
const SLOW = 128 * 1024;

Deno.test("Downloads past maxDownloads are RESOURCE_EXHAUSTED; a cancelled one frees its place at once", async () => {
  await using server = await oneSlotServer({ maxUpload: SLOW });
  const { client } = server;
  const first = client.Download({ name: "fragment_0.bin", peer: "" });
  const firstStatus = statusOf(first);
  await taken(first);
  assertEquals(await takesDownload(client, "fragment_1.bin"), false);
  first.cancel();
  await firstStatus;
  await assertPlaceFreed(client);
});

Deno.test("A Download past its grpc-timeout ends DEADLINE_EXCEEDED from the server and frees its place", async () => {
  await using server = await oneSlotServer({ maxUpload: SLOW });
  const request = downloadRequest("fragment_0.bin");
  // A raw client, which waits for the server's answer rather than cancelling on its own.
  const answer = await post(server.port, DOWNLOAD, framed(request), {
    ...GRPC,
    "grpc-timeout": "300m",
  });
  assertEquals(answer["grpc-status"], String(grpc.status.DEADLINE_EXCEEDED));
  await assertPlaceFreed(server.client);
});

Deno.test("A Download whose client stopped reading is cut at its deadline and frees its place", async () => {
  await using server = await oneSlotServer();
  const { outcome, rstCode } = await unreadDownload(server.port, { "grpc-timeout": "300m" });
  assertEquals([outcome, rstCode], ["closed", http2.constants.NGHTTP2_CANCEL]);
  await assertPlaceFreed(server.client);
});

Deno.test("A Download whose client reads nothing is cut after the stall time, deadline or not", async () => {
  await using server = await oneSlotServer({ stallTimeoutMs: 300 });
  const { outcome } = await unreadDownload(server.port); // and says no deadline
  assertEquals(outcome, "closed");
  await assertPlaceFreed(server.client);
});

Deno.test("A call passed on that grpc-js resets after its headers ends UNAVAILABLE, in trailers", async () => {
  // Stands in for grpc-js: answers headers and a message, then resets the stream.
  const upstream = http2.createServer();
  upstream.on("stream", (stream: http2.ServerHttp2Stream) => {
    stream.respond({ ":status": 200, "content-type": "application/grpc" });
    stream.write(framed(new Uint8Array([0x0a, 0x01, 0x61])));
    setTimeout(() => stream.close(http2.constants.NGHTTP2_CANCEL), 50);
  });
  await new Promise<void>((resolve) => upstream.listen(0, "127.0.0.1", resolve));
  const port = await listenHttp2({
    port: 0,
    hostname: "127.0.0.1",
    upstreamPort: (upstream.address() as { port: number }).port,
    download: () => {},
    decodeRequest: () => ({ name: "", peer: "" }),
  });
  try {
    const answer = await post(port.port, "/p2p.FileTransfer/Echo", framed(new Uint8Array()));
    assertEquals([answer[":status"], answer["grpc-status"]], [
      200,
      String(grpc.status.UNAVAILABLE),
    ]);
  } finally {
    await port.close();
    await new Promise((resolve) => upstream.close(resolve));
  }
});

Deno.test("A raw HTTP/2 client that breaks the gRPC protocol gets a clear status, and the port goes on", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const request = downloadRequest("fragment_0.bin");
  const cases: [string, () => Promise<Record<string, unknown>>, string][] = [
    ["not gRPC", () => post(server.port, DOWNLOAD, request, { "content-type": "text/plain" }), ""],
    // Past 4 KiB, but within the 64 KiB a client may send before the server reads (the answer
    // and RST_STREAM(NO_ERROR) reach a client blocked past it too, but Deno's never closes).
    ["too large", () => post(server.port, DOWNLOAD, new Uint8Array(10_000)), "8"],
    ["no message head", () => post(server.port, DOWNLOAD, request), "12"],
    [
      "two messages",
      () =>
        post(
          server.port,
          DOWNLOAD,
          new Uint8Array([...framed(request), ...framed(request)]),
        ),
      "12",
    ],
    ["compressed, no grpc-encoding", () => post(server.port, DOWNLOAD, framed(request, 1)), "13"],
    [
      "compressed, unknown grpc-encoding",
      () => post(server.port, DOWNLOAD, framed(request, 1), { ...GRPC, "grpc-encoding": "br" }),
      "12",
    ],
    [
      "a gzip bomb",
      () =>
        post(server.port, DOWNLOAD, framed(zlib.gzipSync(new Uint8Array(1e6)), 1), {
          ...GRPC,
          "grpc-encoding": "gzip",
        }),
      "8",
    ],
    [
      "not gzip",
      () => post(server.port, DOWNLOAD, framed(request, 1), { ...GRPC, "grpc-encoding": "gzip" }),
      "13",
    ],
    [
      "not the proto",
      () => post(server.port, DOWNLOAD, framed(new Uint8Array([0x0a, 0xff]))),
      "13",
    ],
  ];
  for (const [what, send, status] of cases) {
    const answer = await send();
    if (status === "") assertEquals(answer[":status"], 415, what);
    else assertEquals([answer[":status"], answer["grpc-status"]], [200, status], what);
  }
  // Not a POST: a GET, and a CONNECT (which has no path, and once ended the process).
  assertEquals(
    (await post(server.port, DOWNLOAD, new Uint8Array(), { ":method": "GET" }))[":status"],
    405,
  );
  assertEquals(
    (await post(server.port, "/p2p.FileTransfer/Echo", new Uint8Array(), { ":method": "GET" }))[
      ":status"
    ],
    405,
  );
  assertEquals(await connect(server.port), 405);
  using client = new GrpcClient();
  const { size } = await client.download(`127.0.0.1:${server.port}`, "fragment_0.bin");
  assertEquals(size, 3 * 1024 * 1024);
});

Deno.test("A Download request that does not arrive whole in time is DEADLINE_EXCEEDED", async () => {
  let served = 0;
  const port = await listenHttp2({
    port: 0,
    hostname: "127.0.0.1",
    upstreamPort: 9, // nothing is passed on here
    download: () => served++,
    decodeRequest: () => ({ name: "fragment_0.bin", peer: "" }),
    requestTimeoutMs: 200,
  });
  const session = http2.connect(`http://127.0.0.1:${port.port}`);
  try {
    const request = session.request({ ":method": "POST", ":path": DOWNLOAD, ...GRPC });
    request.write(new Uint8Array([0, 0, 0, 0, 9, 0x0a])); // a head and one byte of nine, then nothing
    const status = await within(
      new Promise((resolve) => request.on("response", (h) => resolve(h["grpc-status"]))),
      3000,
      "no answer in 3 s",
    );
    assertEquals([status, served], [String(grpc.status.DEADLINE_EXCEEDED), 0]);
    request.close();
  } finally {
    session.close();
    await port.close();
  }
});

Deno.test("A Download request a client compressed (gzip) is served", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const client = rawClient(`127.0.0.1:${server.port}`, {
    "grpc.default_compression_algorithm": grpc.compressionAlgorithms.gzip,
  });
  try {
    const call = client.Download({ name: "fragment_3.bin", peer: "" });
    let bytes = 0;
    call.on("data", (chunk: { data: Uint8Array }) => bytes += chunk.data.length);
    const status = await statusOf(call);
    assertEquals([status.code, bytes], [grpc.status.OK, 3 * 1024 * 1024]);
  } finally {
    client.close();
  }
});

Deno.test("A raw gzip-compressed Download request is served", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const request = downloadRequest("fragment_2.bin");
  const answer = await post(server.port, DOWNLOAD, framed(zlib.gzipSync(request), 1), {
    ...GRPC,
    "grpc-encoding": "gzip",
  });
  assertEquals([answer[":status"], answer["grpc-status"]], [200, "0"]);
});

Deno.test("A call passed on that grpc-js answers early is closed, though its client goes on sending", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path, "fragment_2.bin");
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const refused = fileTransfer().service.Upload!.requestSerialize({
    name: "../escape.bin", // refused at its first message
    size: 1024,
    sha256: "0".repeat(64),
    data: new Uint8Array(16),
  });
  const session = http2.connect(`http://127.0.0.1:${server.port}`);
  try {
    const stream = session.request({
      ":method": "POST",
      ":path": "/p2p.FileTransfer/Upload",
      ...GRPC,
    });
    const answer: Record<string, unknown> = {};
    stream.on("response", (headers) => Object.assign(answer, headers));
    stream.on("trailers", (headers) => Object.assign(answer, headers));
    stream.on("data", () => {});
    stream.on("error", () => {});
    const closed = new Promise((resolve) => stream.on("close", () => resolve("closed")));
    stream.write(framed(refused)); // and never ends its side
    const outcome = await within(closed, 3000, "still open after 3 s");
    assertEquals([outcome, answer["grpc-status"]], [
      "closed",
      String(grpc.status.INVALID_ARGUMENT),
    ]);
  } finally {
    session.destroy();
  }
});

Deno.test("An Upload passed on to grpc-js and cut off by its client leaves no temporary file", async () => {
  await using dir = await tempDir();
  const store = await fullStore(dir.path, "fragment_2.bin");
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const info = store.manifest!.fragments.find((fragment) => fragment.name === "fragment_2.bin")!;
  const client = rawClient(`127.0.0.1:${server.port}`) as unknown as {
    Upload(callback: () => void): grpc.ClientWritableStream<unknown>;
    close(): void;
  };
  try {
    const call = client.Upload(() => {});
    call.write({
      name: info.name,
      size: info.size,
      sha256: info.sha256,
      data: new Uint8Array(1000),
    });
    // Wait until grpc-js's handler has begun the temporary file, then hang up.
    const deadline = Date.now() + 5000;
    while (!(await temporaries(store.dir)).length) {
      assert(Date.now() < deadline, "the upload never began a temporary file");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    call.cancel();
    while ((await temporaries(store.dir)).length) {
      assert(Date.now() < deadline + 5000, "the cancelled upload left its temporary file");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  } finally {
    client.close();
  }
});

/** The temporary files in `dir` (an upload in progress). */
async function temporaries(dir: string): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    if (entry.name.startsWith(".part-")) names.push(entry.name);
  }
  return names;
}
