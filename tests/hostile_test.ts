/**
 * Hostile clients against a peer's TCP server and HTTP player, as real child processes: running
 * the peer out of file descriptors, one address taking every slot, keepalives that ask for
 * nothing, and a reader that trickles a fragment's body. Each prints the child's RSS under the
 * attack on stderr.
 * @module
 */
import { join } from "node:path";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { Child, peerArgs, ROOT, taskArgv, tempDir } from "./_util.ts";
import { splitFile } from "../split.ts";
import { rssMiB } from "../bench/_report.ts";

const encoder = new TextEncoder();
const decoder = new TextDecoder();
/** No directory and no broker: the peer works alone. */
const NOWHERE = "http://127.0.0.1:1";

/** A peer started as `deno task peer` (in a shell limited to `files` descriptors, if given). */
interface PeerChild {
  child: Child;
  tcp: number;
  grpc: number;
  http: number;
}

async function startPeer(dir: string, files?: number): Promise<PeerChild> {
  const argv = [...taskArgv("peer"), "0", ...peerArgs(dir, NOWHERE), "--no-console"];
  const child = files === undefined ? new Child(argv) : new Child(
    ["-c", 'ulimit -n "$1" && shift && exec "$@"', "bash", String(files), Deno.execPath(), ...argv],
    { command: "bash" }, // bash exec-s deno: the child's pid is the peer's
  );
  try {
    const [, tcp] = await child.waitFor(/\[SERVER\] Node listening on port (\d+)/);
    const [, grpc] = await child.waitFor(/\[gRPC\] Listening on port (\d+)/);
    const [, http] = await child.waitFor(/\[PLAYER\] Watch at http:\/\/localhost:(\d+)\//);
    return { child, tcp: Number(tcp), grpc: Number(grpc), http: Number(http) };
  } catch (error) {
    await child[Symbol.asyncDispose]();
    throw error;
  }
}

/**
 * `startTcpServer(store, options)` alone in a child process (for limits the peer's command line
 * does not set); returns the child once it prints its port.
 */
async function startTcpChild(store: string, options: object): Promise<[Child, number]> {
  const code = `
    import { startTcpServer } from "${new URL("../peer/tcp.ts", import.meta.url)}";
    import { Store } from "${new URL("../peer/store.ts", import.meta.url)}";
    const server = startTcpServer(await Store.open(${JSON.stringify(store)}), {
      port: 0, hostname: "127.0.0.1", ...${JSON.stringify(options)},
    });
    console.log("port", server.port);
  `;
  const child = new Child(["eval", "--config", `${ROOT}deno.json`, code]);
  const [, port] = await child.waitFor(/^port (\d+)$/m, { stream: "stdout" });
  return [child, Number(port)];
}

/** True while `child` has not exited. */
function alive(child: Child): () => boolean {
  let exited = false;
  child.status().then(() => exited = true, () => exited = true);
  return () => !exited;
}

/** Sends `text` on a fresh connection and reads until `done(received)` or the end. */
async function exchange(
  port: number,
  text: string,
  done: (received: string) => boolean,
): Promise<string> {
  using conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(encoder.encode(text));
  let received = "";
  const buffer = new Uint8Array(65536);
  while (!done(received)) {
    const n = await conn.read(buffer).catch(() => null);
    if (n === null) break;
    received += decoder.decode(buffer.subarray(0, n), { stream: true });
  }
  return received;
}

/** Reads one line (up to its `\n`) from `conn`; "" when it closes first. */
async function readLine(conn: Deno.Conn): Promise<string> {
  let received = "";
  const buffer = new Uint8Array(1);
  while (!received.endsWith("\n")) {
    const n = await conn.read(buffer).catch(() => null);
    if (n === null) return received;
    received += decoder.decode(buffer.subarray(0, n));
  }
  return received.trimEnd();
}

/**
 * Reads `conn` until it ends or `most` bytes came, for at most `ms` (then closes it); returns
 * the bytes read.
 */
async function readToEnd(
  conn: Deno.Conn,
  buffer: Uint8Array,
  ms: number,
  most = Infinity,
): Promise<number> {
  const timer = setTimeout(() => closeQuietly(conn), ms);
  let received = 0;
  try {
    for (let n; received < most && (n = await conn.read(buffer)) !== null;) received += n;
  } catch {
    // closed by the timer
  } finally {
    clearTimeout(timer);
  }
  return received;
}

/** Closes `conn`, which may be closed already. */
function closeQuietly(conn: Deno.Conn): void {
  try {
    conn.close();
  } catch {
    // closed already
  }
}

function pause(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Opens connections to `port` until `child` says it cannot accept, or `most` are open. */
async function exhaust(child: Child, port: number, most = 200): Promise<Deno.Conn[]> {
  const conns: Deno.Conn[] = [];
  for (let i = 0; i < most && !/Cannot accept/.test(child.stderr); i++) {
    // Refused: the server is gone (waiting for its line then says why, with its stderr).
    const conn = await Deno.connect({ hostname: "127.0.0.1", port }).catch(() => undefined);
    if (conn === undefined) break;
    conns.push(conn);
    await pause(5);
  }
  return conns;
}

const GET_PAGE = "GET / HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n";

Deno.test("A peer's player out of file descriptors keeps running, and answers once the connections go", async () => {
  await using dir = await tempDir();
  const peer = await startPeer(dir.path, 64);
  await using _ = peer.child;
  const running = alive(peer.child);
  const pid = peer.child.process.pid;
  const before = rssMiB(pid);
  const conns = await exhaust(peer.child, peer.http);
  let during;
  try {
    await peer.child.waitFor(
      /\[PLAYER\] Cannot accept connections: too many open files; retrying/,
      { stream: "stderr", timeoutMs: 5_000 },
    );
    during = rssMiB(pid);
  } finally {
    conns.forEach((conn) => conn.close());
  }
  const answer = await exchange(peer.http, GET_PAGE, (r) => r.includes("</html>"));
  assertMatch(answer, /^HTTP\/1\.1 200 OK\r\n/);
  await peer.child.waitFor(/\[PLAYER\] Accepting connections again/, { timeoutMs: 5_000 });
  assert(running(), peer.child.stderr);
  assert(!/Uncaught|Too many open files \(os error/.test(peer.child.stderr), peer.child.stderr);
  // The TCP server, beside it, answers too.
  assertEquals(await exchange(peer.tcp, "PING\n", (r) => r.endsWith("\n")), "PONG\n");
  console.error(
    `  player, ${conns.length} connections under ulimit -n 64: RSS ${before.toFixed(1)} MiB ` +
      `before, ${during.toFixed(1)} during`,
  );
});

Deno.test("A peer's TCP server out of file descriptors keeps running, and answers once the connections go", async () => {
  await using dir = await tempDir();
  const peer = await startPeer(dir.path, 64);
  await using _ = peer.child;
  const running = alive(peer.child);
  const pid = peer.child.process.pid;
  const before = rssMiB(pid);
  const conns = await exhaust(peer.child, peer.tcp);
  let during;
  try {
    await peer.child.waitFor(/\[TCP\] Cannot accept connections: too many open files; retrying/, {
      stream: "stderr",
      timeoutMs: 5_000,
    });
    during = rssMiB(pid);
  } finally {
    conns.forEach((conn) => conn.close());
  }
  assertEquals(await exchange(peer.tcp, "PING\n", (r) => r.endsWith("\n")), "PONG\n");
  assertEquals(await exchange(peer.tcp, "LIST\n", (r) => r.endsWith("\n")), "OK 0\n");
  await peer.child.waitFor(/\[TCP\] Accepting connections again/, { timeoutMs: 5_000 });
  assert(running(), peer.child.stderr);
  // The player, beside it, answers too.
  const answer = await exchange(peer.http, GET_PAGE, (r) => r.includes("</html>"));
  assertMatch(answer, /^HTTP\/1\.1 200 OK\r\n/);
  console.error(
    `  TCP, ${conns.length} connections under ulimit -n 64: RSS ${before.toFixed(1)} MiB ` +
      `before, ${during.toFixed(1)} during`,
  );
});

Deno.test("A peer's TCP server gives one address a quarter of its slots, and the rest ERR BUSY", async () => {
  await using dir = await tempDir();
  const peer = await startPeer(dir.path);
  await using _ = peer.child;
  const pid = peer.child.process.pid;
  const before = rssMiB(pid);
  const conns: Deno.Conn[] = [];
  try {
    // 64 of the default 256 from 127.0.0.1: each is served.
    for (let i = 0; i < 64; i++) {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: peer.tcp });
      conns.push(conn);
      await conn.write(encoder.encode("PING\n"));
      assertEquals(await readLine(conn), "PONG", `connection ${i + 1}`);
    }
    const during = rssMiB(pid);
    // The next is refused, however many slots are free in all.
    const refused = await exchange(peer.tcp, "PING\n", (r) => r.endsWith("\n"));
    assertEquals(refused, "ERR BUSY too many connections from your address\n");
    // One goes: a slot for that address is free again.
    conns.shift()!.close();
    const deadline = Date.now() + 3_000;
    let answer = await exchange(peer.tcp, "PING\n", (r) => r.endsWith("\n"));
    while (answer !== "PONG\n" && Date.now() < deadline) {
      await pause(50);
      answer = await exchange(peer.tcp, "PING\n", (r) => r.endsWith("\n"));
    }
    assertEquals(answer, "PONG\n");
    console.error(
      `  64 connections from one address, the 65th refused: RSS ${before.toFixed(1)} MiB ` +
        `before, ${during.toFixed(1)} during`,
    );
  } finally {
    conns.forEach((conn) => conn.close());
  }
});

Deno.test("startTcpServer() closes connections that only PING once the idle timeout passes, freeing their slots", async () => {
  await using dir = await tempDir();
  await Deno.mkdir(join(dir.path, "store"));
  // The attack of the issue in small: every slot held by connections that PING more often than
  // the idle timeout, which reset the watchdog before.
  const [server, port] = await startTcpChild(join(dir.path, "store"), {
    idleTimeoutMs: 1_000,
    maxConnections: 8,
    maxConnectionsPerAddress: 8,
  });
  await using _ = server;
  const pingers: Deno.Conn[] = [];
  const worker = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    for (let i = 0; i < 7; i++) pingers.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    const before = rssMiB(server.process.pid);
    assertEquals(
      await exchange(port, "PING\n", (r) => r.endsWith("\n")),
      "ERR BUSY too many connections\n",
    );
    // For 2 s the pingers PING every 200 ms; the worker asks for the list as often.
    const closedAt = new Map<Deno.Conn, number>();
    const start = Date.now();
    while (Date.now() - start < 2_000) {
      for (const conn of [...pingers, worker]) {
        if (closedAt.has(conn)) continue;
        const ok = await conn.write(encoder.encode(conn === worker ? "LIST\n" : "PING\n"))
          .then(() => readLine(conn), () => "");
        if (ok === "") closedAt.set(conn, Date.now() - start);
      }
      await pause(200);
    }
    assertEquals(closedAt.size, pingers.length, "every pinger is closed");
    assert(!closedAt.has(worker), "the connection that asks for the list is kept");
    for (const ms of closedAt.values()) assert(ms >= 800 && ms < 1_800, `closed after ${ms} ms`);
    // Their slots are free again.
    assertEquals(await exchange(port, "PING\n", (r) => r.endsWith("\n")), "PONG\n");
    console.error(
      `  8 slots held by connections that only PING: RSS ${before.toFixed(1)} MiB, ` +
        `pingers closed after ${Math.max(...closedAt.values())} ms at most`,
    );
  } finally {
    pingers.forEach((conn) => conn.close());
    worker.close();
  }
});

Deno.test("startTcpServer() cuts off readers that trickle a fragment's body, freeing the upload slots", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "big.bin");
  const size = 64 * 1024 * 1024;
  await Deno.writeFile(input, new Uint8Array(size).fill(7));
  await splitFile(input, { out: join(dir.path, "store"), fragments: 1 });
  // 8 MiB/s averaged from a body's start, checked after 1 s: loopback's socket buffers take a
  // few MiB without any reading, so the trickle must fall below that to be seen in a second.
  const [server, port] = await startTcpChild(join(dir.path, "store"), {
    minBodyRate: 8 * 1024 * 1024,
    bodyRateWindowMs: 1_000,
  });
  await using _ = server;
  // Two tricklers take both upload slots (2 by default), reading 16 KiB every 100 ms.
  const tricklers = await Promise.all(
    [0, 1].map(() => Deno.connect({ hostname: "127.0.0.1", port })),
  );
  try {
    const start = Date.now();
    const trickled = tricklers.map(async (conn) => {
      await conn.write(encoder.encode("GET fragment_0.bin\n"));
      const buffer = new Uint8Array(1024 * 1024);
      let received = 0;
      for (let ended = false; !ended && Date.now() - start < 3_000; await pause(100)) {
        const n = await conn.read(buffer.subarray(0, 16 * 1024)).catch(() => null);
        if (n === null) ended = true;
        else received += n;
      }
      // Then it reads at full speed what its socket holds: a connection that was cut ends
      // short of the fragment; one still served would get it all.
      const ends = readToEnd(conn, buffer, 3_000);
      return { received: received + await ends };
    });
    await pause(200); // they have the slots
    const during = rssMiB(server.process.pid);
    // A reader that keeps up waits for a slot, then gets the whole fragment.
    const fast = await Deno.connect({ hostname: "127.0.0.1", port });
    tricklers.push(fast); // closed with them
    await fast.write(encoder.encode("GET fragment_0.bin\n"));
    assertMatch(await readLine(fast), new RegExp(`^OK ${size} [0-9a-f]{64}$`));
    const body = await readToEnd(fast, new Uint8Array(1024 * 1024), 4_000, size);
    assertEquals(body, size);
    const fastMs = Date.now() - start;
    assert(fastMs < 4_000, `the fast reader waited ${fastMs} ms`);
    const results = await Promise.all(trickled);
    for (const { received } of results) {
      assert(received < size, `a trickler got all ${received} bytes: it was not cut off`);
    }
    console.error(
      `  2 tricklers holding both upload slots: RSS ${during.toFixed(1)} MiB; ` +
        `the fast reader had its fragment after ${fastMs} ms`,
    );
  } finally {
    tricklers.forEach(closeQuietly);
  }
});
