/**
 * docker/health.ts, the probe compose.yaml's healthchecks run, against real servers: a peer and
 * a broker (PING), a directory (GET /health), and ports that do not answer as they should. And
 * the point of probing with PING: a peer logs a connection only once it asks for something, so a
 * probe every 2 s leaves its log alone.
 * @module
 */
import { join } from "node:path";
import { startBroker } from "../broker.ts";
import { startDirectory } from "../directory.ts";
import { SAMPLE_VIDEO, splitFile } from "../split.ts";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { peerArgs, ROOT, startTask, tempDir } from "./_util.ts";

/** Runs the probe with the flags compose.yaml gives it. */
async function probe(...args: string[]): Promise<{ code: number; stderr: string }> {
  const { code, stderr } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net=127.0.0.1", `${ROOT}docker/health.ts`, ...args],
    stdout: "null",
    stderr: "piped",
  }).output();
  return { code, stderr: new TextDecoder().decode(stderr) };
}

/** A port on 127.0.0.1 that `serve` answers each connection on, until disposed. */
function fakeServer(serve: (conn: Deno.Conn) => Promise<void>) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  const accepting = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      serve(conn).catch(() => {});
    }
  })();
  return {
    port: (listener.addr as Deno.NetAddr).port,
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const conn of conns) {
        try {
          conn.close();
        } catch { /* closed already */ }
      }
      await accepting.catch(() => {});
    },
  };
}

Deno.test("health.ts ping finds a real peer healthy, and the peer logs no connection for it", async () => {
  await using dir = await tempDir();
  await splitFile(SAMPLE_VIDEO, { out: join(dir.path, "fragments"), peers: ["seed"] });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  await using peer = startTask("peer", [
    "0",
    ...peerArgs(join(dir.path, "fragments", "seed"), directory.url),
    "--no-console",
  ]);
  const port = Number((await peer.waitFor(/Node listening on port (\d+)/))[1]);

  for (let i = 0; i < 3; i++) {
    assertEquals(await probe("ping", String(port)), { code: 0, stderr: "" });
  }

  // A client that asks for a fragment is logged as ever. The peer's output is in order, so a
  // line for any probe would come before this one.
  using conn = await Deno.connect({ hostname: "127.0.0.1", port });
  await conn.write(new TextEncoder().encode("GET fragment_0.bin\n"));
  const mine = `127.0.0.1:${(conn.localAddr as Deno.NetAddr).port}`;
  await peer.waitFor(/\[\+\] Connected from /, { stream: "stdout" });
  const connected = peer.stdout.split("\n").filter((line) => line.includes("Connected from"));
  assertEquals(connected, [`[+] Connected from ${mine}`]);
});

Deno.test("health.ts ping finds a real broker healthy", async () => {
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  assertEquals(await probe("ping", String(broker.port)), { code: 0, stderr: "" });
});

Deno.test("health.ts http finds a real directory healthy at /health, and not at a missing route", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const port = new URL(directory.url).port;
  assertEquals(await probe("http", port, "/health"), { code: 0, stderr: "" });
  const missing = await probe("http", port, "/no-such-route");
  assertEquals(missing.code, 1);
  assertMatch(
    missing.stderr,
    /^unhealthy: http:\/\/127\.0\.0\.1:\d+\/no-such-route answered 404\n$/,
  );
});

Deno.test("health.ts says unhealthy in one line: nothing listening, a wrong answer, no answer", async () => {
  const closed = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const closedPort = (closed.addr as Deno.NetAddr).port;
  closed.close();
  const refused = await probe("ping", String(closedPort));
  assertEquals(refused.code, 1);
  assertMatch(refused.stderr, /^unhealthy: 127\.0\.0\.1:\d+ is not answering: .+\n$/);

  await using busy = fakeServer(async (conn) => {
    await conn.write(new TextEncoder().encode("ERR BUSY too many connections\n"));
    conn.close();
  });
  const wrong = await probe("ping", String(busy.port));
  assertEquals(wrong.code, 1);
  assertEquals(
    wrong.stderr,
    `unhealthy: 127.0.0.1:${busy.port} answered "ERR BUSY too many connections" to PING\n`,
  );

  // Accepts and never answers: the probe gives up on its own, well inside compose's 5 s timeout.
  await using silent = fakeServer(() => new Promise(() => {}));
  const hung = await probe("ping", String(silent.port));
  assertEquals(hung.code, 1);
  assertEquals(hung.stderr, `unhealthy: 127.0.0.1:${silent.port} did not answer within 3000 ms\n`);

  for (
    const args of [[], ["ping"], ["ping", "0"], ["http", "80"], ["http", "80", "health"], [
      "dig",
      "80",
    ]]
  ) {
    const bad = await probe(...args);
    assertEquals(bad.code, 1, args.join(" "));
    assert(/^unhealthy: .+\n$/.test(bad.stderr), bad.stderr);
  }
});
