/**
 * A 100 MiB fragment over gRPC, from a peer's supervised gRPC server to a client that writes it
 * through Store.write (so it is verified), beside a raw Deno TCP copy of the same file (a 1 MiB
 * read/write loop from another process into a file), measured in the same run. Each side runs
 * ROUNDS times, alternating, after a first round that is not counted (JIT, page cache and the
 * HTTP/2 window all start cold, and that round ran 1.5-2.5x the others); the median counts; the
 * ratio to the raw copy is printed.
 *
 * The target is a share (0.8x) of what this runtime allows any gRPC at all (as split_bench
 * measures its ceiling): the same 100 MiB over a bare `node:http2` stream, no gRPC in between (a child
 * writes the file in 1 MiB writes; this process regroups the DATA into 1 MiB pieces, the one copy
 * any gRPC decoder makes, and feeds them to Store.write), asking for the largest frames and the
 * same 8 MiB window the gRPC client asks for. It also prints the largest DATA chunk the client
 * got (Deno 2.9.6's nghttp2 binding sends at most 16 KiB per DATA frame, whatever
 * SETTINGS_MAX_FRAME_SIZE says, so each MiB costs 64 frames and as many callbacks into
 * JavaScript), and the CPU time the two processes spend per copy: with N cores, a copy cannot
 * take less than 1/N of it (this machine has 2).
 * @module
 */
import { createHash } from "node:crypto";
import http2 from "node:http2";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { GrpcClient, superviseGrpcServer } from "../peer_grpc.ts";
import { Store } from "../peer/store.ts";
import { cpuSeconds, peakRssMiB, printTable, ratio } from "./_report.ts";

const SIZE = 100 * 1024 * 1024;
const ROUNDS = 9;
/**
 * gRPC must reach this share of what a bare HTTP/2 stream reaches in the same run: a target on
 * the ratio to a raw TCP copy alone would pass or fail with the runtime's HTTP/2, not with our code.
 */
const MIN_SHARE = 0.8;
const CHUNK = 1024 * 1024;
const NAME = "fragment_0.bin";
const SELF = fileURLToPath(import.meta.url);
// The bare HTTP/2 stream asks for the most HTTP/2 allows, and the gRPC client's receive window.
const H2_MAX_FRAME = 2 ** 24 - 1;
const H2_WINDOW = 8 * 1024 * 1024;

/** One copy: how long it took, and the CPU time this process and the server spent on it. */
interface Copy {
  seconds: number;
  cpuMs: number;
}

/** Writes `size` random-looking bytes to `path`; returns their SHA-256. */
async function makeFragment(path: string, size: number): Promise<string> {
  using file = await Deno.open(path, { write: true, createNew: true });
  const hash = createHash("sha256");
  const chunk = crypto.getRandomValues(new Uint8Array(65536));
  const block = new Uint8Array(CHUNK);
  for (let i = 0; i < CHUNK; i += chunk.length) block.set(chunk, i);
  for (let written = 0, n = 0; written < size; written += CHUNK, n++) {
    new DataView(block.buffer).setUint32(0, n); // no two blocks alike
    const bytes = block.subarray(0, Math.min(CHUNK, size - written));
    hash.update(bytes);
    await file.write(bytes);
  }
  return hash.digest("hex");
}

/** Child mode: serve `path` to each connection with a 1 MiB read/write loop; print the port. */
async function rawServer(path: string) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  console.log(`PORT ${(listener.addr as Deno.NetAddr).port}`);
  const buffer = new Uint8Array(CHUNK);
  for await (const conn of listener) {
    using file = await Deno.open(path);
    for (let n; (n = await file.read(buffer)) !== null;) {
      for (let sent = 0; sent < n;) sent += await conn.write(buffer.subarray(sent, n));
    }
    conn.close();
  }
}

/** Child mode: answer each HTTP/2 request with `path`, in 1 MiB writes; print the port. */
function h2Server(path: string) {
  const server = http2.createServer({
    settings: { maxFrameSize: H2_MAX_FRAME, initialWindowSize: H2_WINDOW },
  });
  server.on("stream", async (stream: http2.ServerHttp2Stream) => {
    stream.on("error", () => {}); // a client that went away: nothing to answer
    stream.respond({ ":status": 200 });
    using file = await Deno.open(path);
    for (;;) {
      const buffer = new Uint8Array(CHUNK); // a fresh one: the stream may hold it a while
      const n = await file.read(buffer);
      if (n === null) break;
      if (!stream.write(buffer.subarray(0, n))) {
        await new Promise((resolve) => stream.once("drain", resolve));
      }
    }
    stream.end();
  });
  server.listen(0, "127.0.0.1", () => {
    console.log(`PORT ${(server.address() as { port: number }).port}`);
  });
}

/** Copies what the raw server sends into `path` with a 1 MiB read/write loop. */
async function rawCopy(port: number, path: string): Promise<number> {
  const start = performance.now();
  using conn = await Deno.connect({ hostname: "127.0.0.1", port });
  using file = await Deno.open(path, { write: true, create: true, truncate: true });
  const buffer = new Uint8Array(CHUNK);
  let total = 0;
  for (let n; (n = await conn.read(buffer)) !== null;) {
    for (let written = 0; written < n;) written += await file.write(buffer.subarray(written, n));
    total += n;
  }
  if (total !== SIZE) throw new Error(`Raw copy got ${total} bytes, not ${SIZE}`);
  return (performance.now() - start) / 1000;
}

/** Downloads the fragment over gRPC into a fresh store, verified by Store.write. */
async function grpcCopy(client: GrpcClient, address: string, dir: string): Promise<number> {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  const store = await Store.open(dir);
  const start = performance.now();
  const { size, sha256, chunks } = await client.download(address, NAME);
  await store.write(NAME, { size, sha256 }, chunks);
  return (performance.now() - start) / 1000;
}

/**
 * Fetches the fragment over a bare HTTP/2 stream into a fresh store, verified by Store.write;
 * `stats.largestData` keeps the largest DATA chunk seen.
 */
async function h2Copy(
  session: http2.ClientHttp2Session,
  expected: { size: number; sha256: string },
  dir: string,
  stats: { largestData: number },
): Promise<number> {
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  const store = await Store.open(dir);
  const start = performance.now();
  const request = session.request({ ":path": `/${NAME}` });
  await store.write(NAME, expected, regroup(request, stats));
  return (performance.now() - start) / 1000;
}

/** The stream's DATA in pieces of CHUNK bytes (the last one shorter), as a gRPC decoder does. */
async function* regroup(
  request: http2.ClientHttp2Stream,
  stats: { largestData: number },
): AsyncGenerator<Uint8Array> {
  const ready: Uint8Array[] = [];
  let piece = new Uint8Array(CHUNK), filled = 0;
  let ended = false, failure: unknown;
  let wake = () => {};
  request.on("data", (data: Uint8Array) => {
    stats.largestData = Math.max(stats.largestData, data.length);
    for (let offset = 0; offset < data.length;) {
      const n = Math.min(CHUNK - filled, data.length - offset);
      piece.set(data.subarray(offset, offset + n), filled);
      filled += n;
      offset += n;
      if (filled === CHUNK) {
        ready.push(piece);
        piece = new Uint8Array(CHUNK);
        filled = 0;
      }
    }
    wake();
  });
  request.on("end", () => {
    if (filled > 0) ready.push(piece.subarray(0, filled));
    ended = true;
    wake();
  });
  request.on("error", (error) => {
    failure = error;
    wake();
  });
  try {
    for (;;) {
      if (failure) throw failure;
      const next = ready.shift();
      if (next) yield next;
      else if (ended) return;
      else await new Promise<void>((resolve) => wake = resolve);
    }
  } finally {
    if (!ended) request.close(http2.constants.NGHTTP2_CANCEL); // Store.write gave up early
  }
}

/** Runs `copy` once, with the CPU time this process and the server `pid` spent meanwhile. */
async function measure(pid: number, copy: () => Promise<number>): Promise<Copy> {
  const before = cpuSeconds() + cpuSeconds(pid);
  const seconds = await copy();
  const after = cpuSeconds() + cpuSeconds(pid);
  return { seconds, cpuMs: (after - before) * 1000 };
}

function median(values: number[]): number {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
}

/** Starts this file in child `mode` for `path`; resolves with the child and the port it prints. */
async function spawnChild(mode: "--raw-server" | "--h2-server", path: string) {
  const child = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-P=bench", SELF, mode, path],
    stdout: "piped",
    // The bare HTTP/2 server may abort in nghttp2 when the client hangs up (denoland/deno#36788):
    // that happens after the last copy, and says nothing about the copies.
    stderr: mode === "--h2-server" ? "null" : "inherit",
  }).spawn();
  return { child, port: await readPort(child.stdout) };
}

async function main() {
  // Memory-backed when possible: the disk of a VM swings too much to compare protocols.
  const shm = await Deno.stat("/dev/shm").then((info) => info.isDirectory, () => false);
  const root = await Deno.makeTempDir({ prefix: "grpc-bench-", dir: shm ? "/dev/shm" : undefined });
  const children: Deno.ChildProcess[] = [];
  let session: http2.ClientHttp2Session | undefined;
  try {
    await Deno.mkdir(join(root, "peer"));
    const fragment = join(root, "peer", NAME);
    const sha256 = await makeFragment(fragment, SIZE);
    const raw = await spawnChild("--raw-server", fragment);
    children.push(raw.child);
    const h2 = await spawnChild("--h2-server", fragment);
    children.push(h2.child);
    await using grpc = await superviseGrpcServer({
      dir: join(root, "peer"),
      port: 0,
      hostname: "127.0.0.1",
    });
    using client = new GrpcClient();
    const address = `127.0.0.1:${grpc.port}`;
    session = await connectH2(h2.port);
    const copies = { raw: [] as Copy[], grpc: [] as Copy[], h2: [] as Copy[] };
    const stats = { largestData: 0 };
    const expected = { size: SIZE, sha256 };
    const h2Session = session;
    const rawOut = join(root, "raw.out"), grpcDir = join(root, "client"), h2Dir = join(root, "h2");
    for (let round = 0; round <= ROUNDS; round++) {
      const counted = round > 0; // the first warms up
      const raws = await measure(raw.child.pid, () => rawCopy(raw.port, rawOut));
      const grpcs = await measure(grpc.pid!, () => grpcCopy(client, address, grpcDir));
      const h2s = await measure(h2.child.pid, () => h2Copy(h2Session, expected, h2Dir, stats));
      if (!counted) continue;
      copies.raw.push(raws);
      copies.grpc.push(grpcs);
      copies.h2.push(h2s);
    }
    const peerRss = peakRssMiB(grpc.pid);
    const mibps = (s: number) => `${(SIZE / 1024 ** 2 / s).toFixed(0)} MiB/s`;
    const seconds = (list: Copy[]) => median(list.map((copy) => copy.seconds));
    const cpu = (list: Copy[]) => `${median(list.map((copy) => copy.cpuMs)).toFixed(0)} ms`;
    const rawS = seconds(copies.raw), grpcS = seconds(copies.grpc), h2S = seconds(copies.h2);
    const cores = navigator.hardwareConcurrency;
    const ok = printTable([
      { name: `raw TCP copy, 100 MiB (median of ${ROUNDS})`, value: mibps(rawS) },
      { name: "gRPC Download -> Store.write, 100 MiB", value: mibps(grpcS) },
      { name: "gRPC / raw", value: ratio(rawS / grpcS) },
      { name: "ceiling: bare node:http2 stream -> Store.write, 100 MiB", value: mibps(h2S) },
      { name: "ceiling: bare node:http2 / raw", value: ratio(rawS / h2S) },
      {
        name: "gRPC: share of its ceiling (bare node:http2)",
        value: ratio(h2S / grpcS),
        target: `>= ${ratio(MIN_SHARE)}`,
        pass: h2S / grpcS >= MIN_SHARE,
      },
      {
        name: `largest HTTP/2 DATA chunk received (asked maxFrameSize ${H2_MAX_FRAME})`,
        value: `${stats.largestData} B`,
      },
      {
        name: `CPU per copy, client + server (${cores} cores): raw / gRPC / bare http2`,
        value: `${cpu(copies.raw)} / ${cpu(copies.grpc)} / ${cpu(copies.h2)}`,
      },
      { name: "gRPC server child peak RSS", value: `${peerRss.toFixed(0)} MiB` },
      { name: "gRPC server restarts during the run", value: String(grpc.restarts) },
    ]);
    if (!ok) Deno.exitCode = 1;
  } finally {
    session?.destroy();
    for (const child of children) {
      try {
        child.kill();
      } catch { /* already gone */ }
      await child.status;
    }
    await Deno.remove(root, { recursive: true });
  }
}

/** Opens an HTTP/2 session with the largest frames and the gRPC client's window. */
async function connectH2(port: number): Promise<http2.ClientHttp2Session> {
  const session = http2.connect(`http://127.0.0.1:${port}`, {
    settings: { maxFrameSize: H2_MAX_FRAME, initialWindowSize: H2_WINDOW },
  });
  await new Promise((resolve, reject) => {
    session.once("remoteSettings", resolve);
    session.once("error", reject);
  });
  session.setLocalWindowSize(H2_WINDOW); // the connection's window too, as grpc-js does
  return session;
}

/** Reads the `PORT n` line of a child server, then lets its stdout go. */
async function readPort(stdout: ReadableStream<Uint8Array>): Promise<number> {
  const reader = stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!/PORT \d+\n/.test(text)) {
    const { value, done } = await reader.read();
    if (done) throw new Error("Server child exited before listening");
    text += value;
  }
  reader.releaseLock();
  return Number(text.match(/PORT (\d+)/)![1]);
}

if (import.meta.main) {
  if (Deno.args[0] === "--raw-server") await rawServer(Deno.args[1]);
  else if (Deno.args[0] === "--h2-server") h2Server(Deno.args[1]);
  else await main();
}
