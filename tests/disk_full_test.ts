/**
 * A full disk during a split, a fetch and a join, on a small tmpfs: one line each, no stack
 * trace, nothing partial left, and a peer that goes on seeding what it holds. Needs root (to
 * mount the tmpfs); skipped with a message otherwise.
 * @module
 */
import { join } from "node:path";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { type Child, peerArgs, runTask, startTask, tempDir } from "./_util.ts";
import { startDirectory } from "../directory.ts";
import { SAMPLE_VIDEO, splitFile } from "../split.ts";

async function succeeds(command: string, ...args: string[]): Promise<boolean> {
  try {
    const { success } = await new Deno.Command(command, { args, stderr: "null", stdout: "null" })
      .output();
    return success;
  } catch {
    return false;
  }
}

/** A tmpfs of `size` at a new folder, unmounted and removed on dispose. */
async function smallDisk(size: string): Promise<AsyncDisposable & { path: string }> {
  const path = await Deno.makeTempDir({ prefix: "p2p-full-" });
  if (!await succeeds("mount", "-t", "tmpfs", "-o", `size=${size}`, "tmpfs", path)) {
    await Deno.remove(path);
    throw new Error(`Cannot mount a tmpfs at ${path}`);
  }
  return {
    path,
    [Symbol.asyncDispose]: async () => {
      await succeeds("umount", path);
      await Deno.remove(path, { recursive: true });
    },
  };
}

const canMount = await (async () => {
  try {
    await (await smallDisk("64k"))[Symbol.asyncDispose]();
    return true;
  } catch {
    console.warn("Skipping the full-disk tests: they need root to mount a tmpfs");
    return false;
  }
})();

/** Every name in `dir`, hidden ones too. */
async function names(dir: string): Promise<string[]> {
  const found = [];
  for await (const entry of Deno.readDir(dir)) found.push(entry.name);
  return found.sort();
}

/** Asks a peer's TCP server for `name`; resolves with its `OK <size> <sha256>` line. */
async function firstLineOfGet(port: number, name: string): Promise<string> {
  using connection = await Deno.connect({ hostname: "127.0.0.1", port });
  await connection.write(new TextEncoder().encode(`GET ${name}\n`));
  const buffer = new Uint8Array(256);
  const n = await connection.read(buffer);
  return new TextDecoder().decode(buffer.subarray(0, n ?? 0)).split("\n")[0]!;
}

Deno.test({
  name: "split into a full disk says so on one line and leaves nothing behind",
  ignore: !canMount,
  fn: async () => {
    await using disk = await smallDisk("1m");
    const out = join(disk.path, "fragments");
    const { code, stderr } = await runTask("split", [SAMPLE_VIDEO, "--out", out]);
    assertEquals(code, 1);
    assertMatch(stderr, /^error: Cannot split ".*sample\.webm" into ".*": the disk is full/);
    assertEquals(stderr.trim().split("\n").length, 1, stderr);
    assertEquals(await names(out), []);
  },
});

Deno.test({
  name:
    "a peer whose disk fills during a fetch, or during the join, says so once and keeps seeding",
  ignore: !canMount,
  fn: async () => {
    await using dir = await tempDir();
    const manifest = await splitFile(SAMPLE_VIDEO, {
      out: join(dir.path, "fragments"),
      peers: ["seed"],
    });
    await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
    await using _seed = startTask("peer", [
      "0",
      ...peerArgs(join(dir.path, "fragments", "seed"), directory.url),
      "--no-console",
    ]);
    // 1 MiB holds some fragments, not all; 3 MiB all of them, not the joined file as well.
    const cases = [
      { size: "1m", says: /\[!\] Cannot store 'fragment_\d\.bin' in .*: the disk is full/ },
      { size: "3m", says: /\[!\] Cannot write ".*sample\.webm": the disk is full/ },
    ];
    for (const { size, says } of cases) {
      await using disk = await smallDisk(size);
      const store = join(disk.path, "viewer");
      await using viewer: Child = startTask("peer", [
        "0",
        ...peerArgs(store, directory.url),
        "--no-console",
        "--fetch-all",
      ]);
      const port = Number((await viewer.waitFor(/Node listening on port (\d+)/))[1]);
      const [line] = await viewer.waitFor(
        new RegExp(`${says.source}.*seeding the (\\d+) fragments held`),
      );
      const held = Number(line.match(/seeding the (\d+) fragments held/)![1]);
      assert(held > 0 && held <= manifest.fragments.length, line);
      assert(!/Uncaught|\n\s+at /.test(viewer.stderr + viewer.stdout), viewer.stderr);
      // Nothing partial: no temporary of a fragment or of the join, only whole fragments.
      const left = await names(store);
      assert(!left.some((name) => name.startsWith(".")), left.join(", "));
      assertEquals(left.filter((name) => name.startsWith("fragment_")).length, held);
      // It still serves what it holds.
      const first = left.find((name) => name.startsWith("fragment_"))!;
      const entry = manifest.fragments.find((f) => f.name === first)!;
      assertEquals(await firstLineOfGet(port, first), `OK ${entry.size} ${entry.sha256}`);
    }
  },
});
