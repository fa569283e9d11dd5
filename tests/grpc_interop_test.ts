import { assert, assertEquals } from "./_assert.ts";
import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { CHUNK_SIZE, PROTO_PATH } from "../peer_grpc.ts";
import { startGrpcFront } from "../peer/grpc_front.ts";
import { standardProtoDirs } from "../peer/grpc_constants.ts";
import { randomBytes, ROOT, tempDir } from "./_util.ts";

const CLIENT = join(ROOT, "tests", "grpc_interop", "client.mjs");

/**
 * Makes `target` a node_modules folder of links into Deno's own npm cache, for `roots` and every
 * package they need (read from deno.lock). So node runs the very versions deno.json pins, with no
 * `npm install` and no network: importing peer_grpc.ts already put them in the cache. A package
 * needed in two versions is linked once, in the version found first (the roots' own first).
 */
async function linkNodeModules(target: string, roots: string[]): Promise<void> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output();
  const { npmCache } = JSON.parse(new TextDecoder().decode(info.stdout));
  const lock = JSON.parse(await Deno.readTextFile(join(ROOT, "deno.lock")));
  const packages: Record<string, { dependencies?: string[] }> = lock.npm;
  // Lock keys are `name@version`, perhaps with a `_peer@version` suffix; deno.json's pins are
  // `npm:name@version` in the lock's specifiers.
  const split = (key: string) => key.match(/^(@?[^@]+)@([^_]+)/)!.slice(1, 3);
  const pinned = new Map(
    Object.entries(lock.specifiers as Record<string, string>)
      .filter(([specifier]) => specifier.startsWith("npm:"))
      .map(([specifier, version]) => {
        const name = specifier.slice(4).replace(/(.)@.*$/, "$1");
        return [name, `${name}@${version}`];
      }),
  );
  const byName = new Map(Object.keys(packages).map((key) => [split(key)[0], key]));
  const linked = new Set<string>();
  for (const queue = [...roots]; queue.length > 0;) {
    const wanted = queue.shift()!;
    const key = packages[wanted] ? wanted : pinned.get(wanted) ?? byName.get(wanted);
    if (!key || !packages[key]) throw new Error(`deno.lock has no npm package "${wanted}"`);
    const [name, version] = split(key);
    if (linked.has(name)) continue;
    linked.add(name);
    const source = join(npmCache, "registry.npmjs.org", name, version);
    await Deno.stat(source).catch(() => {
      throw new Error(`"${name}@${version}" is not in Deno's npm cache at ${source}`);
    });
    await Deno.mkdir(dirname(join(target, name)), { recursive: true });
    await Deno.symlink(source, join(target, name));
    queue.push(...packages[key].dependencies ?? []);
  }
}

Deno.test("A Node.js client (node, @grpc/grpc-js) calls the peer's Echo, Download, Health and reflection", async () => {
  await using dir = await tempDir();
  const store = join(dir.path, "store");
  await Deno.mkdir(store);
  const bytes = randomBytes(CHUNK_SIZE + 4321);
  await Deno.writeFile(join(store, "fragment_3.bin"), bytes);
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  await linkNodeModules(join(dir.path, "node_modules"), ["@grpc/grpc-js", "@grpc/proto-loader"]);
  // Through the front, as in a peer: the server (a supervised child) starts on the first call,
  // and a Node client hanging up can only cost a restart of the child.
  await using front = startGrpcFront({ dir: store, port: 0, hostname: "127.0.0.1" });
  const [healthDir, reflectionDir] = standardProtoDirs();

  const { code, stdout, stderr } = await new Deno.Command("node", {
    args: [
      CLIENT,
      `127.0.0.1:${front.port}`,
      PROTO_PATH,
      "fragment_3.bin",
      join(healthDir, "health", "v1", "health.proto"),
      join(reflectionDir, "grpc", "reflection", "v1", "reflection.proto"),
    ],
    env: { NODE_PATH: join(dir.path, "node_modules") },
  }).output();
  const text = new TextDecoder();
  assertEquals(code, 0, text.decode(stderr));
  const result = JSON.parse(text.decode(stdout));
  assertEquals(result.echo, "hello from node");
  assertEquals(
    { size: result.size, sha256: result.sha256, received: result.received },
    { size: bytes.length, sha256, received: sha256 },
  );
  assertEquals(result.chunkSizes, [CHUNK_SIZE, 4321]);
  assertEquals(result.traversal, "INVALID_ARGUMENT");
  // The standard services, as grpc_health_probe and grpcurl call them.
  assertEquals(result.checks, {
    "": "SERVING",
    "p2p.FileTransfer": "SERVING",
    "no.Such": "NOT_FOUND",
  });
  assertEquals(result.watched, "SERVING");
  assertEquals(result.services, ["grpc.health.v1.Health", "p2p.FileTransfer"]);
  assert(result.files > 0, "describe p2p.FileTransfer returned no file descriptor");
});

const PYTHON_CLIENT = join(ROOT, "tests", "grpc_interop", "client.py");
// Python's grpcio (gRPC's C core) with grpcio-tools, as `.ci/run` installs them when it can.
const hasPythonGrpc = (() => {
  try {
    const check = ["-c", "import grpc, grpc_tools"];
    return new Deno.Command("python3", { args: check, stderr: "null" }).outputSync().success;
  } catch {
    return false;
  }
})();

Deno.test({
  name: "A Python client (grpcio, gRPC's C core) downloads, is refused, cancels and checks health",
  ignore: !hasPythonGrpc,
  async fn() {
    await using dir = await tempDir();
    const store = join(dir.path, "store");
    await Deno.mkdir(store);
    const bytes = randomBytes(2 * CHUNK_SIZE + 4321);
    await Deno.writeFile(join(store, "fragment_3.bin"), bytes);
    const sha256 = createHash("sha256").update(bytes).digest("hex");
    await using front = startGrpcFront({ dir: store, port: 0, hostname: "127.0.0.1" });
    const [healthDir] = standardProtoDirs();
    await Deno.mkdir(join(dir.path, "generated"));
    const { code, stdout, stderr } = await new Deno.Command("python3", {
      args: [
        PYTHON_CLIENT,
        `127.0.0.1:${front.port}`,
        PROTO_PATH,
        join(healthDir, "health", "v1", "health.proto"),
        "fragment_3.bin",
        join(dir.path, "generated"),
      ],
    }).output();
    const text = new TextDecoder();
    assertEquals(code, 0, text.decode(stderr));
    const result = JSON.parse(text.decode(stdout));
    assertEquals(result, {
      echo: "hello from python",
      listed: ["fragment_3.bin"],
      size: bytes.length,
      sha256,
      received: sha256,
      chunkSizes: [CHUNK_SIZE, CHUNK_SIZE, 4321],
      missing: "NOT_FOUND",
      traversal: "INVALID_ARGUMENT",
      deadline: "DEADLINE_EXCEEDED",
      cancelled: "CANCELLED",
      afterCancel: "still here",
      check: "SERVING",
      watched: "SERVING",
    });
  },
});
