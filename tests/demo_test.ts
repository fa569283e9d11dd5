/**
 * `deno task demo`: the whole set on this machine. It uses the fixed ports DESIGN.md gives
 * (5000, 5555, 6001-6004 and their gRPC and HTTP ports), so these tests need them free.
 * @module
 */
import { assertEquals, assertMatch } from "./_assert.ts";
import { runTask } from "./_util.ts";

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
