/**
 * A 100 MiB fragment over gRPC, from a peer's supervised gRPC server to a client that writes it
 * through Store.write (so it is verified), beside a raw Deno TCP copy of the same file (a 1 MiB
 * read/write loop from another process into a file), measured in the same run. Each side runs
 * ROUNDS times, alternating; the median counts. Target: gRPC at least 0.4x the raw copy.
 * @module
 */
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { GrpcClient, superviseGrpcServer } from "../peer_grpc.ts";
import { Store } from "../_store.ts";
import { peakRssMiB, printTable, ratio } from "./_report.ts";

const SIZE = 100 * 1024 * 1024;
const ROUNDS = 5;
const CHUNK = 1024 * 1024;
const NAME = "fragment_0.bin";
const SELF = fileURLToPath(import.meta.url);

/** Writes `size` random-looking bytes to `path`. */
async function makeFragment(path: string, size: number): Promise<void> {
  using file = await Deno.open(path, { write: true, createNew: true });
  const chunk = crypto.getRandomValues(new Uint8Array(65536));
  const block = new Uint8Array(CHUNK);
  for (let i = 0; i < CHUNK; i += chunk.length) block.set(chunk, i);
  for (let written = 0, n = 0; written < size; written += CHUNK, n++) {
    new DataView(block.buffer).setUint32(0, n); // no two blocks alike
    await file.write(block.subarray(0, Math.min(CHUNK, size - written)));
  }
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

function median(values: number[]): number {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
}

async function main() {
  // Memory-backed when possible: the disk of a VM swings too much to compare protocols.
  const shm = await Deno.stat("/dev/shm").then((info) => info.isDirectory, () => false);
  const root = await Deno.makeTempDir({ prefix: "grpc-bench-", dir: shm ? "/dev/shm" : undefined });
  const raw = new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-P=bench", SELF, "--raw-server", join(root, "peer", NAME)],
    stdout: "piped",
  });
  let server: Deno.ChildProcess | undefined;
  try {
    await Deno.mkdir(join(root, "peer"));
    await makeFragment(join(root, "peer", NAME), SIZE);
    server = raw.spawn();
    const rawPort = await readPort(server.stdout);
    await using grpc = await superviseGrpcServer({
      dir: join(root, "peer"),
      port: 0,
      hostname: "127.0.0.1",
    });
    using client = new GrpcClient();
    const address = `127.0.0.1:${grpc.port}`;
    const times = { raw: [] as number[], grpc: [] as number[] };
    for (let round = 0; round < ROUNDS; round++) {
      times.raw.push(await rawCopy(rawPort, join(root, "raw.out")));
      times.grpc.push(await grpcCopy(client, address, join(root, "client")));
    }
    const peerRss = peakRssMiB(grpc.pid);
    const mibps = (s: number) => `${(SIZE / 1024 ** 2 / s).toFixed(0)} MiB/s`;
    const rawS = median(times.raw), grpcS = median(times.grpc);
    const ok = printTable([
      { name: "raw TCP copy, 100 MiB (median of 5)", value: mibps(rawS) },
      { name: "gRPC Download -> Store.write, 100 MiB", value: mibps(grpcS) },
      {
        name: "gRPC / raw",
        value: ratio(rawS / grpcS),
        target: ">= 0.40x",
        pass: rawS / grpcS >= 0.4,
      },
      { name: "gRPC server child peak RSS", value: `${peerRss.toFixed(0)} MiB` },
      { name: "gRPC server restarts during the run", value: String(grpc.restarts) },
    ]);
    if (!ok) Deno.exitCode = 1;
  } finally {
    server?.kill();
    await server?.status;
    await Deno.remove(root, { recursive: true });
  }
}

/** Reads the `PORT n` line of the raw server, then lets its stdout go. */
async function readPort(stdout: ReadableStream<Uint8Array>): Promise<number> {
  const reader = stdout.pipeThrough(new TextDecoderStream()).getReader();
  let text = "";
  while (!/PORT \d+\n/.test(text)) {
    const { value, done } = await reader.read();
    if (done) throw new Error("Raw server exited before listening");
    text += value;
  }
  reader.releaseLock();
  return Number(text.match(/PORT (\d+)/)![1]);
}

if (import.meta.main) {
  if (Deno.args[0] === "--raw-server") await rawServer(Deno.args[1]);
  else await main();
}
