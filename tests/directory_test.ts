/**
 * directory.ts through `app.request()`, no port: every route with good and bad input, expiry on
 * a fake clock, the error shape, owners and their secrets, the bounds, paging, request bodies'
 * deadlines, and the OpenAPI document checked by a real validator. Then the directory as a real
 * process: running out of file descriptors, connection limits and deadlines, and its memory
 * under the attacks that took it to gigabytes.
 * @module
 */
import SwaggerParser from "@apidevtools/swagger-parser";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import {
  type AppOptions,
  createApp,
  DirectoryClient,
  ERROR_CODES,
  MAX_PEER_FRAGMENTS,
  newSecret,
  type PeerState,
  Registry,
} from "../directory.ts";
import { loadOnce } from "../directory/app.ts";
import { type ConnectionLimits, serveConnections } from "../directory/server.ts";
import type { Manifest } from "../split.ts";
import { Child, taskArgv } from "./_util.ts";

const REMOTE = {
  remoteAddr: { hostname: "::ffff:10.0.0.9", port: 40000, transport: "tcp" as const },
};
const SHA = "a".repeat(64);

/**
 * A directory app on a clock the test moves by hand. Its `call()` signs a request to
 * `/peers/{id}` as that peer does, with the secret the directory gave the id (or, for an id the
 * test makes up, one the test chose: what a peer presents to a directory that forgot it);
 * `auth` sends another Authorization header, or none with null.
 */
function fixture(ttl = 30, options: AppOptions = {}) {
  const clock = { now: 1_000_000 };
  const registry = new Registry({ ttl, now: () => clock.now, ...options });
  const app = createApp({ ...options, registry });
  const secrets = new Map<string, string>();
  /** The secret of peer `id`: the one its registration answered, or one chosen for it. */
  const secretOf = (id: string): string => {
    if (!secrets.has(id)) secrets.set(id, newSecret());
    return secrets.get(id)!;
  };
  const call = async (
    method: string,
    path: string,
    body?: unknown,
    env: object = REMOTE,
    auth?: string | null,
  ) => {
    const headers: Record<string, string> = {};
    const init: RequestInit = { method, headers };
    if (body !== undefined) {
      headers["content-type"] = "application/json";
      init.body = typeof body === "string" ? body : JSON.stringify(body);
    }
    const id = path.match(/^\/peers\/([^/?]+)/)?.[1];
    if (auth === undefined && id !== undefined) {
      headers.authorization = `Bearer ${secretOf(decodeURIComponent(id))}`;
    } else if (auth !== undefined && auth !== null) headers.authorization = auth;
    const response = await app.request(path, init, env);
    const text = await response.text();
    const result = { status: response.status, body: text === "" ? undefined : JSON.parse(text) };
    if (method === "POST" && path === "/peers" && result.status === 201) {
      secrets.set(result.body.id, result.body.secret);
    }
    return result;
  };
  /** Registers a peer and returns its id. */
  const register = async (state: PeerState): Promise<string> =>
    (await call("POST", "/peers", state)).body.id;
  return { clock, registry, app, call, register, secretOf };
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

/** The id the tests give file `file`: a SHA-256 of its name, so that each name has its own. */
function idOf(file: string): string {
  return createHash("sha256").update(file).digest("hex");
}

/**
 * A peer that says which file its fragments belong to, by its id and name, as a peer with a
 * manifest does.
 */
function seeder(port: number, file: string, fragments: string[]): PeerState {
  return { ...peer(port, fragments), fileId: idOf(file), file };
}

function manifest(file = "movie.webm", names = ["movie_0.bin", "movie_1.bin"]): Manifest {
  return {
    version: 1,
    file,
    mime: "video/webm",
    size: 200,
    sha256: idOf(file),
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

Deno.test("POST /peers lists a peer at its remote address, whatever host its body names", async () => {
  const { call } = fixture();
  const first = await call("POST", "/peers", peer(6001, ["a.bin"]));
  assert.deepEqual(first.status, 201);
  assert.deepEqual([first.body.ttl, first.body.host], [30, "10.0.0.9"]);
  assert.match(first.body.secret, /^[A-Za-z0-9_-]{43}$/);
  // Aimed at a third party: the directory lists it where the request came from all the same.
  const second = await call("POST", "/peers", peer(6002, ["a.bin"], "victim.example"));
  assert.deepEqual(second.body.host, "10.0.0.9");
  const located = await call("GET", "/fragments/a.bin");
  assert.deepEqual(
    located.body.holders.map((h: { host: string; port: number }) => `${h.host}:${h.port}`),
    ["10.0.0.9:6001", "10.0.0.9:6002"],
  );
  const beat = await call(
    "PUT",
    `/peers/${second.body.id}`,
    peer(6002, ["a.bin"], "other.example"),
  );
  assert.deepEqual(beat.status, 200);
  assert.deepEqual((await call("GET", "/peers")).body.peers[1].host, "10.0.0.9");
});

Deno.test("POST /peers of a directory that trusts advertised hosts takes the host a body names", async () => {
  const { call } = fixture(30, { trustAdvertise: true });
  const first = await call("POST", "/peers", peer(6001, ["a.bin"]));
  assert.deepEqual(first.status, 201);
  assert.deepEqual(first.body.ttl, 30);
  const second = await call("POST", "/peers", peer(6002, ["a.bin"], "seed.example"));
  assert.deepEqual(second.body.host, "seed.example");
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

Deno.test("POST /peers from a peer that restarted at the same address with its secret keeps one entry", async () => {
  const { call } = fixture();
  const first = await call("POST", "/peers", peer(6001, ["a.bin"]));
  const again = await call(
    "POST",
    "/peers",
    peer(6001, ["b.bin"]),
    REMOTE,
    `Bearer ${first.body.secret}`,
  );
  assert.deepEqual([again.status, again.body.secret], [201, first.body.secret]);
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
  const { call } = fixture(30, { trustAdvertise: true });
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
  const { clock, call, register } = fixture(30, { trustAdvertise: true });
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
  const { app, call, secretOf } = fixture();
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
    headers: { "content-type": "text/plain", authorization: `Bearer ${secretOf(id)}` },
    body: JSON.stringify(state),
  }, REMOTE);
  assert.deepEqual(response.status, 415);
  await response.body?.cancel();
});

Deno.test("PUT /peers/{id} with no body refuses a peer added without one, naming the field", async () => {
  const { registry, call, secretOf } = fixture();
  const state = { host: "h", port: 6009, grpcPort: 0, httpPort: 0, fragments: [] };
  registry.upsert("p9", state, { secret: secretOf("p9") });
  assertError(await call("PUT", "/peers/p9"), 400, "BAD_REQUEST", /"port" is required/);
});

Deno.test("POST /files publishes a manifest once, lists another file of its name beside it, and refuses its id split another way or under another name", async () => {
  const { call } = fixture();
  const id = idOf("movie.webm");
  const published = { id, file: "movie.webm", fragments: 2 };
  assert.deepEqual(await call("POST", "/files", manifest()), { status: 201, body: published });
  assert.deepEqual(await call("POST", "/files", manifest()), { status: 200, body: published });
  // Other contents under the same name: another file, with its own id.
  const other = { ...manifest(), sha256: "b".repeat(64) };
  assert.deepEqual(await call("POST", "/files", other), {
    status: 201,
    body: { ...published, id: "b".repeat(64) },
  });
  // The same file split another way, or named otherwise, is not the same publication.
  const resplit = manifest("movie.webm", ["movie_0.bin"]);
  resplit.fragments[0]!.size = 200;
  assertError(await call("POST", "/files", resplit), 409, "CONFLICT", new RegExp(id));
  const renamed = { ...manifest(), file: "renamed.webm" };
  assertError(await call("POST", "/files", renamed), 409, "CONFLICT", new RegExp(id));
  const { body: { files } } = await call("GET", "/files");
  assert.deepEqual(
    files.map((f: { id: string; file: string; fragments: number }) => [f.id, f.file, f.fragments]),
    [
      [id, "movie.webm", 2],
      ["b".repeat(64), "movie.webm", 2],
    ],
  );
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

Deno.test("GET /files lists files with their ids, whether every fragment has a live holder, and their seeders", async () => {
  const { call } = fixture();
  await call("POST", "/files", manifest());
  await call("POST", "/peers", seeder(6001, "movie.webm", ["movie_0.bin"]));
  const id = idOf("movie.webm");
  const summary = {
    id,
    file: "movie.webm",
    mime: "video/webm",
    size: 200,
    sha256: id,
    fragments: 2,
  };
  assert.deepEqual((await call("GET", "/files")).body, {
    files: [{ ...summary, available: false, seeders: 0 }],
  });
  // Every fragment held, but by no one peer: available, and no seeder yet.
  await call("POST", "/peers", seeder(6002, "movie.webm", ["movie_1.bin"]));
  assert.deepEqual((await call("GET", "/files")).body, {
    files: [{ ...summary, available: true, seeders: 0 }],
  });
  // A peer of no file, and one of another file, holding both names are no seeders of it.
  await call("POST", "/peers", peer(6003, ["movie_0.bin", "movie_1.bin"]));
  await call("POST", "/peers", seeder(6004, "other.webm", ["movie_0.bin", "movie_1.bin"]));
  assert.deepEqual((await call("GET", "/files")).body.files[0].seeders, 0);
  await call("POST", "/peers", seeder(6005, "movie.webm", ["movie_0.bin", "movie_1.bin"]));
  assert.deepEqual((await call("GET", "/files")).body, {
    files: [{ ...summary, available: true, seeders: 1 }],
  });
});

Deno.test("GET /files/{file} gives each fragment's live holders and their count", async () => {
  const { call, register } = fixture();
  await call("POST", "/files", manifest());
  const a = await register(seeder(6001, "movie.webm", ["movie_0.bin", "movie_1.bin"]));
  await call("POST", "/peers", seeder(6002, "movie.webm", ["movie_1.bin"]));
  const { status, body } = await call("GET", "/files/movie.webm");
  assert.deepEqual(status, 200);
  assert.deepEqual([body.id, body.sha256], [idOf("movie.webm"), idOf("movie.webm")]);
  assert.deepEqual(body.fragments.map((f: { holderCount: number }) => f.holderCount), [1, 2]);
  assert.deepEqual(body.fragments[0].holders[0], {
    id: a,
    host: "10.0.0.9",
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
    fileId: idOf("movie.webm"),
  });
  assert.deepEqual(body.fragments[1].offset, 100);
  assertError(await call("GET", "/files/other.webm"), 404, "NOT_FOUND", /"other\.webm"/);
  assertError(await call("GET", `/files/${idOf("other.webm")}`), 404, "NOT_FOUND");
  assertError(await call("GET", "/files/..%2Fx"), 400, "BAD_REQUEST", /"file"/);
});

Deno.test("an unknown route is a 404 in the error shape", async () => {
  const { call } = fixture();
  assertError(await call("GET", "/nowhere"), 404, "NOT_FOUND", /GET "\/nowhere"/);
});

Deno.test("a known route asked with another method is a 405 that names the methods it answers", async () => {
  const { call } = fixture();
  const result = await call("PATCH", "/peers");
  assertError(result, 405, "METHOD_NOT_ALLOWED", /answers GET, HEAD, POST, not PATCH/);
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
  assert.deepEqual(
    Object.keys(peers.put.responses).sort(),
    ["200", "400", "401", "403", "408", "409", "413", "414", "415", "429", "503"],
  );
  assert.deepEqual(
    Object.keys(peers.delete.responses).sort(),
    ["204", "400", "401", "403", "404", "414"],
  );
  assert.deepEqual(
    Object.keys(body.paths["/peers"].post.responses).sort(),
    ["201", "400", "401", "408", "409", "413", "414", "415", "429", "503"],
  );
  assert.deepEqual(
    Object.keys(body.paths["/files"].post.responses).sort(),
    ["200", "201", "400", "408", "409", "413", "414", "415", "429", "503"],
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

const WALK_SECRET = newSecret();

/**
 * Sends every route of the OpenAPI document good and bad requests (bad paths, bodies, media
 * types, sizes), on a directory that lists two files and one peer at most: it lists two files
 * named probe.webm already, so that naming that file is ambiguous and publishing another answers
 * what a full directory answers, and registering a second peer does too. Every request carries
 * the same secret, so the peers it makes are all one owner's.
 */
async function walkRoutes(): Promise<Walked[]> {
  const { app, call } = fixture(30, { maxFiles: 2, maxPeers: 1 });
  for (const id of [idOf("probe.webm"), "c".repeat(64)]) {
    const probe = { ...single("probe.webm", "probe_0.bin"), sha256: id };
    assert.deepEqual((await call("POST", "/files", probe)).status, 201);
  }
  const { body: api } = await call("GET", "/openapi.json");
  const big = JSON.stringify({ padding: "x".repeat(1024 * 1024) });
  const walked: Walked[] = [];
  let n = 0;
  for (const [path, operations] of Object.entries<Record<string, OpenApiOperation>>(api.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const documented = Object.keys(operation.responses).map(Number);
      const urls = path.includes("{")
        ? ["probe.bin", "probe.webm", "..%2Fx"].map((value) => path.replace(/\{\w+\}/g, value))
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
        // Signed, as the peer of "probe.bin" (which the first heartbeat creates) signs.
        const headers = { ...init.headers, authorization: `Bearer ${WALK_SECRET}` };
        const signed = { ...init, headers, method: method.toUpperCase() };
        const response = await app.request(url, signed, REMOTE);
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
  // Every route that takes a file by name answered 409 to the name two files share.
  const ambiguous = walked.filter((w) => w.status === 409 && w.request.startsWith("GET "));
  assert.deepEqual([...new Set(ambiguous.map((w) => w.request))].sort(), [
    "GET /files/probe.webm",
    "GET /fragments/probe.bin?file=probe.webm",
    "GET /fragments/probe.webm?file=probe.webm",
    "GET /fragments?file=probe.webm",
  ]);
});

Deno.test("every error code the directory answers is the one ERROR_CODES or its OpenAPI response names", async () => {
  const walked = await walkRoutes();
  const codes = new Set<string>();
  for (const { request, status, code, operation } of walked) {
    if (code === undefined) continue;
    codes.add(code);
    // A status answers the code ERROR_CODES gives it, or one its response names: a 429 has one
    // per bound, and a 409 to a name several files share is AMBIGUOUS_FILE.
    const declared = ERROR_CODES[status as keyof typeof ERROR_CODES];
    const description = (operation.responses[status] as { description: string }).description;
    if (code !== declared) {
      assert.ok(
        description.includes(code),
        `${request}: ${status} ${code} not in "${description}"`,
      );
    }
  }
  for (const code of ["TOO_MANY_FILES", "TOO_MANY_PEERS", "AMBIGUOUS_FILE"]) {
    assert.ok(codes.has(code), `${code} not among ${[...codes].join()}`);
  }
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
  assert.deepEqual((await call("POST", "/files", manifest("b.webm", names))).status, 201);
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
  // A file no one published: none by that name, and no holder of that id.
  assertError(
    await call("GET", "/fragments/fragment_0.bin?file=c.webm"),
    404,
    "NOT_FOUND",
    /^No file "c\.webm"$/,
  );
  assertError(
    await call("GET", `/fragments/fragment_0.bin?file=${idOf("c.webm")}`),
    404,
    "NOT_FOUND",
    new RegExp(`"fragment_0\\.bin" of "${idOf("c.webm")}"`),
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
  assert.deepEqual(await listed(`?file=${idOf("c.webm")}`), []); // an id no one gave
  assertError(await call("GET", "/fragments?file=c.webm"), 404, "NOT_FOUND", /"c\.webm"/);
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
  await call("POST", "/files", manifest("b.webm", ["fragment_0.bin", "fragment_1.bin"]));
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

Deno.test("GET /peers shows the id and name of the file a peer's fragments belong to, and POST /peers refuses a bad one", async () => {
  const { call } = fixture();
  await call("POST", "/peers", seeder(6001, "a.webm", ["fragment_0.bin"]));
  await call("POST", "/peers", peer(6002, ["fragment_0.bin"]));
  const { body: { peers } } = await call("GET", "/peers");
  assert.deepEqual(
    peers.map((p: { port: number; fileId?: string; file?: string }) => [p.port, p.fileId, p.file]),
    [
      [6001, idOf("a.webm"), "a.webm"],
      [6002, undefined, undefined],
    ],
  );
  for (const bad of ["../a.webm", "", 7]) {
    assertError(
      await call("POST", "/peers", { ...peer(6003, []), file: bad }),
      400,
      "BAD_REQUEST",
      /"file"/,
    );
  }
  for (const bad of ["a".repeat(63), "A".repeat(64), `${"a".repeat(63)}g`, "a.webm", 7]) {
    assertError(
      await call("POST", "/peers", { ...peer(6003, []), fileId: bad }),
      400,
      "BAD_REQUEST",
      /"fileId"/,
    );
  }
  assert.deepEqual((await call("GET", "/peers")).body.peers.length, 2);
});

Deno.test("GET /openapi.json describes the file id of a peer's state and holders, the ids of files, and the file query of locate with its 409", async () => {
  const { call } = fixture();
  const { body } = await call("GET", "/openapi.json");
  const state = body.components.schemas.PeerState;
  for (const field of ["file", "fileId"]) {
    assert.ok(state.properties[field], `PeerState has no ${field}`);
    assert.ok(!state.required.includes(field), `${field} should be optional`);
  }
  assert.ok(body.components.schemas.Holder.properties.fileId, "Holder has no fileId");
  for (const schema of ["FileSummary", "FileDetail", "Published"]) {
    assert.ok(body.components.schemas[schema].required.includes("id"), `${schema} has no id`);
  }
  assert.ok(body.components.schemas.FileSummary.required.includes("seeders"));
  assert.ok(body.components.schemas.Error.properties.error.properties.files);
  for (const path of ["/files/{file}", "/fragments/{name}", "/fragments"]) {
    assert.ok(body.paths[path].get.responses["409"], `GET ${path} documents no 409`);
  }
  for (const path of ["/fragments/{name}", "/fragments"]) {
    const parameters: { name: string; in: string; required?: boolean }[] =
      body.paths[path].get.parameters;
    const query = parameters.find((p) => p.in === "query");
    assert.deepEqual([query?.name, query?.required ?? false], ["file", false], path);
  }
  assert.ok(body.paths["/fragments"].get.responses["400"], "GET /fragments documents no 400");
});

// ---------------------------------------------------------------------------------------------
// Content-addressed files: a file's id is its whole-file SHA-256, and names may be shared

/** The ids of two files named sample.webm: an impostor's, published first, and the real one. */
const IMPOSTOR = idOf("the impostor's sample.webm");
const REAL = idOf("the real sample.webm");

/** A manifest of sample.webm, split as split.ts splits it, with contents of id `id`. */
function sample(id: string): Manifest {
  return { ...manifest("sample.webm", ["fragment_0.bin", "fragment_1.bin"]), sha256: id };
}

/** A peer of the sample.webm of id `id` that holds `fragments` of it. */
function sampleSeeder(port: number, id: string, fragments: string[]): PeerState {
  return { ...seeder(port, "sample.webm", fragments), fileId: id };
}

/**
 * Publishes the impostor's sample.webm and then the real one, each with its seeders: one of the
 * impostor's, two of the real file's (holding both fragments) and one that holds the real file's
 * first fragment alone. Returns the impostor's peer id, the real file's peers' ids, and `beat`
 * to heartbeat the real file's peers.
 */
async function impostorAndReal(fixtureOf: ReturnType<typeof fixture>) {
  const { call, register } = fixtureOf;
  const both = ["fragment_0.bin", "fragment_1.bin"];
  assert.deepEqual((await call("POST", "/files", sample(IMPOSTOR))).status, 201);
  const impostor = await register(sampleSeeder(6001, IMPOSTOR, both));
  assert.deepEqual((await call("POST", "/files", sample(REAL))).status, 201);
  const states = [
    sampleSeeder(6002, REAL, both),
    sampleSeeder(6003, REAL, both),
    sampleSeeder(6004, REAL, ["fragment_0.bin"]),
  ];
  const real: string[] = [];
  for (const state of states) real.push(await register(state));
  /** Heartbeats the real file's peers, as they do. */
  const beat = async () => {
    for (const [i, id] of real.entries()) await call("PUT", `/peers/${id}`, states[i]);
  };
  return { impostor, real, beat };
}

/** The FileSummary of the sample.webm of id `id`, fully held, with `seeders`. */
const summaryOf = (id: string, seeders: number) => ({
  id,
  file: "sample.webm",
  mime: "video/webm",
  size: 200,
  sha256: id,
  fragments: 2,
  available: true,
  seeders,
});

Deno.test("GET /files lists two files of one name side by side, each with its id and its seeders", async () => {
  const fixed = fixture();
  await impostorAndReal(fixed);
  assert.deepEqual((await fixed.call("GET", "/files")).body, {
    files: [summaryOf(IMPOSTOR, 1), summaryOf(REAL, 2)],
  });
  assert.deepEqual((await fixed.call("GET", "/health")).body.files, 2);
});

Deno.test("GET /files/{file} of a name two files share is a 409 AMBIGUOUS_FILE listing both ids and their seeders", async () => {
  const fixed = fixture();
  await impostorAndReal(fixed);
  const answer = await fixed.call("GET", "/files/sample.webm");
  assertError(answer, 409, "AMBIGUOUS_FILE");
  const { message, files } = answer.body.error;
  assert.ok(message.includes(`${IMPOSTOR} (sample.webm, 1 seeder)`), message);
  assert.ok(message.includes(`${REAL} (sample.webm, 2 seeders)`), message);
  assert.deepEqual(files, [summaryOf(IMPOSTOR, 1), summaryOf(REAL, 2)]);
});

Deno.test("GET /files/{file} takes a file's id or a prefix of it of 6 hex digits or more, and a shorter one is no file", async () => {
  const fixed = fixture();
  const { real } = await impostorAndReal(fixed);
  assert.notEqual(REAL.slice(0, 6), IMPOSTOR.slice(0, 6)); // what the prefixes below rely on
  for (const ref of [REAL, REAL.slice(0, 6), REAL.slice(0, 20)]) {
    const { status, body } = await fixed.call("GET", `/files/${ref}`);
    assert.deepEqual([status, body.id, body.file], [200, REAL, "sample.webm"], ref);
    assert.deepEqual(body.fragments.map((f: { holders: { id: string }[] }) => ids(f.holders)), [
      real,
      real.slice(0, 2),
    ]);
  }
  assert.deepEqual((await fixed.call("GET", `/files/${IMPOSTOR.slice(0, 6)}`)).body.id, IMPOSTOR);
  for (const ref of [REAL.slice(0, 5), REAL.slice(0, 6).toUpperCase(), `${REAL.slice(0, 6)}x`]) {
    assertError(await fixed.call("GET", `/files/${ref}`), 404, "NOT_FOUND", /^No file "/);
  }
});

Deno.test("a file's id prefix that several files share is a 409 AMBIGUOUS_FILE, and a file's exact name wins over a prefix", async () => {
  const { call } = fixture();
  const one = `abcdef1${"0".repeat(57)}`;
  const two = `abcdef2${"0".repeat(57)}`;
  assert.deepEqual(
    (await call("POST", "/files", { ...manifest("one.webm"), sha256: one })).status,
    201,
  );
  assert.deepEqual(
    (await call("POST", "/files", { ...manifest("two.webm"), sha256: two })).status,
    201,
  );
  for (
    const path of ["/files/abcdef", "/fragments?file=abcdef", "/fragments/one_0.bin?file=abcdef"]
  ) {
    const answer = await call("GET", path);
    assertError(answer, 409, "AMBIGUOUS_FILE", /one\.webm, 0 seeders\).*two\.webm, 0 seeders\)/);
    assert.deepEqual(answer.body.error.files.map((f: { id: string }) => f.id), [one, two], path);
  }
  assert.deepEqual((await call("GET", "/files/abcdef2")).body.id, two);
  // A file whose name looks like a prefix: the name is what it means.
  const named = idOf("abcdef");
  assert.deepEqual((await call("POST", "/files", single("abcdef", "abcdef_0.bin"))).status, 201);
  assert.deepEqual((await call("GET", "/files/abcdef")).body.id, named);
});

Deno.test("?file= takes an id, an id prefix or a name one file has, and a name several files share is a 409 AMBIGUOUS_FILE", async () => {
  const fixed = fixture();
  const { impostor, real, beat } = await impostorAndReal(fixed);
  const { call } = fixed;
  for (const ref of [REAL, REAL.slice(0, 6)]) {
    const located = await call("GET", `/fragments/fragment_0.bin?file=${ref}`);
    assert.deepEqual(ids(located.body.holders), real, ref);
    const listed = await call("GET", `/fragments?file=${ref}`);
    assert.deepEqual(
      listed.body.fragments.map((f: { name: string; holders: { id: string }[] }) => [
        f.name,
        ids(f.holders),
      ]),
      [["fragment_0.bin", real], ["fragment_1.bin", real.slice(0, 2)]],
      ref,
    );
  }
  for (
    const path of ["/fragments/fragment_0.bin?file=sample.webm", "/fragments?file=sample.webm"]
  ) {
    const answer = await call("GET", path);
    assertError(answer, 409, "AMBIGUOUS_FILE", /^"sample\.webm" names 2 files: /);
    assert.deepEqual(answer.body.error.files, [summaryOf(IMPOSTOR, 1), summaryOf(REAL, 2)]);
  }
  // Once the impostor's file is gone (its seeder left a ttl ago), the name is the real file's.
  await call("DELETE", `/peers/${impostor}`);
  fixed.clock.now += 20_000;
  await beat();
  fixed.clock.now += 10_000;
  const answer = await call("GET", "/files/sample.webm");
  assert.deepEqual([answer.status, answer.body.id], [200, REAL]);
  assert.deepEqual(
    ids((await call("GET", "/fragments/fragment_0.bin?file=sample.webm")).body.holders),
    real,
  );
});

Deno.test("an impostor that publishes a file's name first gets its own id, and its holders are never listed as the real file's", async () => {
  const fixed = fixture();
  const { call } = fixed;
  const { impostor, real } = await impostorAndReal(fixed);
  const holdersOf = async (name: string, ref: string) =>
    (await call("GET", `/fragments/${name}?file=${ref}`)).body.holders;
  const realHolders: [string, string[]][] = [
    ["fragment_0.bin", real],
    ["fragment_1.bin", real.slice(0, 2)],
  ];
  for (const [name, expected] of realHolders) {
    const holders = await holdersOf(name, REAL);
    assert.deepEqual(ids(holders), expected, `${name}: ${JSON.stringify(holders)}`);
    assert.deepEqual(holders.map((h: { fileId: string }) => h.fileId), holders.map(() => REAL));
    assert.deepEqual(ids(await holdersOf(name, IMPOSTOR)), [impostor]);
  }
  const detail = (await call("GET", `/files/${REAL}`)).body;
  for (const fragment of detail.fragments) {
    assert.ok(!ids(fragment.holders).includes(impostor));
    assert.ok(fragment.holders.every((h: { fileId: string }) => h.fileId === REAL));
  }
  const listed = (await call("GET", `/fragments?file=${REAL}`)).body.fragments;
  assert.ok(listed.every((f: { holders: { id: string }[] }) => !ids(f.holders).includes(impostor)));
  // A locate without a file lists every holder of the name, each with the id it gave.
  const all = (await call("GET", "/fragments/fragment_0.bin")).body.holders;
  assert.deepEqual(all.map((h: { id: string; fileId: string }) => [h.id, h.fileId]), [
    [impostor, IMPOSTOR],
    ...real.map((id) => [id, REAL]),
  ]);
});

Deno.test("a peer that names its file but gives no id belongs to no file: only a locate without a file lists it", async () => {
  const { call, register } = fixture();
  assert.deepEqual((await call("POST", "/files", single("a.webm", "fragment_0.bin"))).status, 201);
  const named = await register({ ...peer(6001, ["fragment_0.bin"]), file: "a.webm" });
  const located = (await call("GET", "/fragments/fragment_0.bin")).body.holders;
  assert.deepEqual(located, [
    { id: named, host: "10.0.0.9", port: 6001, grpcPort: 50051, httpPort: 8001 },
  ]);
  for (const ref of ["a.webm", idOf("a.webm")]) {
    assertError(await call("GET", `/fragments/fragment_0.bin?file=${ref}`), 404, "NOT_FOUND");
    assert.deepEqual((await call("GET", `/fragments?file=${ref}`)).body, { fragments: [] });
  }
  assert.deepEqual((await call("GET", "/files/a.webm")).body.fragments[0].holderCount, 0);
  assert.deepEqual((await call("GET", "/files")).body.files[0].seeders, 0);
  const { body: { peers } } = await call("GET", "/peers");
  assert.deepEqual([peers[0].file, peers[0].fileId], ["a.webm", undefined]);
});

Deno.test("a peer's file id is what groups it: the same id under another name is the same file, and changing ids moves it", async () => {
  const { call, register } = fixture();
  assert.deepEqual((await call("POST", "/files", sample(REAL))).status, 201);
  const id = await register({
    ...sampleSeeder(6001, REAL, ["fragment_0.bin"]),
    file: "renamed.webm",
  });
  assert.deepEqual(
    ids((await call("GET", "/fragments/fragment_0.bin?file=sample.webm")).body.holders),
    [id],
  );
  const moved = await call("PUT", `/peers/${id}`, sampleSeeder(6001, IMPOSTOR, ["fragment_0.bin"]));
  assert.deepEqual(moved.status, 200);
  assertError(await call("GET", `/fragments/fragment_0.bin?file=${REAL}`), 404, "NOT_FOUND");
  const [holder] = (await call("GET", `/fragments/fragment_0.bin?file=${IMPOSTOR}`)).body.holders;
  assert.deepEqual([holder.id, holder.fileId], [id, IMPOSTOR]);
});

// ---------------------------------------------------------------------------------------------
// Bounds on peers

Deno.test("POST /peers and PUT /peers/{id} refuse a new peer past maxPeers with 429, and take one once another goes", async () => {
  const { clock, call, register, secretOf } = fixture(30, { maxPeers: 2 });
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
  const again = await call(
    "POST",
    "/peers",
    peer(6001, ["y.bin"]),
    REMOTE,
    `Bearer ${secretOf(a)}`,
  );
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

// ---------------------------------------------------------------------------------------------
// Owners: a peer's entry is changed or removed only with its secret

/** A request to `/peers/{id}` with the Authorization header `auth` (none when undefined). */
async function signed(
  app: ReturnType<typeof fixture>["app"],
  method: string,
  path: string,
  auth?: string,
  body?: unknown,
) {
  const headers: Record<string, string> = auth === undefined ? {} : { authorization: auth };
  if (body !== undefined) headers["content-type"] = "application/json";
  const init = { method, headers, body: body === undefined ? undefined : JSON.stringify(body) };
  const response = await app.request(path, init, REMOTE);
  const text = await response.text();
  return {
    status: response.status,
    body: text === "" ? undefined : JSON.parse(text),
    challenge: response.headers.get("www-authenticate"),
  };
}

Deno.test("PUT and DELETE /peers/{id} need the peer's secret: 401 without one or with a malformed one, 403 with another's", async () => {
  const { app, call, secretOf } = fixture();
  const id = (await call("POST", "/peers", peer(6001, ["a.bin"]))).body.id;
  const state = peer(6001, ["a.bin", "b.bin"]);
  for (const method of ["PUT", "DELETE"]) {
    const body = method === "PUT" ? state : undefined;
    const missing = await signed(app, method, `/peers/${id}`, undefined, body);
    assertError(missing, 401, "UNAUTHORIZED", /Authorization: Bearer <secret>/);
    assert.deepEqual(missing.challenge, "Bearer");
    for (const malformed of ["Basic abc", "Bearer short", `Bearer ${"x".repeat(129)}`]) {
      assertError(await signed(app, method, `/peers/${id}`, malformed, body), 401, "UNAUTHORIZED");
    }
    const other = await signed(app, method, `/peers/${id}`, `Bearer ${newSecret()}`, body);
    assertError(other, 403, "FORBIDDEN", new RegExp(`"${id}" is another owner's`));
  }
  // Nothing changed: still there, with its one fragment.
  assert.deepEqual((await call("GET", "/peers")).body.peers[0].fragments, ["a.bin"]);
  const beat = await signed(app, "PUT", `/peers/${id}`, `bearer ${secretOf(id)}`, state);
  assert.deepEqual(beat.status, 200);
  assert.deepEqual((await call("GET", "/peers")).body.peers[0].fragments, ["a.bin", "b.bin"]);
  assert.deepEqual(
    (await signed(app, "DELETE", `/peers/${id}`, `Bearer ${secretOf(id)}`)).status,
    204,
  );
  // An unknown peer is a 404 to its owner, and to anyone: there is nothing to own.
  assertError(await signed(app, "DELETE", `/peers/${id}`), 401, "UNAUTHORIZED");
  assertError(
    await signed(app, "DELETE", `/peers/${id}`, `Bearer ${newSecret()}`),
    404,
    "NOT_FOUND",
  );
});

Deno.test("POST /peers registers with a secret the peer chose, answers it back, and refuses a malformed one", async () => {
  const { call } = fixture();
  const secret = newSecret();
  const chosen = await call("POST", "/peers", peer(6001, []), REMOTE, `Bearer ${secret}`);
  assert.deepEqual([chosen.status, chosen.body.secret], [201, secret]);
  const made = await call("POST", "/peers", peer(6002, []));
  assert.notEqual(made.body.secret, secret);
  assertError(
    await call("POST", "/peers", peer(6003, []), REMOTE, "Bearer nope"),
    401,
    "UNAUTHORIZED",
  );
  assert.deepEqual((await call("GET", "/health")).body.peers, 2);
});

Deno.test("PUT /peers/{id} of a peer a restarted directory forgot adopts its id and secret, and refuses another owner then", async () => {
  const before = fixture();
  const registered = await before.call("POST", "/peers", peer(6001, ["a.bin"]));
  const { id, secret } = registered.body;
  const after = fixture(); // a new directory: it knows nothing
  const beat = await after.call(
    "PUT",
    `/peers/${id}`,
    peer(6001, ["a.bin"]),
    REMOTE,
    `Bearer ${secret}`,
  );
  assert.deepEqual(beat.body, { id, ttl: 30, recreated: true });
  assertError(
    await after.call("PUT", `/peers/${id}`, peer(6001, ["a.bin"]), REMOTE, `Bearer ${newSecret()}`),
    403,
    "FORBIDDEN",
  );
  assert.deepEqual(
    (await after.call("PUT", `/peers/${id}`, peer(6001, ["a.bin"]), REMOTE, `Bearer ${secret}`))
      .body.recreated,
    false,
  );
  // Once it expired, its id is anyone's again, as a forgotten one is.
  after.clock.now += 30_000;
  const other = newSecret();
  const taken = await after.call(
    "PUT",
    `/peers/${id}`,
    peer(6001, ["a.bin"]),
    REMOTE,
    `Bearer ${other}`,
  );
  assert.deepEqual(taken.body.recreated, true);
  assertError(
    await after.call("DELETE", `/peers/${id}`, undefined, REMOTE, `Bearer ${secret}`),
    403,
    "FORBIDDEN",
  );
});

Deno.test("POST and PUT /peers refuse to replace a live peer of another owner at the same address with 409, and take its place once it goes", async () => {
  const { clock, call, secretOf } = fixture(30, { trustAdvertise: true });
  const victim = (await call("POST", "/peers", peer(6001, ["a.bin"], "seed.example"))).body.id;
  // Someone else claims its host and port: with a new registration, or by moving there.
  assertError(
    await call("POST", "/peers", peer(6001, ["evil.bin"], "seed.example")),
    409,
    "CONFLICT",
    /"seed\.example:6001"/,
  );
  const mallory = (await call("POST", "/peers", peer(6002, [], "mallory.example"))).body.id;
  assertError(
    await call("PUT", `/peers/${mallory}`, peer(6001, ["evil.bin"], "seed.example")),
    409,
    "CONFLICT",
  );
  assertError(
    await call("PUT", "/peers/new-id", peer(6001, ["evil.bin"], "seed.example")),
    409,
    "CONFLICT",
  );
  const located = await call("GET", "/fragments/a.bin");
  assert.deepEqual(located.body.holders.map((h: { id: string }) => h.id), [victim]);
  assert.deepEqual((await call("GET", "/fragments/evil.bin")).status, 404);
  // Its owner may: it restarted, and registers with the secret it had.
  const again = await call(
    "POST",
    "/peers",
    peer(6001, ["b.bin"], "seed.example"),
    REMOTE,
    `Bearer ${secretOf(victim)}`,
  );
  assert.deepEqual(again.status, 201);
  // And anyone once it has gone a ttl without a heartbeat.
  clock.now += 30_000;
  assert.deepEqual(
    (await call("POST", "/peers", peer(6001, ["c.bin"], "seed.example"))).status,
    201,
  );
});

// ---------------------------------------------------------------------------------------------
// Bounds on what one client, and all of them, can make the directory hold

const FROM = (hostname: string) => ({
  remoteAddr: { hostname, port: 40000, transport: "tcp" as const },
});

Deno.test("POST /peers refuses a new peer past maxPeersPerAddress with 429 TOO_MANY_PEERS_FROM_ADDRESS, counting the request's address whatever host it names", async () => {
  const { clock, call, register } = fixture(30, { maxPeersPerAddress: 2, trustAdvertise: true });
  const a = await register(peer(6001, [], "one.example"));
  await register(peer(6002, [], "two.example"));
  assertError(
    await call("POST", "/peers", peer(6003, [], "three.example")),
    429,
    "TOO_MANY_PEERS_FROM_ADDRESS",
    /^The directory lists 2 live peers registered from "10\.0\.0\.9", its limit per address/,
  );
  assertError(
    await call("PUT", "/peers/p3", peer(6003, [], "three.example")),
    429,
    "TOO_MANY_PEERS_FROM_ADDRESS",
  );
  // Another address has its own room, and a peer of this one may not move there past it.
  const elsewhere = await call(
    "POST",
    "/peers",
    peer(6003, [], "three.example"),
    FROM("10.0.0.10"),
  );
  assert.deepEqual(elsewhere.status, 201);
  await call("POST", "/peers", peer(6004, [], "four.example"), FROM("10.0.0.10"));
  assertError(
    await call("PUT", `/peers/${a}`, peer(6001, [], "one.example"), FROM("10.0.0.10")),
    429,
    "TOO_MANY_PEERS_FROM_ADDRESS",
  );
  // Known peers still heartbeat; one that leaves makes room, and so does one that expires.
  assert.deepEqual(
    (await call("PUT", `/peers/${a}`, peer(6001, ["x.bin"], "one.example"))).status,
    200,
  );
  assert.deepEqual((await call("DELETE", `/peers/${a}`)).status, 204);
  assert.deepEqual((await call("POST", "/peers", peer(6005, [], "five.example"))).status, 201);
  clock.now += 30_000;
  assert.deepEqual((await call("POST", "/peers", peer(6006, [], "six.example"))).status, 201);
  assert.deepEqual((await call("POST", "/peers", peer(6007, [], "seven.example"))).status, 201);
});

Deno.test("POST and PUT /peers refuse a state that takes the index past maxIndexedFragments with 429, and a listed peer keeps its last state", async () => {
  const { clock, call, register } = fixture(30, { maxIndexedFragments: 5 });
  const names = (from: number, count: number) =>
    Array.from({ length: count }, (_, i) => `f_${from + i}.bin`);
  const a = await register(peer(6001, names(0, 3)));
  assertError(
    await call("POST", "/peers", peer(6002, names(3, 3))),
    429,
    "TOO_MANY_FRAGMENTS",
    /more than 5 fragments across all peers/,
  );
  // Duplicates count once, as the index holds them.
  const b = await register(peer(6002, ["f_9.bin", "f_9.bin", "f_8.bin"]));
  assert.deepEqual((await call("GET", "/health")).body.peers, 2);
  clock.now += 20_000;
  assertError(await call("PUT", `/peers/${a}`, peer(6001, names(0, 4))), 429, "TOO_MANY_FRAGMENTS");
  clock.now += 20_000; // b expired (40 s); a was refreshed 20 s ago with its last state
  const { body: { peers } } = await call("GET", "/peers");
  assert.deepEqual(peers.map((p: { id: string; fragments: string[] }) => [p.id, p.fragments]), [
    [a, names(0, 3)],
  ]);
  // b's place in the index is free again (sweep or not): a grows into it.
  assert.deepEqual((await call("PUT", `/peers/${a}`, peer(6001, names(0, 5)))).status, 200);
  assert.notEqual(b, a);
});

Deno.test("GET /peers and GET /fragments answer a page at a time, and following next lists each entry once", async () => {
  const { call, register } = fixture();
  const ids: string[] = [];
  for (let i = 0; i < 5; i++) ids.push(await register(peer(6001 + i, [`f_${i}.bin`, "all.bin"])));
  const walk = async (path: string, key: string) => {
    const pages: string[][] = [];
    let next: string | undefined;
    do {
      const query = next === undefined ? "" : `&cursor=${next}`;
      const { status, body } = await call("GET", `${path}limit=2${query}`);
      assert.deepEqual(status, 200);
      pages.push(body[key].map((entry: { id?: string; name?: string }) => entry.id ?? entry.name));
      next = body.next;
    } while (next !== undefined);
    return pages;
  };
  assert.deepEqual(await walk("/peers?", "peers"), [ids.slice(0, 2), ids.slice(2, 4), [ids[4]]]);
  assert.deepEqual(await walk("/fragments?", "fragments"), [
    ["f_0.bin", "all.bin"],
    ["f_1.bin", "f_2.bin"],
    ["f_3.bin", "f_4.bin"],
  ]);
  // Without ?limit= a page holds 100, so these fit in one, with no next.
  assert.deepEqual(Object.keys((await call("GET", "/peers")).body), ["peers"]);
  assert.deepEqual((await call("GET", `/fragments?file=${idOf("x.webm")}&limit=1`)).body, {
    fragments: [],
  });
});

Deno.test("a ?limit= that is not a whole number from 1 to 1000 is refused in words, not zod's", async () => {
  const { call } = fixture();
  for (const limit of ["abc", "0", "1.5", "1001"]) {
    assertError(
      await call("GET", `/peers?limit=${limit}`),
      400,
      "BAD_REQUEST",
      /^Query parameter "limit" is invalid: must be a whole number from 1 to 1000$/,
    );
  }
});

Deno.test("a page of GET /peers or GET /fragments ends once it holds 10,000 fragment names or holders", async () => {
  const { call, register } = fixture(30, { maxPeersPerAddress: 3_000 });
  const names = (peer: number) => Array.from({ length: 4_000 }, (_, i) => `p${peer}_${i}.bin`);
  for (let i = 0; i < 4; i++) await register(peer(1001 + i, names(i)));
  const first = await call("GET", "/peers?limit=1000");
  // 4,000 + 4,000 + 4,000 reach 10,000 with the third: the fourth waits for the next page.
  assert.deepEqual(first.body.peers.length, 3);
  const second = await call("GET", `/peers?cursor=${first.body.next}`);
  assert.deepEqual([second.body.peers.length, second.body.next], [1, undefined]);
  for (const { id } of [...first.body.peers, ...second.body.peers]) {
    assert.deepEqual((await call("DELETE", `/peers/${id}`)).status, 204);
  }
  // Five names, each held by 2,500 peers: the fourth reaches 10,000 holders.
  const shared = ["a.bin", "b.bin", "c.bin", "d.bin", "e.bin"];
  for (let i = 0; i < 2_500; i++) await register(peer(10_001 + i, shared));
  const page = await call("GET", "/fragments?limit=1000");
  assert.deepEqual(page.body.fragments.map((f: { name: string }) => f.name), shared.slice(0, 4));
  const rest = await call("GET", `/fragments?cursor=${page.body.next}`);
  assert.deepEqual(rest.body.fragments.map((f: { name: string }) => f.name), ["e.bin"]);
  assert.deepEqual(rest.body.fragments[0].holders.length, 2_500);
});

Deno.test("GET /peers and GET /fragments refuse a bad limit or cursor with 400", async () => {
  const { call } = fixture();
  for (const path of ["/peers", "/fragments"]) {
    for (
      const query of ["limit=0", "limit=1001", "limit=x", "limit=1.5", "cursor=-1", "cursor=a"]
    ) {
      assertError(
        await call("GET", `${path}?${query}`),
        400,
        "BAD_REQUEST",
        new RegExp(`Query parameter "${query.split("=")[0]}"`),
      );
    }
  }
});

Deno.test("GET /files/{file} lists at most 50 holders of a fragment, a sample of them, and counts them all", async () => {
  const { call, register } = fixture(30, { maxPeersPerAddress: 100 });
  await call("POST", "/files", single("big.webm", "big_0.bin"));
  const all = new Set<string>();
  for (let i = 0; i < 80; i++) all.add(await register(seeder(6001 + i, "big.webm", ["big_0.bin"])));
  const seen = new Set<string>();
  for (let round = 0; round < 10; round++) {
    const [fragment] = (await call("GET", "/files/big.webm")).body.fragments;
    assert.deepEqual([fragment.holders.length, fragment.holderCount], [50, 80]);
    for (const holder of fragment.holders) {
      assert.ok(all.has(holder.id));
      seen.add(holder.id);
    }
  }
  assert.ok(seen.size > 50, "every answer lists the same 50");
});

Deno.test("new Registry() and createApp() refuse bounds and limits that are not positive", () => {
  for (const options of [{ maxPeersPerAddress: 0 }, { maxIndexedFragments: 1.5 }]) {
    assert.throws(() => new Registry(options), RangeError, JSON.stringify(options));
  }
  for (const options of [{ bodyTimeout: 0 }, { minBodyRate: -1 }, { maxBodyMemory: NaN }]) {
    assert.throws(() => createApp(options), RangeError, JSON.stringify(options));
  }
});

// ---------------------------------------------------------------------------------------------
// Request bodies: a deadline, a minimum rate, and a budget of memory

/**
 * Sends `POST /peers` with a body that arrives as `chunks` say: a string is sent, a number is a
 * pause of that many milliseconds, and Infinity a pause that never ends. `length`, when given,
 * is the Content-Length. Once answered, a body still coming fails, as when the server closes
 * the connection.
 */
async function trickle(
  app: ReturnType<typeof fixture>["app"],
  chunks: (string | number)[],
  { length, env = REMOTE }: { length?: number; env?: object } = {},
) {
  const encoder = new TextEncoder();
  let answered = false;
  let stream: ReadableStreamDefaultController<Uint8Array> | undefined;
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      stream = controller;
    },
    async pull(controller) {
      for (let next = chunks.shift(); next !== undefined; next = chunks.shift()) {
        if (typeof next === "string") return controller.enqueue(encoder.encode(next));
        const until = performance.now() + next;
        while (!answered && performance.now() < until) {
          await new Promise((resolve) => setTimeout(resolve, Math.min(10, next as number)));
        }
        if (answered) return;
      }
      controller.close();
      stream = undefined;
    },
    cancel() {
      stream = undefined;
    },
  });
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (length !== undefined) headers["content-length"] = String(length);
  const started = performance.now();
  // A directory that never answers fails the test rather than hanging it.
  let guard: ReturnType<typeof setTimeout> | undefined;
  const hung = new Promise<never>((_, reject) => {
    guard = setTimeout(() => reject(new Error("No answer within 10 s")), 10_000);
  });
  const answer = (async () => {
    const response = await app.request("/peers", { method: "POST", headers, body }, env);
    return { status: response.status, body: await response.json() };
  })();
  const result = await Promise.race([answer, hung]).finally(() => clearTimeout(guard));
  answered = true;
  stream?.error(new Error("The connection closed"));
  return { ...result, ms: performance.now() - started };
}

Deno.test("a request body that stalls is a 408 once its deadline passes", async () => {
  const { app, call } = fixture(30, { bodyTimeout: 0.3 });
  const text = JSON.stringify(peer(6001, ["a.bin"]));
  const stalled = await trickle(app, [text.slice(0, 10), Infinity]);
  assertError(stalled, 408, "REQUEST_TIMEOUT", /did not arrive in time: 10 bytes in 0\.3 s/);
  assert.ok(stalled.ms >= 280 && stalled.ms < 2_000, `${stalled.ms} ms`);
  // A body that says its size has its deadline from the start: 0.3 s, and 40 bytes buy little.
  const sized = await trickle(app, [text.slice(0, 10), Infinity], { length: text.length });
  assertError(sized, 408, "REQUEST_TIMEOUT", /a body of \d+ bytes in 0\.3 s/);
  assert.ok(sized.ms >= 280 && sized.ms < 2_000, `${sized.ms} ms`);
  // A body that comes in time is read as ever, chunk by chunk.
  const whole = await trickle(app, [text.slice(0, 10), 50, text.slice(10)]);
  assert.deepEqual(whole.status, 201, JSON.stringify(whole.body));
  assert.deepEqual((await call("GET", "/health")).body.peers, 1);
});

Deno.test("a body that keeps the minimum rate gets in past the first deadline, and one slower is a 408", async () => {
  // 0.3 s, and one second more for each 100 bytes: 30 bytes every 100 ms keep ahead of it.
  const { app } = fixture(30, { bodyTimeout: 0.3, minBodyRate: 100 });
  const text = JSON.stringify(peer(6001, [])).padEnd(300, " ");
  const every = (bytes: number) => {
    const chunks: (string | number)[] = [];
    for (let at = 0; at < text.length; at += bytes) chunks.push(text.slice(at, at + bytes), 100);
    return chunks;
  };
  const kept = await trickle(app, every(30));
  assert.deepEqual(kept.status, 201, JSON.stringify(kept.body));
  assert.ok(kept.ms > 600, `took ${kept.ms} ms, not past the first deadline`);
  // 5 bytes every 100 ms buy 0.05 s each: the deadline comes after about 0.6 s.
  const slow = await trickle(app, every(5));
  assertError(slow, 408, "REQUEST_TIMEOUT", /did not arrive in time: \d+ bytes in 0\.3 s, and one/);
  assert.ok(slow.ms > 500 && slow.ms < 1_500, `${slow.ms} ms`);
});

Deno.test("a body past the memory for all bodies, or for one address's, is a 503 until others are read", async () => {
  // 4 MiB in all: one address may hold a quarter, that is one body of the largest size. The
  // stalled ones time out after about 1 s + 1 MiB at 1 MiB/s.
  const { app } = fixture(30, {
    maxBodyMemory: 4 * 1024 * 1024,
    bodyTimeout: 1,
    minBodyRate: 1024 * 1024,
  });
  const text = JSON.stringify(peer(6001, []));
  const mib = 1024 * 1024;
  const stall = (env: object) => trickle(app, [" ".repeat(100), Infinity], { length: mib, env });
  const held = [stall(REMOTE)];
  await new Promise((resolve) => setTimeout(resolve, 50));
  // The same address: its quarter is taken.
  assertError(
    await trickle(app, [text], { length: text.length }),
    503,
    "SERVICE_UNAVAILABLE",
    /as many request bodies as it may hold/,
  );
  // Other addresses: room for three more of the largest, and then for nothing.
  held.push(...[11, 12, 13].map((n) => stall(FROM(`10.0.0.${n}`))));
  await new Promise((resolve) => setTimeout(resolve, 50));
  const other = { env: FROM("10.0.0.14") };
  assertError(
    await trickle(app, [text], { ...other, length: text.length }),
    503,
    "SERVICE_UNAVAILABLE",
  );
  // A body without a Content-Length counts as it arrives.
  assertError(await trickle(app, [text], other), 503, "SERVICE_UNAVAILABLE");
  // The stalled ones time out, and give their memory back.
  for (const result of await Promise.all(held)) assertError(result, 408, "REQUEST_TIMEOUT");
  assert.deepEqual((await trickle(app, [text], other)).status, 201);
  assert.deepEqual((await trickle(app, [text], { length: text.length })).status, 201);
});

Deno.test("GET /openapi.json declares the peer's secret as a bearer scheme, which heartbeat and leave need, and paging on the lists", async () => {
  const { call } = fixture();
  const { body } = await call("GET", "/openapi.json");
  await SwaggerParser.validate(structuredClone(body));
  assert.deepEqual(body.components.securitySchemes.peerSecret.type, "http");
  assert.deepEqual(body.components.securitySchemes.peerSecret.scheme, "bearer");
  const peers = body.paths["/peers/{id}"];
  for (const operation of [peers.put, peers.delete]) {
    assert.deepEqual(operation.security, [{ peerSecret: [] }]);
    assert.ok(operation.responses["401"] && operation.responses["403"]);
  }
  // Registering may carry a secret the peer chose, or none.
  assert.deepEqual(body.paths["/peers"].post.security, [{}, { peerSecret: [] }]);
  const registration = body.components.schemas.Registration;
  assert.deepEqual(registration.required.sort(), ["host", "id", "secret", "ttl"]);
  for (const path of ["/peers", "/fragments"]) {
    const names = body.paths[path].get.parameters.map((p: { name: string }) => p.name);
    assert.ok(names.includes("limit") && names.includes("cursor"), `${path}: ${names}`);
    const answer = body.paths[path].get.responses["200"].content["application/json"].schema;
    assert.ok(answer.properties.next, `${path} answers no next`);
  }
  const tooMany = peers.put.responses["429"].description;
  for (const code of ["TOO_MANY_PEERS", "TOO_MANY_PEERS_FROM_ADDRESS", "TOO_MANY_FRAGMENTS"]) {
    assert.ok(tooMany.includes(code), code);
  }
});

// ---------------------------------------------------------------------------------------------
// Connections: serveConnections() in this process, with a handler the test holds

/** An HTTP/1.1 request on `conn`, and its answer's status line and body; "" at end of stream. */
async function exchange(conn: Deno.Conn, request: string): Promise<string> {
  await conn.write(new TextEncoder().encode(request));
  return await readAnswer(conn);
}

/** One answer from `conn`: its status line and body, or "" when the connection closes first. */
async function readAnswer(conn: Deno.Conn, timeoutMs = 5_000): Promise<string> {
  const buffer = new Uint8Array(64 * 1024);
  let text = "";
  const deadline = setTimeout(() => conn.close(), timeoutMs); // a hang fails, rather than hangs
  try {
    while (true) {
      const n = await conn.read(buffer).catch(() => null);
      if (n === null) return "";
      text += new TextDecoder().decode(buffer.subarray(0, n));
      const end = text.indexOf("\r\n\r\n");
      const length = Number(text.match(/content-length: (\d+)/i)?.[1] ?? 0);
      if (end >= 0 && text.length >= end + 4 + length) {
        return `${text.slice(0, text.indexOf("\r\n"))} ${text.slice(end + 4, end + 4 + length)}`;
      }
    }
  } finally {
    clearTimeout(deadline);
  }
}

/** True when the server closed `conn` (it reads end of stream, or a reset) within `ms`. */
async function closedWithin(conn: Deno.Conn, ms: number): Promise<boolean> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const timeout = new Promise<"open">((resolve) => timer = setTimeout(() => resolve("open"), ms));
  const read = conn.read(new Uint8Array(1024)).then(
    (n) => n === null ? "closed" : "data",
    () => "closed",
  );
  const result = await Promise.race([read, timeout]);
  clearTimeout(timer);
  return result === "closed";
}

const GET = (path: string) => `GET ${path} HTTP/1.1\r\nHost: x\r\n\r\n`;

/**
 * A server on port 0 whose `/hold` requests wait until released; `entered` counts them in, and
 * resolves `held(n)` once n are in. Connections are closed and the server shut down on dispose.
 */
function holdingServer(limits: ConnectionLimits) {
  let release = Promise.withResolvers<void>();
  let entered = 0;
  const waiters: [number, () => void][] = [];
  const server = serveConnections(
    { hostname: "127.0.0.1", port: 0, warn: () => {}, ...limits },
    async (request) => {
      if (new URL(request.url).pathname === "/hold") {
        entered++;
        for (const [n, wake] of waiters) if (entered >= n) wake();
        await release.promise;
      }
      return new Response("ok");
    },
  );
  const conns: Deno.Conn[] = [];
  return {
    server,
    connect: async () => {
      const conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
      conns.push(conn);
      return conn;
    },
    held: (n: number) =>
      entered >= n ? Promise.resolve() : new Promise<void>((wake) => waiters.push([n, wake])),
    release: () => {
      release.resolve();
      release = Promise.withResolvers();
    },
    async [Symbol.asyncDispose]() {
      this.release();
      for (const conn of conns) {
        try {
          conn.close();
        } catch {
          // closed by the server
        }
      }
      await server.shutdown();
    },
  };
}

Deno.test("serveConnections() gives a new connection the place of the one idle longest at the per-address limit", async () => {
  await using holding = holdingServer({ maxConnectionsPerAddress: 3 });
  // Three keep-alive connections, each answered once: now idle, the first the longest.
  const idle = [];
  for (let i = 0; i < 3; i++) {
    const conn = await holding.connect();
    assert.deepEqual(await exchange(conn, GET("/")), "HTTP/1.1 200 OK ok");
    idle.push(conn);
  }
  const fourth = await holding.connect();
  assert.deepEqual(await exchange(fourth, GET("/")), "HTTP/1.1 200 OK ok");
  assert.ok(await closedWithin(idle[0]!, 2_000), "the idlest connection is still open");
  assert.deepEqual(await exchange(idle[1]!, GET("/")), "HTTP/1.1 200 OK ok");
  assert.deepEqual(holding.server.connections, 3);
});

Deno.test("serveConnections() answers 503 to a connection when every one at the limit is in a request, and keeps those", async () => {
  await using holding = holdingServer({ maxConnections: 3 });
  const busy = [];
  for (let i = 0; i < 3; i++) {
    const conn = await holding.connect();
    await conn.write(new TextEncoder().encode(GET("/hold")));
    busy.push(conn);
  }
  await holding.held(3);
  const refused = await holding.connect();
  const answer = await readAnswer(refused);
  assert.match(
    answer,
    /^HTTP\/1\.1 503 Service Unavailable \{"error":\{"code":"SERVICE_UNAVAILABLE"/,
  );
  assert.ok(await closedWithin(refused, 2_000));
  holding.release();
  for (const conn of busy) assert.deepEqual(await readAnswer(conn), "HTTP/1.1 200 OK ok");
  // Answered, they wait for a request again: a new connection takes the place of the idlest.
  const late = await holding.connect();
  assert.deepEqual(await exchange(late, GET("/")), "HTTP/1.1 200 OK ok");
  assert.ok(await closedWithin(busy[0]!, 2_000));
});

Deno.test("serveConnections() closes a connection that sends no request, or not all of one, within the header timeout, and one idle as long", async () => {
  await using holding = holdingServer({ headerTimeout: 0.5 });
  const silent = await holding.connect();
  const partial = await holding.connect();
  await partial.write(new TextEncoder().encode("GET / HTTP/1.1\r\nHost: x\r\n"));
  const kept = await holding.connect();
  assert.deepEqual(await exchange(kept, GET("/")), "HTTP/1.1 200 OK ok");
  const held = await holding.connect();
  await held.write(new TextEncoder().encode(GET("/hold")));
  await holding.held(1);
  const started = performance.now();
  for (const conn of [silent, partial, kept]) assert.ok(await closedWithin(conn, 3_000));
  assert.ok(performance.now() - started >= 300, "closed before the timeout");
  // A request in flight is not the connection's to hurry: it keeps its place past the timeout.
  await new Promise((resolve) => setTimeout(resolve, 700));
  holding.release();
  assert.deepEqual(await readAnswer(held), "HTTP/1.1 200 OK ok");
});

// ---------------------------------------------------------------------------------------------
// The directory as a real process: out of file descriptors, and its memory under attack

const LISTENING = /\[DIRECTORY\] Listening on (http:\/\/\S+) /;

/**
 * `deno task directory` with `args`, as a child process; with `files`, in a shell that limits it
 * to that many file descriptors. Resolves with the child and its URL once it listens.
 */
async function startDirectoryTask(
  args: string[],
  files?: number,
): Promise<{ child: Child; url: string; port: number }> {
  const argv = [...taskArgv("directory"), "--port", "0", "--hostname", "127.0.0.1", ...args];
  const child = files === undefined ? new Child(argv) : new Child([
    "-c",
    'ulimit -n "$1" && shift && exec "$@"',
    "bash",
    `${files}`,
    Deno.execPath(),
    ...argv,
  ], {
    command: "bash",
  });
  const [, url] = await child.waitFor(LISTENING, { stream: "stdout" });
  return { child, url: url!, port: Number(new URL(url!).port) };
}

/** A process's resident memory in MiB, from /proc (read with `cat`, as the bench does). */
function rssMiB(pid: number): number {
  const { stdout } = new Deno.Command("cat", { args: [`/proc/${pid}/status`] }).outputSync();
  const kb = new TextDecoder().decode(stdout).match(/^VmRSS:\s+(\d+) kB/m)?.[1];
  return Number(kb) / 1024;
}

/** GET `url` as JSON, giving up after a few seconds. */
async function getJson(url: string) {
  const response = await fetch(url, { signal: AbortSignal.timeout(10_000) });
  return { status: response.status, body: await response.json() };
}

Deno.test("deno task directory keeps serving when it runs out of file descriptors, even while they are held, saying so once", async () => {
  const { child, url, port } = await startDirectoryTask([], 64);
  await using _ = child;
  const conns: Deno.Conn[] = [];
  try {
    // More clients than it has descriptors for, none sending anything.
    for (let i = 0; i < 100 && !/Cannot accept/.test(child.stderr); i++) {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    }
    await child.waitFor(
      /^\[DIRECTORY\] Cannot accept connections: too many open files; retrying$/m,
      { stream: "stderr" },
    );
    // While they hold their connections, a client is still answered: the idlest give way.
    assert.deepEqual((await getJson(`${url}/health`)).body.status, "ok");
  } finally {
    for (const conn of conns) conn.close();
  }
  // Those clients gone, it answers as ever, and says so once.
  await child.waitFor(/^\[DIRECTORY\] Accepting connections again$/m, { stream: "stderr" });
  const client = new DirectoryClient(url);
  const me = await client.register({ port: 6001, grpcPort: 0, httpPort: 0, fragments: ["a.bin"] });
  assert.deepEqual((await client.locate("a.bin")).map((holder) => holder.id), [me.id]);
  assert.deepEqual(child.stderr.match(/Cannot accept/g)?.length, 1, child.stderr);
  assert.deepEqual(child.stderr.match(/Uncaught|error:/gi), null, child.stderr);
});

Deno.test("deno task directory refuses peers past its index bound with 429 and pages GET /fragments, within bounded memory", async () => {
  // The attack that took the directory to 2.5 GB: peers of 10,000 names each, all different.
  const args = ["--max-indexed-fragments", "200000", "--max-peers-per-address", "1000"];
  const { child, url } = await startDirectoryTask(args);
  await using _ = child;
  const statuses: number[] = [];
  for (let i = 0; i < 30; i++) {
    const fragments = Array.from({ length: 10_000 }, (_, j) => `p${i}_fragment_${j}.bin`);
    const response = await fetch(`${url}/peers`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ port: 1000 + i, grpcPort: 0, httpPort: 0, fragments }),
    });
    const body = await response.json();
    statuses.push(response.status);
    if (response.status === 429) assert.deepEqual(body.error.code, "TOO_MANY_FRAGMENTS");
  }
  assert.deepEqual(statuses, [...Array(20).fill(201), ...Array(10).fill(429)]);
  const page = await getJson(`${url}/fragments`);
  assert.deepEqual([page.status, page.body.fragments.length, typeof page.body.next], [
    200,
    100,
    "string",
  ]);
  const health = await getJson(`${url}/health`);
  assert.deepEqual([health.body.peers, health.body.fragments], [20, 200_000]);
  const rss = rssMiB(child.process.pid);
  console.log(`    RSS with 200,000 fragments indexed, 10 peers refused: ${rss.toFixed(0)} MiB`);
  assert.ok(rss < 400, `${rss} MiB`);
});

Deno.test("deno task directory holds stalled request bodies within its memory bound, and drops them at their deadline", async () => {
  // Each body says 1 MiB and stops one byte short. One address may hold a quarter of the
  // 64 MiB for bodies: 16 of them; the rest are refused at once.
  const args = ["--body-timeout", "2", "--min-body-rate", "1MiB/s"];
  const { child, port } = await startDirectoryTask(args);
  await using _ = child;
  const mib = 1024 * 1024;
  const head = new TextEncoder().encode(
    `POST /peers HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\ncontent-length: ${mib}\r\n\r\n`,
  );
  const almost = new Uint8Array(mib - 1).fill(32);
  const conns = await Promise.all(
    Array.from({ length: 32 }, () => Deno.connect({ hostname: "127.0.0.1", port })),
  );
  try {
    const started = performance.now();
    const written: Promise<void>[] = [];
    const answering = Promise.all(conns.map(async (conn) => {
      await conn.write(head);
      const answer = readAnswer(conn, 15_000);
      // Refused ones may be closed meanwhile.
      written.push(conn.write(almost).then(() => {}, () => {}));
      return [await answer, performance.now() - started] as const;
    }));
    // Every byte sent, and nothing answered yet but the refusals: they are held now.
    while (written.length < conns.length) await new Promise((resolve) => setTimeout(resolve, 10));
    await Promise.all(written);
    const rss = rssMiB(child.process.pid);
    const measuredAt = performance.now() - started;
    const answers = await answering;
    const codes = answers.map(([answer]) => answer.match(/"code":"(\w+)"/)?.[1]);
    assert.deepEqual(codes.filter((code) => code === "SERVICE_UNAVAILABLE").length, 16);
    assert.deepEqual(codes.filter((code) => code === "REQUEST_TIMEOUT").length, 16);
    // Their deadline: 2 s, and a second more for the MiB each sent.
    for (const [answer, ms] of answers) {
      if (answer.includes("REQUEST_TIMEOUT")) assert.ok(ms > 2_500 && ms < 6_000, `${ms} ms`);
    }
    assert.ok(measuredAt < 2_500, `the RSS was taken after the deadline, at ${measuredAt} ms`);
    console.log(`    RSS with 32 stalled bodies of 1 MiB sent: ${rss.toFixed(0)} MiB`);
    assert.ok(rss < 300, `${rss} MiB`);
  } finally {
    for (const conn of conns) conn.close();
  }
});

// ---------------------------------------------------------------------------------------------
// The repeated heartbeat, answered ahead of routing: over a socket, with a Content-Length, as a
// peer sends it (app.request() sends none, and takes the route)

Deno.test("a repeated heartbeat over HTTP refreshes its peer, and every other heartbeat gets its route's answer", async () => {
  const { app, clock, secretOf } = fixture(30, { trustAdvertise: true, bodyTimeout: 0.3 });
  const server = serveConnections({ hostname: "127.0.0.1", port: 0, warn: () => {} }, app.fetch);
  const base = `http://127.0.0.1:${server.addr.port}`;
  try {
    const put = async (path: string, body: string, headers: Record<string, string> = {}) => {
      const response = await fetch(`${base}${path}`, {
        method: "PUT",
        headers: { "content-type": "application/json", ...headers },
        body,
      });
      return {
        status: response.status,
        type: response.headers.get("content-type"),
        exposed: response.headers.get("access-control-expose-headers"),
        body: await response.json(),
      };
    };
    const auth = { authorization: `Bearer ${secretOf("peer-1")}` };
    const listed = async () =>
      (await (await fetch(`${base}/peers`)).json()).peers.map((p: PeerState) => p.fragments);
    const state = JSON.stringify(peer(6001, ["a.bin"], "peer1"));
    assert.deepEqual((await put("/peers/peer-1", state, auth)).body.recreated, true);
    // Repeated: answered as the route answers, and the peer lives a ttl from now.
    clock.now += 20_000;
    const repeated = await put("/peers/peer-1", state, auth);
    assert.deepEqual(repeated, {
      status: 200,
      type: "application/json",
      exposed: null,
      body: { id: "peer-1", ttl: 30, recreated: false },
    });
    clock.now += 20_000; // 40 s after it registered, 20 after the heartbeat
    assert.deepEqual(await listed(), [["a.bin"]]);
    // The same bytes with another owner's secret, or none: refused, and nothing changes.
    const stranger = await put("/peers/peer-1", state, { authorization: `Bearer ${newSecret()}` });
    assertError(stranger, 403, "FORBIDDEN");
    assertError(await put("/peers/peer-1", state), 401, "UNAUTHORIZED");
    // A page's heartbeat has its CORS headers; a query is the route's, and still refreshes.
    assert.deepEqual(
      (await put("/peers/peer-1", state, { ...auth, origin: "https://a.example" })).exposed,
      "Allow, WWW-Authenticate",
    );
    assert.deepEqual((await put("/peers/peer-1?x=1", state, auth)).body.recreated, false);
    // A heartbeat that changes the peer goes to its route with the body already read.
    const changed = JSON.stringify(peer(6001, ["a.bin", "b.bin"], "peer1"));
    assert.deepEqual((await put("/peers/peer-1", changed, auth)).status, 200);
    assert.deepEqual(await listed(), [["a.bin", "b.bin"]]);
    // One whose body stalls past its deadline is a 408, as on the route.
    await using conn = await Deno.connect({ hostname: "127.0.0.1", port: server.addr.port });
    const head = `PUT /peers/peer-1 HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n` +
      `authorization: ${auth.authorization}\r\ncontent-length: ${changed.length}\r\n\r\n`;
    const answer = await exchange(conn, head + changed.slice(0, 10));
    assert.match(answer, /^HTTP\/1\.1 408 [^]*"REQUEST_TIMEOUT"/);
    assert.deepEqual(await listed(), [["a.bin", "b.bin"]]);
  } finally {
    await server.shutdown();
  }
});
