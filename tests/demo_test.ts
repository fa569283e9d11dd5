/**
 * `deno task demo`: the whole set on this machine. It uses the fixed ports DESIGN.md gives
 * (5000, 5555, 6001-6004 and their gRPC and HTTP ports), so these tests need them free.
 * @module
 */
import { assertEquals, assertMatch } from "./_assert.ts";
import { Child, runTask, startTask } from "./_util.ts";

Deno.test("deno task demo --check runs the whole set until the viewer holds the verified video", async () => {
  const { code, stdout, stderr } = await runTask("demo", ["--check"]);
  assertEquals(code, 0, stdout + stderr);
  assertMatch(stdout, /\[DEMO\] Player: +http:\/\/localhost:8004\//);
  assertMatch(stdout, /\[DEMO\] Swagger UI: http:\/\/localhost:5000\/apidocs/);
  assertMatch(stdout, /\[fragmentos\] fragment_\d\.bin localhost:6004/);
  assertMatch(stdout, /\[✓\] 'sample\.webm' complete: 10\/10 fragments, sha256 verified/);
  assertMatch(stdout, /Check passed/);
});

Deno.test("deno task demo says which port is taken, and stops", async () => {
  using _taken = Deno.listen({ port: 5555 });
  const { code, stdout, stderr } = await runTask("demo", ["--check"]);
  assertEquals(code, 1);
  assertEquals(stdout, "");
  assertEquals(
    stderr,
    "error: Port 5555 is taken (the broker needs it): stop what holds it and retry\n",
  );
});

// Python, because Deno cannot pick a connection's local port and Node's sockets set
// SO_REUSEADDR, which lets a listener share it: it holds 50054, the viewer's gRPC port, as a
// recent connection would, and lets go when told (the server side closing first, so the port is
// not left in TIME_WAIT).
const HOLD_PORT = `
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.socket()
client.bind(("127.0.0.1", 50054))
client.connect(server.getsockname())
accepted, _ = server.accept()
print("holding", flush=True)
sys.stdin.readline()
accepted.close()
server.close()
client.close()
`;
const hasPython = (() => {
  try {
    return new Deno.Command("python3", { args: ["-c", ""] }).outputSync().success;
  } catch {
    return false;
  }
})();

Deno.test({
  name: hasPython
    ? "deno task demo waits for a port only a recent connection holds"
    : "deno task demo waits for a port only a recent connection holds (skipped: no python3)",
  ignore: !hasPython,
  async fn() {
    await using holder = new Child(["-c", HOLD_PORT], { command: "python3", stdin: true });
    await holder.waitFor(/holding/);
    await using demo = startTask("demo", ["--check"]);
    await demo.waitFor(/\[DEMO\] Port 50054 is held by a recent connection; waiting for it/);
    await holder.write("go\n");
    const { code } = await demo.status();
    assertEquals(code, 0, demo.stdout + demo.stderr);
    assertMatch(demo.stdout, /Check passed/);
  },
});
