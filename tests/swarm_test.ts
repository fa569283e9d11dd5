/**
 * The swarm download: a viewer gets the whole video from several seeders at once, and survives
 * a seeder dying (closed, or killed mid-fragment), the directory restarting, and a seeder far
 * slower than the rest. Stand-in holders that hold their replies show the scheduler's limits and
 * its order.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { DirectoryClient, startDirectory } from "../directory.ts";
import { Fetcher, FetchError } from "../peer/fetch.ts";
import { LineBuffer } from "../common/lines.ts";
import { PeerError, TcpPeerClient } from "../peer/tcp.ts";
import { Store } from "../peer/store.ts";
import { Swarm, type SwarmOptions } from "../peer/swarm.ts";
import { type Peer, type PeerOptions, startPeer } from "../peer.ts";
import { type Manifest, SAMPLE_VIDEO, splitFile } from "../split.ts";
import { type Child, peerArgs, startTask, tempDir } from "./_util.ts";

/** A peer in-process on the store `dir`, registered in `directory`; silent but for `log`. */
function startLocalPeer(dir: string, directory: string, options: PeerOptions = {}): Promise<Peer> {
  return startPeer({
    port: 0,
    hostname: "127.0.0.1",
    dir,
    directory,
    broker: null,
    log: () => {},
    ...options,
  });
}

/** Seeders in-process, each on its own store under `root`, registered in `directory`. */
async function startSeeders(
  root: string,
  directory: string,
  stores: string[],
  options: { maxUpload?: number } = {},
): Promise<Peer[]> {
  return await Promise.all(
    stores.map((store) => startLocalPeer(join(root, store), directory, options)),
  );
}

async function registered(directory: string, count: number) {
  const deadline = Date.now() + 10_000;
  while (true) {
    const { peers } = await (await fetch(`${directory}/peers`)).json();
    if (peers.length >= count) return;
    assert(Date.now() < deadline, "seeders never registered");
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/**
 * A `peer --fetch-all --exit-when-done` viewer as a child process, with its task's flags;
 * `extra` (neighbours, flags) goes right after the port.
 */
function startViewerTask(dir: string, directory: string, extra: string[] = []): Child {
  const args = ["0", ...extra, ...peerArgs(dir, directory), "--fetch-all", "--exit-when-done"];
  return startTask("peer", args);
}

async function closeAll(peers: Peer[]) {
  await Promise.all(peers.map((peer) => peer.close()));
}

Deno.test("peer --fetch-all gets the video from three seeders at once, joins it and verifies it", async () => {
  await using dir = await tempDir();
  await splitFile(SAMPLE_VIDEO, { out: join(dir.path, "f"), peers: ["a", "b", "c"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const seeders = await startSeeders(join(dir.path, "f"), directory.url, ["a", "b", "c"]);
  try {
    await registered(directory.url, 3);
    const viewer = join(dir.path, "viewer");
    await using child = startViewerTask(viewer, directory.url);
    assertEquals((await child.status()).code, 0, child.stderr);
    assertMatch(child.stdout, /\[✓\] 'sample\.webm' complete: 10\/10 fragments, sha256 verified/);
    // Plain progress lines when not on a terminal, and fragments from every seeder.
    const sources = new Set(
      [...child.stdout.matchAll(/\[swarm\] fragment_\d+\.bin from (\S+)/g)].map((m) => m[1]),
    );
    assertEquals(sources.size, 3);
    assertEquals(
      await Deno.readFile(join(viewer, "sample.webm")),
      await Deno.readFile(SAMPLE_VIDEO),
    );
  } finally {
    await closeAll(seeders);
  }
});

Deno.test("the swarm completes when a seeder dies mid-download", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b", "c"] });
  await Deno.rename(root, join(dir.path, "full")); // the folder itself is a full store
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b", "c"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  // Slow seeders, so the download is still going when one of them dies.
  const seeders = await startSeeders(dir.path, directory.url, ["f/a", "f/b", "f/c", "full"], {
    maxUpload: 400_000,
  });
  try {
    await registered(directory.url, 4);
    await using viewer = await startLocalPeer(join(dir.path, "viewer"), directory.url);
    const done = viewer.fetchAll();
    done.catch(() => {}); // awaited below; a failed assertion before must not leave it unhandled
    await waitForHeld(viewer, 2);
    await seeders[0]!.close(); // a seeder dies
    const manifest = await done;
    assertEquals(manifest.fragments.every((f) => viewer.store.get(f.name)), true);
  } finally {
    await closeAll(seeders);
  }
});

Deno.test("the swarm completes when the directory restarts mid-download", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b"] });
  const first = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1 });
  const { port, url } = first;
  const seeders = await startSeeders(root, url, ["a", "b"], { maxUpload: 500_000 });
  let second;
  try {
    await registered(url, 2);
    await using viewer = await startLocalPeer(join(dir.path, "viewer"), url);
    const done = viewer.fetchAll();
    done.catch(() => {}); // awaited below; a failed assertion before must not leave it unhandled
    await waitForHeld(viewer, 2);
    await first.close();
    second = startDirectory({ port, hostname: "127.0.0.1", ttl: 1 });
    await done;
    assertEquals(viewer.store.list().length, 10);
  } finally {
    await closeAll(seeders);
    await second?.close();
  }
});

Deno.test("the swarm asks a second holder when the first is clearly late", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: join(root, "slow") });
  await splitFile(SAMPLE_VIDEO, { out: join(root, "fast") });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  // 20 KB/s: one fragment (244 KB) would take twelve seconds from the slow seeder.
  const [slow] = await startSeeders(root, directory.url, ["slow"], { maxUpload: 20_000 });
  const [fast] = await startSeeders(root, directory.url, ["fast"]);
  try {
    await registered(directory.url, 2);
    const lines: string[] = [];
    await using viewer = await startLocalPeer(join(dir.path, "viewer"), directory.url, {
      log: (line) => lines.push(line),
    });
    const arrivals: string[] = [];
    viewer.swarm.onEvent((e) => e.state === "held" && arrivals.push(`${e.name} ${e.from}`));
    await viewer.fetchAll();
    assert(lines.some((line) => line.includes("complete: 10/10")));
    // The slow seeder was given fragments too, but each was fetched again from the fast one
    // long before the slow one could finish it.
    assertEquals(arrivals.length, 10);
    assertEquals(arrivals.filter((a) => !a.endsWith(`:${fast!.port}`)), []);
  } finally {
    await closeAll([slow!, fast!]);
  }
});

/** A viewer's store, fetcher and swarm in this process, with the swarm's timings shortened. */
async function startSwarm(
  dir: string,
  directory: string,
  options: SwarmOptions & { avoidMs?: number } = {},
) {
  const { avoidMs, ...swarmOptions } = options;
  const store = await Store.open(dir);
  const fetcher = new Fetcher(store, { avoidMs, log: options.log });
  const swarm = new Swarm(
    store,
    fetcher,
    { directory: new DirectoryClient(directory) },
    swarmOptions,
  );
  return {
    store,
    swarm,
    [Symbol.dispose]() {
      swarm[Symbol.dispose]();
      fetcher[Symbol.dispose]();
    },
  };
}

Deno.test("the swarm gives up, naming the fragments, when no holder has them", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b", "c"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const seeders = await startSeeders(root, directory.url, ["a", "b"]); // no one holds c's share
  try {
    await registered(directory.url, 2);
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, { stallMs: 1000 });
    let timer;
    const error = await Promise.race([
      viewer.swarm.fetchAll().then(() => undefined, (error) => error),
      new Promise((resolve) => timer = setTimeout(resolve, 15_000, "still waiting after 15 s")),
    ]);
    clearTimeout(timer);
    assert(error instanceof FetchError, `fetchAll() should reject, not ${error}`);
    assertMatch(error.message, /^No holder could provide fragment_2\.bin, fragment_5\.bin/);
    assertEquals(viewer.store.list().length, 7, "what could be had was fetched");
  } finally {
    await closeAll(seeders);
  }
});

Deno.test("the swarm never asks a holder again for a fragment it sent bad bytes of", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: join(root, "liar") });
  await splitFile(SAMPLE_VIDEO, { out: join(root, "honest") });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const [liar] = await startSeeders(root, directory.url, ["liar"]);
  const seeders = [liar!];
  try {
    // Corrupted after the liar hashed its store: it serves the bad bytes as good.
    const path = join(root, "liar", "fragment_3.bin");
    await Deno.writeFile(path, new Uint8Array((await Deno.stat(path)).size).fill(0x55));
    await registered(directory.url, 1);
    const lines: string[] = [];
    // The fetcher's own avoidance is short, so only the swarm's memory keeps the liar away.
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, {
      avoidMs: 100,
      log: (line) => lines.push(line),
    });
    const done = viewer.swarm.fetchAll();
    done.catch(() => {}); // awaited below; a failed assertion before must not leave it unhandled
    const deadline = Date.now() + 10_000;
    while (viewer.store.list().length < 9) {
      assert(Date.now() < deadline, "the liar's good fragments never arrived");
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    await new Promise((resolve) => setTimeout(resolve, 1500)); // refreshes, and avoidance ends
    seeders.push(...await startSeeders(root, directory.url, ["honest"]));
    await done;
    // The fetcher's line for each attempt that got bad bytes (the swarm says it again).
    const bad = lines.filter((line) => /^\[!\] 'fragment_3\.bin' from \S+ failed verif/.test(line));
    assertEquals(bad.length, 1, lines.join("\n"));
    assertEquals(viewer.store.list().length, 10);
  } finally {
    await closeAll(seeders);
  }
});

async function waitForHeld(peer: Peer, count: number) {
  const deadline = Date.now() + 15_000;
  while (peer.store.list().length < count) {
    assert(Date.now() < deadline, "no fragment arrived");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** Polls `probe` every 20 ms until it gives something truthy, and returns it; or fails. */
async function poll<T>(
  probe: () => T | Promise<T>,
  message: string,
  timeoutMs = 30_000,
): Promise<NonNullable<T>> {
  const deadline = Date.now() + timeoutMs;
  while (true) {
    const found = await probe();
    if (found) return found;
    assert(Date.now() < deadline, message);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

Deno.test("each [swarm] line counts one fragment more than the line before", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b", "c"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const seeders = await startSeeders(root, directory.url, ["a", "b", "c"]);
  try {
    await registered(directory.url, 3);
    const lines: string[] = [];
    await using viewer = await startLocalPeer(join(dir.path, "viewer"), directory.url, {
      log: (line) => lines.push(line),
    });
    // Two fragments land before the first one's fetch is over, as when both arrive in one turn
    // of the event loop: the first write's answer waits until a second fragment is stored.
    let landed = 0;
    viewer.store.onFragment(() => landed++);
    const write = viewer.store.write.bind(viewer.store);
    viewer.store.write = async (name, expected, chunks) => {
      const info = await write(name, expected, chunks);
      if (landed === 1) await poll(() => landed >= 2, "no second fragment landed");
      return info;
    };
    await viewer.fetchAll();
    const counts = lines.flatMap((line) =>
      line.match(/^\[swarm\] fragment_\d+\.bin from 127\.0\.0\.1:\d+ \((\d+)\/10\)$/)?.[1] ?? []
    );
    assertEquals(counts, ["1", "2", "3", "4", "5", "6", "7", "8", "9", "10"], lines.join("\n"));
  } finally {
    await closeAll(seeders);
  }
});

// ---------------------------------------------------------------------------------------------
// A seeder killed mid-fragment

/** A seeder as a child process, with its task's flags, uploading at `rate`. */
function startSeederTask(dir: string, directory: string, rate: string): Child {
  const own = ["--no-console", "--max-upload", rate, "--hostname", "127.0.0.1"];
  return startTask("peer", ["0", ...own, ...peerArgs(dir, directory)]);
}

async function listeningPort(child: Child): Promise<number> {
  const [, port] = await child.waitFor(/\[SERVER\] Node listening on port (\d+)/, {
    stream: "stdout",
    timeoutMs: 30_000,
  });
  return Number(port);
}

Deno.test("the swarm completes from the others when a seeder is killed mid-fragment", async () => {
  await using dir = await tempDir();
  const all = join(dir.path, "all");
  const manifest = await splitFile(SAMPLE_VIDEO, { out: all });
  // Three seeders, each lacking a third: every fragment has two holders, so any one may die.
  const stores = [0, 1, 2].map((k) => join(dir.path, `seeder${k}`));
  for (const [k, store] of stores.entries()) {
    await Deno.mkdir(store);
    await Deno.copyFile(join(all, "manifest.json"), join(store, "manifest.json"));
    for (const f of manifest.fragments) {
      if (f.index % 3 !== k) await Deno.copyFile(join(all, f.name), join(store, f.name));
    }
  }
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  // Slow, so that fragments are still on their way when the victim dies.
  await using victim = startSeederTask(stores[0]!, directory.url, "200KB/s");
  await using seeder1 = startSeederTask(stores[1]!, directory.url, "200KB/s");
  await using seeder2 = startSeederTask(stores[2]!, directory.url, "200KB/s");
  const victimAddress = `127.0.0.1:${await listeningPort(victim)}`;
  await Promise.all([seeder1, seeder2].map(listeningPort));
  await registered(directory.url, 3);

  const lines: string[] = [];
  const viewerDir = join(dir.path, "viewer");
  // No second holder for a late fragment: what the victim had is fetched again because it died.
  using viewer = await startSwarm(viewerDir, directory.url, {
    lateMs: 600_000,
    log: (line) => lines.push(line),
  });
  const asked = new Map<string, string>(); // fragment -> the holder last asked for it
  const arrived = new Map<string, string | undefined>(); // fragment -> where it came from
  viewer.swarm.onEvent((e) => {
    if (e.state === "inflight") asked.set(e.name, e.from!);
    if (e.state === "held") arrived.set(e.name, e.from);
  });
  const done = viewer.swarm.fetchAll();
  done.catch(() => {}); // awaited below; a failed assertion before must not leave it unhandled

  // A fragment the victim is sending: its bytes have started to arrive, and it is not done.
  const cut = await poll(async () => {
    for await (const entry of Deno.readDir(viewerDir)) {
      const name = entry.name.match(/^\.part-(.+)-[0-9a-f-]{36}$/)?.[1];
      if (!name || asked.get(name) !== victimAddress || viewer.store.get(name)) continue;
      const size = await Deno.stat(join(viewerDir, entry.name)).then((s) => s.size, () => 0);
      if (size > 0) return name;
    }
    return undefined;
  }, "the victim never sent part of a fragment");
  victim.kill("SIGKILL");
  assertEquals((await victim.status()).signal, "SIGKILL");

  await done;
  assert(
    lines.some((line) => line.startsWith(`[!] ${victimAddress} failed mid-fragment`)),
    lines.join("\n"),
  );
  // Retried elsewhere, so not given up: one line says so, and none says it could not be fetched.
  const said = lines.filter((line) => line.includes("mid-fragment") && line.includes(`'${cut}'`));
  assertEquals(said.length, 1, lines.join("\n"));
  assertMatch(
    said[0]!,
    /^\[!\] \S+ failed mid-fragment \(.*\); trying the next holder of '[^']+'$/,
  );
  assertEquals(lines.filter((line) => /Could not fetch/.test(line)), [], lines.join("\n"));
  assert(arrived.has(cut) && arrived.get(cut) !== victimAddress, `${cut} from ${arrived.get(cut)}`);
  assertEquals(manifest.fragments.filter((f) => !viewer.store.get(f.name)), []);
  assertEquals(
    await Deno.readFile(join(viewerDir, "sample.webm")),
    await Deno.readFile(SAMPLE_VIDEO),
  );
});

// ---------------------------------------------------------------------------------------------
// A fragment that leaves the store

/** The child's exit status, or undefined when it is still running after `ms`. */
async function exited(child: Child, ms: number): Promise<Deno.CommandStatus | undefined> {
  let timer;
  try {
    return await Promise.race([
      child.status(),
      new Promise<undefined>((resolve) => timer = setTimeout(() => resolve(undefined), ms)),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

Deno.test("a --fetch-all viewer fetches again a fragment that left its store mid-download", async () => {
  await using dir = await tempDir();
  const root = join(dir.path, "f");
  await splitFile(SAMPLE_VIDEO, { out: root, peers: ["a", "b", "c"] });
  // The viewer starts with the manifest and fragment 0: it wants the other nine.
  const viewerDir = join(dir.path, "viewer");
  await Deno.mkdir(viewerDir);
  for (const name of ["manifest.json", "fragment_0.bin"]) {
    await Deno.copyFile(join(root, "a", name), join(viewerDir, name));
  }
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  // Slow, so that the download is still going when fragment 0 leaves the viewer's store.
  const seeders = await startSeeders(root, directory.url, ["a", "b", "c"], {
    maxUpload: 150_000,
  });
  try {
    await registered(directory.url, 3);
    await using viewer = startViewerTask(viewerDir, directory.url, [
      "--no-console",
      "--hostname",
      "127.0.0.1",
    ]);
    const port = await listeningPort(viewer);
    await viewer.waitFor(/\[swarm\] fragment_\d+\.bin from/, {
      stream: "stdout",
      timeoutMs: 30_000,
    });
    // Fragment 0's file goes; the viewer's store forgets it once a holder-to-be asks for it.
    await Deno.remove(join(viewerDir, "fragment_0.bin"));
    using client = await TcpPeerClient.connect(`127.0.0.1:${port}`);
    const error = await client.get("fragment_0.bin").then(() => undefined, (error) => error);
    assert(error instanceof PeerError && error.code === "NOT_FOUND", `GET answered ${error}`);

    const status = await exited(viewer, 30_000);
    if (!status) {
      viewer.kill("SIGTERM");
      const stopped = await exited(viewer, 5_000);
      throw new Error(
        `the viewer never finished, and ${stopped ? "stopped" : "ignored"} SIGTERM\n` +
          viewer.stdout + viewer.stderr,
      );
    }
    assertEquals(status.code, 0, viewer.stderr);
    assertMatch(viewer.stdout, /\[swarm\] fragment_0\.bin from 127\.0\.0\.1:\d+/);
    assertMatch(viewer.stdout, /\[✓\] 'sample\.webm' complete: 10\/10 fragments, sha256 verified/);
    assertEquals(
      await Deno.readFile(join(viewerDir, "sample.webm")),
      await Deno.readFile(SAMPLE_VIDEO),
    );
  } finally {
    await closeAll(seeders);
  }
});

// ---------------------------------------------------------------------------------------------
// Stand-in holders: the scheduler's limits and order

/** Requests being answered: now, and the most at once. */
class Tally {
  now = 0;
  most = 0;
  enter() {
    this.most = Math.max(this.most, ++this.now);
  }
  leave() {
    this.now--;
  }
}

interface FakeHolder extends AsyncDisposable {
  readonly port: number;
  /** The requests it is answering. */
  readonly tally: Tally;
  /** Lets every reply held so far, and every later one, go. */
  open(): void;
}

/**
 * A holder speaking the peer TCP protocol from memory: it answers `GET <name>` from `fragments`,
 * each reply waiting for `open()` when started `held`. Each request counts in its own tally and
 * in `overall`, and its name goes on `asked`, while it is being answered.
 */
function startFakeHolder(
  fragments: Map<string, Uint8Array>,
  options: { held?: boolean; overall?: Tally; asked?: string[] } = {},
): FakeHolder {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const tally = new Tally();
  const gate = Promise.withResolvers<void>();
  if (!options.held) gate.resolve();
  const conns = new Set<Deno.Conn>();
  const tasks = new Set<Promise<void>>();
  const encoder = new TextEncoder();

  async function serve(conn: Deno.Conn) {
    const lines = new LineBuffer(1024);
    const buffer = new Uint8Array(4096);
    const write = async (bytes: Uint8Array) => {
      for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
    };
    for (let n; (n = await conn.read(buffer)) !== null;) {
      lines.push(buffer.subarray(0, n));
      for (let line; (line = lines.shift()) !== undefined;) {
        const name = line.replace(/^GET /, "");
        const bytes = fragments.get(name);
        options.asked?.push(name);
        tally.enter();
        options.overall?.enter();
        try {
          await gate.promise;
          if (!bytes) {
            await write(encoder.encode(`ERR NOT_FOUND no fragment "${name}" here\n`));
            continue;
          }
          const sha256 = createHash("sha256").update(bytes).digest("hex");
          await write(encoder.encode(`OK ${bytes.length} ${sha256}\n`));
          await write(bytes);
        } finally {
          tally.leave();
          options.overall?.leave();
        }
      }
    }
  }

  const accepting = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      const task = serve(conn).catch((error) => {
        // The viewer hung up, or the holder was closed under a reply.
        if (!(error instanceof Deno.errors.BadResource || isConnectionLoss(error))) throw error;
      }).finally(() => {
        tasks.delete(task);
        if (conns.delete(conn)) conn.close();
      });
      tasks.add(task);
    }
  })();

  return {
    port: listener.addr.port,
    tally,
    open: () => gate.resolve(),
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const conn of conns) conn.close();
      conns.clear();
      gate.resolve(); // held replies now fail on their closed connections
      await accepting;
      await Promise.all(tasks);
    },
  };
}

function isConnectionLoss(error: unknown): boolean {
  return error instanceof Deno.errors.ConnectionReset ||
    error instanceof Deno.errors.BrokenPipe ||
    error instanceof Deno.errors.Interrupted ||
    error instanceof Deno.errors.NotConnected;
}

/** The sample split into `dir`: its manifest, and each fragment's bytes. */
async function sampleFragments(dir: string) {
  const manifest = await splitFile(SAMPLE_VIDEO, { out: dir });
  const bytes = new Map<string, Uint8Array>();
  for (const f of manifest.fragments) bytes.set(f.name, await Deno.readFile(join(dir, f.name)));
  return { manifest, bytes };
}

/** Publishes `manifest` in the directory, and registers each stand-in with what it holds of it. */
async function registerFakes(
  directory: string,
  manifest: Manifest,
  holders: { holder: FakeHolder; fragments: string[] }[],
) {
  const client = new DirectoryClient(directory);
  await client.publishFile(manifest);
  for (const { holder, fragments } of holders) {
    await client.register({
      host: "127.0.0.1",
      port: holder.port,
      grpcPort: 0,
      httpPort: 0,
      fragments,
      fileId: manifest.sha256,
      file: manifest.file,
    });
  }
}

/**
 * A fetch-all from `count` stand-ins that each hold every fragment and hold back their replies
 * until `expected` requests are in flight and the scheduler has gone round a few more times,
 * each a chance to start more than it may. Returns the most requests in flight at once, overall
 * and at each holder.
 */
async function mostInFlight(count: number, expected: number, perSeed = 2) {
  await using dir = await tempDir();
  const { manifest, bytes } = await sampleFragments(join(dir.path, "all"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const overall = new Tally();
  const holders = Array.from(
    { length: count },
    () => startFakeHolder(bytes, { held: true, overall }),
  );
  try {
    const names = [...bytes.keys()];
    await registerFakes(
      directory.url,
      manifest,
      holders.map((holder) => ({ holder, fragments: names })),
    );
    let rounds = 0; // the scheduler reports progress once per round
    // Every stand-in holds the whole file, so each is a seeder: by default here a seeder takes
    // as many requests as any holder, so the limits under test are the only ones.
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, {
      progress: () => rounds++,
      perSeed,
    });
    const done = viewer.swarm.fetchAll();
    done.catch(() => {}); // awaited below
    await poll(() => overall.now >= expected, `never ${expected} requests at once`);
    const seen = rounds;
    await poll(() => rounds >= seen + 4, "the scheduler stopped going round");
    for (const holder of holders) holder.open();
    await done;
    assertEquals(viewer.store.list().length, 10);
    return { overall: overall.most, perHolder: holders.map((h) => h.tally.most) };
  } finally {
    await Promise.all(holders.map((holder) => holder[Symbol.asyncDispose]()));
  }
}

Deno.test("the swarm keeps at most 2 fragments in flight from one holder", async () => {
  assertEquals(await mostInFlight(2, 4), { overall: 4, perHolder: [2, 2] });
});

Deno.test("the swarm asks a seeder for one fragment at a time", async () => {
  assertEquals(await mostInFlight(3, 3, 1), { overall: 3, perHolder: [1, 1, 1] });
});

Deno.test("the swarm keeps at most 6 fragments in flight overall", async () => {
  const most = await mostInFlight(4, 6);
  assertEquals(most.overall, 6);
  assert(most.perHolder.every((n) => n <= 2), `per holder: ${most.perHolder}`);
});

Deno.test("the swarm asks for the rarest fragments first, ties in random order", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await sampleFragments(join(dir.path, "all"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  // Fragment i has 3 holders when i % 3 is 0, one when it is 1, two when it is 2.
  const holds = [(_i: number) => true, (i: number) => i % 3 !== 1, (i: number) => i % 3 === 0];
  const asked: string[] = [];
  const holders = holds.map((has) =>
    startFakeHolder(
      new Map([...bytes].filter((_, i) => has(i))),
      { asked },
    )
  );
  try {
    await registerFakes(
      directory.url,
      manifest,
      holders.map((holder, k) => ({
        holder,
        fragments: manifest.fragments.filter((f) => holds[k]!(f.index)).map((f) => f.name),
      })),
    );
    // One fragment at a time, so the order asked is the order chosen; rarest first from the
    // start, without the random first fragments.
    const options = { total: 1, randomFirst: 0 };
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, options);
    await viewer.swarm.fetchAll();
    const rarity = (name: string) => [3, 1, 2][Number(name.match(/\d+/)![0]) % 3]!;
    assertEquals(asked.map(rarity), [1, 1, 1, 2, 2, 2, 3, 3, 3, 3], asked.join(", "));
    assertEquals(new Set(asked).size, 10);
  } finally {
    await Promise.all(holders.map((holder) => holder[Symbol.asyncDispose]()));
  }
});

Deno.test("a fetch-all fetches again a fragment deleted behind the store's back before the join", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await sampleFragments(join(dir.path, "all"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const asked: string[] = [];
  const holder = startFakeHolder(bytes, { held: true, asked });
  try {
    await registerFakes(directory.url, manifest, [{ holder, fragments: [...bytes.keys()] }]);
    const viewerDir = join(dir.path, "viewer");
    await Deno.mkdir(viewerDir);
    for (const name of ["manifest.json", "fragment_0.bin"]) {
      await Deno.copyFile(join(dir.path, "all", name), join(viewerDir, name));
    }
    using viewer = await startSwarm(viewerDir, directory.url);
    const done = viewer.swarm.fetchAll();
    done.catch(() => {}); // awaited below
    await poll(() => holder.tally.now > 0, "nothing was asked for");
    // Gone while the rest is on its way, and nobody reads it: the store still lists it.
    await Deno.remove(join(viewerDir, "fragment_0.bin"));
    holder.open();
    await done;
    assertEquals(asked.filter((name) => name === "fragment_0.bin").length, 1);
    assertEquals(
      await Deno.readFile(join(viewerDir, "sample.webm")),
      await Deno.readFile(SAMPLE_VIDEO),
    );
  } finally {
    await holder[Symbol.asyncDispose]();
  }
});

Deno.test("the swarm never restarts its scheduler without waiting, whatever the store says", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await sampleFragments(join(dir.path, "all"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const holder = startFakeHolder(bytes);
  try {
    await registerFakes(directory.url, manifest, [{ holder, fragments: [...bytes.keys()] }]);
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url);
    // Once the fetch-all has its manifest, the store's own hides fragment 0: the fetch-all
    // waits for a fragment the scheduler never sees missing. A scheduler restarted at once would
    // spin without yielding to timers, so the count of asks, not a clock, stops a spin.
    let asks = 0;
    let hide = false;
    const hidden = { ...manifest, fragments: manifest.fragments.slice(1) };
    Object.defineProperty(viewer.store, "manifest", {
      get: () => {
        if (++asks > 100_000) throw new Error("the scheduler is spinning");
        return hide ? hidden : manifest;
      },
    });
    const done = viewer.swarm.fetchAll().then(() => undefined, (error) => error);
    hide = true; // fetchAll() took its manifest before its first await
    await poll(() => viewer.store.list().length === 9, "the other fragments never arrived");
    const before = asks;
    await new Promise((resolve) => setTimeout(resolve, 1000)); // the time the scheduler is given
    assert(asks - before < 1000, `${asks - before} asks of the manifest in a second`);
    viewer.swarm[Symbol.dispose]();
    const error = await done;
    assert(error instanceof FetchError && error.message === "Cancelled", String(error));
  } finally {
    await holder[Symbol.asyncDispose]();
  }
});

Deno.test("closing the swarm ends its search for a manifest at once", async () => {
  await using dir = await tempDir();
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" }); // no file in it
  using viewer = await startSwarm(join(dir.path, "viewer"), directory.url);
  const done = viewer.swarm.fetchAll().then(() => undefined, (error) => error);
  viewer.swarm[Symbol.dispose]();
  let timer;
  const error = await Promise.race([
    done,
    new Promise((resolve) => timer = setTimeout(() => resolve("still searching after 5 s"), 5000)),
  ]);
  clearTimeout(timer);
  assert(error instanceof FetchError && error.message === "Cancelled", String(error));
});

// ---------------------------------------------------------------------------------------------
// Which file

/**
 * Two files split into `root`: a.webm (the sample) and b.webm (its first 300,000 bytes, in three
 * fragments), each with its manifest and fragment bytes. Their fragment names are the same.
 */
async function twoFiles(root: string) {
  const sample = await Deno.readFile(SAMPLE_VIDEO);
  await Deno.mkdir(root);
  await Deno.writeFile(join(root, "a.webm"), sample);
  await Deno.writeFile(join(root, "b.webm"), sample.subarray(0, 300_000));
  const split = async (file: string, fragments: number) => {
    const manifest = await splitFile(join(root, file), {
      out: join(root, file + ".parts"),
      fragments,
    });
    const bytes = new Map<string, Uint8Array>();
    for (const f of manifest.fragments) {
      bytes.set(f.name, await Deno.readFile(join(root, file + ".parts", f.name)));
    }
    return { manifest, bytes };
  };
  return { a: await split("a.webm", 10), b: await split("b.webm", 3) };
}

Deno.test("the swarm refuses to guess between the directory's files, and names them", async () => {
  await using dir = await tempDir();
  const { a, b } = await twoFiles(join(dir.path, "src"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(a.manifest);
  await client.publishFile(b.manifest);
  using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, { stallMs: 2000 });
  const error = await viewer.swarm.fetchAll().then(() => undefined, (error) => error);
  assert(error instanceof FetchError, String(error));
  const [idA, idB] = [a.manifest.sha256.slice(0, 12), b.manifest.sha256.slice(0, 12)];
  assertEquals(
    error.message,
    `The directory lists 2 files (a.webm ${idA} (0 seeders), b.webm ${idB} (0 seeders)): ` +
      "choose one with --file NAME or --file ID (the first 6 or more hex digits of its id)",
  );
  assertEquals(viewer.store.manifest, undefined, "no manifest adopted");
});

Deno.test("the swarm fetches the file it is told to, among several", async () => {
  await using dir = await tempDir();
  const { a, b } = await twoFiles(join(dir.path, "src"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const holder = startFakeHolder(b.bytes);
  try {
    await new DirectoryClient(directory.url).publishFile(a.manifest); // listed first, unbacked
    await registerFakes(directory.url, b.manifest, [{ holder, fragments: [...b.bytes.keys()] }]);
    const viewerDir = join(dir.path, "viewer");
    using viewer = await startSwarm(viewerDir, directory.url, { file: "b.webm", stallMs: 2000 });
    const manifest = await viewer.swarm.fetchAll();
    assertEquals(manifest.file, "b.webm");
    assertEquals(
      await Deno.readFile(join(viewerDir, "b.webm")),
      await Deno.readFile(join(dir.path, "src", "b.webm")),
    );
  } finally {
    await holder[Symbol.asyncDispose]();
  }
});

Deno.test("the swarm keeps to the file its store holds, and refuses another", async () => {
  await using dir = await tempDir();
  const { a, b } = await twoFiles(join(dir.path, "src"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const holder = startFakeHolder(b.bytes);
  try {
    await new DirectoryClient(directory.url).publishFile(a.manifest);
    await registerFakes(directory.url, b.manifest, [{ holder, fragments: [...b.bytes.keys()] }]);
    const viewerDir = join(dir.path, "viewer");
    await Deno.mkdir(viewerDir);
    await Deno.copyFile(
      join(dir.path, "src", "b.webm.parts", "manifest.json"),
      join(viewerDir, "manifest.json"),
    );
    {
      using viewer = await startSwarm(viewerDir, directory.url, { file: "a.webm", stallMs: 2000 });
      const error = await viewer.swarm.fetchAll().then(() => undefined, (error) => error);
      assert(error instanceof FetchError, String(error));
      assertEquals(
        error.message,
        `The store "${viewerDir}" holds fragments of "b.webm" (${
          b.manifest.sha256.slice(0, 12)
        }), not "a.webm": use another store for it`,
      );
      assertEquals(viewer.store.list(), [], "nothing fetched");
    }
    using viewer = await startSwarm(viewerDir, directory.url, { stallMs: 2000 });
    assertEquals((await viewer.swarm.fetchAll()).file, "b.webm");
  } finally {
    await holder[Symbol.asyncDispose]();
  }
});

Deno.test("the swarm names the directory's files when the one it is told to fetch is not there", async () => {
  await using dir = await tempDir();
  const { a, b } = await twoFiles(join(dir.path, "src"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(a.manifest);
  await client.publishFile(b.manifest);
  const lines: string[] = [];
  using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, {
    file: "c.webm",
    stallMs: 1000,
    log: (line) => lines.push(line),
  });
  const error = await viewer.swarm.fetchAll().then(() => undefined, (error) => error);
  assert(error instanceof FetchError, String(error));
  assertEquals(
    error.message,
    `The directory at "${directory.url}" does not list "c.webm" (it lists a.webm ${
      a.manifest.sha256.slice(0, 12)
    } (0 seeders), b.webm ${b.manifest.sha256.slice(0, 12)} (0 seeders))`,
  );
  // It said at once that it waits, and only once (it waits less than the time between lines).
  assertEquals(lines, [
    `[swarm] The directory at "${directory.url}" does not list "c.webm"; waiting up to 1 s more`,
  ]);
});

Deno.test("a neighbour the directory lists is asked only for what it holds, whatever its name", async () => {
  await using dir = await tempDir();
  await splitFile(SAMPLE_VIDEO, { out: join(dir.path, "f"), peers: ["a", "b"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const seeders = await startSeeders(join(dir.path, "f"), directory.url, ["a", "b"]);
  try {
    await registered(directory.url, 2);
    // Typed as localhost; the directory lists the same peer as 127.0.0.1.
    await using child = startViewerTask(join(dir.path, "viewer"), directory.url, [
      `localhost:${seeders[0]!.port}`,
    ]);
    assertEquals((await child.status()).code, 0, child.stderr);
    assertMatch(child.stdout, /complete: 10\/10 fragments, sha256 verified/);
    // It holds only the even fragments: asking it for an odd one would be a NOT_FOUND.
    assertEquals(
      (child.stdout + child.stderr).match(/NOT_FOUND|Could not fetch/g),
      null,
      child.stdout + child.stderr,
    );
  } finally {
    await closeAll(seeders);
  }
});

Deno.test("the swarm asks a second holder for a late fragment only in the endgame", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await sampleFragments(join(dir.path, "all"));
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 600 });
  const slowAsked: string[] = [];
  const fastAsked: string[] = [];
  const slow = startFakeHolder(bytes, { held: true, asked: slowAsked }); // never answers
  const fast = startFakeHolder(bytes, { asked: fastAsked });
  try {
    const names = [...bytes.keys()];
    await registerFakes(directory.url, manifest, [
      { holder: slow, fragments: names },
      { holder: fast, fragments: names },
    ]);
    // Late after 100 ms: long before the fast holder is through the other nine.
    using viewer = await startSwarm(join(dir.path, "viewer"), directory.url, { lateMs: 100 });
    await viewer.swarm.fetchAll();
    const late = slowAsked[0]!;
    assertEquals(slowAsked, [late]);
    // The slow holder's fragment was asked of the fast one last, once the rest was in.
    assertEquals(fastAsked.at(-1), late);
    assertEquals(new Set(fastAsked).size, 10);
  } finally {
    slow.open();
    await Promise.all([slow, fast].map((holder) => holder[Symbol.asyncDispose]()));
  }
});
