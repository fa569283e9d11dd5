import { assert, assertEquals, assertMatch, assertRejects } from "./_assert.ts";
import { join } from "node:path";
import { Fetcher, FetchError, type Holder, StoreWriteError } from "../peer/fetch.ts";
import { startTcpServer } from "../peer/tcp.ts";
import { Store } from "../peer/store.ts";
import { type Manifest, MANIFEST_NAME as MANIFEST, SAMPLE_VIDEO, splitFile } from "../split.ts";
import { tempDir } from "./_util.ts";

const encoder = new TextEncoder();

async function seed(root: string): Promise<{ seeder: Store; manifest: Manifest }> {
  const manifest = await splitFile(SAMPLE_VIDEO, { out: join(root, "seeder"), fragments: 4 });
  return { seeder: await Store.open(join(root, "seeder")), manifest };
}

const local = (port: number): Holder => ({ host: "127.0.0.1", port, grpcPort: 1 });

/**
 * A holder that misbehaves: it answers every GET for the real fragment's size and hash, then
 * sends `body(size)` instead of the bytes (and closes when `cut` is set). Counts connections.
 */
function startLiar(
  fragment: { size: number; sha256: string },
  body: (size: number) => Uint8Array,
  cut = false,
) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  let connections = 0;
  const serving = (async () => {
    for await (const conn of listener) {
      connections++;
      (async () => {
        const buffer = new Uint8Array(1024);
        while ((await conn.read(buffer)) !== null) {
          await conn.write(encoder.encode(`OK ${fragment.size} ${fragment.sha256}\n`));
          await conn.write(body(fragment.size));
          if (cut) break;
        }
      })().catch(() => {}).finally(() => conn.close());
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get connections() {
      return connections;
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      await serving;
    },
  };
}

Deno.test("Fetcher skips a holder that is down and fetches from the next", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using server = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  const down = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const downPort = (down.addr as Deno.NetAddr).port;
  down.close(); // a port where nothing listens any more
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")));
  const from = await fetcher.fetch("fragment_2.bin", [local(downPort), local(server.port)]);
  assertEquals(from, `127.0.0.1:${server.port}`);
  assertEquals(
    (await Deno.readFile(join(dir.path, "viewer", "fragment_2.bin"))).length,
    manifest.fragments[2]!.size,
  );
});

Deno.test("Fetcher rejects a holder's wrong bytes, stores nothing from it, and avoids it", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  await using liar = startLiar(manifest.fragments[0]!, (size) => new Uint8Array(size).fill(7));
  const logs: string[] = [];
  const viewer = await Store.open(join(dir.path, "viewer"));
  using fetcher = new Fetcher(viewer, { log: (line) => logs.push(line) });

  assertEquals(
    await fetcher.fetch("fragment_0.bin", [local(liar.port), local(good.port)]),
    `127.0.0.1:${good.port}`,
  );
  assertMatch(
    logs.join("\n"),
    /'fragment_0\.bin' from 127\.0\.0\.1:\d+ failed verification; avoiding it/,
  );
  assert(fetcher.isAvoided(local(liar.port)));
  // Asked again for another fragment, the liar is not even contacted.
  const before = liar.connections;
  await fetcher.fetch("fragment_1.bin", [local(liar.port), local(good.port)]);
  assertEquals(liar.connections, before);
  assertEquals(viewer.list().map((f) => f.name), ["fragment_0.bin", "fragment_1.bin"]);
});

Deno.test("Fetcher retries elsewhere when a connection is cut mid-fragment", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  await using cutter = startLiar(manifest.fragments[3]!, (size) => new Uint8Array(size / 2), true);
  const viewer = await Store.open(join(dir.path, "viewer"));
  using fetcher = new Fetcher(viewer);
  assertEquals(
    await fetcher.fetch("fragment_3.bin", [local(cutter.port), local(good.port)]),
    `127.0.0.1:${good.port}`,
  );
  assertEquals(viewer.get("fragment_3.bin")?.sha256, manifest.fragments[3]!.sha256);
  assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))].map((e) => e.name), [
    "fragment_3.bin",
  ]);
});

Deno.test("Fetcher reconnects to a holder that restarted on the same port", async () => {
  await using dir = await tempDir();
  const { seeder } = await seed(dir.path);
  const first = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  const port = first.port;
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")));
  await fetcher.fetch("fragment_0.bin", [local(port)]);
  await first.close(); // the pooled connection is now dead
  await using second = startTcpServer(seeder, { port, hostname: "127.0.0.1" });
  assertEquals(await fetcher.fetch("fragment_1.bin", [local(second.port)]), `127.0.0.1:${port}`);
});

Deno.test("Fetcher says why when no holder can provide a fragment", async () => {
  await using dir = await tempDir();
  const { seeder } = await seed(dir.path);
  await using server = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")));
  await assertRejects(() => fetcher.fetch("fragment_0.bin", []), FetchError, "no holder known");
  await assertRejects(
    () => fetcher.fetch("fragment_99.bin", [local(server.port)]),
    FetchError,
    "answered NOT_FOUND",
  );
});

Deno.test("Fetcher reports a failed disk write clearly and leaves no partial file", async () => {
  await using dir = await tempDir();
  const { seeder } = await seed(dir.path);
  await using server = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  const viewerDir = join(dir.path, "viewer");
  using fetcher = new Fetcher(await Store.open(viewerDir));
  await Deno.remove(viewerDir, { recursive: true });
  await Deno.writeTextFile(viewerDir, "a file where the store was");
  await assertRejects(
    () => fetcher.fetch("fragment_0.bin", [local(server.port)]),
    StoreWriteError,
    `Cannot store 'fragment_0.bin' in "${viewerDir}"`,
  );
  assertEquals(await Deno.readTextFile(viewerDir), "a file where the store was");
  assertEquals([...Deno.readDirSync(dir.path)].map((e) => e.name).sort(), ["seeder", "viewer"]);
});

Deno.test("Store.prune() forgets the fragments whose files went or changed size, and only those", async () => {
  await using dir = await tempDir();
  const { seeder } = await seed(dir.path); // four fragments
  await Deno.remove(join(seeder.dir, "fragment_1.bin"));
  await Deno.writeTextFile(join(seeder.dir, "fragment_2.bin"), "shorter");
  assertEquals(await seeder.prune(), ["fragment_1.bin", "fragment_2.bin"]);
  assertEquals(seeder.list().map((f) => f.name), ["fragment_0.bin", "fragment_3.bin"]);
  assertEquals(await seeder.prune(), []);
});

Deno.test("Fetcher passes over a holder of another file's fragment of the same name, without avoiding it", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  // Another file, split the same way: its fragment_1.bin is other bytes under the same name.
  const otherFile = join(dir.path, "other.bin");
  await Deno.writeFile(otherFile, crypto.getRandomValues(new Uint8Array(64 * 1024)));
  await splitFile(otherFile, { out: join(dir.path, "other"), fragments: 4 });
  const other = await Store.open(join(dir.path, "other"));
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  await using elsewhere = startTcpServer(other, { port: 0, hostname: "127.0.0.1" });
  // The viewer's store knows which file it is after: it has the seeder's manifest.
  await Deno.mkdir(join(dir.path, "viewer"));
  await Deno.copyFile(join(dir.path, "seeder", MANIFEST), join(dir.path, "viewer", MANIFEST));
  const viewer = await Store.open(join(dir.path, "viewer"));
  const logs: string[] = [];
  using fetcher = new Fetcher(viewer, { log: (line) => logs.push(line) });
  const name = manifest.fragments[1]!.name;
  const from = await fetcher.fetch(name, [local(elsewhere.port), local(good.port)]);
  assertEquals(from, `127.0.0.1:${good.port}`);
  assertEquals(viewer.get(name)?.sha256, manifest.fragments[1]!.sha256);
  assert(!fetcher.isAvoided(local(elsewhere.port)));
  assertEquals(logs.filter((line) => /failed verification/.test(line)), []);
  // With it alone, the error says what it holds.
  const error = await assertRejects(
    () => fetcher.fetch(manifest.fragments[2]!.name, [local(elsewhere.port)]),
    FetchError,
  );
  assertMatch(error.message, new RegExp(`holds another file's '${manifest.fragments[2]!.name}'`));
});
