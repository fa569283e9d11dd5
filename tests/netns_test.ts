/**
 * Several hosts on one machine: the directory, the broker, three seeders, a full seeder and a
 * viewer, each in its own network namespace with its own address on a private bridge, so nothing
 * can lean on localhost. A seeder's link is cut mid-download; the viewer still completes.
 *
 * Needs root and iproute2 (`ip netns`); skipped with a message otherwise. Traffic stays inside
 * the namespaces this test makes, and it removes them when done.
 * @module
 */
import { assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { splitFile } from "../split.ts";
import { Child, ROOT, taskArgv, tempDir } from "./_util.ts";

const canRun = Deno.build.os === "linux" && Deno.uid() === 0 &&
  (await new Deno.Command("ip", { args: ["netns", "list"] }).output().then(
    (o) => o.success,
    () => false,
  ));
if (!canRun) console.warn("Skipping the several-hosts test: it needs root and iproute2 (ip netns)");

const SUBNET = "10.231.7";
const TAG = `p2p${Deno.pid % 100000}`;

async function ip(...args: string[]): Promise<void> {
  const { success, stderr } = await new Deno.Command("ip", { args }).output();
  if (!success) throw new Error(`ip ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
}

/** A namespace per host, each joined to a bridge that lives in a namespace of its own. */
class Network implements AsyncDisposable {
  readonly hosts = new Map<string, string>(); // host -> address
  readonly #switch = `${TAG}sw`;
  readonly #namespaces: string[] = [];

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

  /** Unplugs host `n`'s cable at the switch: its packets go nowhere, nothing is reset. */
  async cut(n: number): Promise<void> {
    await ip("-n", this.#switch, "link", "set", `${TAG}${n}`, "down");
  }

  /** Runs task `name` inside host `host`'s namespace. */
  run(host: string, name: string, args: string[]): Child {
    const argv = ["netns", "exec", `${TAG}${host}`, Deno.execPath(), ...taskArgv(name), ...args];
    return new Child(argv, { cwd: ROOT, command: "ip" });
  }

  async #add(ns: string): Promise<void> {
    await ip("netns", "add", ns);
    this.#namespaces.push(ns);
    await ip("-n", ns, "link", "set", "lo", "up");
  }

  async [Symbol.asyncDispose](): Promise<void> {
    for (const ns of this.#namespaces.reverse()) await ip("netns", "delete", ns).catch(() => {});
  }
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
    const directoryAt = await net.host("dir", 1);
    const brokerAt = await net.host("broker", 2);
    const children: Child[] = [];
    try {
      const directory = net.run("dir", "directory", ["--port", "5000", "--ttl", "6"]);
      const broker = net.run("broker", "broker", ["--port", "5555"]);
      children.push(directory, broker);
      await directory.waitFor(/Listening/);
      await broker.waitFor(/Listening/);
      const common = [
        "--directory",
        `http://${directoryAt}:5000`,
        "--broker",
        `${brokerAt}:5555`,
        "--no-console",
      ];
      const seeders: [string, number, string][] = [["s1", 11, "s1"], ["s2", 12, "s2"], [
        "s3",
        13,
        "s3",
      ], [
        "full",
        14,
        ".",
      ]];
      for (const [name, n, store] of seeders) {
        const address = await net.host(name, n);
        const peer = net.run(name, "peer", [
          "6001",
          "--dir",
          join(data, store),
          "--advertise",
          address,
          "--max-upload",
          "150KB/s",
          ...common,
        ]);
        children.push(peer);
        await peer.waitFor(/Node listening on port 6001/);
      }
      const viewerAt = await net.host("viewer", 20);
      // Wait until the directory lists the four seeders by their real addresses.
      const deadline = Date.now() + 15_000;
      let peers: { host: string }[] = [];
      while (peers.length < 4 && Date.now() < deadline) {
        peers = await directoryPeers(directoryAt);
        if (peers.length < 4) await new Promise((resolve) => setTimeout(resolve, 200));
      }
      assertEquals(peers.map((p) => p.host).sort(), [11, 12, 13, 14].map((n) => `${SUBNET}.${n}`));

      const viewer = net.run("viewer", "peer", [
        "6001",
        "--dir",
        join(dir.path, "viewer"),
        "--advertise",
        viewerAt,
        "--fetch-all",
        "--exit-when-done",
        ...common,
      ]);
      children.push(viewer);
      await viewer.waitFor(/\[swarm\] fragment_\d+\.bin from/, { timeoutMs: 20_000 });
      await net.cut(11); // s1 vanishes mid-download, without a reset
      assertEquals((await viewer.status()).code, 0, viewer.stdout + viewer.stderr);
      assertMatch(
        viewer.stdout,
        /\[✓\] 'sample\.webm' complete: 10\/10 fragments, sha256 verified/,
      );
      assertMatch(viewer.stdout, new RegExp(`from ${SUBNET.replaceAll(".", "\\.")}\\.1[1-4]:6001`));
    } finally {
      for (const child of children) await child[Symbol.asyncDispose]();
    }
  },
});

/** The directory's live peers, asked from inside the viewer's namespace. */
async function directoryPeers(directoryAt: string): Promise<{ host: string }[]> {
  const script =
    `const r = await fetch("http://${directoryAt}:5000/peers"); console.log(JSON.stringify((await r.json()).peers));`;
  const { stdout, success } = await new Deno.Command("ip", {
    args: ["netns", "exec", `${TAG}viewer`, Deno.execPath(), "eval", script],
  }).output();
  return success ? JSON.parse(new TextDecoder().decode(stdout)) : [];
}
