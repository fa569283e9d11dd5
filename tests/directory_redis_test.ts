/**
 * The directory on Redis (`--store redis://...`), against Debian's real redis-server: the main
 * API behaviours run against both stores, in memory and in Redis, through `app.request()`; then
 * two directory replicas as real processes on one Redis (one view, one killed, expiry across
 * them, Redis restarting), and the `--store` flag's errors; then each replica's cache of locate
 * answers: changes made at one replica seen at the other at once, and nothing stale kept while
 * changes cannot be heard.
 * @module
 */
import { createClient } from "@redis/client";
import { createHash } from "node:crypto";
import {
  createApp,
  DirectoryClient,
  type DirectoryStore,
  newSecret,
  type PeerState,
  RedisStore,
  Registry,
  startDirectory,
} from "../directory.ts";
import type { Manifest } from "../split.ts";
import { LocateCache } from "../directory/locate_cache.ts";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { type RedisServer, startRedisServer } from "./_redis_server.ts";
import { Child, runTask, startTask } from "./_util.ts";

const REMOTE = {
  remoteAddr: { hostname: "10.0.0.9", port: 40000, transport: "tcp" as const },
};
const SHA = "a".repeat(64);

type Result = { status: number; body: Record<string, unknown> & { error?: { code: string } } };
type Call = (method: string, path: string, body?: unknown, secret?: string) => Promise<Result>;

/** Runs `test` against an app over `kind` of store, with a fresh redis-server for Redis. */
async function withStore(
  kind: "memory" | "redis",
  options: { maxPeers?: number },
  test: (call: Call) => Promise<void>,
): Promise<void> {
  await using redis = kind === "redis" ? await startRedisServer() : undefined;
  let store: DirectoryStore;
  if (redis === undefined) store = new Registry({ ttl: 30, ...options });
  else {
    const redisStore = new RedisStore(redis.url, { ttl: 30, ...options });
    await redisStore.ready();
    store = redisStore;
  }
  try {
    const app = createApp({ registry: store });
    await test(async (method, path, body, secret) => {
      const headers: Record<string, string> = {};
      if (body !== undefined) headers["content-type"] = "application/json";
      if (secret !== undefined) headers.authorization = `Bearer ${secret}`;
      const init = { method, headers, body: body === undefined ? undefined : JSON.stringify(body) };
      const response = await app.request(path, init, REMOTE);
      const text = await response.text();
      return { status: response.status, body: text === "" ? {} : JSON.parse(text) };
    });
  } finally {
    await store.close?.();
  }
}

function idOf(file: string): string {
  return createHash("sha256").update(file).digest("hex");
}

function seeder(port: number, file: string, fragments: string[]): PeerState {
  return { port, grpcPort: port + 1, httpPort: port + 2, fragments, fileId: idOf(file), file };
}

function manifest(file: string, names: string[], sha256 = idOf(file)): Manifest {
  return {
    version: 1,
    file,
    mime: "video/webm",
    size: 100 * names.length,
    sha256,
    fragments: names.map((name, index) => ({
      index,
      name,
      offset: index * 100,
      size: 100,
      sha256: SHA,
    })),
  };
}

/** Registers `state` and answers its id and secret. */
async function register(call: Call, state: PeerState): Promise<{ id: string; secret: string }> {
  const { status, body } = await call("POST", "/peers", state);
  assertEquals(status, 201, JSON.stringify(body));
  return { id: body.id as string, secret: body.secret as string };
}

const holderIds = (result: Result) =>
  (result.body.holders as { id: string }[] | undefined)?.map((holder) => holder.id).sort();

/** What a user relies on, the same whichever store the directory runs on. */
const CASES: Record<string, { maxPeers?: number; run: (call: Call) => Promise<void> }> = {
  "locates a registered peer, and keeps it on a repeated heartbeat": {
    async run(call) {
      const state = seeder(7000, "a.webm", ["fragment_0.bin", "fragment_1.bin"]);
      const { id, secret } = await register(call, state);
      const located = await call("GET", "/fragments/fragment_1.bin");
      assertEquals(located.status, 200);
      assertEquals(located.body.holders, [{
        id,
        host: "10.0.0.9",
        port: 7000,
        grpcPort: 7001,
        httpPort: 7002,
        fileId: idOf("a.webm"),
      }]);
      for (let i = 0; i < 2; i++) {
        const beat = await call("PUT", `/peers/${id}`, state, secret);
        assertEquals(beat, { status: 200, body: { id, ttl: 30, recreated: false } });
      }
      assertEquals((await call("GET", "/health")).body, {
        status: "ok",
        peers: 1,
        fragments: 2,
        files: 0,
      });
    },
  },
  "refuses another owner's heartbeat and leave, and forgets a peer that leaves": {
    async run(call) {
      const state = seeder(7000, "a.webm", ["fragment_0.bin"]);
      const { id, secret } = await register(call, state);
      const other = newSecret();
      assertEquals((await call("PUT", `/peers/${id}`, state, other)).status, 403);
      assertEquals((await call("DELETE", `/peers/${id}`, undefined, other)).status, 403);
      assertEquals((await call("DELETE", `/peers/${id}`, undefined, secret)).status, 204);
      assertEquals((await call("DELETE", `/peers/${id}`, undefined, secret)).status, 404);
      const gone = await call("GET", "/fragments/fragment_0.bin");
      assertEquals([gone.status, gone.body.error?.code], [404, "NOT_FOUND"]);
    },
  },
  "locates a peer by what it holds now, and narrows to one file with ?file=": {
    async run(call) {
      const a = await register(call, seeder(7000, "a.webm", ["fragment_0.bin", "fragment_1.bin"]));
      const b = await register(call, seeder(7010, "b.webm", ["fragment_0.bin"]));
      const beat = await call(
        "PUT",
        `/peers/${a.id}`,
        seeder(7000, "a.webm", ["fragment_1.bin"]),
        a.secret,
      );
      assertEquals(beat.status, 200);
      assertEquals(holderIds(await call("GET", "/fragments/fragment_0.bin")), [b.id]);
      assertEquals(holderIds(await call("GET", "/fragments/fragment_1.bin")), [a.id]);
      const ofB = await call("GET", `/fragments/fragment_0.bin?file=${idOf("b.webm")}`);
      assertEquals(holderIds(ofB), [b.id]);
      const ofA = await call("GET", `/fragments/fragment_0.bin?file=${idOf("a.webm")}`);
      assertEquals(ofA.status, 404);
    },
  },
  "lists a published file with its seeders, and resolves it by name, id or prefix": {
    async run(call) {
      const names = ["fragment_0.bin", "fragment_1.bin"];
      const published = await call("POST", "/files", manifest("a.webm", names));
      assertEquals(published.status, 201);
      assertEquals((await call("POST", "/files", manifest("a.webm", names))).status, 200);
      const moved = manifest("a.webm", ["other_0.bin", "other_1.bin"]);
      assertEquals((await call("POST", "/files", moved)).status, 409);
      const { id } = await register(call, seeder(7000, "a.webm", names));
      await register(call, seeder(7010, "a.webm", ["fragment_0.bin"]));
      const files = await call("GET", "/files");
      assertEquals(files.body.files, [{
        id: idOf("a.webm"),
        file: "a.webm",
        mime: "video/webm",
        size: 200,
        sha256: idOf("a.webm"),
        fragments: 2,
        available: true,
        seeders: 1,
      }]);
      for (const ref of ["a.webm", idOf("a.webm"), idOf("a.webm").slice(0, 8)]) {
        const detail = await call("GET", `/files/${ref}`);
        assertEquals(detail.status, 200, ref);
        const fragments = detail.body.fragments as { holderCount: number }[];
        assertEquals(fragments.map((fragment) => fragment.holderCount), [2, 1]);
      }
      const located = await call("GET", "/fragments/fragment_1.bin?file=a.webm");
      assertEquals(holderIds(located), [id]);
      assertEquals((await call("GET", "/files/nothing.webm")).status, 404);
    },
  },
  "answers 409 AMBIGUOUS_FILE for a name two files share": {
    async run(call) {
      const one = manifest("same.webm", ["fragment_0.bin"], idOf("one"));
      const two = manifest("same.webm", ["fragment_0.bin"], idOf("two"));
      one.fragments[0]!.size = two.fragments[0]!.size = 100;
      assertEquals((await call("POST", "/files", one)).status, 201);
      assertEquals((await call("POST", "/files", two)).status, 201);
      const result = await call("GET", "/files/same.webm");
      assertEquals([result.status, result.body.error?.code], [409, "AMBIGUOUS_FILE"]);
    },
  },
  "refuses a peer past max-peers with 429, and another owner's address with 409": {
    maxPeers: 2,
    async run(call) {
      await register(call, seeder(7000, "a.webm", ["fragment_0.bin"]));
      await register(call, seeder(7010, "a.webm", ["fragment_0.bin"]));
      const third = await call("POST", "/peers", seeder(7020, "a.webm", ["fragment_0.bin"]));
      assertEquals([third.status, third.body.error?.code], [429, "TOO_MANY_PEERS"]);
      const taken = await call("POST", "/peers", seeder(7000, "b.webm", []));
      assertEquals([taken.status, taken.body.error?.code], [409, "CONFLICT"]);
    },
  },
  "pages through peers and fragments": {
    async run(call) {
      for (let i = 0; i < 5; i++) {
        await register(call, seeder(7000 + 10 * i, "a.webm", [`fragment_${i}.bin`]));
      }
      const seen: string[] = [];
      let path = "/peers?limit=2";
      for (let pages = 0; pages < 5; pages++) {
        const { body } = await call("GET", path);
        seen.push(...(body.peers as { port: number }[]).map((peer) => String(peer.port)));
        if (body.next === undefined) break;
        path = `/peers?limit=2&cursor=${body.next}`;
      }
      assertEquals(seen, ["7000", "7010", "7020", "7030", "7040"]);
      const first = await call("GET", "/fragments?limit=3");
      const names = (first.body.fragments as { name: string }[]).map((entry) => entry.name);
      const rest = await call("GET", `/fragments?limit=3&cursor=${first.body.next}`);
      names.push(...(rest.body.fragments as { name: string }[]).map((entry) => entry.name));
      assertEquals(names, [0, 1, 2, 3, 4].map((i) => `fragment_${i}.bin`));
      assertEquals(rest.body.next, undefined);
    },
  },
};

for (const [name, { run, ...options }] of Object.entries(CASES)) {
  for (const kind of ["memory", "redis"] as const) {
    Deno.test(`directory on ${kind}: ${name}`, () => withStore(kind, options, run));
  }
}

// ---------------------------------------------------------------------------------------------
// Replicas as real processes

const LISTENING = /Listening on (http:\/\/\S+)/;

/** A directory process on `redis`, and its URL. */
async function startReplica(
  redis: RedisServer,
  ttl = 30,
  flags: string[] = [],
): Promise<{ child: Child; url: string }> {
  const child = startTask("directory", [
    ...flags,
    "--port",
    "0",
    "--hostname",
    "127.0.0.1",
    "--ttl",
    String(ttl),
    "--store",
    redis.url,
  ]);
  try {
    const [, url] = await child.waitFor(LISTENING);
    return { child, url: url! };
  } catch (error) {
    await child[Symbol.asyncDispose]();
    throw error;
  }
}

/** A request to a replica, as JSON; a refused connection throws. */
async function request(
  base: string,
  method: string,
  path: string,
  body?: unknown,
  secret?: string,
): Promise<Result> {
  const headers: Record<string, string> = {};
  if (body !== undefined) headers["content-type"] = "application/json";
  if (secret !== undefined) headers.authorization = `Bearer ${secret}`;
  const response = await fetch(base + path, {
    method,
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await response.text();
  return { status: response.status, body: text === "" ? {} : JSON.parse(text) };
}

/** Polls `check` until it is true, or fails after `timeoutMs`. */
async function until(what: string, check: () => Promise<boolean>, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

Deno.test("two replicas on one Redis serve one view, and one goes on when the other is killed", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis);
  await using _a = a.child;
  const b = await startReplica(redis);
  await using _b = b.child;
  const state = seeder(7000, "a.webm", ["fragment_0.bin"]);
  const registered = await request(a.url, "POST", "/peers", state);
  assertEquals(registered.status, 201);
  const { id, secret } = registered.body as { id: string; secret: string };
  const located = await request(b.url, "GET", "/fragments/fragment_0.bin");
  assertEquals(holderIds(located), [id]);
  assertEquals((await request(b.url, "POST", "/files", manifest("a.webm", ["x.bin"]))).status, 201);
  assertEquals((await request(a.url, "GET", "/files/a.webm")).status, 200);
  // The other replica knows the secret: a heartbeat with another is refused there too.
  assertEquals((await request(b.url, "PUT", `/peers/${id}`, state, newSecret())).status, 403);

  a.child.kill("SIGKILL");
  await a.child.status();
  for (let i = 0; i < 3; i++) {
    const beat = await request(b.url, "PUT", `/peers/${id}`, state, secret);
    assertEquals(beat.body, { id, ttl: 30, recreated: false });
  }
  assertEquals(holderIds(await request(b.url, "GET", "/fragments/fragment_0.bin")), [id]);
});

Deno.test("a peer's ttl runs out on every replica", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis, 1);
  await using _a = a.child;
  const b = await startReplica(redis, 1);
  await using _b = b.child;
  const registered = await request(a.url, "POST", "/peers", seeder(7000, "a.webm", ["f.bin"]));
  const { id, secret } = registered.body as { id: string; secret: string };
  assertEquals(holderIds(await request(b.url, "GET", "/fragments/f.bin")), [id]);
  await until("the peer expires", async () => {
    const [atA, atB] = await Promise.all([
      request(a.url, "GET", "/fragments/f.bin"),
      request(b.url, "GET", "/fragments/f.bin"),
    ]);
    return atA.status === 404 && atB.status === 404;
  });
  assertEquals((await request(b.url, "GET", "/health")).body.peers, 0);
  // Expired, it is anyone's: its heartbeat comes back as a new registration.
  const beat = await request(
    b.url,
    "PUT",
    `/peers/${id}`,
    seeder(7000, "a.webm", ["f.bin"]),
    secret,
  );
  assertEquals(beat.body, { id, ttl: 1, recreated: true });
});

Deno.test("while Redis is down every route answers 503, and the directory recovers by itself", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis);
  await using _a = a.child;
  const state = seeder(7000, "a.webm", ["f.bin"]);
  const { id, secret } = (await request(a.url, "POST", "/peers", state)).body as {
    id: string;
    secret: string;
  };
  await redis.kill();
  const routes: [string, string, unknown?, string?][] = [
    ["GET", "/health"],
    ["GET", "/peers"],
    ["POST", "/peers", state],
    ["PUT", `/peers/${id}`, state, secret],
    ["DELETE", `/peers/${id}`, undefined, secret],
    ["GET", "/fragments"],
    ["GET", "/fragments/f.bin"],
    ["GET", "/fragments/f.bin?file=a.webm"],
    ["GET", "/files"],
    ["POST", "/files", manifest("a.webm", ["f.bin"])],
    ["GET", "/files/a.webm"],
  ];
  await until(
    "Redis is seen down",
    async () => (await request(a.url, "GET", "/health")).status === 503,
  );
  for (const [method, path, body, key] of routes) {
    const result = await request(a.url, method, path, body, key);
    assertEquals(result.status, 503, `${method} ${path}`);
    assertEquals(Object.keys(result.body), ["error"]);
    assertEquals(result.body.error?.code, "SERVICE_UNAVAILABLE");
  }
  // The OpenAPI document needs no state.
  assertEquals((await request(a.url, "GET", "/openapi.json")).status, 200);
  await a.child.waitFor(/Redis at 127\.0\.0\.1:\d+ is unreachable/);

  await redis.restart();
  await until("Redis is back", async () => (await request(a.url, "GET", "/health")).status === 200);
  await a.child.waitFor(/Redis at 127\.0\.0\.1:\d+ is back/);
  // The new Redis is empty: the peer's next heartbeat registers it again.
  const beat = await request(a.url, "PUT", `/peers/${id}`, state, secret);
  assertEquals(beat.body, { id, ttl: 30, recreated: true });
  assertEquals(holderIds(await request(a.url, "GET", "/fragments/f.bin")), [id]);
});

Deno.test("directory --store refuses what is not memory or a redis:// URL, in one line", async () => {
  for (const store of ["nosuch", "http://localhost:6379", "redis://localhost:6379/x"]) {
    const { code, stderr } = await runTask("directory", ["--port", "0", "--store", store]);
    assert(code !== 0, store);
    assertMatch(stderr, /^error: Invalid --store: .*\n$/);
  }
});

Deno.test("heartbeats racing on two replicas leave one consistent index", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis);
  await using _a = a.child;
  const b = await startReplica(redis);
  await using _b = b.child;
  const peers = await Promise.all(Array.from({ length: 20 }, async (_, i) => {
    const registered = await request(i % 2 ? a.url : b.url, "POST", "/peers", {
      ...seeder(7000 + 10 * i, "a.webm", ["f0.bin", "f1.bin"]),
    });
    return registered.body as { id: string; secret: string };
  }));
  // Each peer sends two different lists at once, one to each replica, five times over.
  for (let round = 0; round < 5; round++) {
    await Promise.all(peers.flatMap(({ id, secret }, i) => {
      const port = 7000 + 10 * i;
      return [
        request(a.url, "PUT", `/peers/${id}`, seeder(port, "a.webm", ["f0.bin"]), secret),
        request(b.url, "PUT", `/peers/${id}`, seeder(port, "a.webm", ["f1.bin", "f2.bin"]), secret),
      ];
    }));
  }
  // Whichever came last, each peer is indexed under exactly the names of its one list.
  const listed = (await request(a.url, "GET", "/peers")).body.peers as {
    id: string;
    fragments: string[];
  }[];
  assertEquals(listed.length, 20);
  const indexed = (await request(b.url, "GET", "/fragments")).body.fragments as {
    name: string;
    holders: { id: string }[];
  }[];
  const byIndex = new Map<string, string[]>();
  for (const { name, holders } of indexed) {
    for (const { id } of holders) byIndex.set(id, [...byIndex.get(id) ?? [], name]);
  }
  for (const peer of listed) assertEquals(byIndex.get(peer.id)?.sort(), [...peer.fragments].sort());
  const health = (await request(a.url, "GET", "/health")).body;
  assertEquals(health.peers, 20);
});

Deno.test("DirectoryClient fails over to the next directory, and comes back to the first", async () => {
  await using redis = await startRedisServer();
  const first = startDirectory({ port: 0, hostname: "127.0.0.1", store: redis.url });
  await using second = startDirectory({ port: 0, hostname: "127.0.0.1", store: redis.url });
  await (first.registry as RedisStore).ready();
  await (second.registry as RedisStore).ready();
  const client = new DirectoryClient(`${first.url},${second.url}`, { failbackMs: 200 });
  const state = seeder(7000, "a.webm", ["f.bin"]);
  const peer = await client.register(state);
  assertEquals(client.url, first.url);

  await first.close();
  assertEquals(await client.heartbeat(peer, state), { id: peer.id, ttl: 30, recreated: false });
  assertEquals(client.url, second.url);
  assertEquals((await client.locate("f.bin")).map((holder) => holder.id), [peer.id]);

  // The first is back on its port: once failbackMs has passed, calls go to it again.
  await using again = startDirectory({ port: first.port, hostname: "127.0.0.1", store: redis.url });
  await (again.registry as RedisStore).ready();
  await until("the client is back on the first", async () => {
    await client.heartbeat(peer, state);
    return client.url === first.url;
  });
  assertEquals((await client.locate("f.bin")).map((holder) => holder.id), [peer.id]);
});

Deno.test("DirectoryClient skips a directory that answers 503, and throws when all fail", async () => {
  await using redis = await startRedisServer();
  await using down = await startRedisServer();
  const quiet = () => {};
  await using broken = startDirectory({
    port: 0,
    hostname: "127.0.0.1",
    store: down.url,
    warn: quiet,
  });
  await using working = startDirectory({ port: 0, hostname: "127.0.0.1", store: redis.url });
  await (working.registry as RedisStore).ready();
  await (broken.registry as RedisStore).ready();
  await down.kill();
  await until(
    "the broken one answers 503",
    async () => (await request(broken.url, "GET", "/health")).status === 503,
  );
  const client = new DirectoryClient([broken.url, working.url]);
  assertEquals((await client.health()).status, "ok");
  assertEquals(client.url, working.url);
  const alone = new DirectoryClient(broken.url);
  const error = await alone.health().then(() => undefined, (error) => error);
  assertEquals([error?.status, error?.code], [503, "SERVICE_UNAVAILABLE"]);
});

Deno.test("replicas on one Redis share their limits", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis, 30, ["--max-peers", "2"]);
  await using _a = a.child;
  const b = await startReplica(redis, 30, ["--max-peers", "2"]);
  await using _b = b.child;
  assertEquals((await request(a.url, "POST", "/peers", seeder(7000, "a.webm", []))).status, 201);
  assertEquals((await request(b.url, "POST", "/peers", seeder(7010, "a.webm", []))).status, 201);
  for (const url of [a.url, b.url]) {
    const third = await request(url, "POST", "/peers", seeder(7020, "a.webm", []));
    assertEquals([third.status, third.body.error?.code], [429, "TOO_MANY_PEERS"]);
  }
});

Deno.test("a change at one replica shows in the other's locate answers within a moment", async () => {
  await using redis = await startRedisServer();
  const a = await startReplica(redis);
  await using _a = a.child;
  const b = await startReplica(redis);
  await using _b = b.child;
  const one = (await request(a.url, "POST", "/peers", seeder(7000, "a.webm", ["f.bin"])))
    .body as { id: string; secret: string };
  const path = `/fragments/f.bin?file=${idOf("a.webm")}`;
  // Asked twice: kept by B from then on.
  for (let i = 0; i < 2; i++) assertEquals(holderIds(await request(b.url, "GET", path)), [one.id]);
  // Well within the cache's max age (1 s): only the change's message can make B see it.
  const soon = (what: string, check: (result: Result) => boolean) =>
    until(what, async () => check(await request(b.url, "GET", path)), 500);

  const two = (await request(a.url, "POST", "/peers", seeder(7010, "a.webm", ["f.bin"])))
    .body as { id: string; secret: string };
  await soon("B lists the new peer", (result) => holderIds(result)?.length === 2);
  const moved = seeder(7000, "a.webm", ["g.bin"]);
  assertEquals((await request(a.url, "PUT", `/peers/${one.id}`, moved, one.secret)).status, 200);
  await soon("B forgets what the first let go", (result) => holderIds(result)?.[0] === two.id);
  assertEquals(holderIds(await request(b.url, "GET", path)), [two.id]);
  assertEquals(
    (await request(a.url, "DELETE", `/peers/${two.id}`, undefined, two.secret)).status,
    204,
  );
  await soon("B forgets the peer that left", (result) => result.status === 404);
  // B's own change shows in its own answer at once.
  const three = (await request(b.url, "POST", "/peers", seeder(7020, "a.webm", ["f.bin"])))
    .body as { id: string };
  assertEquals(holderIds(await request(b.url, "GET", path)), [three.id]);
});

/** A store on `redis` whose locate answers last `maxAgeMs` unless a change drops them. */
async function cachingStore(redis: RedisServer, maxAgeMs: number): Promise<RedisStore> {
  const store = new RedisStore(redis.url, { ttl: 30, locateMaxAgeMs: maxAgeMs, warn: () => {} });
  await store.ready();
  return store;
}

/** Registers (or changes) peer `id` at `store`, with `fragments` of a.webm. */
async function upsertAt(store: RedisStore, id: string, port: number, fragments: string[]) {
  const state = { ...seeder(port, "a.webm", fragments), host: "10.0.0.9" };
  const outcome = await store.upsert(id, state, {
    secret: `secret-${id}`,
    source: "10.0.0.9",
    body: JSON.stringify(state),
  });
  assert(outcome === "created" || outcome === "refreshed", outcome);
}

/** The ids and ports a store's locate lists; undefined when none. */
async function located(store: RedisStore, name: string, file?: string) {
  const json = await store.locateJson(name, file);
  if (json === undefined) return undefined;
  return (JSON.parse(json) as { id: string; port: number }[])
    .map(({ id, port }) => `${id}:${port}`).sort();
}

/**
 * Locates `name` at `store` until its answer is kept: given at once, not as a promise (a change's
 * message that comes after a fetch drops what it fetched).
 */
async function kept(store: RedisStore, name: string): Promise<string | undefined> {
  let held: Awaited<ReturnType<RedisStore["locateJson"]>> | Promise<unknown> = undefined;
  await soon(`"${name}" is kept`, async () => {
    await store.locateJson(name);
    held = store.locateJson(name);
    return !(held instanceof Promise);
  });
  return held as string | undefined;
}

/** Polls `check` every few ms until it is true; fails after `timeoutMs`. */
async function soon(what: string, check: () => Promise<boolean>, timeoutMs = 1_000) {
  const deadline = Date.now() + timeoutMs;
  while (!await check()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

Deno.test("RedisStore keeps locate answers, and drops them on any change at any replica", async () => {
  await using redis = await startRedisServer();
  // A minute's max age: only the changes' messages can make the answers move within a second.
  const a = await cachingStore(redis, 60_000);
  const b = await cachingStore(redis, 60_000);
  try {
    await upsertAt(a, "one", 7000, ["f.bin"]);
    assertEquals(await located(b, "f.bin"), ["one:7000"]);
    assertEquals(await located(b, "f.bin", idOf("a.webm")), ["one:7000"]);
    await kept(b, "f.bin");
    // Its own change: seen at once.
    await upsertAt(b, "two", 7010, ["f.bin"]);
    assertEquals(await located(b, "f.bin"), ["one:7000", "two:7010"]);
    // Another's: a new port, other fragments, a peer removed.
    const at = (name: string, expected: string[] | undefined, file?: string) => async () =>
      JSON.stringify(await located(b, name, file)) === JSON.stringify(expected);
    await upsertAt(a, "two", 7020, ["f.bin"]);
    await soon("the new port shows", at("f.bin", ["one:7000", "two:7020"]));
    await upsertAt(a, "one", 7000, ["g.bin"]);
    await soon("the fragment let go of goes", at("f.bin", ["two:7020"], idOf("a.webm")));
    assertEquals(await located(b, "f.bin"), ["two:7020"]);
    assert(await a.remove("two"));
    await soon("the peer removed goes", at("f.bin", undefined));

    // A heartbeat that repeats the state changes no answer, and drops none.
    const held = await kept(b, "g.bin");
    assertEquals(typeof held, "string");
    await kept(b, "h.bin");
    await upsertAt(a, "one", 7000, ["g.bin"]);
    await upsertAt(a, "three", 7030, ["h.bin"]);
    // Messages come in order: once h.bin's has come, the heartbeat's would have too.
    await soon("h.bin's change shows", at("h.bin", ["three:7030"]));
    assertEquals(b.locateJson("g.bin"), held);
  } finally {
    await a.close();
    await b.close();
  }
});

Deno.test("RedisStore keeps no locate answer while it cannot hear changes, nor past its max age", async () => {
  await using redis = await startRedisServer();
  const a = await cachingStore(redis, 60_000);
  const b = await cachingStore(redis, 60_000);
  const admin = createClient({ url: redis.url });
  await admin.connect();
  try {
    await upsertAt(a, "one", 7000, ["f.bin"]);
    assertEquals(await located(b, "f.bin"), ["one:7000"]);
    // Its listening connection cut: what it missed meanwhile is not served from its cache.
    await admin.sendCommand(["CLIENT", "KILL", "TYPE", "pubsub"]);
    await upsertAt(a, "two", 7010, ["f.bin"]);
    await soon(
      "the change shows",
      async () => (await located(b, "f.bin"))?.length === 2,
    );
    // Redis restarted empty: nothing held from before is served.
    await b.ready();
    await kept(b, "f.bin");
    await admin.close();
    await redis.restart();
    await b.ready();
    assertEquals(await located(b, "f.bin"), undefined);
  } finally {
    if (admin.isOpen) await admin.close();
    await a.close();
    await b.close();
  }

  // A change no message tells of (made behind the scripts' back) shows within the max age.
  const maxAgeMs = 300;
  const c = await cachingStore(redis, maxAgeMs);
  const other = createClient({ url: redis.url });
  await other.connect();
  try {
    await upsertAt(c, "four", 7040, ["f.bin"]);
    assertEquals(await located(c, "f.bin"), ["four:7040"]);
    await kept(c, "f.bin"); // its own change's message, if late, has dropped and been refetched
    const start = performance.now();
    await other.sRem("fragmentos:directory:f:f.bin", "four");
    assertEquals(await located(c, "f.bin"), ["four:7040"]);
    await soon("the answer is too old", async () => await located(c, "f.bin") === undefined);
    const elapsed = performance.now() - start;
    assert(elapsed <= maxAgeMs + 200, `Served for ${Math.round(elapsed)} ms`);
  } finally {
    await other.close();
    await c.close();
  }
});

Deno.test("LocateCache shares a fetch, keeps answers for their age, and drops the oldest", async () => {
  let now = 0;
  const cache = new LocateCache({ maxEntries: 2, maxAgeMs: 1_000, now: () => now });
  let fetches = 0;
  const fetch = (json: string | undefined, validMs = Infinity) => () => {
    fetches++;
    return Promise.resolve({ json, validMs });
  };
  // Two calls while the first fetch is out: one fetch.
  const [one, again] = [cache.get("a", fetch("[1]")), cache.get("a", fetch("[2]"))];
  assertEquals([await one, await again, fetches], ["[1]", "[1]", 1]);
  assertEquals(cache.get("a", fetch("[3]")), "[1]");
  // Kept for its max age, or until its first holder expires if that is sooner.
  now = 1_000;
  assertEquals(await cache.get("a", fetch("[4]")), "[4]");
  assertEquals(await cache.get("b", fetch("[5]", 10)), "[5]");
  now = 1_010;
  assertEquals(await cache.get("b", fetch(undefined)), undefined);
  assertEquals(cache.get("b", fetch("[6]")), undefined);
  // A third key drops the oldest.
  assertEquals(await cache.get("c", fetch("[7]")), "[7]");
  assertEquals(cache.size, 2);
  assert(cache.get("a", fetch("[8]")) instanceof Promise);
  // Dropped while it is being fetched: the answer is given, not kept.
  const pending = cache.get("d", fetch("[9]"));
  cache.drop(["d"]);
  assertEquals(await pending, "[9]");
  assert(cache.get("d", fetch("[10]")) instanceof Promise);
});
