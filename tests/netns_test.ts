/**
 * Several hosts on one machine: the directory, the broker and the peers each run in a network
 * namespace of their own with their own address on a private bridge, so nothing can lean on
 * localhost. In the first test a seeder's link is cut mid-download and the viewer still completes;
 * in the second a crowd of viewers downloads from one seeder over links whose upload rate `tc`
 * sets, as real links would, and shares what it already holds.
 *
 * Needs root and iproute2 (`ip netns`, and `tc` for the crowd); skipped with a message otherwise.
 * Traffic stays inside the namespaces these tests make, and they remove them (and their queueing
 * disciplines) when done.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { splitFile } from "../split.ts";
import { Child, randomBytes, ROOT, taskArgv, tempDir } from "./_util.ts";

/** Whether `command args...` runs and exits 0 (false when the program is missing). */
async function succeeds(command: string, ...args: string[]): Promise<boolean> {
  try {
    // A missing program throws from output() itself, not through the promise it returns.
    return (await new Deno.Command(command, { args, stdout: "null", stderr: "null" }).output())
      .success;
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return false;
    throw error;
  }
}

const canRun = Deno.build.os === "linux" && Deno.uid() === 0 &&
  await succeeds("ip", "netns", "list");
if (!canRun) {
  console.warn("Skipping the several-hosts tests: they need root and iproute2 (ip netns)");
}
const canShape = canRun && await succeeds("tc", "-V");
if (canRun && !canShape) {
  console.warn("Skipping the crowd test: it needs tc (iproute2) to set rates");
}

const SUBNET = "10.231.7";
const TAG = `p2p${Deno.pid % 100000}`;
const PEER_PORT = 6001;
const DIRECTORY_PORT = 5000;
const BROKER_PORT = 5555;

async function run(command: string, args: string[]): Promise<void> {
  const { success, stderr } = await new Deno.Command(command, { args }).output();
  if (!success) {
    throw new Error(`${command} ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
  }
}

function ip(...args: string[]): Promise<void> {
  return run("ip", args);
}

/**
 * A namespace per host, each joined to a bridge that lives in a namespace of its own. Disposing
 * of it kills every process it ran, then removes the rates it set and the namespaces.
 */
class Network implements AsyncDisposable {
  readonly hosts = new Map<string, string>(); // host -> address
  readonly #switch = `${TAG}sw`;
  readonly #namespaces: string[] = [];
  readonly #shaped: string[] = []; // namespaces whose eth0 has a root qdisc of ours
  readonly #children: Child[] = [];

  async start(): Promise<void> {
    await this.#add(this.#switch);
    await ip("-n", this.#switch, "link", "add", "br0", "type", "bridge");
    await ip("-n", this.#switch, "link", "set", "br0", "up");
  }

  /** Adds host `name` at `${SUBNET}.${n}`. */
  async host(name: string, n: number): Promise<string> {
    const ns = `${TAG}${name}`;
    await this.#add(ns);
    const outside = `${TAG}${n}`; // the switch's end of the cable
    await ip(
      "link",
      "add",
      outside,
      "netns",
      this.#switch,
      "type",
      "veth",
      "peer",
      "name",
      "eth0",
      "netns",
      ns,
    );
    await ip("-n", this.#switch, "link", "set", outside, "master", "br0", "up");
    await ip("-n", ns, "addr", "add", `${SUBNET}.${n}/24`, "dev", "eth0");
    await ip("-n", ns, "link", "set", "eth0", "up");
    this.hosts.set(name, `${SUBNET}.${n}`);
    return `${SUBNET}.${n}`;
  }

  /** The address of host `name`. */
  address(name: string): string {
    const address = this.hosts.get(name);
    if (address === undefined) throw new Error(`No host "${name}" on this network`);
    return address;
  }

  /**
   * Limits what host `name` sends (its upload) to `rate`, in tc's units (`8mbit` is 1 MB/s), with
   * a token bucket on its eth0, as the link of a real machine would.
   */
  async shape(name: string, rate: string): Promise<void> {
    const ns = `${TAG}${name}`;
    const args = ["-n", ns, "qdisc", "add", "dev", "eth0", "root", "tbf", "rate", rate];
    await run("tc", [...args, "burst", "16kb", "latency", "100ms"]);
    this.#shaped.push(ns);
  }

  /** Unplugs host `n`'s cable at the switch: its packets go nowhere, nothing is reset. */
  async cut(n: number): Promise<void> {
    await ip("-n", this.#switch, "link", "set", `${TAG}${n}`, "down");
  }

  /** Runs task `name` inside host `host`'s namespace; it is killed when the network goes. */
  run(host: string, name: string, args: string[]): Child {
    const argv = ["netns", "exec", `${TAG}${host}`, Deno.execPath(), ...taskArgv(name), ...args];
    const child = new Child(argv, { cwd: ROOT, command: "ip" });
    this.#children.push(child);
    return child;
  }

  async #add(ns: string): Promise<void> {
    await ip("netns", "add", ns);
    this.#namespaces.push(ns);
    await ip("-n", ns, "link", "set", "lo", "up");
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const child of this.#children) await child[Symbol.asyncDispose]();
    for (const ns of this.#shaped) {
      await run("tc", ["-n", ns, "qdisc", "del", "dev", "eth0", "root"]).catch(() => {});
    }
    for (const ns of this.#namespaces.reverse()) await ip("netns", "delete", ns).catch(() => {});
  }
}

/**
 * Starts the directory on host `dir` (`${SUBNET}.1`) and the broker on host `broker`
 * (`${SUBNET}.2`); resolves, once both listen, with the flags a peer needs to reach them.
 */
async function startServices(net: Network): Promise<string[]> {
  const directoryAt = await net.host("dir", 1);
  const brokerAt = await net.host("broker", 2);
  const directory = net.run("dir", "directory", ["--port", `${DIRECTORY_PORT}`, "--ttl", "6"]);
  const broker = net.run("broker", "broker", ["--port", `${BROKER_PORT}`]);
  await directory.waitFor(/Listening/);
  await broker.waitFor(/Listening/);
  return [
    "--directory",
    `http://${directoryAt}:${DIRECTORY_PORT}`,
    "--broker",
    `${brokerAt}:${BROKER_PORT}`,
    "--no-console",
  ];
}

/** Starts a peer on host `host`, advertising the host's own address. */
function startPeer(net: Network, host: string, args: string[]): Child {
  return net.run(host, "peer", [`${PEER_PORT}`, "--advertise", net.address(host), ...args]);
}

/**
 * Waits until the directory lists `count` live peers, asking it from inside host `from`, and
 * resolves with their addresses, sorted.
 */
async function listedPeers(net: Network, from: string, count: number): Promise<string[]> {
  const deadline = Date.now() + 15_000;
  let peers: { host: string }[] = [];
  while (peers.length < count && Date.now() < deadline) {
    peers = await directoryPeers(net, from);
    if (peers.length < count) await new Promise((resolve) => setTimeout(resolve, 200));
  }
  return peers.map((p) => p.host).sort();
}

/** The directory's live peers, asked from inside host `from` ([] while it does not answer). */
async function directoryPeers(net: Network, from: string): Promise<{ host: string }[]> {
  const url = `http://${net.address("dir")}:${DIRECTORY_PORT}/peers`;
  const script = `console.log(await (await fetch("${url}")).text());`;
  const { stdout, success } = await new Deno.Command("ip", {
    args: ["netns", "exec", `${TAG}${from}`, Deno.execPath(), "eval", script],
  }).output();
  if (!success) return [];
  const text = new TextDecoder().decode(stdout).trim();
  const peers = JSON.parse(text).peers;
  if (!Array.isArray(peers)) throw new Error(`GET ${url} answered ${text}, with no list of peers`);
  return peers;
}

/** Waits for `viewer` to exit and checks that it exited 0 with all of `file` verified. */
async function assertCompletes(viewer: Child, file: string, fragments: number): Promise<void> {
  assertEquals((await viewer.status()).code, 0, viewer.stdout + viewer.stderr);
  const complete = `[✓] '${file}' complete: ${fragments}/${fragments} fragments, sha256 verified`;
  assertMatch(viewer.stdout, new RegExp(`^${escapeRegExp(complete)}$`, "m"));
}

/** The holder (`host:port`) each fragment came from, from a viewer's `[swarm]` lines. */
function sources(stdout: string): Map<string, string> {
  const lines = stdout.matchAll(/^\[swarm\] (\S+) from (\S+) \(\d+\/\d+\)$/gm);
  return new Map([...lines].map(([, fragment, from]) => [fragment!, from!]));
}

/** Whether `a` and `b` hold the same bytes (assertEquals would print megabytes on a mismatch). */
function sameBytes(a: Uint8Array, b: Uint8Array): boolean {
  return a.length === b.length && a.every((byte, i) => byte === b[i]);
}

function escapeRegExp(text: string): string {
  return text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
}

Deno.test({
  name:
    "peers on separate hosts advertise real addresses, and a viewer survives a seeder's cut link",
  ignore: !canRun,
  async fn() {
    await using dir = await tempDir();
    const data = join(dir.path, "f");
    await splitFile(join(ROOT, "samples", "sample.webm"), { out: data, peers: ["s1", "s2", "s3"] });
    await using net = new Network();
    await net.start();
    const common = await startServices(net);
    const seeders: [string, number, string][] = [
      ["s1", 11, "s1"],
      ["s2", 12, "s2"],
      ["s3", 13, "s3"],
      ["full", 14, "."],
    ];
    for (const [name, n, store] of seeders) {
      await net.host(name, n);
      const peer = startPeer(net, name, [
        "--dir",
        join(data, store),
        "--max-upload",
        "150KB/s",
        ...common,
      ]);
      await peer.waitFor(/Node listening on port 6001/);
    }
    await net.host("viewer", 20);
    // The directory lists the four seeders by their real addresses.
    assertEquals(
      await listedPeers(net, "viewer", 4),
      [11, 12, 13, 14].map((n) => `${SUBNET}.${n}`),
    );

    const viewer = startPeer(net, "viewer", [
      "--dir",
      join(dir.path, "viewer"),
      "--fetch-all",
      "--exit-when-done",
      ...common,
    ]);
    await viewer.waitFor(/\[swarm\] fragment_\d+\.bin from/, { timeoutMs: 20_000 });
    await net.cut(11); // s1 vanishes mid-download, without a reset
    await assertCompletes(viewer, "sample.webm", 10);
    assertMatch(viewer.stdout, new RegExp(`from ${escapeRegExp(SUBNET)}\\.1[1-4]:6001`));
  },
});

Deno.test({
  name: "a crowd on several hosts, each uploading at 1 MB/s, gets the whole file and shares it",
  ignore: !canShape,
  async fn() {
    const rate = "8mbit"; // 1 MB/s up, for the seeder and each viewer
    const fragments = 15;
    await using dir = await tempDir();
    const original = randomBytes(3_000_000);
    const input = join(dir.path, "crowd.bin");
    await Deno.writeFile(input, original);
    await splitFile(input, { out: join(dir.path, "seed"), fragments });
    await using net = new Network();
    await net.start();
    const common = await startServices(net); // the directory and the broker: not shaped
    const seederAt = await net.host("seed", 11);
    await net.shape("seed", rate);
    const viewers = ["v1", "v2", "v3", "v4"];
    for (const [i, name] of viewers.entries()) {
      await net.host(name, 21 + i);
      await net.shape(name, rate);
    }
    const seeder = startPeer(net, "seed", ["--dir", join(dir.path, "seed"), ...common]);
    await seeder.waitFor(/Node listening on port 6001/);
    assertEquals(await listedPeers(net, "v1", 1), [seederAt]);

    const started = performance.now();
    const children = viewers.map((name) =>
      startPeer(net, name, [
        "--dir",
        join(dir.path, name),
        "--fetch-all",
        "--exit-when-done",
        ...common,
      ])
    );
    await Promise.all(children.map((child) => child.status()));
    const seconds = (performance.now() - started) / 1000;

    let shared = 0;
    const shares: string[] = [];
    for (const [i, name] of viewers.entries()) {
      const viewer = children[i]!;
      await assertCompletes(viewer, "crowd.bin", fragments);
      const joined = await Deno.readFile(join(dir.path, name, "crowd.bin"));
      assert(sameBytes(joined, original), `${name}'s crowd.bin differs from the original`);
      const froms = [...sources(viewer.stdout).values()];
      const fromViewers = froms.filter((from) => !from.startsWith(`${seederAt}:`)).length;
      shares.push(`${name} ${fromViewers}/${froms.length}`);
      shared += fromViewers;
    }
    const total = viewers.length * fragments;
    console.log(
      `4 viewers done in ${seconds.toFixed(1)} s; fragments from other viewers: ` +
        `${shares.join(", ")} (${shared}/${total}, ${Math.round(100 * shared / total)}%)`,
    );
    assert(
      shared > 0,
      `Every fragment came from the seeder: no viewer got one from another (${shares.join(", ")})`,
    );
  },
});
