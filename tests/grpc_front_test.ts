/**
 * The peer's gRPC port as a user meets it, on real processes: the port listens at once, the gRPC
 * server (a child process) starts only when a client first talks gRPC, and a peer that nobody
 * talks gRPC to needs none of grpc-js's environment. Also: an oversized first Upload is refused
 * cleanly, with nothing in the peer's log.
 * @module
 */
import { assert, assertEquals } from "./_assert.ts";
import { createHash } from "node:crypto";
import * as grpc from "@grpc/grpc-js";
import { CHUNK_SIZE, GrpcClient } from "../peer_grpc.ts";
import { fileTransfer } from "../peer/grpc_wire.ts";
import { startGrpcFront } from "../peer/grpc_front.ts";
import { Child, peerArgs, ROOT, startTask, tempDir } from "./_util.ts";

/** No directory and no broker: the peer works alone. */
const NOWHERE = "http://127.0.0.1:1";

/** The ids of the processes whose parent is `pid`. */
async function childrenOf(pid: number): Promise<number[]> {
  const { stdout } = await new Deno.Command("ps", { args: ["-o", "pid=", "--ppid", String(pid)] })
    .output();
  return new TextDecoder().decode(stdout).split(/\s+/).filter(Boolean).map(Number);
}

/** True while a process with this id exists (signal 0 probes without killing). */
function alive(pid: number): boolean {
  const { code } = new Deno.Command("kill", { args: ["-0", String(pid)], stderr: "null" })
    .outputSync();
  return code === 0;
}

/** Polls `check` until it holds, failing after `timeoutMs`. */
async function eventually(check: () => Promise<boolean> | boolean, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`Condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

Deno.test("A peer nobody talks gRPC to has no gRPC child and needs no GRPC_* access; the first call starts it", async () => {
  await using dir = await tempDir();
  // The peer's permissions without grpc-js's environment variables: loading grpc-js would end
  // it with "Requires env access" (stdin is not a terminal).
  await using peer = new Child([
    "run",
    "-q",
    "--config",
    `${ROOT}deno.json`,
    "--allow-net",
    "--allow-read",
    "--allow-write",
    "--allow-run",
    "--allow-env=DIRECTORY_URL,BROKER_ADDR",
    `${ROOT}peer.ts`,
    "0",
    ...peerArgs(dir.path, NOWHERE),
    "--no-console",
  ]);
  const [, port] = await peer.waitFor(/\[gRPC\] Listening on port (\d+)/);
  await peer.waitFor(/\[PLAYER\] Watch at/);
  const pid = peer.process.pid;
  assertEquals(await childrenOf(pid), [], "no gRPC child before anyone talks gRPC");

  using client = new GrpcClient({ deadlineMs: 10_000 });
  const address = `127.0.0.1:${port}`;
  assertEquals(await client.echo(address, "ECO"), "ECO");
  const children = await childrenOf(pid);
  assertEquals(children.length, 1, "one gRPC child, started by the first call");
  // What works over gRPC works through the front: an Upload is stored and then listed.
  const bytes = new TextEncoder().encode("pushed by a neighbour");
  await client.upload(address, "pushed.bin", bytes);
  const list = await client.listFiles(address);
  assertEquals(list.fragments.map((f) => f.name), ["pushed.bin"]);
  client.close();
  assert(!/error|Uncaught/i.test(peer.stderr), peer.stderr);

  peer.kill("SIGTERM");
  assertEquals((await peer.status()).code, 0, peer.stderr);
  // The child goes with its peer.
  await eventually(() => !alive(children[0]));
});

Deno.test("An oversized first Upload to a peer is RESOURCE_EXHAUSTED, with nothing in the peer's log", async () => {
  await using dir = await tempDir();
  await using peer = startTask("peer", ["0", ...peerArgs(dir.path, NOWHERE), "--no-console"]);
  const [, port] = await peer.waitFor(/\[gRPC\] Listening on port (\d+)/);
  await peer.waitFor(/\[PLAYER\] Watch at/);
  const before = { stdout: peer.stdout, stderr: peer.stderr };

  const Client = fileTransfer();
  const raw = new Client(`127.0.0.1:${port}`, grpc.credentials.createInsecure(), {
    "grpc.max_send_message_length": -1,
  });
  const bytes = new Uint8Array(2 * CHUNK_SIZE);
  const sha256 = createHash("sha256").update(bytes).digest("hex");
  try {
    // One message holding the whole fragment: bigger than the server's receive limit.
    const error = await new Promise<grpc.ServiceError | null>((resolve) => {
      const call = raw.Upload((error: grpc.ServiceError | null) => resolve(error));
      call.write({ name: "big.bin", size: bytes.length, sha256, data: bytes });
      call.end();
    });
    assertEquals(error?.code, grpc.status.RESOURCE_EXHAUSTED, error?.message);
  } finally {
    raw.close();
  }
  // A call after it: whatever the refusal would have logged is in by then.
  using client = new GrpcClient();
  assertEquals(await client.echo(`127.0.0.1:${port}`, "still here"), "still here");
  client.close();
  // Other news may come meanwhile (the directory unreachable): none about gRPC or the upload.
  const since = peer.stdout.slice(before.stdout.length) + peer.stderr.slice(before.stderr.length);
  const lines = since.split("\n").filter((line) =>
    /gRPC|Upload|big\.bin|RESOURCE|Uncaught|^\s+at |disk|Could not/i.test(line)
  );
  assertEquals(lines, [], since);
});

Deno.test("startGrpcFront() restarts a killed gRPC child, and the same port and client reach the new one", async () => {
  await using dir = await tempDir();
  const logs: string[] = [];
  await using front = startGrpcFront({
    dir: dir.path,
    port: 0,
    hostname: "127.0.0.1",
    onLog: (line) => logs.push(line),
  });
  using client = new GrpcClient({ deadlineMs: 10_000 });
  const address = `127.0.0.1:${front.port}`;
  assertEquals(await client.echo(address, "before"), "before");
  const server = front.server!;
  const first = server.pid!;
  Deno.kill(first, "SIGKILL");
  await eventually(() => server.restarts === 1 && server.pid !== undefined);
  // The same client, its channel to the front cut when the child died.
  assertEquals(await client.echo(address, "after"), "after");
  assert(server.pid !== first);
  assertEquals(logs.filter((line) => /Server exited \(SIGKILL\); restarting/.test(line)).length, 1);
});

Deno.test("startGrpcFront() says in one line why its server cannot start, and closes the connection", async () => {
  const logs: string[] = [];
  // The child refuses a store under /proc (Deno opens it only with --allow-all).
  await using front = startGrpcFront({
    dir: "/proc/no-store",
    port: 0,
    hostname: "127.0.0.1",
    onLog: (line) => logs.push(line),
  });
  using client = new GrpcClient({ deadlineMs: 5_000 });
  let code;
  try {
    await client.echo(`127.0.0.1:${front.port}`, "anyone?");
  } catch (error) {
    code = (error as { code?: string }).code;
  }
  assertEquals(code, "UNAVAILABLE");
  assertEquals(front.server, undefined);
  assertEquals(logs, [
    '[gRPC] Cannot start the server: gRPC server did not start: Cannot use "/proc/no-store": ' +
    "Deno allows /dev, /proc and /sys only with --allow-all",
  ]);
});
