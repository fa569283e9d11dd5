/**
 * A crowd of viewers served peer to peer: HAVE messages from the broker, random tie-breaks, a
 * busy seeder pointing requesters at the peers it already sent a fragment to, upload slots shared
 * fairly between peers, and a crowd that survives one of its viewers dying. Viewers and seeders
 * are child processes started with the peer task's flags; the directory and the broker run in
 * this process, on port 0.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { startDirectory } from "../directory.ts";
import { startBroker } from "../broker.ts";
import { Fetcher, type Holder } from "../peer/fetch.ts";
import { Steering } from "../peer/steering.ts";
import { Store } from "../peer/store.ts";
import { type FragmentEvent, Swarm } from "../peer/swarm.ts";
import { PeerError, startTcpServer, TcpPeerClient } from "../peer/tcp.ts";
import { UploadSlots } from "../peer/upload_slots.ts";
import { GrpcClient, startGrpcServer } from "../peer_grpc.ts";
import { createThrottle } from "../common/throttle.ts";
import { type FragmentEntry, type Manifest, splitFile } from "../split.ts";
import { type Child, peerArgs, startTask, tempDir } from "./_util.ts";

const FILE = "crowd.bin";
const SENT = /^\[✓\] Fragment '(\S+)' sent to \S+$/gm;
const ARRIVAL = /^\[swarm\] (\S+) from (\S+) \(\d+\/\d+\)$/gm;
const COMPLETE = (fragments: number) =>
  new RegExp(`\\[✓\\] '${FILE}' complete: ${fragments}/${fragments} fragments, sha256 verified`);

/** A file of `size` random bytes split into `fragments` in `dir`. */
async function makeStore(dir: string, size: number, fragments: number): Promise<Manifest> {
  await Deno.mkdir(dir, { recursive: true });
  const input = join(dir, "..", FILE);
  const bytes = new Uint8Array(size);
  for (let at = 0; at < size; at += 65536) crypto.getRandomValues(bytes.subarray(at, at + 65536));
  await Deno.writeFile(input, bytes);
  return await splitFile(input, { out: dir, fragments });
}

/**
 * A store at `dir` for `manifest`'s file, holding a copy of each fragment of `copied` from the
 * seeder's store `seederDir`: a viewer (nothing copied) or another holder.
 */
async function storeFor(
  dir: string,
  manifest: Manifest,
  seederDir?: string,
  copied: FragmentEntry[] = [],
): Promise<Store> {
  const store = await Store.open(dir);
  await store.setManifest(manifest);
  for (const fragment of copied) {
    const bytes = await Deno.readFile(join(seederDir!, fragment.name));
    await store.write(
      fragment.name,
      fragment,
      (async function* () {
        yield bytes;
      })(),
    );
  }
  return store;
}

/** Flags of a crowd peer: its store, the directory, the broker, an upload limit. */
function crowdArgs(dir: string, directory: string, broker: string, rate: string): string[] {
  return [...peerArgs(dir, directory), "--broker", broker, "--max-upload", rate];
}

/** The `[swarm] <fragment> from <host:port>` lines of a viewer: fragment and source, in order. */
function arrivals(viewer: Child): { name: string; from: string }[] {
  return [...viewer.stdout.matchAll(ARRIVAL)].map(([, name, from]) => ({
    name: name!,
    from: from!,
  }));
}

async function listed(url: string, count: number): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (true) {
    const { peers } = await (await fetch(`${url}/peers`)).json() as { peers: unknown[] };
    const { files } = await (await fetch(`${url}/files`)).json() as { files: unknown[] };
    if (peers.length >= count && files.length > 0) return;
    assert(Date.now() < deadline, `the directory never listed ${count} peer(s) and a file`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

Deno.test("UploadSlots gives a freed slot to the peer served least recently", async () => {
  const slots = new UploadSlots(1);
  const order: string[] = [];
  const first = await slots.acquire("a");
  // Peer a asks three times, b once, c once: they take turns, a's extra asks wait behind.
  const asks = ["a", "a", "a", "b", "c"].map((peer) =>
    slots.acquire(peer).then((release) => {
      order.push(peer);
      release();
    })
  );
  assertEquals([slots.active, slots.waiting], [1, 5]);
  first();
  await Promise.all(asks);
  assertEquals(order, ["a", "b", "c", "a", "a"]);
  assertEquals([slots.active, slots.waiting], [0, 0]);
  // A wait that is given up leaves no trace.
  const held = await slots.acquire("x");
  const gone = new AbortController();
  const waiting = slots.acquire("y", gone.signal);
  gone.abort();
  await waiting.then(() => assert(false, "should reject"), () => {});
  assertEquals(slots.waiting, 0);
  held();
});

Deno.test("UploadSlots serves a request placed at the front before one placed back that waited longer", async () => {
  const slots = new UploadSlots(1, { placeStepMs: 1_000, maxLeadMs: 5_000 });
  const order: string[] = [];
  const take = (peer: string, place: number, urgent = false) =>
    slots.acquire(peer, undefined, { place: () => place, urgent }).then((release) => {
      order.push(`${peer}${urgent ? "!" : ""}`);
      release();
    });
  const first = await slots.acquire("x");
  // b came later, but a stands 3 places (3 s) back; c's own urgent request goes before its other.
  const asks = [take("a", 3), take("b", 0), take("c", 3), take("c", 3, true)];
  first();
  await Promise.all(asks);
  assertEquals(order, ["b", "a", "c!", "c"]);
});

Deno.test("UploadSlots bounds a place's handicap: a request never waits longer than maxLeadMs behind later ones", async () => {
  const slots = new UploadSlots(1, { placeStepMs: 1_000, maxLeadMs: 200 });
  const order: string[] = [];
  const first = await slots.acquire("x");
  // Placed 1000 places back, but past 200 ms of waiting it goes before those that came after.
  const far = slots.acquire("far", undefined, { place: () => 1000 }).then((release) => {
    order.push("far");
    release();
  });
  await new Promise((resolve) => setTimeout(resolve, 300));
  const near = slots.acquire("near").then((release) => {
    order.push("near");
    release();
  });
  first();
  await Promise.all([far, near]);
  assertEquals(order, ["far", "near"]);
});

Deno.test("a busy peer points a second requester at the peer it is sending to, only once", async () => {
  await using dir = await tempDir();
  const manifest = await makeStore(join(dir.path, "seeder"), 400_000, 4);
  const store = await Store.open(join(dir.path, "seeder"));
  const steering = new Steering(store);
  // 100 KB/s: a fragment takes a second, so the first send is still going when B asks.
  await using server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    throttle: createThrottle(100_000),
    steering,
  });
  const address = `127.0.0.1:${server.port}`;
  const [first, second] = manifest.fragments;
  using a = await TcpPeerClient.connect(address);
  using b = await TcpPeerClient.connect(address);
  using anonymous = await TcpPeerClient.connect(address);
  await a.hello("10.0.0.1:6001");
  await b.hello("10.0.0.2:6002");
  const sending = await a.get(first!.name);
  const reading = (async () => {
    for await (const _ of sending.chunks); // A reads its fragment to the end
  })();
  // B asks for the fragment on its way to A: pointed at A, while the seeder alone holds others.
  const error = await b.get(first!.name).then(() => undefined, (e) => e);
  assert(error instanceof PeerError, String(error));
  assertEquals([error.code, error.elsewhere], ["ELSEWHERE", ["10.0.0.1:6001"]]);
  assertMatch(error.message, /held elsewhere: 10\.0\.0\.1:6001/);
  // A client that does not say who it is is served, and so is B when it comes back.
  const served = await anonymous.get(first!.name);
  for await (const _ of served.chunks);
  const again = await b.get(first!.name);
  for await (const _ of again.chunks);
  await reading;
  // A HAVE names another holder; an idle seeder serves anyway.
  steering.have(second!.name, "10.0.0.3:6003");
  const idle = await b.get(second!.name);
  assertEquals(idle.size, second!.size);
  for await (const _ of idle.chunks);
});

Deno.test("a busy seeder goes on pointing while requests only wait in line, and stops once every fragment is out", async () => {
  await using dir = await tempDir();
  const manifest = await makeStore(join(dir.path, "seeder"), 400_000, 4);
  const steering = new Steering(await Store.open(join(dir.path, "seeder")));
  const peer = (i: number) => `10.0.0.${i + 1}:6001`;
  // A crowd asks for every fragment at once: all wait in line, none is out yet.
  for (const [i, f] of manifest.fragments.entries()) steering.asked(f.name, peer(i));
  const [first, second] = manifest.fragments.map((f) => f.name);
  assertEquals(steering.redirect(first!, "10.0.0.9:6009", true), [peer(0)]);
  assertEquals(steering.redirect(first!, "10.0.0.9:6009", true), undefined, "once");
  assertEquals(steering.redirect(first!, "10.0.0.8:6008", false), undefined, "idle: it serves");
  // Every fragment sent (or held) elsewhere: the seeder is a peer like the others.
  for (const [i, f] of manifest.fragments.entries()) steering.have(f.name, peer(i));
  assertEquals(steering.redirect(second!, "10.0.0.9:6009", true), undefined);
});

Deno.test("over gRPC too, a busy seeder points a second requester at the first", async () => {
  await using dir = await tempDir();
  const manifest = await makeStore(join(dir.path, "seeder"), 400_000, 4);
  const store = await Store.open(join(dir.path, "seeder"));
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    maxUpload: 50_000, // the first is still on its way when the second asks
    steering: new Steering(store),
  });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const name = manifest.fragments[0]!.name;
  // The first is paced before its first message: under way, not answered yet.
  const first = client.download(address, name, { peer: "10.0.0.1:50051" });
  await new Promise((resolve) => setTimeout(resolve, 300));
  const error = await client.download(address, name, { peer: "10.0.0.2:50052" })
    .then(() => undefined, (e) => e);
  assert(error instanceof PeerError, String(error));
  assertEquals([error.code, error.elsewhere], ["ELSEWHERE", ["10.0.0.1:50051"]]);
  // Asked again, it serves; and a client that names no peer is never pointed elsewhere.
  for (const peer of ["10.0.0.2:50052", undefined]) {
    const again = await client.download(address, name, { peer });
    assertEquals(again.size, manifest.fragments[0]!.size);
    again.cancel?.();
  }
  (await first).cancel?.();
});

Deno.test("Fetcher follows ERR ELSEWHERE to the peer named, and asks the pointer again after", async () => {
  await using dir = await tempDir();
  const manifest = await makeStore(join(dir.path, "seeder"), 400_000, 4);
  const seeder = await Store.open(join(dir.path, "seeder"));
  const steering = new Steering(seeder);
  // 20 KB/s: the send that keeps it busy lasts seconds.
  await using busy = startTcpServer(seeder, {
    port: 0,
    hostname: "127.0.0.1",
    throttle: createThrottle(20_000),
    steering,
  });
  // The peer pointed at holds the fragment; a second one pointed at is down.
  const [first, second] = manifest.fragments;
  const other = await storeFor(join(dir.path, "other"), manifest, join(dir.path, "seeder"), [
    first!,
  ]);
  await using holder = startTcpServer(other, { port: 0, hostname: "127.0.0.1" });
  steering.have(first!.name, `127.0.0.1:${holder.port}`);
  steering.have(second!.name, "127.0.0.1:1");
  // Keep the seeder busy with a slow send.
  using keeper = await TcpPeerClient.connect(`127.0.0.1:${busy.port}`);
  await keeper.hello("10.9.9.9:1");
  const slow = await keeper.get(manifest.fragments[3]!.name);
  const draining = (async () => {
    for await (const _ of slow.chunks);
  })();
  const viewer = await storeFor(join(dir.path, "viewer"), manifest);
  using fetcher = new Fetcher(viewer, { self: "127.0.0.1:7777" });
  const seed = { host: "127.0.0.1", port: busy.port, grpcPort: 0 };
  assertEquals(await fetcher.fetch(first!.name, [seed]), `127.0.0.1:${holder.port}`);
  // Pointed at a peer that is down: back to the pointer, which serves this time.
  assertEquals(await fetcher.fetch(second!.name, [seed]), `127.0.0.1:${busy.port}`);
  await draining;
});

/**
 * A seeder of a 1.6 MB file in 4 fragments under `root`/seeder: a TCP server with one upload
 * slot at 400 KB/s (with `steering`, when asked for), kept busy sending the last fragment.
 */
async function busySeeder(root: string, { steer = false } = {}) {
  const seederDir = join(root, "seeder");
  const manifest = await makeStore(seederDir, 1_600_000, 4);
  const store = await Store.open(seederDir);
  const steering = steer ? new Steering(store) : undefined;
  const server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    uploadSlots: 1,
    throttle: createThrottle(400_000),
    steering,
  });
  const keeper = await TcpPeerClient.connect(`127.0.0.1:${server.port}`);
  await keeper.hello("10.9.9.9:1");
  const busy = await keeper.get(manifest.fragments[3]!.name);
  let doneAt = Infinity;
  const draining = (async () => {
    for await (const _ of busy.chunks);
    doneAt = performance.now();
  })();
  return {
    manifest,
    seederDir,
    steering,
    port: server.port,
    /** When the keeper's fragment was all sent (Infinity until then). */
    doneAt: () => doneAt,
    async [Symbol.asyncDispose]() {
      await draining.catch(() => {});
      keeper.close();
      await server.close();
    },
  };
}

/**
 * `count` clients of the peer at `address`, the i-th saying it is peer `10.0.0.<i+1>:600<i+1>`,
 * and `take`, which fetches a fragment on one of them, noting in `order` when its send began.
 */
async function orderedClients(address: string, count: number) {
  const clients = await Promise.all(
    Array.from({ length: count }, async (_, i) => {
      const client = await TcpPeerClient.connect(address);
      await client.hello(`10.0.0.${i + 1}:600${i + 1}`);
      return client;
    }),
  );
  const order: string[] = [];
  return {
    clients,
    order,
    async take(client: TcpPeerClient, name: string) {
      const download = await client.get(name);
      order.push(name);
      for await (const _ of download.chunks);
    },
    [Symbol.dispose]: () => clients.forEach((client) => client.close()),
  };
}

Deno.test("a busy seeder gives its next slot to a fragment only it holds before one others hold", async () => {
  await using dir = await tempDir();
  await using holder = await busySeeder(dir.path, { steer: true });
  const [f0, f1, f2] = holder.manifest.fragments;
  holder.steering!.have(f1!.name, "10.0.0.9:6009"); // another peer holds f1
  using peers = await orderedClients(`127.0.0.1:${holder.port}`, 2);
  const { clients: [a, b], order, take } = peers;
  // A asks for f1: pointed at its holder once, then it waits for a slot. B asks for f2 later.
  const pointed = await a!.get(f1!.name).then(() => undefined, (e) => e);
  assert(pointed instanceof PeerError && pointed.code === "ELSEWHERE", String(pointed));
  const asks = [take(a!, f1!.name)];
  await new Promise((resolve) => setTimeout(resolve, 50));
  asks.push(take(b!, f2!.name));
  await Promise.all(asks);
  assertEquals(order, [f2!.name, f1!.name]);
  assert(f0, "four fragments");
});

Deno.test("a busy seeder moves up a request others were pointed at: they wait for it too", async () => {
  await using dir = await tempDir();
  await using holder = await busySeeder(dir.path, { steer: true });
  const [f0, f1, f2] = holder.manifest.fragments;
  using peers = await orderedClients(`127.0.0.1:${holder.port}`, 3);
  const { clients: [a, b, c], order, take } = peers;
  // C waits for f2 first, then A for f1; B, asking for f1 too, is pointed at A.
  const asks = [take(c!, f2!.name)];
  await new Promise((resolve) => setTimeout(resolve, 50));
  asks.push(take(a!, f1!.name));
  await new Promise((resolve) => setTimeout(resolve, 50));
  const pointed = await b!.get(f1!.name).then(() => undefined, (e) => e);
  assert(pointed instanceof PeerError && pointed.code === "ELSEWHERE", String(pointed));
  assertEquals(pointed.elsewhere, ["10.0.0.1:6001"]);
  await Promise.all(asks);
  assertEquals(order, [f1!.name, f2!.name]);
  assert(f0, "four fragments");
});

Deno.test("a cancelled fetch that waits for a busy holder's slot ends at once, not when the slot frees", async () => {
  await using dir = await tempDir();
  await using holder = await busySeeder(dir.path);
  const { manifest } = holder;
  const viewer = await storeFor(join(dir.path, "viewer"), manifest);
  using fetcher = new Fetcher(viewer, { self: "127.0.0.1:7777" });
  const cancel = new AbortController();
  const fetching = fetcher.fetch(manifest.fragments[0]!.name, [
    { host: "127.0.0.1", port: holder.port, grpcPort: 0 },
  ], { signal: cancel.signal });
  await new Promise((resolve) => setTimeout(resolve, 100));
  cancel.abort();
  const error = await fetching.then(() => undefined, (e) => e);
  const endedAt = performance.now();
  assertMatch(String(error), /cancelled/);
  assert(endedAt < holder.doneAt(), "the fetch waited for the slot anyway");
  assertEquals(viewer.get(manifest.fragments[0]!.name), undefined);
});

/**
 * A viewer's swarm on a fresh store under `root`, asking `neighbours` (read afresh, so a test can
 * change them), and the holders named by its `state` events, in order.
 */
async function viewerSwarm(
  root: string,
  manifest: Manifest,
  neighbours: Holder[],
  state: FragmentEvent["state"],
) {
  const viewer = await storeFor(join(root, "viewer"), manifest);
  const fetcher = new Fetcher(viewer, { self: "127.0.0.1:7777" });
  const swarm = new Swarm(viewer, fetcher, { neighbours: () => neighbours });
  const named: string[] = [];
  swarm.onEvent((event) => {
    if (event.state === state) named.push(event.from ?? "");
  });
  return {
    swarm,
    named,
    [Symbol.dispose]() {
      swarm[Symbol.dispose]();
      fetcher[Symbol.dispose]();
    },
  };
}

Deno.test("a swarm waiting for a busy holder's slot takes the fragment from an idle holder that turns up", async () => {
  await using dir = await tempDir();
  await using busy = await busySeeder(dir.path);
  const { manifest } = busy;
  const name = manifest.fragments[0]!.name;
  // An idle peer holding the fragment, known only once the swarm already waits at the first.
  const other = await storeFor(join(dir.path, "other"), manifest, busy.seederDir, [
    manifest.fragments[0]!,
  ]);
  await using idle = startTcpServer(other, { port: 0, hostname: "127.0.0.1" });
  const neighbours = [{ host: "127.0.0.1", port: busy.port, grpcPort: 0 }];
  using viewer = await viewerSwarm(dir.path, manifest, neighbours, "held");
  const from = viewer.named;
  const needing = viewer.swarm.need(name);
  await new Promise((resolve) => setTimeout(resolve, 100));
  neighbours.push({ host: "127.0.0.1", port: idle.port, grpcPort: 0 });
  await needing;
  assert(performance.now() < busy.doneAt(), "it waited for the busy holder's slot");
  assertEquals(from, [`127.0.0.1:${idle.port}`]);
});

Deno.test("a swarm takes localhost:P and 127.0.0.1:P for one holder: no second request waits in its line", async () => {
  await using dir = await tempDir();
  await using busy = await busySeeder(dir.path);
  const { manifest } = busy;
  // As its pointers and HAVEs name it; then the directory lists it too, at its address.
  const neighbours = [{ host: "localhost", port: busy.port, grpcPort: 0 }];
  using viewer = await viewerSwarm(dir.path, manifest, neighbours, "inflight");
  const { swarm, named: asked } = viewer;
  const needing = swarm.need(manifest.fragments[0]!.name).catch(() => {});
  await new Promise((resolve) => setTimeout(resolve, 100));
  neighbours.unshift({ host: "127.0.0.1", port: busy.port, grpcPort: 0 });
  await new Promise((resolve) => setTimeout(resolve, 600)); // past the 300 ms before a second ask
  swarm[Symbol.dispose]();
  await needing;
  assertEquals(asked, [`localhost:${busy.port}`]);
});

/**
 * A directory, a broker and a seeder child holding a file of `size` bytes in `fragments`;
 * `prepare` may change the seeder's store before it starts.
 */
async function startCrowdSeed(
  root: string,
  size: number,
  fragments: number,
  rate: string,
  prepare?: (manifest: Manifest) => Promise<void>,
) {
  const manifest = await makeStore(join(root, "seeder"), size, fragments);
  await prepare?.(manifest);
  const directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  const brokerAddress = `127.0.0.1:${broker.port}`;
  const seeder = startTask("peer", [
    "0",
    "--no-console",
    ...crowdArgs(join(root, "seeder"), directory.url, brokerAddress, rate),
  ]);
  const port = (await seeder.waitFor(/Node listening on port (\d+)/, { stream: "stdout" }))[1]!;
  await listed(directory.url, 1);
  return {
    manifest,
    url: directory.url,
    broker: brokerAddress,
    seeder,
    seederPort: Number(port),
    viewer(name: string, extra: string[] = []): Child {
      return startTask("peer", [
        "0",
        ...crowdArgs(join(root, name), directory.url, brokerAddress, rate),
        "--fetch-all",
        "--exit-when-done",
        ...extra,
      ]);
    },
    async [Symbol.asyncDispose]() {
      await seeder[Symbol.asyncDispose]();
      await broker.close();
      await directory.close();
    },
  };
}

Deno.test("a crowd shares: viewers start on different fragments and fetch from each other", async () => {
  await using dir = await tempDir();
  await using crowd = await startCrowdSeed(dir.path, 2_000_000, 10, "500KB/s");
  const viewers = ["v1", "v2", "v3", "v4"].map((name) => crowd.viewer(name));
  try {
    for (const viewer of viewers) {
      assertEquals((await viewer.status()).code, 0, viewer.stderr);
      assertMatch(viewer.stdout, COMPLETE(10));
    }
    const original = await Deno.readFile(join(dir.path, FILE));
    for (const name of ["v1", "v2", "v3", "v4"]) {
      assertEquals(await Deno.readFile(join(dir.path, name, FILE)), original);
    }
    const seederSuffix = `:${crowd.seederPort}`;
    const got = viewers.map(arrivals);
    // Random tie-breaks: the viewers did not all ask the seeder first for the same fragment. (Their
    // first arrivals may well be one fragment: the seeder points them at the viewer getting it.)
    const firstFromSeeder = got.flatMap((a) => a.find((x) => x.from.endsWith(seederSuffix)) ?? []);
    assert(new Set(firstFromSeeder.map((a) => a.name)).size > 1, JSON.stringify(got));
    const fromViewers = got.flat().filter((a) => !a.from.endsWith(seederSuffix)).length;
    assert(fromViewers > 0, "no viewer fetched from another viewer");
    // Client-server would have the seeder send the file four times.
    const sent = [...crowd.seeder.stdout.matchAll(SENT)].length;
    assert(sent < 4 * 10, `the seeder sent ${sent} fragments for 4 viewers of 10`);
    console.log(`seeder sent ${sent} fragments; ${fromViewers}/40 came from other viewers`);
  } finally {
    await Promise.all(viewers.map((viewer) => viewer[Symbol.asyncDispose]()));
  }
});

Deno.test("a crowd completes when one of its viewers dies mid-download", async () => {
  await using dir = await tempDir();
  await using crowd = await startCrowdSeed(dir.path, 2_000_000, 10, "400KB/s");
  const viewers = ["v1", "v2", "v3"].map((name) => crowd.viewer(name));
  try {
    await viewers[0]!.waitFor(ARRIVAL, { stream: "stdout" });
    await viewers[0]![Symbol.asyncDispose](); // SIGKILL: no goodbye to the directory
    for (const viewer of viewers.slice(1)) {
      assertEquals((await viewer.status()).code, 0, viewer.stderr);
      assertMatch(viewer.stdout, COMPLETE(10));
    }
  } finally {
    await Promise.all(viewers.map((viewer) => viewer[Symbol.asyncDispose]()));
  }
});

/**
 * The seeder lacks the last fragment. Another peer fetches it from a third peer, typed at its
 * console, and announces it; the viewer must find it there. `listed`: that peer is in the
 * directory; `heard`: the viewer is on the broker.
 */
async function lateHolder({ listed, heard }: { listed: boolean; heard: boolean }) {
  await using dir = await tempDir();
  const late = join(dir.path, "late");
  const source = join(dir.path, "source");
  let last = "";
  await using crowd = await startCrowdSeed(dir.path, 1_000_000, 5, "10MB/s", async (manifest) => {
    last = manifest.fragments.at(-1)!.name;
    const seeder = join(dir.path, "seeder");
    await Deno.mkdir(late);
    await Deno.mkdir(source);
    for (const name of ["manifest.json", last]) {
      await Deno.copyFile(join(seeder, name), join(source, name));
    }
    await Deno.copyFile(join(seeder, "manifest.json"), join(late, "manifest.json"));
    await Deno.remove(join(seeder, last));
  });
  const nowhere = "http://127.0.0.1:1";
  await using third = startTask("peer", ["0", "--no-console", ...peerArgs(source, nowhere)]);
  const thirdPort = (await third.waitFor(/Node listening on port (\d+)/, { stream: "stdout" }))[1];
  const lateArgs = crowdArgs(late, listed ? crowd.url : nowhere, crowd.broker, "10MB/s");
  await using holder = startTask("peer", ["0", `127.0.0.1:${thirdPort}`, ...lateArgs], {
    stdin: true,
  });
  const holderPort = (await holder.waitFor(/Node listening on port (\d+)/))[1];
  await using viewer = crowd.viewer("viewer", heard ? [] : ["--broker", "127.0.0.1:1"]);
  await viewer.waitFor(/\[swarm\] \S+ from \S+ \(4\/5\)/, { stream: "stdout" });
  await holder.write(`${last}\n`);
  assertEquals((await viewer.status()).code, 0, viewer.stderr);
  const from = arrivals(viewer).find((a) => a.name === last)?.from;
  // Heard of: the address it announces; listed: where the directory saw it.
  assertEquals(from, `${heard ? "localhost" : "127.0.0.1"}:${holderPort}`);
}

Deno.test("a HAVE from the broker makes a holder known that the directory does not list", () =>
  lateHolder({ listed: false, heard: true }));

Deno.test("a viewer that misses the HAVE learns the holder from the directory", () =>
  lateHolder({ listed: true, heard: false }));
