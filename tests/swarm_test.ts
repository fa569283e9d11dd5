/**
 * The swarm download: a viewer gets the whole video from several seeders at once, and survives
 * a seeder dying, the directory restarting, and a seeder far slower than the rest.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { DirectoryClient, startDirectory } from "../directory.ts";
import { Fetcher, FetchError } from "../_fetch.ts";
import { Store } from "../_store.ts";
import { Swarm } from "../_swarm.ts";
import { type Peer, startPeer } from "../peer.ts";
import { SAMPLE_VIDEO, splitFile } from "../split.ts";
import { startTask, tempDir } from "./_util.ts";

/** Seeders in-process, each on its own store under `root`, registered in `directory`. */
async function startSeeders(
  root: string,
  directory: string,
  stores: string[],
  options: { maxUpload?: number } = {},
): Promise<Peer[]> {
  return await Promise.all(stores.map((store) =>
    startPeer({
      port: 0,
      hostname: "127.0.0.1",
      dir: join(root, store),
      directory,
      broker: null,
      log: () => {},
      ...options,
    })
  ));
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
    await using child = startTask("peer", [
      "0",
      "--dir",
      viewer,
      "--directory",
      directory.url,
      "--broker",
      "127.0.0.1:1",
      "--grpc-port",
      "0",
      "--http-port",
      "0",
      "--fetch-all",
      "--exit-when-done",
    ]);
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
    await using viewer = await startPeer({
      port: 0,
      hostname: "127.0.0.1",
      dir: join(dir.path, "viewer"),
      directory: directory.url,
      broker: null,
      log: () => {},
    });
    const done = viewer.fetchAll();
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
    await using viewer = await startPeer({
      port: 0,
      hostname: "127.0.0.1",
      dir: join(dir.path, "viewer"),
      directory: url,
      broker: null,
      log: () => {},
    });
    const done = viewer.fetchAll();
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
    await using viewer = await startPeer({
      port: 0,
      hostname: "127.0.0.1",
      dir: join(dir.path, "viewer"),
      directory: directory.url,
      broker: null,
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
  options: { stallMs?: number; avoidMs?: number; log?: (line: string) => void } = {},
) {
  const store = await Store.open(dir);
  const fetcher = new Fetcher(store, { avoidMs: options.avoidMs, log: options.log });
  const swarm = new Swarm(store, fetcher, { directory: new DirectoryClient(directory) }, {
    stallMs: options.stallMs,
    log: options.log,
  });
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
