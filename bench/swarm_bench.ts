/**
 * The swarm's speedup: a viewer (`peer --fetch-all --exit-when-done`) fetches an 8 MiB file in 30
 * fragments from three seeders, each limited to the same upload rate (`--max-upload 1MB/s`),
 * against one seeder alone at that rate. Everything is a real child process started with its
 * task's flags: a directory on port 0, seeders on port 0, the viewer; no broker (a dead address:
 * peers work without one). Traffic stays on 127.0.0.1.
 *
 * The setup that carries the target is three seeders each holding every fragment, so the only
 * difference from the lone seeder is how many there are: the ratio measures the swarm's
 * parallelism alone. Beside it, for information, the demo's setup: three seeders holding a third
 * each, dealt by `split --peers` (30 fragments, so exactly 10 each and the deal is even).
 *
 * A viewer's time runs from its `[gRPC] Listening` line (printed once its servers are up, just
 * before it asks the directory for the manifest) to its `complete` line, so process and server
 * startup are left out. Setups alternate for ROUNDS rounds; the median counts. Target: three
 * seeders at least 2.5x as fast as one.
 * @module
 */
import { join } from "node:path";
import { splitFile } from "../split.ts";
import { type Child, peerArgs, startTask } from "../tests/_util.ts";
import { printTable, ratio, type Row } from "./_report.ts";

const SIZE = 8 * 1024 * 1024;
const FRAGMENTS = 30;
const RATE = "1MB/s";
const ROUNDS = 3;
const FILE = "swarm-bench.bin";
/** Longest a viewer may take: a lone seeder needs about 8.4 s at 1MB/s. */
const VIEWER_TIMEOUT_MS = 60_000;
const LISTENING = /\[DIRECTORY\] Listening on (http:\/\/\S+) /;

/** Writes `size` bytes of incompressible-looking data to `path`. */
async function makeInput(path: string, size: number): Promise<void> {
  using file = await Deno.open(path, { write: true, createNew: true });
  const chunk = crypto.getRandomValues(new Uint8Array(65536));
  for (let written = 0; written < size; written += chunk.length) {
    crypto.getRandomValues(chunk);
    await file.write(chunk.subarray(0, Math.min(chunk.length, size - written)));
  }
}

/** A directory and its seeders, all child processes. */
interface Setup {
  name: string;
  url: string;
  seeders: number;
}

/** Starts a directory and one seeder per store folder; registers each child in `children`. */
async function startSetup(
  name: string,
  stores: string[],
  children: Child[],
): Promise<Setup> {
  const directory = startTask("directory", ["--port", "0", "--hostname", "127.0.0.1"]);
  children.push(directory);
  const url = (await directory.waitFor(LISTENING, { stream: "stdout" }))[1]!;
  for (const store of stores) {
    const own = ["--no-console", "--max-upload", RATE, "--hostname", "127.0.0.1"];
    const seeder = startTask("peer", ["0", ...own, ...peerArgs(store, url)]);
    children.push(seeder);
    await seeder.waitFor(/Node listening on port \d+/, { stream: "stdout" });
  }
  const setup = { name, url, seeders: stores.length };
  await settled(setup);
  return setup;
}

/**
 * Waits until the directory lists exactly the setup's seeders, each with its fragments, and the
 * file: no viewer of an earlier round lingers as a holder.
 */
async function settled(setup: Setup): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (true) {
    const { peers } = await (await fetch(`${setup.url}/peers`)).json() as {
      peers: { fragments: string[] }[];
    };
    const files = await (await fetch(`${setup.url}/files`)).json() as { files?: unknown[] };
    const ready = peers.length === setup.seeders && peers.every((p) => p.fragments.length > 0);
    if (ready && (files.files?.length ?? 0) > 0) return;
    if (Date.now() > deadline) {
      throw new Error(`The directory of "${setup.name}" never settled: ${JSON.stringify(peers)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** Runs a viewer with an empty store against `setup`; seconds from ready to complete. */
async function view(setup: Setup, dir: string): Promise<number> {
  await settled(setup);
  await Deno.remove(dir, { recursive: true }).catch(() => {});
  await using viewer = startTask("peer", [
    "0",
    "--hostname",
    "127.0.0.1",
    ...peerArgs(dir, setup.url),
    "--fetch-all",
    "--exit-when-done",
  ]);
  const options = { stream: "stdout" as const, timeoutMs: VIEWER_TIMEOUT_MS };
  await viewer.waitFor(/\[gRPC\] Listening on port \d+/, options);
  const start = performance.now();
  await viewer.waitFor(/\[✓\] '\S+' complete: \d+\/\d+ fragments, sha256 verified/, options);
  const seconds = (performance.now() - start) / 1000;
  const { code } = await viewer.status();
  if (code !== 0) throw new Error(`The viewer of "${setup.name}" exited ${code}: ${viewer.stderr}`);
  if ((await Deno.stat(join(dir, FILE))).size !== SIZE) throw new Error("The joined file is short");
  return seconds;
}

function median(values: number[]): number {
  return [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;
}

async function main() {
  // Not /dev/shm: the peers run with the peer task's own permissions, which cannot reach /dev
  // (denoland/deno#30979); at 1MB/s the disk does not matter.
  const root = await Deno.makeTempDir({ prefix: "swarm-bench-" });
  const children: Child[] = [];
  try {
    const input = join(root, FILE);
    await makeInput(input, SIZE);
    const full = join(root, "full"), dealt = join(root, "dealt");
    await splitFile(input, { out: full, fragments: FRAGMENTS });
    await splitFile(input, { out: dealt, fragments: FRAGMENTS, peers: ["a", "b", "c"] });
    const copies = ["1", "2", "3"].map((n) => join(root, `full-${n}`));
    for (const copy of copies) await copyStore(full, copy);

    const one = await startSetup("one seeder, everything", [full], children);
    const three = await startSetup("three seeders, everything each", copies, children);
    const demo = await startSetup(
      "three seeders, a third each",
      ["a", "b", "c"].map((p) => join(dealt, p)),
      children,
    );
    const times = new Map<Setup, number[]>([[one, []], [three, []], [demo, []]]);
    for (let round = 0; round < ROUNDS; round++) {
      for (const [setup, seconds] of times) seconds.push(await view(setup, join(root, "viewer")));
    }

    const oneS = median(times.get(one)!), threeS = median(times.get(three)!);
    const demoS = median(times.get(demo)!);
    const mbps = (s: number) => `${(SIZE / s / 1e6).toFixed(2)} MB/s`;
    const rows: Row[] = [
      {
        name: `one seeder at ${RATE}, ${SIZE / 1024 ** 2} MiB in ${FRAGMENTS} fragments ` +
          `(median of ${ROUNDS})`,
        value: `${oneS.toFixed(2)} s (${mbps(oneS)})`,
      },
      {
        name: `three seeders at ${RATE} each, every fragment on each`,
        value: `${threeS.toFixed(2)} s (${mbps(threeS)})`,
      },
      {
        name: "speedup, three / one",
        value: ratio(oneS / threeS),
        target: ">= 2.50x",
        pass: oneS / threeS >= 2.5,
      },
      {
        name: `three seeders at ${RATE} each, a third each (split --peers, as the demo)`,
        value: `${demoS.toFixed(2)} s (${mbps(demoS)})`,
      },
      { name: "speedup, three with a third each / one", value: ratio(oneS / demoS) },
    ];
    if (!printTable(rows)) Deno.exitCode = 1;
  } finally {
    await stopAll(children);
    await Deno.remove(root, { recursive: true });
  }
}

/** Copies a store folder (its fragments and manifest). */
async function copyStore(from: string, to: string): Promise<void> {
  await Deno.mkdir(to);
  for await (const entry of Deno.readDir(from)) {
    if (entry.isFile) await Deno.copyFile(join(from, entry.name), join(to, entry.name));
  }
}

/** SIGTERM to every child (seeders leave the directory), then SIGKILL to any still there. */
async function stopAll(children: Child[]): Promise<void> {
  for (const child of children.toReversed()) child.kill("SIGTERM");
  let timer: ReturnType<typeof setTimeout> | undefined;
  const grace = new Promise((resolve) => timer = setTimeout(resolve, 5_000));
  await Promise.all(children.map((child) => Promise.race([child.status(), grace])));
  clearTimeout(timer);
  await Promise.all(children.map((child) => child[Symbol.asyncDispose]()));
}

if (import.meta.main) await main();
