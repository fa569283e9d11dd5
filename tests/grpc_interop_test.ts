import { assertEquals } from "./_assert.ts";
import { createHash } from "node:crypto";
import { dirname, join } from "node:path";
import { CHUNK_SIZE, PROTO_PATH, superviseGrpcServer } from "../peer_grpc.ts";
import { ROOT, tempDir } from "./_util.ts";

const CLIENT = join(ROOT, "tests", "grpc_interop", "client.mjs");

/**
 * Makes `target` a node_modules folder of links into Deno's own npm cache, for `roots` and every
 * package they need (read from deno.lock). So node runs the very versions deno.json pins, with no
 * `npm install` and no network: importing peer_grpc.ts already put them in the cache.
 */
async function linkNodeModules(target: string, roots: string[]): Promise<void> {
  const info = await new Deno.Command(Deno.execPath(), { args: ["info", "--json"] }).output();
  const { npmCache } = JSON.parse(new TextDecoder().decode(info.stdout));
  const lock = JSON.parse(await Deno.readTextFile(join(ROOT, "deno.lock")));
  const packages: Record<string, { dependencies?: string[] }> = lock.npm;
  // Lock keys are `name@version`, perhaps with a `_peer@version` suffix.
  const split = (key: string) => key.match(/^(@?[^@]+)@([^_]+)/)!.slice(1, 3);
  const byName = new Map(Object.keys(packages).map((key) => [split(key)[0], key]));
  const seen = new Set<string>();
  for (const queue = [...roots]; queue.length > 0;) {
    const wanted = queue.pop()!;
    const key = packages[wanted] ? wanted : byName.get(wanted);
    if (!key) throw new Error(`deno.lock has no npm package "${wanted}"`);
    if (seen.has(key)) continue;
    seen.add(key);
    const [name, version] = split(key);
    const source = join(npmCache, "registry.npmjs.org", name, version);
    await Deno.stat(source).catch(() => {
      throw new Error(`"${name}@${version}" is not in Deno's npm cache at ${source}`);
    });
    await Deno.mkdir(dirname(join(target, name)), { recursive: true });
    await Deno.symlink(source, join(target, name));
    queue.push(...packages[key].dependencies ?? []);
  }
}

Deno.test("A Node.js client (node, @grpc/grpc-js) calls the peer's Echo and Download", async () => {
  await using dir = await tempDir();
  const store = join(dir.path, "store");
  await Deno.mkdir(store);
  const bytes = new Uint8Array(CHUNK_SIZE + 4321);
  for (let i = 0; i < bytes.length; i += 65536) {
    crypto.getRandomValues(bytes.subarray(i, i + 65536));
  }
  await Deno.writeFile(join(store, "fragment_3.bin"), bytes);
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  await linkNodeModules(join(dir.path, "node_modules"), ["@grpc/grpc-js", "@grpc/proto-loader"]);
  // Supervised, as in a peer: a Node client hanging up can only cost a restart of the child.
  await using supervisor = await superviseGrpcServer({
    dir: store,
    port: 0,
    hostname: "127.0.0.1",
  });

  const { code, stdout, stderr } = await new Deno.Command("node", {
    args: [CLIENT, `127.0.0.1:${supervisor.port}`, PROTO_PATH, "fragment_3.bin"],
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
});
