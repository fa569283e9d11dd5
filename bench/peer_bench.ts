/**
 * Fragments over the peer TCP protocol, along the real code path: a serving peer in a child
 * process (startTcpServer over a Store, bench/_serve_child.ts) and, in the measuring process, a
 * Fetcher (TcpPeerClient under it) writing through Store.write, so every byte is hashed and
 * verified and lands on disk. Beside it, in the same run, a raw Deno TCP copy: another child sends
 * the file with a plain loop, and the measuring process reads it into a 1 MiB buffer and writes it
 * to a file.
 *
 * - One 100 MiB fragment, peer to peer. Target: at least 0.6x the raw copy.
 * - 20 clients at once, each fetching a different 5 MiB fragment from one peer (its own Fetcher,
 *   connection and store): aggregate throughput. Target: at least 0.5x the raw copy. The serving
 *   peer's peak RSS while it serves them (a child of its own, its peak reset once its store is
 *   open, so only the serving counts). Target: under 150 MiB.
 *
 * Every side runs ROUNDS times, alternating, after one warm-up round; the median counts (the
 * machine has 2 cores and is shared). Data and stores live in /dev/shm when it exists, so the disk
 * does not dominate. Deno lets only `--allow-all` touch /dev (denoland/deno#30979), so the
 * measuring runs in a child of this bench with `-A` (and its servers too), and prints what it
 * measured as JSON for this process to report.
 * @module
 */
import { createHash } from "node:crypto";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { Fetcher } from "../peer/fetch.ts";
import { Store } from "../peer/store.ts";
import { peakRssMiB, printTable, ratio, type Row } from "./_report.ts";

const BIG = 100 * 1024 * 1024;
const CLIENTS = 20;
const SMALL = 5 * 1024 * 1024;
const ROUNDS = 7;
const CHUNK = 1024 * 1024;
const BIG_NAME = "fragment_0.bin";
/** Longest any one copy may take before the bench gives up on it. */
const COPY_TIMEOUT_MS = 60_000;
/** Longest the whole measuring may take. */
const MEASURE_TIMEOUT_MS = 5 * 60_000;
const SERVE_CHILD = fileURLToPath(new URL("./_serve_child.ts", import.meta.url));
const SELF = fileURLToPath(import.meta.url);
const CONFIG = fileURLToPath(new URL("../deno.json", import.meta.url));

/** Writes `size` random-looking bytes to `path`; returns their SHA-256. */
async function makeFragment(path: string, size: number, seed: number): Promise<string> {
  using file = await Deno.open(path, { write: true, createNew: true });
  const hash = createHash("sha256");
  const block = new Uint8Array(CHUNK);
  const random = crypto.getRandomValues(new Uint8Array(65536));
  for (let i = 0; i < CHUNK; i += random.length) block.set(random, i);
  for (let written = 0, n = 0; written < size; written += CHUNK, n++) {
    const view = new DataView(block.buffer);
    view.setUint32(0, seed);
    view.setUint32(4, n); // no two blocks alike
    const bytes = block.subarray(0, Math.min(CHUNK, size - written));
    hash.update(bytes);
    for (let done = 0; done < bytes.length;) done += await file.write(bytes.subarray(done));
  }
  return hash.digest("hex");
}

/** A server child (see _serve_child.ts) and the port it listens on. */
interface Server extends AsyncDisposable {
  readonly pid: number;
  readonly port: number;
}

async function startServer(mode: "store" | "raw", path: string): Promise<Server> {
  const child = new Deno.Command(Deno.execPath(), {
    // -A, as the measuring child: the store may be in /dev/shm.
    args: ["run", "-q", "-A", "--config", CONFIG, SERVE_CHILD, mode, path],
    stdin: "piped", // the child exits when this closes, even if this process is killed
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  async function stop() {
    await child.stdin.close().catch(() => {});
    const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
    try {
      child.kill("SIGTERM");
    } catch { /* already gone */ }
    await child.status;
    clearTimeout(timer);
  }
  try {
    const port = await readPort(child.stdout);
    return { pid: child.pid, port, [Symbol.asyncDispose]: stop };
  } catch (error) {
    await stop();
    throw error;
  }
}

/** Reads the child's `PORT n` line within 30 s, then drains the rest of its stdout. */
async function readPort(stdout: ReadableStream<Uint8Array>): Promise<number> {
  const reader = stdout.pipeThrough(new TextDecoderStream()).getReader();
  const timer = setTimeout(() => reader.cancel(), 30_000);
  let text = "";
  try {
    while (!/PORT \d+\n/.test(text)) {
      const { value, done } = await reader.read();
      if (done) throw new Error("The server child exited (or hung) before listening");
      text += value;
    }
  } finally {
    clearTimeout(timer);
  }
  (async () => {
    while (!(await reader.read()).done) { /* nothing more is expected */ }
  })().catch(() => {});
  return Number(text.match(/PORT (\d+)/)![1]);
}

/** Copies what the raw server sends into `path` with a 1 MiB read/write loop; seconds. */
async function rawCopy(port: number, path: string): Promise<number> {
  const start = performance.now();
  using conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const timer = setTimeout(() => conn.close(), COPY_TIMEOUT_MS);
  try {
    using file = await Deno.open(path, { write: true, create: true, truncate: true });
    const buffer = new Uint8Array(CHUNK);
    let total = 0;
    for (let n; (n = await conn.read(buffer)) !== null;) {
      for (let written = 0; written < n;) written += await file.write(buffer.subarray(written, n));
      total += n;
    }
    if (total !== BIG) throw new Error(`The raw copy got ${total} bytes, not ${BIG}`);
  } finally {
    clearTimeout(timer);
  }
  return (performance.now() - start) / 1000;
}

/**
 * Fetches each of `names` into its own fresh store through its own Fetcher, all at once, as the
 * peer does (Fetcher.fetch -> TcpPeerClient.get -> Store.write); checks each hash; seconds.
 */
async function peerCopies(
  port: number,
  root: string,
  names: Map<string, string>,
): Promise<number> {
  const holder = { host: "127.0.0.1", port, grpcPort: 0 };
  const clients = await Promise.all([...names.keys()].map(async (name, i) => {
    const dir = join(root, `client-${i}`);
    await Deno.remove(dir, { recursive: true }).catch(() => {});
    return { name, fetcher: new Fetcher(await Store.open(dir)), store: dir };
  }));
  const signal = AbortSignal.timeout(COPY_TIMEOUT_MS);
  const start = performance.now();
  try {
    await Promise.all(
      clients.map(({ name, fetcher }) => fetcher.fetch(name, [holder], { signal })),
    );
  } finally {
    clients.forEach(({ fetcher }) => fetcher[Symbol.dispose]());
  }
  const seconds = (performance.now() - start) / 1000;
  for (const { name, store } of clients) {
    const held = (await Store.open(store)).get(name);
    if (held?.sha256 !== names.get(name)) {
      throw new Error(`"${name}" arrived wrong: ${held?.sha256}`);
    }
    await Deno.remove(store, { recursive: true });
  }
  return seconds;
}

/** Resets the peak RSS (VmHWM) of process `pid` to its current RSS, so a later peak is new. */
function resetPeakRss(pid: number): void {
  Deno.writeTextFileSync(`/proc/${pid}/clear_refs`, "5");
}

function median(values: number[]): number {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
}

/** What the measuring child reports: seconds per round of each side, and the server's memory. */
interface Measured {
  shm: boolean;
  raw: number[];
  one: number[];
  crowd: number[];
  startupRssMiB: number;
  servingRssMiB: number;
}

/** Child mode (`--measure`, with `-A`): runs every round and prints a {@link Measured}. */
async function measure(): Promise<void> {
  // Memory-backed when possible: the disk of a VM swings too much to compare transfer code.
  const shm = await Deno.stat("/dev/shm").then((info) => info.isDirectory, () => false);
  const root = await Deno.makeTempDir({ prefix: "peer-bench-", dir: shm ? "/dev/shm" : undefined });
  // Stopped from outside (the parent's timeout): still free the memory /dev/shm holds.
  Deno.addSignalListener("SIGTERM", () => {
    Deno.removeSync(root, { recursive: true });
    Deno.exit(1);
  });
  try {
    const big = join(root, "big"), many = join(root, "many");
    await Deno.mkdir(big);
    await Deno.mkdir(many);
    const bigHash = await makeFragment(join(big, BIG_NAME), BIG, 0);
    const smalls = new Map<string, string>();
    for (let i = 0; i < CLIENTS; i++) {
      const name = `fragment_${i}.bin`;
      smalls.set(name, await makeFragment(join(many, name), SMALL, i + 1));
    }

    await using raw = await startServer("raw", join(big, BIG_NAME));
    await using one = await startServer("store", big);
    await using crowd = await startServer("store", many);
    // Opening the store (hashing its fragments) has a peak of its own: measure the serving alone.
    const startupRssMiB = peakRssMiB(crowd.pid);
    resetPeakRss(crowd.pid);
    const measured: Measured = {
      shm,
      raw: [],
      one: [],
      crowd: [],
      startupRssMiB,
      servingRssMiB: NaN,
    };
    // Round 0 warms up (JIT, page cache, first connections) and does not count.
    for (let round = 0; round <= ROUNDS; round++) {
      const rawS = await rawCopy(raw.port, join(root, "raw.out"));
      await Deno.remove(join(root, "raw.out"));
      const oneS = await peerCopies(one.port, root, new Map([[BIG_NAME, bigHash]]));
      const crowdS = await peerCopies(crowd.port, root, smalls);
      if (round === 0) continue;
      measured.raw.push(rawS);
      measured.one.push(oneS);
      measured.crowd.push(crowdS);
    }
    measured.servingRssMiB = peakRssMiB(crowd.pid);
    console.log(JSON.stringify(measured));
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

async function main() {
  // The measuring runs in a child with -A: Deno lets only --allow-all touch /dev/shm
  // (denoland/deno#30979), and the data belongs in memory, not on this VM's disk.
  const { code, stdout } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-A", "--config", CONFIG, SELF, "--measure"],
    stdin: "null",
    stderr: "inherit",
    signal: AbortSignal.timeout(MEASURE_TIMEOUT_MS),
  }).output();
  if (code !== 0) {
    console.error(`error: The peer bench's measuring child failed (exit code ${code})`);
    Deno.exit(1);
  }
  const measured: Measured = JSON.parse(new TextDecoder().decode(stdout));
  const mbps = (bytes: number, s: number) => bytes / s / 1e6;
  const rawRate = mbps(BIG, median(measured.raw));
  const oneRate = mbps(BIG, median(measured.one));
  const crowdRate = mbps(CLIENTS * SMALL, median(measured.crowd));
  const rows: Row[] = [
    { name: "data and stores", value: measured.shm ? "/dev/shm (tmpfs)" : "temp dir (disk)" },
    {
      name: `raw TCP copy, 100 MiB, 1 MiB read/write loop (median of ${ROUNDS})`,
      value: `${rawRate.toFixed(0)} MB/s`,
    },
    {
      name: "peer TCP: Fetcher -> Store.write, 100 MiB, verified",
      value: `${oneRate.toFixed(0)} MB/s`,
    },
    {
      name: "peer TCP / raw",
      value: ratio(oneRate / rawRate),
      target: ">= 0.60x",
      pass: oneRate / rawRate >= 0.6,
    },
    {
      name: `${CLIENTS} clients at once, 5 MiB each from one peer, aggregate`,
      value: `${crowdRate.toFixed(0)} MB/s`,
    },
    {
      name: `${CLIENTS} clients aggregate / raw`,
      value: ratio(crowdRate / rawRate),
      target: ">= 0.50x",
      pass: crowdRate / rawRate >= 0.5,
    },
    {
      name: `serving peer's peak RSS at startup (Store.open hashes its ${CLIENTS} fragments)`,
      value: `${measured.startupRssMiB.toFixed(0)} MiB`,
    },
    {
      name: `serving peer's peak RSS while serving ${CLIENTS} clients at once`,
      value: `${measured.servingRssMiB.toFixed(0)} MiB`,
      target: "< 150 MiB",
      pass: measured.servingRssMiB < 150,
    },
  ];
  if (!printTable(rows)) Deno.exitCode = 1;
}

if (import.meta.main) {
  if (Deno.args[0] === "--measure") await measure();
  else await main();
}
