import { assert, assertEquals, assertMatch, assertRejects } from "./_assert.ts";
import { join } from "node:path";
import {
  Fetcher,
  FetchError,
  formatSize,
  type Holder,
  parseSize,
  StoreWriteError,
} from "../peer/fetch.ts";
import { createThrottle } from "../common/throttle.ts";
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

/**
 * A fake holder on a real socket: answers each request line with `header`, then sends what
 * `body(conn)` writes. Counts connections and bytes it got written; closing stops it all.
 */
function startFake(header: string, body: (conn: Deno.Conn) => Promise<void> = async () => {}) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  const handlers = new Set<Promise<void>>();
  let connections = 0;
  const serving = (async () => {
    for await (const conn of listener) {
      connections++;
      conns.add(conn);
      const handler = (async () => {
        const buffer = new Uint8Array(1024);
        while ((await conn.read(buffer)) !== null) {
          if (!new TextDecoder().decode(buffer).startsWith("GET ")) continue; // HELLO and such
          await conn.write(encoder.encode(header + "\n"));
          await body(conn);
        }
      })().catch(() => {}).finally(() => {
        conns.delete(conn);
        try {
          conn.close();
        } catch { /* closed */ }
      });
      handlers.add(handler);
    }
  })().catch(() => {});
  return {
    port: (listener.addr as Deno.NetAddr).port,
    get connections() {
      return connections;
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const conn of conns) {
        try {
          conn.close();
        } catch { /* closed */ }
      }
      await serving;
      await Promise.all(handlers);
    },
  };
}

const HASH = "ab".repeat(32);

Deno.test("Fetcher refuses a fragment announced over --max-fragment before writing a byte, avoids its holder, and fetches from the next", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  let sent = 0;
  // It announces a terabyte and would send zeros for as long as it is read.
  await using liar = startFake(`OK ${2 ** 40} ${HASH}`, async (conn) => {
    const zeros = new Uint8Array(64 * 1024);
    while (true) sent += await conn.write(zeros);
  });
  const viewerDir = join(dir.path, "viewer"); // no manifest: nothing says how big it is
  const logs: string[] = [];
  using fetcher = new Fetcher(await Store.open(viewerDir), { log: (line) => logs.push(line) });
  const name = manifest.fragments[0]!.name;
  assertEquals(
    await fetcher.fetch(name, [local(liar.port), local(good.port)]),
    `127.0.0.1:${good.port}`,
  );
  assertMatch(
    logs.join("\n"),
    /127\.0\.0\.1:\d+ announced 'fragment_0\.bin' at 1 TiB, over the 1 GiB a fragment may have \(--max-fragment\); avoiding it; trying the next holder/,
  );
  assert(fetcher.isAvoided(local(liar.port)));
  assertEquals([...Deno.readDirSync(viewerDir)].map((e) => e.name), [name]);
  // The connection was dropped at once: what the liar got out is what socket buffers hold.
  assert(sent < 16 * 1024 * 1024, `the liar wrote ${sent} bytes`);
});

Deno.test("Fetcher takes the manifest's word on a fragment's size over --max-fragment", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path); // fragments of about 600 KB
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  await Deno.mkdir(join(dir.path, "viewer"));
  await Deno.copyFile(join(dir.path, "seeder", MANIFEST), join(dir.path, "viewer", MANIFEST));
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")), { maxFragment: 1000 });
  await fetcher.fetch(manifest.fragments[1]!.name, [local(good.port)]);
  // Without the manifest, the same bound refuses it.
  using loose = new Fetcher(await Store.open(join(dir.path, "loose")), { maxFragment: 1000 });
  const error = await assertRejects(
    () => loose.fetch(manifest.fragments[1]!.name, [local(good.port)]),
    FetchError,
  );
  assertMatch(error.message, /over the 1000 bytes a fragment may have/);
  assertEquals(error.failures[0]?.kind, "bad");
});

Deno.test("Fetcher refuses a gRPC download whose first message announces more than --max-fragment", async () => {
  await using dir = await tempDir();
  let pulled = 0;
  let cancelled = false;
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")), {
    grpcDownload: () =>
      Promise.resolve({
        size: 2 ** 40,
        sha256: HASH,
        chunks: (async function* () {
          while (true) yield new Uint8Array(1024 * 1024).fill(++pulled);
        })(),
        cancel: () => cancelled = true,
      }),
  });
  const error = await assertRejects(
    () => fetcher.fetch("fragment_0.bin", [local(1)], { transport: "grpc" }),
    FetchError,
  );
  assertMatch(error.message, /announced 'fragment_0\.bin' at 1 TiB, over the 1 GiB/);
  assertEquals([pulled, cancelled], [0, true]);
  assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))], []);
});

Deno.test("Fetcher leaves a holder that drips its bytes, and fetches from the next", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  const fragment = manifest.fragments[2]!;
  // A byte every 20 ms: each read comes in well under the 15 s read timeout, for hours.
  await using dripper = startFake(`OK ${fragment.size} ${fragment.sha256}`, async (conn) => {
    while (true) {
      await conn.write(new Uint8Array(1));
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
  });
  const logs: string[] = [];
  const viewerDir = join(dir.path, "viewer");
  using fetcher = new Fetcher(await Store.open(viewerDir), {
    log: (line) => logs.push(line),
    minRate: 64 * 1024,
    rateWindowMs: 300,
  });
  const start = performance.now();
  // Without a rate to keep, this would take hours: cut it short, so the test fails instead.
  const limit = new AbortController();
  const timer = setTimeout(() => limit.abort(), 5_000);
  try {
    assertEquals(
      await fetcher.fetch(fragment.name, [local(dripper.port), local(good.port)], {
        signal: limit.signal,
      }),
      `127.0.0.1:${good.port}`,
    );
  } finally {
    clearTimeout(timer);
  }
  assert(performance.now() - start < 2_000, "left within about one window");
  assertMatch(
    logs.join("\n"),
    /\[!\] 127\.0\.0\.1:\d+ sent too slowly \(\d+ bytes? in 0\.3 s, under the 64 KiB\/s a fragment needs\); trying the next holder/,
  );
  assert(!fetcher.isAvoided(local(dripper.port)), "slow is not lying");
  assertEquals([...Deno.readDirSync(viewerDir)].map((e) => e.name), [fragment.name]);
});

Deno.test("Fetcher keeps a holder that is paced but steady above the minimum rate", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  // About 600 KB at 500 KB/s: a second and more, in 64 KiB writes, against 64 KiB/s windows.
  await using paced = startTcpServer(seeder, {
    port: 0,
    hostname: "127.0.0.1",
    throttle: createThrottle(500_000),
  });
  const logs: string[] = [];
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")), {
    log: (line) => logs.push(line),
    minRate: 64 * 1024,
    rateWindowMs: 300,
  });
  const name = manifest.fragments[0]!.name;
  assertEquals(await fetcher.fetch(name, [local(paced.port)]), `127.0.0.1:${paced.port}`);
  assertEquals(logs, []);
});

Deno.test("Fetcher shows a holder's ERR text with its control characters escaped", async () => {
  await using dir = await tempDir();
  await using rude = startFake("ERR NOT_FOUND \x1b]0;pwned\x07\x1b[2J\x9b31m gone");
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")));
  const error = await assertRejects(
    () => fetcher.fetch("fragment_0.bin", [local(rude.port)]),
    FetchError,
  );
  assertEquals(
    error.message,
    `Could not fetch 'fragment_0.bin': 127.0.0.1:${rude.port} answered NOT_FOUND: ` +
      "\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m gone",
  );
  assertEquals(error.failures[0]?.text.includes("\x1b"), false);
});

Deno.test("Fetcher takes a malformed OK line for a broken holder and reads none of its bytes", async () => {
  await using dir = await tempDir();
  for (const header of ["OK -5 " + HASH, "OK 12abc " + HASH, "OK 10 nothex", `OK 1e3 ${HASH}`]) {
    await using broken = startFake(header, async (conn) => {
      await conn.write(new Uint8Array(10));
    });
    using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")));
    const error = await assertRejects(
      () => fetcher.fetch("fragment_0.bin", [local(broken.port)]),
      FetchError,
    );
    assertMatch(error.message, /failed \(Malformed answer from 127\.0\.0\.1:\d+: "OK /);
    assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))], []);
  }
});

Deno.test("parseSize() reads --max-fragment sizes, and formatSize() shows them", () => {
  assertEquals(parseSize("256MiB"), 256 * 1024 ** 2);
  assertEquals(parseSize("1GiB"), 1024 ** 3);
  assertEquals(parseSize("500MB"), 500e6);
  assertEquals(parseSize("1000000"), 1e6);
  for (const bad of ["", "0", "-1", "big", "1 PiB"]) {
    let threw = false;
    try {
      parseSize(bad);
    } catch (error) {
      threw = error instanceof TypeError;
    }
    assert(threw, `"${bad}" is refused`);
  }
  assertEquals(formatSize(2 ** 40), "1 TiB");
  assertEquals(formatSize(1536), "1.5 KiB");
  assertEquals(formatSize(1000), "1000 bytes");
  assertEquals(formatSize(1), "1 byte");
});

Deno.test("Fetcher says it tries the next holder only when there is one; after the last, the error says it", async () => {
  await using dir = await tempDir();
  const { seeder, manifest } = await seed(dir.path);
  await using good = startTcpServer(seeder, { port: 0, hostname: "127.0.0.1" });
  // A holder that is down: a port nothing listens on any more.
  const gone = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const down = (gone.addr as Deno.NetAddr).port;
  gone.close();
  const logs: string[] = [];
  using fetcher = new Fetcher(await Store.open(join(dir.path, "viewer")), {
    log: (line) => logs.push(line),
  });
  await fetcher.fetch(manifest.fragments[0]!.name, [local(down), local(good.port)]);
  assertEquals(logs.length, 1, logs.join("\n"));
  assertMatch(
    logs[0]!,
    new RegExp(`^\\[!\\] 127\\.0\\.0\\.1:${down} failed .*; trying the next holder$`),
  );
  logs.length = 0;
  const error = await assertRejects(
    () => fetcher.fetch(manifest.fragments[1]!.name, [local(down)]),
    FetchError,
  );
  assertEquals(logs, []);
  assertMatch(
    error.message,
    new RegExp(`^Could not fetch 'fragment_1\\.bin': 127\\.0\\.0\\.1:${down} failed`),
  );
});
