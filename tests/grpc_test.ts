import { assert, assertEquals, assertRejects } from "./_assert.ts";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { CHUNK_SIZE, type Download, GrpcClient, GrpcError, startGrpcServer } from "../peer_grpc.ts";
import { type FragmentInfo, IntegrityError, Store } from "../peer/store.ts";
import { splitFile } from "../split.ts";
import { randomBytes, tempDir } from "./_util.ts";
import * as grpc from "@grpc/grpc-js";
import { fileTransfer } from "../peer/grpc_wire.ts";

const BIG = "big.bin"; // 2.5 MiB: three chunks, the last one short

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

/** A store with 4 fragments of a small file (and its manifest) plus a 2.5 MiB loose fragment. */
async function makeStore(root: string) {
  const input = join(root, "video.webm");
  await Deno.writeFile(input, randomBytes(65536 + 3));
  const manifest = await splitFile(input, { out: join(root, "store"), fragments: 4 });
  const store = await Store.open(join(root, "store"));
  const big = randomBytes(2.5 * CHUNK_SIZE);
  await store.write(BIG, { size: big.length, sha256: sha256(big) }, toAsync([big]));
  return { store, manifest, big };
}

/** Every file under `dir`, as sorted relative paths. */
async function listTree(dir: string, prefix = ""): Promise<string[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(dir)) {
    const path = prefix + entry.name;
    if (entry.isDirectory) names.push(...await listTree(join(dir, entry.name), `${path}/`));
    else names.push(path);
  }
  return names.sort();
}

async function collect(chunks: AsyncIterable<Uint8Array>): Promise<Uint8Array[]> {
  const all: Uint8Array[] = [];
  for await (const chunk of chunks) all.push(chunk);
  return all;
}

/** Runs `call` and returns the gRPC status name it failed with. */
async function failure(call: () => Promise<unknown>): Promise<string> {
  return (await assertRejects(call, GrpcError)).code;
}

/** An upload source announcing `info` but carrying `bytes`. */
function lying(info: { size: number; sha256: string }, bytes: Uint8Array): Download {
  return { ...info, chunks: [bytes].values() as unknown as AsyncIterable<Uint8Array> };
}

Deno.test("Echo answers with the message it was given", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  assertEquals(await client.echo(address, "DUMMY"), "DUMMY");
  assertEquals(await client.echo(address, ""), "");
  assertEquals(await client.echo(address, "héllo ✓"), "héllo ✓");
});

Deno.test("ListFiles names every fragment held with its size and hash, and the file", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const list = await client.listFiles(`127.0.0.1:${server.port}`);
  assertEquals(list.file, "video.webm");
  assertEquals(list.fileId, manifest.sha256, "the file's id is its whole-file SHA-256");
  assertEquals(list.fragments, store.list());
  assertEquals(
    list.fragments.slice(0, 4),
    manifest.fragments.map((f) => ({ name: f.name, size: f.size, sha256: f.sha256 })),
  );
});

Deno.test("Locate says whether the peer holds a fragment and names the holders it knows", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  const holder = {
    id: "x",
    host: "10.0.0.7",
    port: 6002,
    grpcPort: 50052,
    httpPort: 8002,
    fileId: manifest.sha256,
  };
  const asked: (string | undefined)[] = [];
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    locate: (name, file) => {
      asked.push(file);
      return Promise.resolve(name === "elsewhere.bin" ? [holder] : []);
    },
  });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const first = manifest.fragments[0];
  assertEquals(await client.locate(address, first.name), {
    held: true,
    fragment: { name: first.name, size: first.size, sha256: first.sha256 },
    holders: [],
    fileId: manifest.sha256,
  });
  const { id: _, ...where } = holder;
  assertEquals(await client.locate(address, "elsewhere.bin"), {
    held: false,
    holders: [where],
    fileId: manifest.sha256,
  });
  // No file named: holders of the peer's own file, by its id.
  assertEquals(asked, [manifest.sha256, manifest.sha256]);
  assertEquals(await failure(() => client.locate(address, "../elsewhere.bin")), "INVALID_ARGUMENT");
});

Deno.test("Locate asks for the file named by id, id prefix or name, and says the id when known", async () => {
  await using dir = await tempDir();
  const store = await Store.open(join(dir.path, "store")); // no manifest: any file
  const id = "ab".repeat(32);
  const holder = { host: "10.0.0.7", port: 6002, grpcPort: 50052, httpPort: 8002, fileId: id };
  const asked: (string | undefined)[] = [];
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    locate: (_name, file) => {
      asked.push(file);
      return Promise.resolve([holder]);
    },
  });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const located = await client.locate(address, "fragment_0.bin", { file: "abab" });
  assertEquals(
    located,
    { held: false, holders: [holder], fileId: id },
    "a prefix the holders share",
  );
  assertEquals((await client.locate(address, "fragment_0.bin", { file: id })).fileId, id);
  await client.locate(address, "fragment_0.bin", { file: "video.webm" });
  await client.locate(address, "fragment_0.bin");
  assertEquals(asked, ["abab", id, "video.webm", undefined]);
  assertEquals((await client.listFiles(address)).fileId, "", "no manifest, no id");
  assertEquals(
    await failure(() => client.locate(address, "fragment_0.bin", { file: "../x" })),
    "INVALID_ARGUMENT",
  );
});

Deno.test("Locate still answers when the directory behind it fails", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    locate: () => Promise.reject(new Error("directory down")),
  });
  using client = new GrpcClient();
  assertEquals(await client.locate(`127.0.0.1:${server.port}`, "nowhere.bin"), {
    held: false,
    holders: [],
    fileId: manifest.sha256,
  });
});

Deno.test("Download streams chunks of at most 1 MiB that Store.write verifies", async () => {
  await using dir = await tempDir();
  const { store, big } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;

  const { size, sha256: hash, chunks } = await client.download(address, BIG);
  assertEquals({ size, hash }, { size: big.length, hash: sha256(big) });
  const pieces = await collect(chunks);
  assertEquals(pieces.map((p) => p.length), [CHUNK_SIZE, CHUNK_SIZE, CHUNK_SIZE / 2]);

  const mine = await Store.open(join(dir.path, "mine"));
  const download = await client.download(address, BIG);
  const info = await mine.write(BIG, download, download.chunks);
  assertEquals(info, { name: BIG, size: big.length, sha256: sha256(big) });
  assertEquals(await Deno.readFile(join(dir.path, "mine", BIG)), big);
});

Deno.test("Download of an empty fragment announces size 0 and carries no bytes", async () => {
  await using dir = await tempDir();
  await Deno.mkdir(join(dir.path, "store"));
  await Deno.writeFile(join(dir.path, "store", "empty.bin"), new Uint8Array());
  const store = await Store.open(join(dir.path, "store"));
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const { size, sha256: hash, chunks } = await client.download(
    `127.0.0.1:${server.port}`,
    "empty.bin",
  );
  assertEquals({ size, hash }, { size: 0, hash: sha256(new Uint8Array()) });
  assertEquals(await collect(chunks), []);
});

Deno.test("Download answers NOT_FOUND for a fragment the peer does not hold", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  assertEquals(await failure(() => client.download(address, "fragment_99.bin")), "NOT_FOUND");
  // The manifest is in the folder but is no fragment: it is never served.
  assertEquals(await failure(() => client.download(address, "manifest.json")), "INVALID_ARGUMENT");
});

Deno.test("A folder in a fragment's place is neither located nor downloaded, and the server goes on", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "video.webm");
  await Deno.writeFile(input, randomBytes(4096));
  await splitFile(input, { out: join(dir.path, "store"), fragments: 2 });
  const broken = join(dir.path, "store", "fragment_1.bin");
  await Deno.remove(broken);
  const store = await Store.open(join(dir.path, "store"));
  // Not a regular file: never opened, so neither served nor mistaken for a disk error.
  await Deno.mkdir(broken);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  assertEquals((await client.locate(address, "fragment_1.bin")).held, false);
  const download = (async () => {
    const { chunks } = await client.download(address, "fragment_1.bin");
    await collect(chunks);
  })();
  assertEquals(await failure(() => download), "NOT_FOUND");
  assertEquals((await client.locate(address, "fragment_0.bin")).held, true);
});

Deno.test("A peer sending bytes that do not match its hash is caught by Store.write", async () => {
  await using dir = await tempDir();
  const { store, big } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  // Flip a byte behind the serving store's back: it still announces the old hash.
  big[12345] ^= 0xff;
  await Deno.writeFile(join(dir.path, "store", BIG), big);
  const mine = await Store.open(join(dir.path, "mine"));
  const download = await client.download(`127.0.0.1:${server.port}`, BIG);
  await assertRejects(() => mine.write(BIG, download, download.chunks), IntegrityError);
  assertEquals(await listTree(join(dir.path, "mine")), []);
});

Deno.test("download() stops when its signal aborts", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const controller = new AbortController();
  const { chunks } = await client.download(`127.0.0.1:${server.port}`, BIG, {
    signal: controller.signal,
  });
  const reading = (async () => {
    for await (const _ of chunks) controller.abort(new Error("enough"));
  })();
  await assertRejects(() => reading, Error, "enough");
});

Deno.test("Upload keeps a verified fragment, reports it, and the store serves it", async () => {
  await using dir = await tempDir();
  // No manifest: any valid name is taken, once its bytes match the hash it was announced with.
  const store = await Store.open(join(dir.path, "store"));
  const stored: FragmentInfo[] = [];
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    onStored: (info) => stored.push(info),
  });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const bytes = randomBytes(CHUNK_SIZE + 777);
  const expected = { name: "pushed.bin", size: bytes.length, sha256: sha256(bytes) };
  assertEquals(await client.upload(address, "pushed.bin", bytes), expected);
  assertEquals(stored, [expected]);
  assertEquals(store.get("pushed.bin"), expected);
  assertEquals(await Deno.readFile(join(dir.path, "store", "pushed.bin")), bytes);
  // A stream in small pieces is regrouped, and an empty fragment is just the announcement.
  const pieces = [bytes.subarray(0, 10), bytes.subarray(10, 70000), bytes.subarray(70000)];
  const streamed = { size: bytes.length, sha256: expected.sha256, chunks: toAsync(pieces) };
  assertEquals(await client.upload(address, "pushed2.bin", streamed), {
    ...expected,
    name: "pushed2.bin",
  });
  assertEquals((await client.upload(address, "empty.bin", new Uint8Array())).size, 0);
});

async function* toAsync(pieces: Uint8Array[]): AsyncGenerator<Uint8Array> {
  yield* pieces;
}

Deno.test("Upload of corrupt bytes is DATA_LOSS and leaves no file, not even a temporary", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  const loose = await Store.open(join(dir.path, "loose"));
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  await using looseServer = await startGrpcServer(loose, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const before = await listTree(dir.path);
  const bytes = randomBytes(3 * CHUNK_SIZE);
  const truth = { size: bytes.length, sha256: sha256(bytes) };
  const flipped = bytes.slice();
  flipped[CHUNK_SIZE * 2 + 5] ^= 1;
  const cases: [string, Download][] = [
    ["a flipped byte", lying(truth, flipped)],
    ["too few bytes", lying(truth, bytes.subarray(1))],
    ["too many bytes", lying({ ...truth, size: truth.size - 1 }, bytes)],
    // The manifest's hash wins over what the sender claims.
    ["bytes the manifest disagrees with", lying(truth, bytes)],
  ];
  for (const [what, source] of cases) {
    const [to, name] = what.startsWith("bytes the")
      ? [address, manifest.fragments[0].name]
      : [`127.0.0.1:${looseServer.port}`, "bad.bin"];
    assertEquals(await failure(() => client.upload(to, name, source)), "DATA_LOSS", what);
  }
  assertEquals(await listTree(dir.path), before);
  assertEquals(loose.get("bad.bin"), undefined);
});

Deno.test("Upload refuses a bad announcement with INVALID_ARGUMENT", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const bytes = randomBytes(100);
  for (
    const claim of [{ size: 100, sha256: "nothex" }, { size: 5 * 1024 ** 3, sha256: sha256(bytes) }]
  ) {
    assertEquals(
      await failure(() => client.upload(address, "ok.bin", lying(claim, bytes))),
      "INVALID_ARGUMENT",
    );
  }
});

Deno.test("Traversal names are refused by every RPC and nothing outside the store is touched", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await Deno.writeTextFile(join(dir.path, "secret"), "do not serve me");
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const before = await listTree(dir.path);
  const names = [
    "../secret",
    "../etc/passwd",
    "/etc/passwd",
    `${dir.path}/secret`,
    "..%2fsecret",
    "..%2Fx",
    "%2e%2e/x",
    "%2e%2e%2fsecret",
    "a/b",
    "..",
    ".",
    "..\\secret",
    "x\0y",
    "a".repeat(300),
    "",
  ];
  const bytes = new TextEncoder().encode("do not keep me");
  for (const name of names) {
    const shown = JSON.stringify(name.slice(0, 20));
    assertEquals(await failure(() => client.download(address, name)), "INVALID_ARGUMENT", shown);
    assertEquals(await failure(() => client.locate(address, name)), "INVALID_ARGUMENT", shown);
    assertEquals(
      await failure(() => client.upload(address, name, bytes)),
      "INVALID_ARGUMENT",
      shown,
    );
  }
  assertEquals(await listTree(dir.path), before);
  assertEquals(await Deno.readTextFile(join(dir.path, "secret")), "do not serve me");
});

Deno.test("Upload takes only what the store's manifest lists, and never its reserved names", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  const bytes = randomBytes(100);
  const before = await listTree(dir.path);
  const cases: [string, string][] = [
    ["stray.bin", "FAILED_PRECONDITION"],
    ["manifest.json", "INVALID_ARGUMENT"],
    [manifest.file, "INVALID_ARGUMENT"],
    [".part-x", "INVALID_ARGUMENT"],
    [".hidden", "INVALID_ARGUMENT"],
  ];
  for (const [name, code] of cases) {
    assertEquals(await failure(() => client.upload(address, name, bytes)), code, name);
  }
  assertEquals(await listTree(dir.path), before);
});

Deno.test("An Upload whose first message is over the size limit is RESOURCE_EXHAUSTED, not a disk error", async () => {
  await using dir = await tempDir();
  const store = await Store.open(join(dir.path, "store"));
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const Client = fileTransfer();
  const raw = new Client(`127.0.0.1:${server.port}`, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": -1,
  });
  const bytes = randomBytes(2 * CHUNK_SIZE);
  const logged: unknown[] = [];
  const original = console.error;
  console.error = (...args: unknown[]) => logged.push(args);
  try {
    // One message holding the whole fragment: bigger than the server's receive limit.
    const code = await new Promise<number | undefined>((resolve) => {
      const call = raw.Upload((error: grpc.ServiceError | null) => resolve(error?.code));
      call.write({ name: "big.bin", size: bytes.length, sha256: sha256(bytes), data: bytes });
      call.end();
    });
    assertEquals(code, grpc.status.RESOURCE_EXHAUSTED);
  } finally {
    console.error = original;
    raw.close();
  }
  assertEquals(logged, []);
  assertEquals(await listTree(join(dir.path, "store")), []);
});

Deno.test("A message over the size limit is refused with RESOURCE_EXHAUSTED", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const huge = "x".repeat(2 * CHUNK_SIZE);
  assertEquals(
    await failure(() => client.echo(`127.0.0.1:${server.port}`, huge)),
    "RESOURCE_EXHAUSTED",
  );
});

Deno.test("GrpcClient reaches a server restarted on the same port through its cached channel", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  using client = new GrpcClient({ deadlineMs: 3000 });
  const first = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const address = `127.0.0.1:${first.port}`;
  assertEquals(await client.echo(address, "before"), "before");
  await first.close();
  assertEquals(await failure(() => client.echo(address, "while down")), "UNAVAILABLE");
  await using _second = await startGrpcServer(store, { port: first.port, hostname: "127.0.0.1" });
  assertEquals(await client.echo(address, "after"), "after");
  const { chunks } = await client.download(address, BIG);
  assertEquals((await collect(chunks)).length, 3);
});

Deno.test("startGrpcServer() refuses a port already taken", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using first = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  const error = await assertRejects(
    () => startGrpcServer(store, { port: first.port, hostname: "127.0.0.1" }),
    Error,
  );
  assertEquals(error.message, `Port ${first.port} is already in use`);
});

Deno.test("the gRPC server serves what another process stored since, but never loose files", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "video.webm");
  await Deno.writeFile(input, randomBytes(65536 + 3));
  const manifest = await splitFile(input, { out: join(dir.path, "store"), fragments: 4 });
  const late = manifest.fragments[2]!;
  const path = join(dir.path, "store", late.name);
  const bytes = await Deno.readFile(path);
  await Deno.remove(path);
  const store = await Store.open(join(dir.path, "store"));
  await using server = await startGrpcServer(store, { port: 0, hostname: "127.0.0.1" });
  using client = new GrpcClient();
  const address = `127.0.0.1:${server.port}`;
  // The peer (another process) stores the fragment, and a file no manifest lists.
  await Deno.writeFile(path, bytes);
  await Deno.writeFile(join(dir.path, "store", "notes.txt"), new TextEncoder().encode("secret"));
  const download = await client.download(address, late.name);
  assertEquals(download.sha256, late.sha256);
  await collect(download.chunks);
  assert((await client.listFiles(address)).fragments.some((f) => f.name === late.name));
  await assertRejects(() => client.download(address, "notes.txt"), GrpcError, "No fragment");
  // Nobody may upload over the joined video.
  await assertRejects(
    () => store.write(manifest.file, { size: 1, sha256: sha256(new Uint8Array(1)) }, toAsync([])),
    Error,
    "joined file",
  );
});

Deno.test("Download keeps to maxUpload, the peer's --max-upload", async () => {
  await using dir = await tempDir();
  const { store, big } = await makeStore(dir.path);
  // 1 MB/s: the 2.6 MB fragment cannot arrive in less than about 2.5 s (a burst is 0.1 s).
  await using server = await startGrpcServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    maxUpload: 1_000_000,
  });
  using client = new GrpcClient();
  const start = performance.now();
  const download = await client.download(`127.0.0.1:${server.port}`, BIG);
  const pieces = await collect(download.chunks);
  const seconds = (performance.now() - start) / 1000;
  assertEquals(pieces.reduce((sum, p) => sum + p.length, 0), big.length);
  assert(seconds >= 2, `2.6 MB at 1 MB/s took only ${seconds.toFixed(2)} s`);
});
