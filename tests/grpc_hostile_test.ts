/**
 * Hostile clients against a peer's gRPC port, on real processes and real sockets: running the
 * peer out of file descriptors through it, one address taking every slot, and connections that
 * never say anything. Each ends with a real gRPC call that works once the attack goes away, and
 * prints the peer's RSS under the attack on stderr.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { GrpcClient, GrpcError } from "../peer_grpc.ts";
import { startGrpcFront } from "../peer/grpc_front.ts";
import { Child, peerArgs, taskArgv, tempDir } from "./_util.ts";
import { rssMiB } from "../bench/_report.ts";

/** No directory and no broker: the peer works alone. */
const NOWHERE = "http://127.0.0.1:1";
/** What every HTTP/2 client sends first; the front then pipes the connection to the server. */
const PREFACE = new TextEncoder().encode("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");

/** `deno task peer` on free ports (in a shell limited to `files` descriptors, if given). */
async function startPeer(dir: string, files?: number): Promise<{ child: Child; grpc: number }> {
  const argv = [...taskArgv("peer"), "0", ...peerArgs(dir, NOWHERE), "--no-console"];
  const child = files === undefined ? new Child(argv) : new Child(
    ["-c", 'ulimit -n "$1" && shift && exec "$@"', "bash", String(files), Deno.execPath(), ...argv],
    { command: "bash" }, // bash exec-s deno: the child's pid is the peer's
  );
  try {
    const [, grpc] = await child.waitFor(/\[gRPC\] Listening on port (\d+)/);
    await child.waitFor(/\[PLAYER\] Watch at/);
    return { child, grpc: Number(grpc) };
  } catch (error) {
    await child[Symbol.asyncDispose]();
    throw error;
  }
}

/** True while `child` has not exited. */
function alive(child: Child): () => boolean {
  let exited = false;
  child.status().then(() => exited = true, () => exited = true);
  return () => !exited;
}

/** Echo on a fresh client, retried until `timeoutMs` while the peer recovers. */
async function echoWithin(port: number, message: string, timeoutMs = 10_000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    using client = new GrpcClient({ deadlineMs: 3_000 });
    try {
      return await client.echo(`127.0.0.1:${port}`, message);
    } catch (error) {
      if (!(error instanceof GrpcError) || Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 100)); // polling, with a deadline
    }
  }
}

/** A connection that has begun HTTP/2 (so the front pipes it through) and then says nothing. */
async function openHttp2(port: number): Promise<Deno.Conn | undefined> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port }).catch(() => undefined);
  await conn?.write(PREFACE).catch(() => {});
  return conn;
}

/** Everything `conn` sends until it closes (at most 64 KiB, for at most `ms`; then closes it). */
async function readAll(conn: Deno.Conn, ms = 5_000): Promise<Uint8Array> {
  const timer = setTimeout(() => conn.close(), ms);
  const received: number[] = [];
  const buffer = new Uint8Array(4096);
  try {
    for (let n; received.length < 65536 && (n = await conn.read(buffer)) !== null;) {
      received.push(...buffer.subarray(0, n));
    }
  } catch {
    // closed by the timer
  } finally {
    clearTimeout(timer);
  }
  return new Uint8Array(received);
}

Deno.test("A peer's gRPC port out of file descriptors keeps running, and a gRPC call works once the connections go", async () => {
  await using dir = await tempDir();
  const peer = await startPeer(dir.path, 64);
  await using _ = peer.child;
  const running = alive(peer.child);
  const pid = peer.child.process.pid;
  assertEquals(await echoWithin(peer.grpc, "before"), "before");
  const before = rssMiB(pid);
  const output = () => peer.child.stdout + peer.child.stderr;
  const conns: Deno.Conn[] = [];
  let during;
  try {
    // Each connection costs the peer two descriptors (it and its pipe to the gRPC child).
    for (let i = 0; i < 200 && !/\[gRPC\] Cannot accept connections/.test(output()); i++) {
      const conn = await openHttp2(peer.grpc);
      if (conn === undefined) break;
      conns.push(conn);
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await peer.child.waitFor(
      /\[gRPC\] Cannot accept connections: too many open files; retrying/,
      { timeoutMs: 5_000 },
    );
    during = rssMiB(pid);
  } finally {
    conns.forEach((conn) => conn.close());
  }
  assertEquals(await echoWithin(peer.grpc, "after"), "after");
  await peer.child.waitFor(/\[gRPC\] Accepting connections again/, { timeoutMs: 5_000 });
  assert(running(), peer.child.stderr);
  assert(!/Uncaught|Too many open files \(os error/.test(output()), output());
  console.error(
    `  gRPC, ${conns.length} connections under ulimit -n 64: RSS ${before.toFixed(1)} MiB ` +
      `before, ${during.toFixed(1)} during`,
  );
});

Deno.test("A peer's gRPC port gives one address 64 connections, closes the next, and calls work once one goes", async () => {
  await using dir = await tempDir();
  const peer = await startPeer(dir.path);
  await using _ = peer.child;
  const pid = peer.child.process.pid;
  const before = rssMiB(pid);
  const conns: Deno.Conn[] = [];
  try {
    // No call before: a client's connection that has just closed might still hold a slot.
    for (let i = 0; i < 64; i++) {
      const conn = await openHttp2(peer.grpc);
      assert(conn !== undefined, `connection ${i + 1} refused`);
      conns.push(conn);
    }
    const during = rssMiB(pid);
    // The 65th is closed at once, before a byte is sent back.
    const refused = await Deno.connect({ hostname: "127.0.0.1", port: peer.grpc });
    await refused.write(PREFACE).catch(() => {});
    assertEquals((await readAll(refused)).length, 0);
    try {
      refused.close();
    } catch { /* closed by readAll's timer: then the test fails above */ }
    // A real gRPC client from that address fails with a status.
    await expectRefusedCall(peer.grpc);
    conns.shift()!.close();
    assertEquals(await echoWithin(peer.grpc, "after"), "after");
    console.error(
      `  64 gRPC connections from one address, the 65th refused: RSS ${before.toFixed(1)} MiB ` +
        `before, ${during.toFixed(1)} during`,
    );
  } finally {
    conns.forEach((conn) => conn.close());
  }
});

/** A gRPC call from 127.0.0.1 while its slots are all taken fails UNAVAILABLE. */
async function expectRefusedCall(port: number): Promise<void> {
  using client = new GrpcClient({ deadlineMs: 3_000 });
  let code;
  try {
    await client.echo(`127.0.0.1:${port}`, "refused");
  } catch (error) {
    code = (error as GrpcError).code;
  }
  assertEquals(code, "UNAVAILABLE");
}

Deno.test("startGrpcFront() closes a connection that says nothing, and starts no server for it", async () => {
  await using dir = await tempDir();
  await using front = startGrpcFront({
    dir: dir.path,
    port: 0,
    hostname: "127.0.0.1",
    firstByteTimeoutMs: 200,
  });
  using silent = await Deno.connect({ hostname: "127.0.0.1", port: front.port });
  const started = Date.now();
  assertEquals(await silent.read(new Uint8Array(16)).catch(() => null), null);
  assert(Date.now() - started < 5_000);
  assertEquals(front.server, undefined, "a silent connection started the gRPC server");
  assertEquals(front.connections, 0);
  // Then a real call starts it.
  assertEquals(await echoWithin(front.port, "hello"), "hello");
  assertMatch(String(front.server?.pid), /^\d+$/);
});
