/**
 * directory.ts through `app.request()`, no port: every route with good and bad input, expiry on
 * a fake clock, the error shape, and the OpenAPI document checked by a real validator.
 * @module
 */
import SwaggerParser from "@apidevtools/swagger-parser";
import assert from "node:assert/strict";
import {
  createApp,
  ERROR_CODES,
  MAX_PEER_FRAGMENTS,
  type PeerState,
  Registry,
  type RegistryOptions,
} from "../directory.ts";
import { loadOnce } from "../directory/app.ts";
import type { Manifest } from "../split.ts";

const REMOTE = {
  remoteAddr: { hostname: "::ffff:10.0.0.9", port: 40000, transport: "tcp" as const },
};
const SHA = "a".repeat(64);

/** A directory app on a clock the test moves by hand. */
function fixture(ttl = 30, options: RegistryOptions = {}) {
  const clock = { now: 1_000_000 };
  const registry = new Registry({ ttl, now: () => clock.now, ...options });
  const app = createApp({ registry });
  const call = async (method: string, path: string, body?: unknown, env: object = REMOTE) => {
    const init: RequestInit = { method };
    if (body !== undefined) {
      init.headers = { "content-type": "application/json" };
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    const response = await app.request(path, init, env);
    const text = await response.text();
    return { status: response.status, body: text === "" ? undefined : JSON.parse(text) };
  };
  /** Registers a peer and returns its id. */
  const register = async (state: PeerState): Promise<string> =>
    (await call("POST", "/peers", state)).body.id;
  return { clock, registry, app, call, register };
}

function peer(port: number, fragments: string[], host?: string): PeerState {
  return {
    ...(host ? { host } : {}),
    port,
    grpcPort: port + 44050,
    httpPort: port + 2000,
    fragments,
  };
}

/** A peer that says which file its fragments belong to, as a peer with a manifest does. */
function seeder(port: number, file: string, fragments: string[]): PeerState {
  return { ...peer(port, fragments), file };
}

function manifest(file = "movie.webm", names = ["movie_0.bin", "movie_1.bin"]): Manifest {
  return {
    version: 1,
    file,
    mime: "video/webm",
    size: 200,
    sha256: SHA,
    fragments: names.map((name, index) => ({
      index,
      name,
      offset: index * 100,
      size: 100,
      sha256: SHA,
    })),
  };
}

/** A manifest of one fragment, the whole file. */
function single(file: string, name: string): Manifest {
  const whole = manifest(file, [name]);
  whole.fragments[0]!.size = whole.size;
  return whole;
}

/** Asserts the error shape, its status and code, and that the message matches. */
function assertError(
  result: { status: number; body: { error: { code: string; message: string } } },
  status: number,
  code: string,
  message?: RegExp,
) {
  assert.deepEqual(result.status, status, JSON.stringify(result.body));
  assert.deepEqual(Object.keys(result.body), ["error"]);
  assert.deepEqual(result.body.error.code, code);
  assert.deepEqual(typeof result.body.error.message, "string");
  if (message) assert.match(result.body.error.message, message);
}

Deno.test("GET /health answers ok with the sizes of the state", async () => {
  const { call } = fixture();
  await call("POST", "/peers", peer(6001, ["a.bin", "b.bin"]));
  const { status, body } = await call("GET", "/health");
  assert.deepEqual(status, 200);
  assert.deepEqual(body, { status: "ok", peers: 1, fragments: 2, files: 0 });
});

Deno.test("POST /peers registers a peer at its remote address, and a body host overrides it", async () => {
  const { call } = fixture();
  const first = await call("POST", "/peers", peer(6001, ["a.bin"]));
  assert.deepEqual(first.status, 201);
  assert.deepEqual(first.body.ttl, 30);
  const second = await call("POST", "/peers", peer(6002, ["a.bin"], "seed.example"));
  const located = await call("GET", "/fragments/a.bin");
  assert.deepEqual(located.status, 200);
  assert.deepEqual(located.body, {
    name: "a.bin",
    holders: [
      { id: first.body.id, host: "10.0.0.9", port: 6001, grpcPort: 50051, httpPort: 8001 },
      { id: second.body.id, host: "seed.example", port: 6002, grpcPort: 50052, httpPort: 8002 },
    ],
  });
});

Deno.test("POST /peers without a host and without a remote address is a 400 naming host", async () => {
  const { call } = fixture();
  assertError(await call("POST", "/peers", peer(6001, []), {}), 400, "BAD_REQUEST", /"host"/);
});

Deno.test("POST /peers from a peer that restarted at the same address keeps one entry", async () => {
  const { call } = fixture();
  await call("POST", "/peers", peer(6001, ["a.bin"]));
  const again = await call("POST", "/peers", peer(6001, ["b.bin"]));
  const { body } = await call("GET", "/peers");
  assert.deepEqual(body.peers.map((p: { id: string }) => p.id), [again.body.id]);
  assert.deepEqual((await call("GET", "/fragments/a.bin")).status, 404);
});

Deno.test("POST /peers refuses malformed JSON, a missing field and a bad fragment name", async () => {
  const { call } = fixture();
  assertError(await call("POST", "/peers", "{nope"), 400, "BAD_REQUEST", /Malformed JSON/);
  const { grpcPort: _, ...noGrpc } = peer(6001, []);
  assertError(await call("POST", "/peers", noGrpc), 400, "BAD_REQUEST", /"grpcPort" is required/);
  assertError(
    await call("POST", "/peers", { ...peer(6001, []), port: "6001" }),
    400,
    "BAD_REQUEST",
    /"port" is invalid: expected number/,
  );
  assertError(await call("POST", "/peers", peer(70000, [])), 400, "BAD_REQUEST", /"port"/);
  for (const bad of ["../etc", ".hidden", "a/b", "", "x".repeat(201)]) {
    assertError(
      await call("POST", "/peers", peer(6001, ["ok.bin", bad])),
      400,
      "BAD_REQUEST",
      /"fragments\.1" is invalid/,
    );
  }
  assertError(await call("POST", "/peers", [1, 2]), 400, "BAD_REQUEST", /"\(body\)"/);
  assertError(
    await call("POST", "/peers", peer(6001, [], "bad host/")),
    400,
    "BAD_REQUEST",
    /"host"/,
  );
});

Deno.test("POST /peers refuses a body over 1 MiB with 413 and another media type with 415", async () => {
  const { app } = fixture();
  const big = JSON.stringify(
    peer(6001, Array.from({ length: 70_000 }, (_, i) => `fragment_${i}.bin`)),
  );
  assert.ok(big.length > 1024 * 1024);
  const response = await app.request("/peers", {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: big,
  }, REMOTE);
  assertError({ status: response.status, body: await response.json() }, 413, "PAYLOAD_TOO_LARGE");
  const text = await app.request("/peers", {
    method: "POST",
    headers: { "content-type": "text/plain" },
    body: "port=6001",
  }, REMOTE);
  const body = await text.json();
  assertError({ status: text.status, body }, 415, "UNSUPPORTED_MEDIA_TYPE", /application\/json/);
});

Deno.test("PUT /peers/{id} replaces the peer's fragments in the index, touching only changes", async () => {
  const { call } = fixture();
  const { body: { id } } = await call("POST", "/peers", peer(6001, ["a.bin", "b.bin"]));
  const beat = await call("PUT", `/peers/${id}`, peer(6001, ["b.bin", "c.bin"]));
  assert.deepEqual(beat.status, 200);
  assert.deepEqual(beat.body, { id, ttl: 30, recreated: false });
  assert.deepEqual((await call("GET", "/fragments/a.bin")).status, 404);
  assert.deepEqual((await call("GET", "/fragments/b.bin")).body.holders[0].id, id);
  assert.deepEqual((await call("GET", "/fragments/c.bin")).body.holders[0].id, id);
  assert.deepEqual((await call("GET", "/health")).body.fragments, 2);
});

Deno.test("PUT /peers/{id} recreates a peer the directory forgot, and is idempotent", async () => {
  const { call } = fixture();
  const state = peer(6001, ["a.bin"], "peer1");
  assert.deepEqual((await call("PUT", "/peers/peer-1", state)).body, {
    id: "peer-1",
    ttl: 30,
    recreated: true,
  });
  assert.deepEqual((await call("PUT", "/peers/peer-1", state)).body.recreated, false);
  const { body } = await call("GET", "/peers");
  assert.deepEqual(body.peers, [{
    id: "peer-1",
    host: "peer1",
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
    fragments: ["a.bin"],
  }]);
});

Deno.test("PUT /peers/{id} refuses a bad id, malformed JSON and a schema violation", async () => {
  const { call } = fixture();
  assertError(
    await call("PUT", "/peers/.hidden", peer(6001, [])),
    400,
    "BAD_REQUEST",
    /Path parameter "id"/,
  );
  assertError(await call("PUT", "/peers/p1", "[1,"), 400, "BAD_REQUEST", /Malformed JSON/);
  assertError(
    await call("PUT", "/peers/p1", { ...peer(6001, []), fragments: "a.bin" }),
    400,
    "BAD_REQUEST",
    /"fragments" is invalid/,
  );
});

Deno.test("DELETE /peers/{id} forgets the peer and answers 404 for an unknown id", async () => {
  const { call } = fixture();
  const { body: { id } } = await call("POST", "/peers", peer(6001, ["a.bin"]));
  assert.deepEqual(await call("DELETE", `/peers/${id}`), { status: 204, body: undefined });
  assert.deepEqual((await call("GET", "/fragments/a.bin")).status, 404);
  assertError(await call("DELETE", `/peers/${id}`), 404, "NOT_FOUND", new RegExp(id));
  assertError(await call("DELETE", "/peers/a%2Fb"), 400, "BAD_REQUEST", /"id"/);
});

Deno.test("GET /peers and GET /fragments list every live peer and fragment", async () => {
  const { call, register } = fixture();
  const a = await register(peer(6001, ["x.bin", "y.bin"]));
  const b = await register(peer(6002, ["y.bin"]));
  const { body: { peers } } = await call("GET", "/peers");
  assert.deepEqual(peers.map((p: { id: string; fragments: string[] }) => [p.id, p.fragments]), [
    [a, ["x.bin", "y.bin"]],
    [b, ["y.bin"]],
  ]);
  const { body: { fragments } } = await call("GET", "/fragments");
  assert.deepEqual(
    fragments.map((
      f: { name: string; holders: { id: string }[] },
    ) => [f.name, f.holders.map((h) => h.id)]),
    [["x.bin", [a]], ["y.bin", [a, b]]],
  );
});

Deno.test("GET /fragments/{name} refuses a bad name and answers 404 when nobody holds it", async () => {
  const { call } = fixture();
  for (const bad of ["..%2Fsecret", "%2Eenv", "-x", "a%20b"]) {
    assertError(
      await call("GET", `/fragments/${bad}`),
      400,
      "BAD_REQUEST",
      /Path parameter "name"/,
    );
  }
  assertError(await call("GET", "/fragments/nobody.bin"), 404, "NOT_FOUND", /"nobody\.bin"/);
});

Deno.test("a peer expires ttl seconds after its last heartbeat and the sweep frees its index", async () => {
  const { clock, registry, call } = fixture(30);
  const { body: { id } } = await call("POST", "/peers", peer(6001, ["a.bin"]));
  await call("POST", "/peers", peer(6002, ["b.bin"]));
  clock.now += 20_000;
  await call("PUT", `/peers/${id}`, peer(6001, ["a.bin"]));
  clock.now += 10_000; // 6002 is 30 s old: gone; 6001 heartbeat 10 s ago: live
  assert.deepEqual((await call("GET", "/fragments/b.bin")).status, 404);
  assert.deepEqual((await call("GET", "/fragments/a.bin")).status, 200);
  clock.now += 19_999;
  assert.deepEqual((await call("GET", "/peers")).body.peers.length, 1);
  clock.now += 1;
  registry.sweep();
  assert.deepEqual([registry.peerCount, registry.fragmentCount], [0, 0]);
  assert.deepEqual((await call("GET", "/fragments")).body, { fragments: [] });
  assert.deepEqual((await call("PUT", `/peers/${id}`, peer(6001, ["a.bin"]))).body.recreated, true);
});

Deno.test("GET /fragments/{name} answers again after a holder joins, moves, leaves or expires", async () => {
  const { clock, call, register } = fixture(30);
  const holders = async () =>
    ((await call("GET", "/fragments/a.bin")).body?.holders ?? []).map((
      h: { id: string; host: string; port: number },
    ) => `${h.id} ${h.host}:${h.port}`);
  const a = await register(peer(6001, ["a.bin"], "one"));
  assert.deepEqual(await holders(), [`${a} one:6001`]);
  const b = await register(peer(6002, ["a.bin"], "two"));
  assert.deepEqual(await holders(), [`${a} one:6001`, `${b} two:6002`]);
  await call("PUT", `/peers/${a}`, peer(6003, ["a.bin"], "one")); // moved to another port
  assert.deepEqual(await holders(), [`${a} one:6003`, `${b} two:6002`]);
  await call("DELETE", `/peers/${b}`);
  assert.deepEqual(await holders(), [`${a} one:6003`]);
  await call("POST", "/peers", peer(6004, ["a.bin"], "four"));
  clock.now += 20_000;
  await call("PUT", `/peers/${a}`, peer(6003, ["a.bin"], "one")); // 6004 is now the older
  clock.now += 10_000; // 6004 expires, with no sweep
  assert.deepEqual(await holders(), [`${a} one:6003`]);
  clock.now += 20_000; // and then `a`
  assert.deepEqual((await call("GET", "/fragments/a.bin")).status, 404);
  // The very heartbeat it sent last brings it back, as a peer the directory had forgotten.
  const back = await call("PUT", `/peers/${a}`, peer(6003, ["a.bin"], "one"));
  assert.deepEqual(back.body.recreated, true);
  assert.deepEqual(await holders(), [`${a} one:6003`]);
});

Deno.test("PUT /peers/{id} repeated byte for byte from another address moves a peer without a host", async () => {
  const { app, call } = fixture();
  const state = peer(6001, ["a.bin"]);
  const { body: { id } } = await call("POST", "/peers", state);
  const elsewhere = {
    remoteAddr: { hostname: "10.0.0.10", port: 40001, transport: "tcp" as const },
  };
  const beat = await call("PUT", `/peers/${id}`, state, elsewhere);
  assert.deepEqual(beat.body, { id, ttl: 30, recreated: false });
  const { body } = await call("GET", "/fragments/a.bin");
  assert.deepEqual(body.holders.map((h: { host: string }) => h.host), ["10.0.0.10"]);
  // and the same bytes with another media type are still refused
  const response = await app.request(`/peers/${id}`, {
    method: "PUT",
    headers: { "content-type": "text/plain" },
    body: JSON.stringify(state),
  }, REMOTE);
  assert.deepEqual(response.status, 415);
  await response.body?.cancel();
});

Deno.test("PUT /peers/{id} with no body refuses a peer added without one, naming the field", async () => {
  const { registry, call } = fixture();
  registry.upsert("p9", { host: "h", port: 6009, grpcPort: 0, httpPort: 0, fragments: [] });
  assertError(await call("PUT", "/peers/p9"), 400, "BAD_REQUEST", /"port" is required/);
});

Deno.test("POST /files publishes a manifest once and refuses another file under its name", async () => {
  const { call } = fixture();
  assert.deepEqual(await call("POST", "/files", manifest()), {
    status: 201,
    body: { file: "movie.webm", fragments: 2 },
  });
  assert.deepEqual((await call("POST", "/files", manifest())).status, 200);
  const other = { ...manifest(), sha256: "b".repeat(64) };
  assertError(await call("POST", "/files", other), 409, "CONFLICT", /"movie\.webm"/);
  // The same file split another way is another publication, not the same one again.
  const resplit = manifest("movie.webm", ["movie_0.bin"]);
  resplit.fragments[0]!.size = 200;
  assertError(await call("POST", "/files", resplit), 409, "CONFLICT", /"movie\.webm"/);
});

Deno.test("POST /files refuses a manifest whose fields do not add up, keeping nothing", async () => {
  const { call } = fixture();
  const gap = manifest("gap.webm");
  gap.fragments[1]!.offset = 150; // fragment 0 ends at 100
  assertError(await call("POST", "/files", gap), 400, "BAD_REQUEST", /^Invalid manifest: /);
  const short = { ...manifest("short.webm"), size: 300 }; // the fragments cover 200 bytes
  assertError(await call("POST", "/files", short), 400, "BAD_REQUEST", /^Invalid manifest: /);
  assert.deepEqual((await call("GET", "/files")).body, { files: [] });
});

Deno.test("POST /files refuses a manifest with a bad name, hash, index or duplicate fragment", async () => {
  const { call } = fixture();
  const good = manifest();
  const cases: [unknown, RegExp][] = [
    [{ ...good, file: "../movie.webm" }, /"file"/],
    [{ ...good, version: 2 }, /"version"/],
    [{ ...good, sha256: "XYZ" }, /"sha256"/],
    [{ ...good, fragments: [] }, /"fragments"/],
    [manifest("m.webm", ["a.bin", "a/b.bin"]), /"fragments\.1\.name"/],
    [manifest("m.webm", ["a.bin", "a.bin"]), /"fragments\.1\.name" is invalid: must be unique/],
    [{ ...good, fragments: [good.fragments[1], good.fragments[0]] }, /"fragments\.0\.index"/],
    ["{", /Malformed JSON/],
  ];
  for (const [body, message] of cases) {
    assertError(await call("POST", "/files", body), 400, "BAD_REQUEST", message);
  }
});

Deno.test("GET /files lists files and says whether every fragment has a live holder", async () => {
  const { call } = fixture();
  await call("POST", "/files", manifest());
  await call("POST", "/peers", seeder(6001, "movie.webm", ["movie_0.bin"]));
  const summary = { file: "movie.webm", mime: "video/webm", size: 200, sha256: SHA, fragments: 2 };
  assert.deepEqual((await call("GET", "/files")).body, {
    files: [{ ...summary, available: false }],
  });
  await call("POST", "/peers", seeder(6002, "movie.webm", ["movie_1.bin"]));
  assert.deepEqual((await call("GET", "/files")).body, {
    files: [{ ...summary, available: true }],
  });
});

Deno.test("GET /files/{file} gives each fragment's live holders and their count", async () => {
  const { call, register } = fixture();
  await call("POST", "/files", manifest());
  const a = await register(seeder(6001, "movie.webm", ["movie_0.bin", "movie_1.bin"]));
  await call("POST", "/peers", seeder(6002, "movie.webm", ["movie_1.bin"]));
  const { status, body } = await call("GET", "/files/movie.webm");
  assert.deepEqual(status, 200);
  assert.deepEqual(body.sha256, SHA);
  assert.deepEqual(body.fragments.map((f: { holderCount: number }) => f.holderCount), [1, 2]);
  assert.deepEqual(body.fragments[0].holders[0], {
    id: a,
    host: "10.0.0.9",
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
  });
  assert.deepEqual(body.fragments[1].offset, 100);
  assertError(await call("GET", "/files/other.webm"), 404, "NOT_FOUND", /"other\.webm"/);
  assertError(await call("GET", "/files/..%2Fx"), 400, "BAD_REQUEST", /"file"/);
});

Deno.test("an unknown route is a 404 in the error shape", async () => {
  const { call } = fixture();
  assertError(await call("GET", "/nowhere"), 404, "NOT_FOUND", /GET "\/nowhere"/);
  assertError(await call("PATCH", "/peers"), 404, "NOT_FOUND");
});

Deno.test("a handler that throws becomes a logged, generic 500 that leaks nothing", async () => {
  const { app, call } = fixture();
  app.get("/boom", () => {
    throw new Error("secret detail");
  });
  const logged: unknown[][] = [];
  const original = console.error;
  console.error = (...args: unknown[]) => logged.push(args);
  try {
    const result = await call("GET", "/boom");
    assertError(result, 500, "INTERNAL", /^Internal server error$/);
    assert.ok(!JSON.stringify(result.body).includes("secret"));
  } finally {
    console.error = original;
  }
  assert.deepEqual(logged.length, 1);
  assert.ok(String(logged[0].at(-1)).includes("secret detail"));
});

Deno.test("GET /openapi.json is an OpenAPI 3 document that a real validator accepts", async () => {
  const { call } = fixture();
  const { status, body } = await call("GET", "/openapi.json");
  assert.deepEqual(status, 200);
  const api = await SwaggerParser.validate(structuredClone(body));
  assert.deepEqual(Object.keys(api.paths ?? {}).sort(), [
    "/files",
    "/files/{file}",
    "/fragments",
    "/fragments/{name}",
    "/health",
    "/peers",
    "/peers/{id}",
  ]);
  const peers = body.paths["/peers/{id}"];
  assert.deepEqual(Object.keys(peers).sort(), ["delete", "put"]);
  assert.deepEqual(Object.keys(peers.put.responses).sort(), ["200", "400", "413", "415", "429"]);
  assert.deepEqual(
    Object.keys(body.paths["/peers"].post.responses).sort(),
    ["201", "400", "413", "415", "429"],
  );
  assert.deepEqual(
    Object.keys(body.paths["/files"].post.responses).sort(),
    ["200", "201", "400", "409", "413", "415", "429"],
  );
  assert.deepEqual(body.components.schemas.Error.properties.error.required, ["code", "message"]);
  // and the validator is not a rubber stamp
  body.paths["/health"].get.responses["200"].content["application/json"].schema = { type: "nope" };
  let refused = false;
  await SwaggerParser.validate(body).catch(() => refused = true);
  assert.ok(refused, "the validator accepted a broken document");
});

Deno.test("GET /apidocs serves Swagger UI whose scripts and styles come from the directory", async () => {
  const { app } = fixture();
  const page = await (await app.request("/apidocs")).text();
  assert.match(page, /url: '\/openapi\.json'/);
  const assets = [...page.matchAll(/(?:href|src)="([^"]+)"/g)].map((match) => match[1]);
  assert.deepEqual(assets.sort(), [
    "/apidocs/swagger-ui-dist/swagger-ui-bundle.js",
    "/apidocs/swagger-ui-dist/swagger-ui.css",
  ]);
  for (
    const [path, type, marker] of [
      [assets[0], "text/javascript", "SwaggerUIBundle"],
      [assets[1], "text/css", ".swagger-ui"],
    ]
  ) {
    const response = await app.request(path);
    assert.deepEqual(response.status, 200);
    assert.match(response.headers.get("content-type") ?? "", new RegExp(type));
    assert.ok((await response.text()).includes(marker));
  }
  for (const other of ["index.html", "constructor", "..%2Fpackage.json"]) {
    const missing = await app.request(`/apidocs/swagger-ui-dist/${other}`);
    assert.deepEqual([missing.status, (await missing.json()).error.code], [404, "NOT_FOUND"]);
  }
});

Deno.test("a published file stays while a live peer holds any of its fragments, and goes one ttl after the last", async () => {
  const { clock, call } = fixture(30);
  const listed = async () =>
    (await call("GET", "/files")).body.files.map((f: { file: string }) => f.file);
  assert.deepEqual((await call("POST", "/files", manifest())).status, 201);
  const { body: { id } } = await call(
    "POST",
    "/peers",
    seeder(6001, "movie.webm", ["movie_0.bin"]),
  );
  for (let beat = 0; beat < 5; beat++) { // five ttls, held all along
    clock.now += 20_000;
    await call("PUT", `/peers/${id}`, seeder(6001, "movie.webm", ["movie_0.bin"]));
    assert.deepEqual(await listed(), ["movie.webm"]);
  }
  // The peer drops the fragment: the file is no longer backed from now on.
  await call("PUT", `/peers/${id}`, seeder(6001, "movie.webm", ["other.bin"]));
  clock.now += 29_999;
  assert.deepEqual((await call("GET", "/files/movie.webm")).status, 200);
  clock.now += 1;
  assertError(await call("GET", "/files/movie.webm"), 404, "NOT_FOUND", /"movie\.webm"/);
  assert.deepEqual(await listed(), []);
  assert.deepEqual((await call("GET", "/health")).body.files, 0);
  // Published again, it is a new publication.
  assert.deepEqual((await call("POST", "/files", manifest())).status, 201);
});

Deno.test("a file goes one ttl after its last holder expires, whether or not the sweep ran", async () => {
  for (const sweep of [false, true]) {
    const { clock, registry, call } = fixture(30);
    await call("POST", "/files", manifest());
    await call("POST", "/peers", seeder(6001, "movie.webm", ["movie_0.bin", "movie_1.bin"]));
    clock.now += 20_000;
    await call("POST", "/peers", seeder(6002, "movie.webm", ["movie_1.bin"])); // the last holder: expires at 50 s
    clock.now += 15_000; // 6001 is gone
    if (sweep) registry.sweep();
    assert.deepEqual((await call("GET", "/files")).body.files[0].available, false);
    clock.now += 25_000; // 6002 too, 10 s ago
    if (sweep) registry.sweep();
    assert.deepEqual((await call("GET", "/health")).body, {
      status: "ok",
      peers: 0,
      fragments: 0,
      files: 1,
    });
    clock.now += 19_999;
    assert.deepEqual((await call("GET", "/files/movie.webm")).status, 200, `sweep: ${sweep}`);
    clock.now += 1; // one ttl after 6002 expired
    if (sweep) registry.sweep();
    assert.deepEqual((await call("GET", "/files")).body, { files: [] }, `sweep: ${sweep}`);
  }
});

Deno.test("a file published before its first fragment is registered has one ttl to be backed", async () => {
  const { clock, call } = fixture(30);
  // A peer's presence registers first (with what it holds: nothing yet), then publishes.
  const { body: { id } } = await call("POST", "/peers", seeder(6004, "movie.webm", []));
  await call("POST", "/files", manifest());
  await call("POST", "/files", single("lonely.webm", "lonely_0.bin"));
  clock.now += 29_999;
  await call("PUT", `/peers/${id}`, seeder(6004, "movie.webm", ["movie_1.bin"])); // its first fragment
  for (let beat = 0; beat < 3; beat++) {
    clock.now += 20_000;
    await call("PUT", `/peers/${id}`, seeder(6004, "movie.webm", ["movie_1.bin"]));
  }
  const { body: { files } } = await call("GET", "/files");
  assert.deepEqual(files.map((f: { file: string }) => f.file), ["movie.webm"]);
});

Deno.test("publishing an unchanged manifest again gives an unbacked file another ttl", async () => {
  const { clock, call } = fixture(30);
  await call("POST", "/files", manifest());
  clock.now += 20_000;
  assert.deepEqual((await call("POST", "/files", manifest())).status, 200);
  clock.now += 29_999;
  assert.deepEqual((await call("GET", "/files/movie.webm")).status, 200);
  clock.now += 1;
  assert.deepEqual((await call("GET", "/files/movie.webm")).status, 404);
});

Deno.test("POST /files refuses a file past the bound with 429, and takes it once one is dropped", async () => {
  const { clock, call } = fixture(30, { maxFiles: 2 });
  await call("POST", "/files", single("a.webm", "a_0.bin"));
  await call("POST", "/files", single("b.webm", "b_0.bin"));
  await call("POST", "/peers", seeder(6001, "a.webm", ["a_0.bin"]));
  assertError(
    await call("POST", "/files", single("c.webm", "c_0.bin")),
    429,
    "TOO_MANY_FILES",
    /^Cannot publish "c\.webm": the directory already lists 2 files, its limit/,
  );
  // At the bound, the files it has may still be published again.
  assert.deepEqual((await call("POST", "/files", single("a.webm", "a_0.bin"))).status, 200);
  clock.now += 30_000; // b.webm was never backed: it goes, and makes room
  assert.deepEqual((await call("POST", "/files", single("c.webm", "c_0.bin"))).status, 201);
  const { body: { files } } = await call("GET", "/files");
  assert.deepEqual(files.map((f: { file: string }) => f.file), ["a.webm", "c.webm"]);
});

Deno.test("POST /files refuses a file that would take the fragments of all files past their bound", async () => {
  const { clock, call } = fixture(30, { maxFileFragments: 3 });
  await call("POST", "/files", manifest("a.webm", ["a_0.bin", "a_1.bin"]));
  assertError(
    await call("POST", "/files", manifest("b.webm", ["b_0.bin", "b_1.bin"])),
    429,
    "TOO_MANY_FILES",
    /^Cannot publish "b\.webm": the directory's files would list more than 3 fragments, its limit/,
  );
  assert.deepEqual((await call("POST", "/files", single("c.webm", "c_0.bin"))).status, 201);
  clock.now += 30_000; // both unbacked: dropped, with their fragments
  assert.deepEqual(
    (await call("POST", "/files", manifest("b.webm", ["b_0.bin", "b_1.bin"]))).status,
    201,
  );
});

Deno.test("new Registry() refuses a ttl past a day and bounds that are not positive", () => {
  for (const options of [{ ttl: 0 }, { ttl: 86_401 }, { maxFiles: 0 }, { maxFileFragments: 0.5 }]) {
    assert.throws(() => new Registry(options), RangeError, JSON.stringify(options));
  }
  assert.deepEqual(new Registry({ ttl: 86_400 }).ttl, 86_400);
});

/** A valid request body per body schema, the n-th one distinct from the others. */
const VALID_BODIES: Record<string, (n: number) => unknown> = {
  PeerState: (n) => peer(6000 + n, [`walk_${n}.bin`]),
  Manifest: (n) => single(`walk${n}.webm`, `walk${n}_0.bin`),
};

/** One answer of the walk: the request, its status, and the error code when it failed. */
interface Walked {
  request: string;
  status: number;
  code: string | undefined;
  documented: number[];
  operation: OpenApiOperation;
}

/**
 * Sends every route of the OpenAPI document good and bad requests (bad paths, bodies, media
 * types, sizes), on a directory that lists one file and one peer at most, so that publishing or
 * registering a second answers what a full directory answers.
 */
async function walkRoutes(): Promise<Walked[]> {
  const { app, call } = fixture(30, { maxFiles: 1, maxPeers: 1 });
  const { body: api } = await call("GET", "/openapi.json");
  const big = JSON.stringify({ padding: "x".repeat(1024 * 1024) });
  const walked: Walked[] = [];
  let n = 0;
  for (const [path, operations] of Object.entries<Record<string, OpenApiOperation>>(api.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const documented = Object.keys(operation.responses).map(Number);
      const urls = path.includes("{")
        ? [path.replace(/\{\w+\}/g, "probe.bin"), path.replace(/\{\w+\}/g, "..%2Fx")]
        : [path];
      const bodySchema = operation.requestBody?.content["application/json"].schema.$ref
        ?.replace("#/components/schemas/", "");
      const probes: [string, RequestInit][] = [];
      for (const url of urls) {
        probes.push([url, { method }]);
        for (const query of operation.parameters?.filter((p) => p.in === "query") ?? []) {
          probes.push([`${url}?${query.name}=probe.webm`, { method }]);
          probes.push([`${url}?${query.name}=..%2Fx`, { method }]);
        }
        if (bodySchema === undefined) continue;
        const valid = VALID_BODIES[bodySchema];
        assert.ok(valid, `no valid ${bodySchema} body to probe ${method} ${path} with`);
        const good = JSON.stringify(valid(n++));
        const other = JSON.stringify(valid(n++));
        const type = { "content-type": "application/json" };
        probes.push(
          [url, { method, headers: type, body: good }],
          [url, { method, headers: type, body: good }],
          [url, { method, headers: type, body: other }],
          [url, { method, body: good }], // no Content-Type
          [url, { method, headers: { "content-type": "text/plain" }, body: good }],
          [url, { method, headers: type, body: "{" }],
          [url, { method, headers: type, body: "[]" }],
          [url, { method, headers: type, body: big }],
        );
      }
      for (const [url, init] of probes) {
        const response = await app.request(url, { ...init, method: method.toUpperCase() }, REMOTE);
        const text = await response.text();
        const code = response.ok || text === "" ? undefined : JSON.parse(text).error?.code;
        const request = `${method.toUpperCase()} ${url}`;
        walked.push({ request, status: response.status, code, documented, operation });
      }
    }
  }
  return walked;
}

Deno.test("every status a route answers is one its OpenAPI document lists", async () => {
  const walked = await walkRoutes();
  for (const { request, status, documented } of walked) {
    assert.ok(documented.includes(status), `${request} answered ${status}, not in ${documented}`);
  }
  for (const route of new Set(walked.map((w) => w.operation))) {
    if (route.requestBody === undefined) continue;
    const seen = walked.filter((w) => w.operation === route).map((w) => w.status);
    for (const status of [413, 415, 429]) {
      assert.ok(
        seen.includes(status),
        `${walked.find((w) => w.operation === route)!.request} never answered ${status}`,
      );
    }
  }
});

Deno.test("every error code the directory answers is the one ERROR_CODES or its OpenAPI response names", async () => {
  const walked = await walkRoutes();
  const codes = new Set<string>();
  for (const { request, status, code, operation } of walked) {
    if (code === undefined) continue;
    codes.add(code);
    // A status with one code answers that code; a 429 has one per bound, each one documented.
    const declared = ERROR_CODES[status as keyof typeof ERROR_CODES];
    if (declared !== undefined) {
      assert.deepEqual(code, declared, `${request} answered ${status} ${code}`);
    } else {
      const description = (operation.responses[status] as { description: string }).description;
      assert.ok(description.includes(code), `${request}: ${code} not in "${description}"`);
    }
  }
  assert.ok(codes.has("TOO_MANY_FILES") && codes.has("TOO_MANY_PEERS"), [...codes].join());
});

interface OpenApiOperation {
  responses: Record<string, unknown>;
  parameters?: { name: string; in: string }[];
  requestBody?: { content: Record<string, { schema: { $ref?: string } }> };
}

// ---------------------------------------------------------------------------------------------
// Files that share fragment names: split.ts names every file's fragments fragment_<i>.bin

/** Two published files whose fragments have the same names, as split.ts names them. */
async function twoFiles(call: ReturnType<typeof fixture>["call"]) {
  const names = ["fragment_0.bin", "fragment_1.bin"];
  assert.deepEqual((await call("POST", "/files", manifest("a.webm", names))).status, 201);
  const b = { ...manifest("b.webm", names), sha256: "b".repeat(64) };
  assert.deepEqual((await call("POST", "/files", b)).status, 201);
}

const ids = (holders: { id: string }[]) => holders.map((holder) => holder.id);

Deno.test("GET /files/{file} lists as holders only peers of that file when files share fragment names", async () => {
  const { call, register } = fixture();
  await twoFiles(call);
  const a = await register(seeder(6001, "a.webm", ["fragment_0.bin", "fragment_1.bin"]));
  const b = await register(seeder(6002, "b.webm", ["fragment_0.bin"]));
  await call("POST", "/peers", peer(6003, ["fragment_0.bin"])); // loose: its file is unknown
  const fileA = (await call("GET", "/files/a.webm")).body;
  assert.deepEqual(fileA.fragments.map((f: { holders: { id: string }[] }) => ids(f.holders)), [
    [a],
    [a],
  ]);
  assert.deepEqual(fileA.fragments.map((f: { holderCount: number }) => f.holderCount), [1, 1]);
  const fileB = (await call("GET", "/files/b.webm")).body;
  assert.deepEqual(fileB.fragments.map((f: { holders: { id: string }[] }) => ids(f.holders)), [
    [b],
    [],
  ]);
  const { body: { files } } = await call("GET", "/files");
  assert.deepEqual(files.map((f: { file: string; available: boolean }) => [f.file, f.available]), [
    ["a.webm", true],
    ["b.webm", false],
  ]);
});

Deno.test("GET /fragments/{name} lists every holder of the name, and ?file= narrows it to one file's", async () => {
  const { call, register } = fixture();
  await twoFiles(call);
  const a = await register(seeder(6001, "a.webm", ["fragment_0.bin"]));
  const b = await register(seeder(6002, "b.webm", ["fragment_0.bin"]));
  const c = await register(peer(6003, ["fragment_0.bin"]));
  const located = async (query = "") =>
    ids((await call("GET", `/fragments/fragment_0.bin${query}`)).body.holders);
  assert.deepEqual(await located(), [a, b, c]);
  for (let again = 0; again < 2; again++) { // the second time from the answers it keeps
    assert.deepEqual(await located("?file=a.webm"), [a]);
    assert.deepEqual(await located("?file=b.webm"), [b]);
    assert.deepEqual(await located(), [a, b, c]);
  }
  assertError(
    await call("GET", "/fragments/fragment_0.bin?file=c.webm"),
    404,
    "NOT_FOUND",
    /"fragment_0\.bin" of "c\.webm"/,
  );
  assertError(
    await call("GET", "/fragments/fragment_0.bin?file=..%2Fx"),
    400,
    "BAD_REQUEST",
    /Query parameter "file"/,
  );
  // and the answers follow a change of holders
  await call("DELETE", `/peers/${a}`);
  assertError(await call("GET", "/fragments/fragment_0.bin?file=a.webm"), 404, "NOT_FOUND");
  assert.deepEqual(await located(), [b, c]);
  await call("DELETE", `/peers/${b}`); // one file's holders left, then none
  assert.deepEqual(await located(), [c]);
  assertError(await call("GET", "/fragments/fragment_0.bin?file=b.webm"), 404, "NOT_FOUND");
  await call("DELETE", `/peers/${c}`);
  assertError(await call("GET", "/fragments/fragment_0.bin"), 404, "NOT_FOUND");
  const d = await register(seeder(6004, "b.webm", ["fragment_0.bin"]));
  assert.deepEqual(await located(), [d]);
  assert.deepEqual(await located("?file=b.webm"), [d]);
});

Deno.test("GET /fragments lists every fragment with its holders, and ?file= only that file's", async () => {
  const { call, register } = fixture();
  await twoFiles(call);
  const a = await register(seeder(6001, "a.webm", ["fragment_0.bin", "fragment_1.bin"]));
  const b = await register(seeder(6002, "b.webm", ["fragment_0.bin"]));
  const listed = async (query = "") =>
    (await call("GET", `/fragments${query}`)).body.fragments.map((
      f: { name: string; holders: { id: string }[] },
    ) => [f.name, ids(f.holders)]);
  assert.deepEqual(await listed(), [["fragment_0.bin", [a, b]], ["fragment_1.bin", [a]]]);
  assert.deepEqual(await listed("?file=b.webm"), [["fragment_0.bin", [b]]]);
  assert.deepEqual(await listed("?file=c.webm"), []);
  assertError(await call("GET", "/fragments?file=.x"), 400, "BAD_REQUEST", /"file"/);
});

Deno.test("a file stays listed only while a live peer of that file holds its fragments", async () => {
  const { clock, call } = fixture(30);
  await twoFiles(call);
  // Only b.webm has a seeder; it holds fragments whose names a.webm lists too.
  const { body: { id } } = await call("POST", "/peers", seeder(6002, "b.webm", ["fragment_0.bin"]));
  for (let beat = 0; beat < 3; beat++) {
    clock.now += 20_000;
    await call("PUT", `/peers/${id}`, seeder(6002, "b.webm", ["fragment_0.bin"]));
  }
  const { body: { files } } = await call("GET", "/files");
  assert.deepEqual(files.map((f: { file: string }) => f.file), ["b.webm"]);
  assertError(await call("GET", "/files/a.webm"), 404, "NOT_FOUND");
});

Deno.test("a peer whose fragments stop belonging to a file backs it until then, and the other file from then", async () => {
  const { clock, call } = fixture(30);
  await twoFiles(call);
  const state = (file: string) => seeder(6001, file, ["fragment_0.bin", "fragment_1.bin"]);
  const { body: { id } } = await call("POST", "/peers", state("a.webm"));
  clock.now += 20_000;
  await call("PUT", `/peers/${id}`, state("a.webm"));
  clock.now += 20_000; // b.webm was never backed: gone
  await call("PUT", `/peers/${id}`, state("b.webm")); // its store now holds b.webm
  await call("POST", "/files", {
    ...manifest("b.webm", ["fragment_0.bin", "fragment_1.bin"]),
    sha256: "b".repeat(64),
  });
  assertError(await call("GET", "/fragments/fragment_0.bin?file=a.webm"), 404, "NOT_FOUND");
  const held = async (file: string) =>
    ((await call("GET", `/files/${file}`)).body?.fragments ?? []).map((
      f: { holderCount: number },
    ) => f.holderCount);
  assert.deepEqual(await held("a.webm"), [0, 0]);
  assert.deepEqual(await held("b.webm"), [1, 1]);
  clock.now += 29_999; // a.webm was backed until the move
  assert.deepEqual((await call("GET", "/files/a.webm")).status, 200);
  await call("PUT", `/peers/${id}`, state("b.webm"));
  clock.now += 1;
  assert.deepEqual((await call("GET", "/files/a.webm")).status, 404);
  assert.deepEqual(await held("b.webm"), [1, 1]);
});

Deno.test("GET /peers shows the file a peer's fragments belong to, and POST /peers refuses a bad one", async () => {
  const { call } = fixture();
  await call("POST", "/peers", seeder(6001, "a.webm", ["fragment_0.bin"]));
  await call("POST", "/peers", peer(6002, ["fragment_0.bin"]));
  const { body: { peers } } = await call("GET", "/peers");
  assert.deepEqual(peers.map((p: { port: number; file?: string }) => [p.port, p.file]), [
    [6001, "a.webm"],
    [6002, undefined],
  ]);
  for (const bad of ["../a.webm", "", 7]) {
    assertError(
      await call("POST", "/peers", { ...peer(6003, []), file: bad }),
      400,
      "BAD_REQUEST",
      /"file"/,
    );
  }
});

Deno.test("GET /openapi.json describes the file of a peer's state and the file query of locate", async () => {
  const { call } = fixture();
  const { body } = await call("GET", "/openapi.json");
  const state = body.components.schemas.PeerState;
  assert.ok(state.properties.file, "PeerState has no file");
  assert.ok(!state.required.includes("file"), "file should be optional");
  for (const path of ["/fragments/{name}", "/fragments"]) {
    const parameters: { name: string; in: string; required?: boolean }[] =
      body.paths[path].get.parameters;
    const query = parameters.find((p) => p.in === "query");
    assert.deepEqual([query?.name, query?.required ?? false], ["file", false], path);
  }
  assert.ok(body.paths["/fragments"].get.responses["400"], "GET /fragments documents no 400");
});

// ---------------------------------------------------------------------------------------------
// Bounds on peers

Deno.test("POST /peers and PUT /peers/{id} refuse a new peer past maxPeers with 429, and take one once another goes", async () => {
  const { clock, call, register } = fixture(30, { maxPeers: 2 });
  const a = await register(peer(6001, ["x.bin"]));
  await call("POST", "/peers", peer(6002, ["x.bin"]));
  assertError(
    await call("POST", "/peers", peer(6003, ["x.bin"])),
    429,
    "TOO_MANY_PEERS",
    /^The directory lists 2 live peers, its limit/,
  );
  assertError(await call("PUT", "/peers/p3", peer(6003, ["x.bin"])), 429, "TOO_MANY_PEERS");
  // Known peers still heartbeat and change, and a peer that restarted at its address replaces
  // itself.
  assert.deepEqual((await call("PUT", `/peers/${a}`, peer(6001, ["y.bin"]))).status, 200);
  const again = await call("POST", "/peers", peer(6001, ["y.bin"]));
  assert.deepEqual(again.status, 201);
  assert.deepEqual((await call("GET", "/health")).body.peers, 2);
  assert.deepEqual((await call("GET", "/fragments/x.bin")).body.holders.length, 1);
  clock.now += 30_000; // both expire: room again, sweep or not
  assert.deepEqual((await call("PUT", "/peers/p3", peer(6003, ["x.bin"]))).status, 200);
  assert.deepEqual((await call("POST", "/peers", peer(6004, ["x.bin"]))).status, 201);
  assertError(await call("POST", "/peers", peer(6005, ["x.bin"])), 429, "TOO_MANY_PEERS");
});

Deno.test(`POST /peers refuses a state of more than ${MAX_PEER_FRAGMENTS} fragments`, async () => {
  const { call } = fixture();
  const names = (count: number) => Array.from({ length: count }, (_, i) => `f_${i}.bin`);
  assert.deepEqual(
    (await call("POST", "/peers", peer(6001, names(MAX_PEER_FRAGMENTS)))).status,
    201,
  );
  const many = JSON.stringify(peer(6002, names(MAX_PEER_FRAGMENTS + 1)));
  assert.ok(many.length < 1024 * 1024, "the body limit would refuse it anyway");
  assertError(await call("POST", "/peers", many), 400, "BAD_REQUEST", /"fragments" is invalid/);
  assertError(await call("PUT", "/peers/p2", many), 400, "BAD_REQUEST", /"fragments" is invalid/);
  assert.deepEqual((await call("GET", "/health")).body.peers, 1);
});

Deno.test("new Registry() refuses a bound on peers that is not positive", () => {
  for (const maxPeers of [0, -1, 1.5]) assert.throws(() => new Registry({ maxPeers }), RangeError);
});

// ---------------------------------------------------------------------------------------------
// Swagger UI's assets

Deno.test("loadOnce() loads once on success, and again after a failure", async () => {
  let calls = 0;
  const load = loadOnce(() => {
    calls++;
    return calls === 1
      ? Promise.reject(new Error("not yet"))
      : Promise.resolve({ default: `text ${calls}` });
  });
  await assert.rejects(load(), /not yet/);
  assert.deepEqual(await load(), "text 2");
  assert.deepEqual(await load(), "text 2");
  assert.deepEqual(calls, 2);
});
