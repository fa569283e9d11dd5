import { assert, assertEquals, assertMatch, assertRejects } from "./_assert.ts";
import { join } from "node:path";
import { createHash } from "node:crypto";
import {
  FREE_RELAYS,
  PeerError,
  startTcpServer,
  TcpPeerClient,
  type TcpServerOptions,
} from "../peer/tcp.ts";
import { IntegrityError, Store } from "../peer/store.ts";
import { splitFile } from "../split.ts";
import { createThrottle } from "../common/throttle.ts";
import { Child, ROOT, runTask, tempDir } from "./_util.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();

/** A store holding fragments 0..3 of a random 64 KiB + 3 byte file, and its bytes. */
async function makeStore(root: string) {
  const input = join(root, "video.webm");
  const bytes = new Uint8Array(65536 + 3).map(() => Math.random() * 256);
  await Deno.writeFile(input, bytes);
  const manifest = await splitFile(input, { out: join(root, "store"), fragments: 4 });
  return { store: await Store.open(join(root, "store")), manifest, bytes };
}

/** Sends `text` (optionally one byte at a time) and reads until `done(received)` is true. */
async function exchange(
  port: number,
  text: string,
  done: (received: string) => boolean,
  { byteByByte = false } = {},
): Promise<string> {
  using conn = await Deno.connect({ port });
  const bytes = encoder.encode(text);
  if (byteByByte) {
    for (let i = 0; i < bytes.length; i++) await conn.write(bytes.subarray(i, i + 1));
  } else {
    await conn.write(bytes);
  }
  let received = "";
  const buffer = new Uint8Array(65536);
  while (!done(received)) {
    const n = await conn.read(buffer);
    if (n === null) break;
    received += decoder.decode(buffer.subarray(0, n), { stream: true });
  }
  return received;
}

Deno.test("TCP server answers the protocol table, and stays usable after every ERR", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const table: [string, RegExp][] = [
    ["PING", /^PONG$/],
    ["LIST", new RegExp(`^OK 4$`)],
    ["", /^ERR BAD_REQUEST empty request$/],
    ["GET", /^ERR BAD_REQUEST GET needs a fragment name: GET <name>$/],
    ["GET ", /^ERR BAD_REQUEST GET needs a fragment name: GET <name>$/],
    ["GET nothing.bin", /^ERR NOT_FOUND no fragment "nothing\.bin" here$/],
    ["GET ../etc/passwd", /^ERR BAD_REQUEST invalid fragment name "\.\.\/etc\/passwd"$/],
    ["GET /etc/passwd", /^ERR BAD_REQUEST invalid fragment name/],
    ["GET ..%2fmanifest.json", /^ERR BAD_REQUEST invalid fragment name/],
    ["GET %2e%2e/x", /^ERR BAD_REQUEST invalid fragment name/],
    ["GET manifest.json", /^ERR BAD_REQUEST invalid fragment name "manifest\.json"$/],
    [`GET ${"a".repeat(201)}`, /^ERR BAD_REQUEST invalid fragment name/],
    ["GET a b", /^ERR BAD_REQUEST unknown request "GET a b"$/],
    ["GET nothing.bin URGENT", /^ERR NOT_FOUND no fragment "nothing\.bin" here$/],
    ["GET nothing.bin SOON", /^ERR BAD_REQUEST unknown request "GET nothing\.bin SOON"$/],
    ["GET URGENT nothing.bin", /^ERR BAD_REQUEST unknown request/],
    ["HELLO WORLD", /^ERR BAD_REQUEST HELLO needs the peer's own address: HELLO <host:port>$/],
    ["HELLO 127.0.0.1:6009", /^OK$/],
    ["HELLO", /^ERR BAD_REQUEST HELLO needs the peer's own address/],
    ["PING extra", /^ERR BAD_REQUEST unknown request/],
    ["\0", /^ERR BAD_REQUEST invalid fragment name/],
  ];
  // Every request on one connection: an ERR must leave it usable.
  const script = table.map(([line]) => line + "\n").join("") + "PING\n";
  const received = await exchange(
    server.port,
    script,
    (r) => r.endsWith("PONG\n") && r.split("\n").length > table.length + 5,
  );
  const replies = received.split("\n");
  let at = 0;
  for (const [line, pattern] of table) {
    assertMatch(replies[at]!, pattern, `reply to "${line}"`);
    at += line === "LIST" ? 1 + manifest.fragments.length : 1;
  }
  assertEquals(replies[at], "PONG");
});

Deno.test("TCP server sends a fragment as OK <size> <sha256> and exactly its bytes", async () => {
  await using dir = await tempDir();
  const { store, manifest, bytes } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const f = manifest.fragments[1]!;
  for (const line of [`GET ${f.name}`, f.name, `GET ${f.name} URGENT`]) { // bare: GET
    using conn = await Deno.connect({ port: server.port });
    await conn.write(encoder.encode(line + "\nPING\n"));
    const expected = `OK ${f.size} ${f.sha256}\n`.length + f.size + "PONG\n".length;
    const received = new Uint8Array(expected);
    for (let at = 0; at < expected;) at += (await conn.read(received.subarray(at)))!;
    const header = `OK ${f.size} ${f.sha256}\n`;
    assertEquals(decoder.decode(received.subarray(0, header.length)), header);
    assertEquals(
      received.subarray(header.length, header.length + f.size),
      bytes.subarray(f.offset, f.offset + f.size),
    );
    assertEquals(decoder.decode(received.subarray(header.length + f.size)), "PONG\n");
  }
});

/**
 * A peer holding fragment 0 of `makeStore`'s file and receiving fragment 1: its store is written
 * half, then the rest (`tail`, by default the right bytes) once `finish()` is called; served over
 * TCP meanwhile, with `options`.
 */
async function relayingPeer(
  root: string,
  { tail, ...options }: { tail?: (right: Uint8Array) => Uint8Array } & TcpServerOptions = {},
) {
  const { manifest, bytes } = await makeStore(root);
  const [held, f] = [manifest.fragments[0]!, manifest.fragments[1]!];
  const fragment = bytes.slice(f.offset, f.offset + f.size);
  const half = Math.floor(f.size / 2);
  const store = await Store.open(join(root, "relay"));
  await store.setManifest(manifest);
  await Deno.copyFile(join(root, "store", held.name), join(root, "relay", held.name));
  await store.adopt(held.name);
  const gate = Promise.withResolvers<void>();
  const rest = (tail ?? ((right) => right))(fragment.slice(half));
  const writing = store.write(
    f.name,
    f,
    (async function* () {
      yield fragment.slice(0, half);
      await gate.promise;
      yield rest;
    })(),
  );
  writing.catch(() => {}); // awaited by the test that expects it to fail
  const server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    onError: () => {},
    ...options,
  });
  return { held, f, fragment, half, store, server, writing, finish: () => gate.resolve() };
}

Deno.test("TCP server passes on a fragment it is still receiving, the last byte once it is verified", async () => {
  await using dir = await tempDir();
  const peer = await relayingPeer(dir.path);
  await using _server = peer.server;
  using client = await TcpPeerClient.connect(`127.0.0.1:${peer.server.port}`);
  const download = await client.get(peer.f.name);
  assertEquals([download.size, download.sha256], [peer.f.size, peer.f.sha256]);
  const received: number[] = [];
  const chunks = download.chunks[Symbol.asyncIterator]();
  while (received.length < peer.half) received.push(...(await chunks.next()).value!);
  assertEquals(received.length, peer.half, "the half that arrived, before the peer holds it");
  assertEquals(peer.store.get(peer.f.name), undefined);
  peer.finish();
  for (let next; !(next = await chunks.next()).done;) received.push(...next.value);
  await peer.writing;
  assertEquals(new Uint8Array(received), peer.fragment);
  await client.ping(); // the connection is ready for the next request
});

Deno.test("TCP server passes a fragment on as it arrives without waiting for an upload slot, up to FREE_RELAYS at once", async () => {
  await using dir = await tempDir();
  // One slot, at 16 KB/s with its burst spent: the held fragment (16 KiB) keeps it for a second.
  const throttle = createThrottle(16_384);
  await throttle(64 * 1024);
  const peer = await relayingPeer(dir.path, { uploadSlots: 1, throttle });
  await using _server = peer.server;
  const address = `127.0.0.1:${peer.server.port}`;
  using keeper = await TcpPeerClient.connect(address);
  const clients = await Promise.all(
    Array.from({ length: FREE_RELAYS + 1 }, () => TcpPeerClient.connect(address)),
  );
  const busy = await keeper.get(peer.held.name);
  let kept = true;
  const draining = (async () => {
    for await (const _ of busy.chunks);
    kept = false;
  })();
  const answered: boolean[] = []; // whether the slot was still kept when each OK came
  const relays = clients.map(async (client) => {
    const relayed = await client.get(peer.f.name);
    answered.push(kept);
    for await (const _ of relayed.chunks);
  });
  await new Promise((resolve) => setTimeout(resolve, 100));
  peer.finish();
  await Promise.all([...relays, draining, peer.writing]);
  clients.forEach((client) => client.close());
  assertEquals(answered, [...Array(FREE_RELAYS).fill(true), false]);
});

Deno.test("TCP server cuts a fragment it is passing on before the last byte when its copy fails", async () => {
  await using dir = await tempDir();
  // The rest arrives with its last byte wrong: the relaying peer's verification fails.
  const peer = await relayingPeer(dir.path, {
    tail: (right) => right.map((b, i) => i === right.length - 1 ? b ^ 1 : b),
  });
  await using _server = peer.server;
  const viewer = await Store.open(join(dir.path, "viewer"));
  using client = await TcpPeerClient.connect(`127.0.0.1:${peer.server.port}`);
  const download = await client.get(peer.f.name);
  let count = 0;
  const counted = (async function* () {
    for await (const chunk of download.chunks) {
      count += chunk.length;
      if (count >= peer.half) peer.finish();
      yield chunk;
    }
  })();
  const error = await assertRejects(() => viewer.write(peer.f.name, download, counted), Error);
  assert(!(error instanceof IntegrityError), `cut off, not sent wrong bytes: ${error}`);
  await assertRejects(() => peer.writing, IntegrityError);
  assertEquals(count, peer.f.size - 1);
  assertEquals(viewer.get(peer.f.name), undefined);
  assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))].length, 0);
});

Deno.test("TCP server holds a GET for a fragment this peer is asking a holder for until its bytes begin", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await makeStore(dir.path);
  const store = await Store.open(join(dir.path, "relay"));
  await store.setManifest(manifest);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const [, , f, g] = manifest.fragments;
  using a = await TcpPeerClient.connect(`127.0.0.1:${server.port}`);
  using b = await TcpPeerClient.connect(`127.0.0.1:${server.port}`);
  // Asked of a holder, its bytes not begun: the GET waits instead of NOT_FOUND.
  const expecting = store.expect(f!.name);
  let answered = false;
  const asked = a.get(f!.name).finally(() => answered = true);
  await new Promise((resolve) => setTimeout(resolve, 100));
  assert(!answered, "answered before any byte arrived");
  const fragment = bytes.slice(f!.offset, f!.offset + f!.size);
  await store.write(
    f!.name,
    f!,
    (async function* () {
      yield fragment;
    })(),
  );
  expecting[Symbol.dispose]();
  const download = await asked;
  const received = [];
  for await (const chunk of download.chunks) received.push(...chunk);
  assertEquals(new Uint8Array(received), fragment);
  // The fetch ends with no bytes (the holder had none): NOT_FOUND then.
  const nothing = store.expect(g!.name);
  const refused = b.get(g!.name).then(() => undefined, (error) => error);
  await new Promise((resolve) => setTimeout(resolve, 50));
  nothing[Symbol.dispose]();
  const error = await refused;
  assert(error instanceof PeerError && error.code === "NOT_FOUND", String(error));
  // Bytes that never begin are not waited for forever: two peers each waiting for the other's.
  using _stuck = store.expect(g!.name);
  assertEquals(await store.relay(g!.name, { waitMs: 50 }), undefined);
});

Deno.test("TCP server gives a freed upload slot to a GET ... URGENT before ordinary GETs that came first", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "big.bin");
  await Deno.writeFile(input, new Uint8Array(1_600_000).map(() => Math.random() * 256));
  const manifest = await splitFile(input, { out: join(dir.path, "store"), fragments: 4 });
  const store = await Store.open(join(dir.path, "store"));
  // One slot at 400 KB/s: each 400 KB fragment keeps it most of a second.
  await using server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    uploadSlots: 1,
    throttle: createThrottle(400_000),
  });
  const address = `127.0.0.1:${server.port}`;
  const clients = await Promise.all(
    ["keeper", "first", "second", "player"].map(async (name, i) => {
      const client = await TcpPeerClient.connect(address);
      await client.hello(`10.0.0.${i + 1}:600${i}`);
      return { name, client };
    }),
  );
  try {
    const [keeper, first, second, player] = clients;
    const busy = await keeper!.client.get(manifest.fragments[0]!.name);
    const order: string[] = [];
    const ask = async (
      { name, client }: typeof clients[number],
      fragment: number,
      urgent = false,
    ) => {
      const download = await client.get(manifest.fragments[fragment]!.name, urgent);
      order.push(name);
      for await (const _ of download.chunks); // read to the end: the slot frees
    };
    const asks = [ask(first!, 1)];
    await new Promise((resolve) => setTimeout(resolve, 50));
    asks.push(ask(second!, 2));
    await new Promise((resolve) => setTimeout(resolve, 50));
    asks.push(ask(player!, 3, true));
    await new Promise((resolve) => setTimeout(resolve, 50));
    for await (const _ of busy.chunks);
    await Promise.all(asks);
    assertEquals(order, ["player", "first", "second"]);
  } finally {
    for (const { client } of clients) client.close();
  }
});

Deno.test("TCP server parses requests the same however they are cut, down to one byte", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const script = "PING\r\nLIST\nGET ../x\nGET nothing.bin\nPING\n";
  const finished = (text: string) => /NOT_FOUND[^\n]*\nPONG\n$/.test(text);
  const whole = await exchange(server.port, script, finished);
  const byByte = await exchange(server.port, script, finished, { byteByByte: true });
  assertEquals(byByte, whole);
  assertMatch(whole, /^PONG\nOK 4\n(fragment_\d\.bin \d+ [0-9a-f]{64}\n){4}ERR BAD_REQUEST/);
});

Deno.test("TCP server closes a connection whose line passes 1 KiB", async () => {
  await using dir = await tempDir();
  const { store } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const received = await exchange(server.port, "x".repeat(4096) + "\nPING\n", () => false);
  assertEquals(received, "ERR BAD_REQUEST line too long\n"); // and then EOF, no PONG
});

Deno.test("TCP server serves many clients while one stops reading, and drops idle ones", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "big.bin");
  await Deno.writeFile(input, new Uint8Array(8 * 1024 * 1024));
  await splitFile(input, { out: join(dir.path, "store"), fragments: 1 });
  const store = await Store.open(join(dir.path, "store"));
  await using server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    idleTimeoutMs: 500,
  });

  // A client that asks for 8 MiB and never reads: its socket buffers fill, its writes stall.
  using stuck = await Deno.connect({ port: server.port });
  await stuck.write(encoder.encode("GET fragment_0.bin\n"));

  const clients = await Promise.all(
    Array.from({ length: 50 }, () => TcpPeerClient.connect(`127.0.0.1:${server.port}`)),
  );
  try {
    await Promise.all(clients.map((client) => client.ping()));
    const lists = await Promise.all(clients.map((client) => client.list()));
    assert(lists.every((list) => list.length === 1));
  } finally {
    clients.forEach((client) => client.close());
  }
  // The stalled one and an idle one are both cut off once they make no progress.
  using idle = await Deno.connect({ port: server.port });
  assertEquals(await idle.read(new Uint8Array(1)), null);
  const deadline = Date.now() + 10_000;
  while (server.connections > 0) {
    assert(Date.now() < deadline, `${server.connections} connections left open`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
});

Deno.test("TcpPeerClient fetches into a store, and a holder's ERR leaves the connection usable", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const target = await Store.open(join(dir.path, "viewer"));
  using client = await TcpPeerClient.connect(`127.0.0.1:${server.port}`);

  const error = await assertRejects(() => client.get("nothing.bin"), PeerError);
  assertEquals(error.code, "NOT_FOUND");
  for (const f of manifest.fragments) {
    const download = await client.get(f.name);
    assertEquals([download.size, download.sha256], [f.size, f.sha256]);
    await target.write(f.name, download, download.chunks);
  }
  assertEquals(target.list().map((f) => f.name), manifest.fragments.map((f) => f.name));
  await client.ping();
});

Deno.test("Store.write() refuses bytes that do not match, keeping nothing", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  const viewer = await Store.open(join(dir.path, "viewer"));
  using client = await TcpPeerClient.connect(`127.0.0.1:${server.port}`);
  const f = manifest.fragments[0]!;
  const download = await client.get(f.name);
  const wrong = { size: download.size, sha256: createHash("sha256").update("x").digest("hex") };
  await assertRejects(() => viewer.write(f.name, wrong, download.chunks), IntegrityError);
  assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))].length, 0);
  // Fed too many bytes for what was promised: refused before the end.
  async function* tooLong() {
    yield new Uint8Array(f.size + 1);
  }
  await assertRejects(() => viewer.write(f.name, f, tooLong()), IntegrityError);
  assertEquals([...Deno.readDirSync(join(dir.path, "viewer"))].length, 0);
});

Deno.test("TCP server ends only a connection that fails unexpectedly, saying so once", async () => {
  await using dir = await tempDir();
  const { store, manifest } = await makeStore(dir.path);
  const errors: string[] = [];
  await using server = startTcpServer(store, {
    port: 0,
    hostname: "127.0.0.1",
    onError: (line) => errors.push(line),
  });
  // Cut short on disk behind the store's back: the OK line promises more bytes than there are.
  const f = manifest.fragments[1]!;
  await Deno.truncate(join(dir.path, "store", f.name), 10);
  using conn = await Deno.connect({ port: server.port });
  await conn.write(encoder.encode(`GET ${f.name}\n`));
  let received = "";
  const buffer = new Uint8Array(65536);
  for (let n; (n = await conn.read(buffer)) !== null;) {
    received += decoder.decode(buffer.subarray(0, n));
  }
  assertEquals(received.split("\n")[0], `OK ${f.size} ${f.sha256}`);
  assertEquals(errors.length, 1, errors.join("\n"));
  assertMatch(errors[0]!, /^\[TCP\] Dropped 127\.0\.0\.1:\d+: fragment "fragment_1\.bin" shrank/);
  // Everyone else is still served.
  assertEquals(await exchange(server.port, "PING\n", (r) => r.endsWith("\n")), "PONG\n");
  assertEquals(errors.length, 1);
});

/**
 * Runs `startTcpServer()` in a child limited to `files` file descriptors, so that accepting
 * runs out of them (EMFILE) for real; returns the child once it prints its port.
 */
async function startLimitedTcpServer(store: string, files: number): Promise<[Child, number]> {
  const code = `
    import { startTcpServer } from "${new URL("../peer/tcp.ts", import.meta.url)}";
    import { Store } from "${new URL("../peer/store.ts", import.meta.url)}";
    const server = startTcpServer(await Store.open(${JSON.stringify(store)}), {
      port: 0, hostname: "127.0.0.1",
    });
    console.log("port", server.port);
  `;
  const child = new Child(
    [
      "-c",
      'ulimit -n "$1" && shift && exec "$@"',
      "bash",
      String(files),
      Deno.execPath(),
      "eval",
      "--config",
      `${ROOT}deno.json`,
      code,
    ],
    { command: "bash" },
  );
  const [, port] = await child.waitFor(/^port (\d+)$/m, { stream: "stdout" });
  return [child, Number(port)];
}

Deno.test("TCP server keeps accepting once it has file descriptors again", async () => {
  await using dir = await tempDir();
  await makeStore(dir.path);
  const [server, port] = await startLimitedTcpServer(join(dir.path, "store"), 64);
  await using _ = server;
  // More clients than the child has descriptors for: accepting fails, and says so once.
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < 100 && !/Cannot accept/.test(server.stderr); i++) {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port }));
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await server.waitFor(/^\[TCP\] Cannot accept connections: too many open files; retrying$/m, {
      stream: "stderr",
    });
  } finally {
    conns.forEach((conn) => conn.close());
  }
  assertEquals(await exchange(port, "PING\n", (r) => r.endsWith("\n")), "PONG\n");
  await server.waitFor(/Accepting connections again/, { stream: "stderr" });
  assertEquals(server.stderr.match(/Cannot accept/g)?.length, 1, server.stderr);
});

Deno.test("deno task peer --hostname that does not resolve is one line and exit 1", async () => {
  await using dir = await tempDir();
  const { code, stdout, stderr } = await runTask("peer", [
    "0",
    "--hostname",
    "nosuchhost.invalid",
    "--dir",
    dir.path,
    "--no-console",
  ]);
  assertEquals(code, 1);
  assertEquals(stdout, "");
  assertMatch(stderr, /^error: Cannot listen on "nosuchhost\.invalid": the name does not resolve/);
  assertEquals(stderr.trim().split("\n").length, 1, stderr);
});
