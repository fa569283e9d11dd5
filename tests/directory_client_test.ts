/**
 * directory.ts over real sockets: `startDirectory()` on port 0 and the `DirectoryClient` that
 * peer.ts uses, including its errors, its timeout and an unreachable directory.
 * @module
 */
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { DirectoryClient, DirectoryError, newSecret, startDirectory } from "../directory.ts";
import type { Manifest } from "../split.ts";
import { clampTtl, Presence } from "../peer/presence.ts";

const SHA = "0".repeat(64);

/** The id the tests give file `file`: a SHA-256 of its name, so that each name has its own. */
function idOf(file: string): string {
  return createHash("sha256").update(file).digest("hex");
}

const MANIFEST: Manifest = {
  version: 1,
  file: "clip.webm",
  mime: "video/webm",
  size: 10,
  sha256: idOf("clip.webm"),
  fragments: [
    { index: 0, name: "clip_0.bin", offset: 0, size: 5, sha256: SHA },
    { index: 1, name: "clip_1.bin", offset: 5, size: 5, sha256: SHA },
  ],
};

function state(port: number, fragments: string[], file?: string) {
  return {
    port,
    grpcPort: port + 44050,
    httpPort: port + 2000,
    fragments,
    ...(file ? { fileId: idOf(file), file } : {}),
  };
}

/** A manifest of file `file`, of id `idOf(file)`, whose fragments are named as split.ts names them. */
function manifestOf(file: string): Manifest {
  const fragments = MANIFEST.fragments.map((fragment) => ({
    ...fragment,
    name: `fragment_${fragment.index}.bin`,
  }));
  return { ...MANIFEST, file, sha256: idOf(file), fragments };
}

/** MANIFEST's file split another way: the same id, one fragment. */
const RESPLIT: Manifest = {
  ...MANIFEST,
  fragments: [{ index: 0, name: "clip.bin", offset: 0, size: 10, sha256: SHA }],
};

/** Runs `work` and returns the DirectoryError it must throw. */
async function rejection(work: () => Promise<unknown>): Promise<DirectoryError> {
  try {
    await work();
  } catch (error) {
    assert.ok(error instanceof DirectoryError, `expected a DirectoryError, got ${error}`);
    return error;
  }
  throw new Error("Expected a DirectoryError, but the call succeeded");
}

Deno.test("DirectoryClient registers, heartbeats, locates, publishes and leaves over HTTP", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  assert.ok(directory.port > 0);
  const client = new DirectoryClient(`${directory.url}/`);
  assert.deepEqual(await client.health(), { status: "ok", peers: 0, fragments: 0, files: 0 });

  const me = await client.register(state(6001, ["clip_0.bin"], "clip.webm"));
  const { id, ttl } = me;
  assert.equal(ttl, 30);
  const other = await client.register({
    ...state(6002, ["clip_1.bin"], "clip.webm"),
    host: "seed.example",
  });
  assert.deepEqual(await client.locate("clip_0.bin"), [
    {
      id,
      host: "127.0.0.1",
      port: 6001,
      grpcPort: 50051,
      httpPort: 8001,
      fileId: idOf("clip.webm"),
    },
  ]);
  assert.deepEqual(
    await client.heartbeat(me, state(6001, ["clip_0.bin", "clip_1.bin"], "clip.webm")),
    {
      id,
      ttl: 30,
      recreated: false,
    },
  );
  assert.deepEqual((await client.locate("clip_1.bin")).map((holder) => holder.id), [other.id, id]);
  assert.deepEqual(await client.locate("nobody.bin"), []);

  await client.publishFile(MANIFEST);
  await client.publishFile(MANIFEST); // the same manifest again is fine
  assert.deepEqual((await client.listFiles()).map((file) => [file.file, file.available]), [
    ["clip.webm", true],
  ]);
  const detail = await client.getFile("clip.webm");
  assert.deepEqual(detail.id, MANIFEST.sha256);
  assert.deepEqual(detail.fragments.map((fragment) => fragment.holderCount), [1, 2]);
  assert.deepEqual((await client.getFile(MANIFEST.sha256.slice(0, 6))).id, MANIFEST.sha256);

  assert.equal((await client.listPeers()).length, 2);
  assert.deepEqual((await client.listFragments()).map((fragment) => fragment.name), [
    "clip_0.bin",
    "clip_1.bin",
  ]);
  await client.leave(me);
  assert.deepEqual(await client.locate("clip_0.bin"), []);
});

Deno.test("DirectoryClient throws a DirectoryError with the status and code of a refusal", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const unknown = await rejection(() => client.leave({ id: "ghost", secret: newSecret() }));
  assert.deepEqual([unknown.status, unknown.code], [404, "NOT_FOUND"]);
  assert.match(unknown.message, /DELETE \/peers\/ghost failed: No peer "ghost"/);

  const invalid = await rejection(() => client.register(state(6001, ["../passwd"])));
  assert.deepEqual([invalid.status, invalid.code], [400, "BAD_REQUEST"]);
  assert.match(invalid.message, /"fragments\.0"/);

  await client.publishFile(MANIFEST);
  for (const other of [RESPLIT, { ...MANIFEST, file: "other.webm" }]) {
    const conflict = await rejection(() => client.publishFile(other));
    assert.deepEqual([conflict.status, conflict.code], [409, "CONFLICT"]);
  }

  const missing = await rejection(() => client.getFile("other.webm"));
  assert.deepEqual([missing.status, missing.code], [404, "NOT_FOUND"]);

  // Another clip.webm is listed beside it: the name alone no longer says which.
  await client.publishFile({ ...MANIFEST, sha256: "1".repeat(64) });
  for (
    const call of [
      () => client.getFile("clip.webm"),
      () => client.locate("clip_0.bin", { file: "clip.webm" }),
      () => client.listFragments({ file: "clip.webm" }),
    ]
  ) {
    const ambiguous = await rejection(call);
    assert.deepEqual([ambiguous.status, ambiguous.code], [409, "AMBIGUOUS_FILE"]);
    assert.match(ambiguous.detail, /^"clip\.webm" names 2 files: /);
  }
});

Deno.test("DirectoryClient gets a TOO_MANY_FILES error from a directory at its bound", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", maxFiles: 1 });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(MANIFEST);
  const full = await rejection(() => client.publishFile(manifestOf("other.webm")));
  assert.deepEqual([full.status, full.code], [429, "TOO_MANY_FILES"]);
  assert.match(full.message, /POST \/files failed: Cannot publish "other\.webm"/);
});

/** Polls `check` until it returns true, or fails after `timeoutMs`. */
async function eventually(check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** A quiet Presence of peer 6001 with MANIFEST, whose state lists `fragments` as they are now. */
function seeding(client: DirectoryClient, fragments: string[]): Presence {
  return new Presence(client, {
    state: () => state(6001, fragments),
    manifest: () => MANIFEST,
    log: () => {},
  });
}

Deno.test("a peer's presence keeps its file published while it heartbeats, and the file goes a ttl after it leaves", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1 });
  const client = new DirectoryClient(directory.url);
  // As peer.ts has it: the presence registers with what the store holds, then publishes.
  const fragments: string[] = [];
  const presence = seeding(client, fragments);
  try {
    await eventually(async () => (await client.listFiles()).length === 1);
    fragments.push("clip_0.bin"); // the first fragment arrives after the publication
    presence.poke();
    await eventually(async () => (await client.locate("clip_0.bin")).length === 1);
    const backed = Date.now();
    // Three ttls of heartbeats (every ttl/3): the file stays all along.
    while (Date.now() - backed < 3_000) {
      assert.deepEqual((await client.listFiles()).map((file) => file.file), ["clip.webm"]);
      await new Promise((resolve) => setTimeout(resolve, 250));
    }
  } finally {
    await presence.close();
  }
  const left = Date.now();
  assert.deepEqual(await client.locate("clip_0.bin"), []);
  await eventually(async () => (await client.listFiles()).length === 0);
  assert.ok(Date.now() - left >= 900, "the file went before one ttl without a holder");
});

Deno.test("Presence publishes again a file the directory dropped while the peer held nothing", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1 });
  const client = new DirectoryClient(directory.url);
  const fragments: string[] = [];
  const presence = seeding(client, fragments);
  try {
    await eventually(async () => (await client.listFiles()).length === 1);
    // Nobody holds a fragment of it for a ttl: the directory drops it.
    await eventually(async () => (await client.listFiles()).length === 0);
    fragments.push("clip_1.bin"); // the first fragment arrives late (from a neighbour, say)
    presence.poke();
    await eventually(async () => (await client.listFiles()).length === 1);
  } finally {
    await presence.close();
  }
});

Deno.test("startDirectory() answers 413 to a streamed body over 1 MiB", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  // A stream has no Content-Length: the limit must count the bytes as they arrive.
  const chunk = new TextEncoder().encode(" ".repeat(64 * 1024));
  let sent = 0;
  const body = new ReadableStream<Uint8Array>({
    pull(controller) {
      if (sent++ < 20) controller.enqueue(chunk);
      else controller.close();
    },
  });
  const response = await fetch(`${directory.url}/peers`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body,
  });
  assert.equal(response.status, 413);
  assert.equal((await response.json()).error.code, "PAYLOAD_TOO_LARGE");
});

Deno.test("DirectoryClient gets a PAYLOAD_TOO_LARGE error for a state over 1 MiB", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const names = Array.from({ length: 70_000 }, (_, i) => `fragment_${i}.bin`); // about 1.3 MB
  const error = await rejection(() => client.register(state(6001, names)));
  assert.deepEqual([error.status, error.code], [413, "PAYLOAD_TOO_LARGE"]);
  assert.equal((await client.health()).peers, 0);
});

Deno.test("DirectoryClient gives up with a TIMEOUT error when the directory does not answer", async () => {
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const accepted: Deno.Conn[] = [];
  const accepting = (async () => {
    for await (const conn of listener) accepted.push(conn); // read nothing, answer nothing
  })();
  try {
    const client = new DirectoryClient(`http://127.0.0.1:${listener.addr.port}`, {
      timeoutMs: 200,
    });
    const error = await rejection(() => client.health());
    assert.deepEqual([error.status, error.code], [0, "TIMEOUT"]);
    assert.match(error.message, /did not answer within 200 ms/);
  } finally {
    listener.close();
    await accepting.catch(() => {});
    for (const conn of accepted) conn.close();
  }
});

Deno.test("DirectoryClient says UNREACHABLE when nothing listens at the address", async () => {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const { port } = listener.addr;
  listener.close(); // a port that was just free and is now closed: the connection is refused
  const client = new DirectoryClient(`http://127.0.0.1:${port}`);
  const error = await rejection(() => client.register(state(6001, [])));
  assert.deepEqual([error.status, error.code], [0, "UNREACHABLE"]);
  assert.equal(
    error.message,
    `Cannot reach directory at "http://127.0.0.1:${port}": connection refused`,
  );
});

Deno.test("startDirectory() close() is idempotent and frees the port", async () => {
  const directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  await directory.close();
  await directory.close();
  await directory.finished;
  // the port is free again: binding it right now succeeds
  Deno.listen({ hostname: "127.0.0.1", port: directory.port }).close();
});

Deno.test("DirectoryClient registers a peer's file, and locate() and listFragments() narrow to one file", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const a = await client.register(state(6001, ["fragment_0.bin"], "a.webm"));
  const b = await client.register(state(6002, ["fragment_0.bin"]));
  assert.deepEqual(
    await client.heartbeat(b, state(6002, ["fragment_0.bin"], "b.webm")),
    { id: b.id, ttl: 30, recreated: false },
  );
  const ids = (holders: { id: string }[]) => holders.map((holder) => holder.id);
  assert.deepEqual(ids(await client.locate("fragment_0.bin")), [a.id, b.id]);
  // By id, published or not; by name once published.
  assert.deepEqual(ids(await client.locate("fragment_0.bin", { file: idOf("a.webm") })), [a.id]);
  assert.deepEqual(await client.locate("fragment_0.bin", { file: "a.webm" }), []);
  await client.publishFile(manifestOf("a.webm"));
  assert.deepEqual(ids(await client.locate("fragment_0.bin", { file: "a.webm" })), [a.id]);
  assert.deepEqual(await client.locate("fragment_0.bin", { file: idOf("c.webm") }), []);
  assert.deepEqual(
    (await client.listFragments({ file: idOf("b.webm") })).map((f) => [f.name, ids(f.holders)]),
    [["fragment_0.bin", [b.id]]],
  );
  assert.deepEqual((await client.listPeers()).map((peer) => [peer.file, peer.fileId]), [
    ["a.webm", idOf("a.webm")],
    ["b.webm", idOf("b.webm")],
  ]);
});

Deno.test("DirectoryClient gets a TOO_MANY_PEERS error from a directory at its bound", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", maxPeers: 1 });
  const client = new DirectoryClient(directory.url);
  await client.register(state(6001, []));
  const full = await rejection(() => client.register(state(6002, [])));
  assert.deepEqual([full.status, full.code], [429, "TOO_MANY_PEERS"]);
  assert.match(full.detail, /^The directory lists 1 live peers, its limit/);
});

/** A web server that is not a directory: it answers 200 and a page to everything. */
function notADirectory() {
  let requests = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, () => {
    requests++;
    return new Response("<html><body>It works!</body></html>", {
      headers: { "content-type": "text/html" },
    });
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    get requests() {
      return requests;
    },
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

Deno.test("DirectoryClient turns a 2xx that is not JSON into a DirectoryError asking whether it is a directory", async () => {
  await using other = notADirectory();
  const client = new DirectoryClient(other.url);
  for (const call of [() => client.health(), () => client.register(state(6001, []))]) {
    const error = await rejection(call);
    assert.deepEqual([error.status, error.code], [200, "BAD_RESPONSE"]);
    assert.match(
      error.message,
      new RegExp(`did not answer JSON: is "${other.url}" a directory\\?`),
    );
  }
});

/** A presence's log, line by line. */
function logged() {
  const lines: string[] = [];
  return { lines, log: (line: string) => lines.push(line) };
}

/** Resolves after `ms`: for tests that must show that something does NOT happen meanwhile. */
const idle = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

Deno.test("Presence keeps retrying, and says so once, when the directory URL is some other web server", async () => {
  await using other = notADirectory();
  const { lines, log } = logged();
  const presence = new Presence(new DirectoryClient(other.url), {
    state: () => state(6001, []),
    manifest: () => undefined,
    log,
    retryMs: 20,
  });
  try {
    await eventually(() => Promise.resolve(other.requests >= 3));
    assert.equal(presence.reachable, false);
  } finally {
    await presence.close();
  }
  assert.equal(lines.length, 1, lines.join("\n"));
  assert.match(lines[0], /^\[DIRECTORY\] .*did not answer JSON: is ".*" a directory\?; retrying/);
});

Deno.test("Presence survives an unexpected error, says so once, and registers once it passes", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const { lines, log } = logged();
  let failures = 3;
  const presence = new Presence(client, {
    state: () => {
      if (failures-- > 0) throw new TypeError("the store is not open yet");
      return state(6001, ["clip_0.bin"]);
    },
    manifest: () => undefined,
    log,
    retryMs: 20,
  });
  try {
    await eventually(async () => (await client.locate("clip_0.bin")).length === 1);
    assert.equal(presence.reachable, true);
  } finally {
    await presence.close();
  }
  assert.equal(lines.filter((line) => /not open yet/.test(line)).length, 1, lines.join("\n"));
  assert.match(lines[0], /^\[DIRECTORY\] Unexpected error: TypeError: the store is not open yet/);
});

/** A client whose calls are counted, and whose heartbeats can be held back. */
function counted(url: string) {
  const client = new DirectoryClient(url);
  const calls = { register: 0, heartbeat: 0, publish: 0 };
  let hold: Promise<void> | undefined;
  let started: (() => void) | undefined;
  const { register, heartbeat, publishFile } = client;
  client.register = (s, o) => (calls.register++, register.call(client, s, o));
  client.heartbeat = async (id, s) => {
    calls.heartbeat++;
    started?.();
    if (hold) await hold;
    return heartbeat.call(client, id, s);
  };
  client.publishFile = (m) => (calls.publish++, publishFile.call(client, m));
  return {
    client,
    calls,
    /** Holds the next heartbeats until the returned release is called; resolves once one is sent. */
    holdHeartbeats() {
      const gate = Promise.withResolvers<void>();
      const sent = Promise.withResolvers<void>();
      hold = gate.promise;
      started = () => sent.resolve();
      return {
        sent: sent.promise,
        release: () => {
          hold = undefined;
          started = undefined;
          gate.resolve();
        },
      };
    },
  };
}

for (const refusal of ["conflict", "full"] as const) {
  Deno.test(`Presence says once that the directory refused its file (${refusal}), heartbeats at ttl/3, and does not retry every second`, async () => {
    await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 3, maxFiles: 1 });
    // The directory already lists a file: ours split another way, or another that fills it.
    const other = refusal === "conflict" ? RESPLIT : manifestOf("other.webm");
    await new DirectoryClient(directory.url).publishFile(other);
    const { client, calls } = counted(directory.url);
    const { lines, log } = logged();
    const presence = new Presence(client, {
      state: () => state(6001, ["clip_0.bin"]),
      manifest: () => MANIFEST,
      log,
      retryMs: 50,
    });
    try {
      await eventually(() => Promise.resolve(calls.publish === 1));
      await idle(1_500); // 30 retries before the fix; one heartbeat (every ttl/3 = 1 s) after it
      assert.equal(presence.reachable, true);
      assert.equal(calls.register, 1);
      assert.ok(calls.heartbeat >= 1 && calls.heartbeat <= 2, `${calls.heartbeat} heartbeats`);
      assert.equal(calls.publish, 1, "published again within 1.5 s");
    } finally {
      await presence.close();
    }
    assert.equal(lines.length, 1, lines.join("\n"));
    const why = refusal === "conflict"
      ? "the same file \\(its id, the whole-file SHA-256\\) is published split another way"
      : "the directory lists as many files as it may";
    assert.match(lines[0], new RegExp(`^\\[DIRECTORY\\] Cannot publish "clip\\.webm": ${why}`));
  });
}

Deno.test("a peer refused as its file split another way is not listed as that file's holder", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(RESPLIT); // the file listed, split another way
  const { lines, log } = logged();
  const presence = new Presence(new DirectoryClient(directory.url), {
    state: () => state(6001, ["clip_0.bin"]),
    manifest: () => MANIFEST,
    log,
  });
  try {
    await eventually(() => Promise.resolve(lines.length === 1));
    await eventually(async () => {
      const peers = await client.listPeers();
      return peers.length === 1 && peers[0]!.fileId === undefined;
    });
    const file = await client.getFile(MANIFEST.sha256);
    assert.deepEqual(file.fragments.map((f) => f.holders.length), [0]);
    assert.deepEqual(await client.locate("clip_0.bin", { file: MANIFEST.sha256 }), []);
  } finally {
    await presence.close();
  }
});

Deno.test("Presence of a file that shares its name with another publishes it beside that one, as the holder of its own", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const other = "1".repeat(64);
  await client.publishFile({ ...MANIFEST, sha256: other }); // another clip.webm, first
  const { lines, log } = logged();
  const presence = new Presence(client, {
    state: () => state(6001, ["clip_0.bin"]),
    manifest: () => MANIFEST,
    log,
  });
  try {
    await eventually(async () =>
      (await client.getFile(MANIFEST.sha256).catch(() => undefined))?.fragments[0]
        .holderCount === 1
    );
    assert.deepEqual((await client.listFiles()).map((file) => [file.id, file.file]), [
      [other, "clip.webm"],
      [MANIFEST.sha256, "clip.webm"],
    ]);
    assert.deepEqual((await client.getFile(other)).fragments.map((f) => f.holderCount), [0, 0]);
    assert.deepEqual(await client.locate("clip_0.bin", { file: other }), []);
    assert.equal((await rejection(() => client.getFile("clip.webm"))).code, "AMBIGUOUS_FILE");
  } finally {
    await presence.close();
  }
  assert.equal(lines.filter((line) => /Cannot publish/.test(line)).length, 0, lines.join("\n"));
});

Deno.test("Presence publishes a refused file again later, once the directory has room", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1, maxFiles: 1 });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(manifestOf("other.webm")); // unbacked: gone within a ttl
  const { lines, log } = logged();
  const presence = new Presence(client, {
    state: () => state(6001, ["clip_0.bin"]),
    manifest: () => MANIFEST,
    log,
  });
  try {
    await eventually(async () =>
      (await client.listFiles()).map((file) => file.file).join() === "clip.webm"
    );
  } finally {
    await presence.close();
  }
  assert.match(lines[0], /^\[DIRECTORY\] Cannot publish "clip\.webm"/);
  assert.match(lines.at(-1)!, /^\[DIRECTORY\] Published "clip\.webm"$/);
});

Deno.test("Presence sends a change poked during a heartbeat in flight right after it", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 30 });
  const { client, calls, holdHeartbeats } = counted(directory.url);
  const fragments: string[] = [];
  const presence = new Presence(client, {
    state: () => state(6001, [...fragments]),
    manifest: () => undefined,
    log: () => {},
  });
  try {
    await eventually(async () => (await client.health()).peers === 1);
    fragments.push("clip_0.bin");
    const { sent, release } = holdHeartbeats();
    presence.poke(); // a heartbeat with clip_0.bin starts, and is held in flight
    await sent;
    fragments.push("clip_1.bin"); // stored while it is in flight
    presence.poke();
    release();
    // The next tick is ttl/3 = 10 s away: the change must not wait for it.
    await eventually(async () => (await client.locate("clip_1.bin")).length === 1, 3_000);
    assert.equal(calls.heartbeat, 2);
  } finally {
    await presence.close();
  }
});

Deno.test("Presence tells the directory the file of the manifest it publishes, so it is listed as its holder", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const presence = new Presence(client, {
    state: () => state(6001, ["clip_0.bin"]),
    manifest: () => MANIFEST,
    log: () => {},
  });
  try {
    await eventually(async () => (await client.listFiles()).length === 1);
    await eventually(async () =>
      (await client.getFile("clip.webm")).fragments[0].holderCount === 1
    );
    assert.deepEqual((await client.listPeers()).map((peer) => [peer.file, peer.fileId]), [
      ["clip.webm", MANIFEST.sha256],
    ]);
  } finally {
    await presence.close();
  }
});

// ---------------------------------------------------------------------------------------------
// Secrets, pages, and a presence that keeps its entry its own

Deno.test("DirectoryClient registers with a secret, heartbeats and leaves with it, and gets FORBIDDEN with another", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const me = await client.register(state(6001, ["clip_0.bin"]));
  assert.match(me.secret, /^[A-Za-z0-9_-]{43}$/);
  assert.equal(me.host, "127.0.0.1");
  const thief = { id: me.id, secret: newSecret() };
  const beat = await rejection(() => client.heartbeat(thief, state(6001, [])));
  assert.deepEqual([beat.status, beat.code], [403, "FORBIDDEN"]);
  const leave = await rejection(() => client.leave(thief));
  assert.deepEqual([leave.status, leave.code], [403, "FORBIDDEN"]);
  assert.deepEqual((await client.locate("clip_0.bin")).map((holder) => holder.id), [me.id]);
  // One the peer chose comes back as it is, and works the same.
  const secret = newSecret();
  const chosen = await client.register(state(6002, []), { secret });
  assert.equal(chosen.secret, secret);
  assert.equal((await client.heartbeat(chosen, state(6002, []))).recreated, false);
  await client.leave(chosen);
  await client.leave(me);
  assert.equal((await client.health()).peers, 0);
});

Deno.test("DirectoryClient listPeers() and listFragments() follow the pages to the end", async () => {
  await using directory = startDirectory({
    port: 0,
    hostname: "127.0.0.1",
    maxPeersPerAddress: 2_000,
  });
  const client = new DirectoryClient(directory.url);
  const names = Array.from({ length: 1_500 }, (_, i) => `f_${i}.bin`);
  await client.register(state(1, names));
  for (let i = 2; i <= 1_100; i++) await client.register(state(i, ["shared.bin"]));
  const peers = await client.listPeers();
  assert.equal(peers.length, 1_100);
  assert.equal(new Set(peers.map((peer) => peer.id)).size, 1_100);
  const fragments = await client.listFragments();
  assert.deepEqual(fragments.length, 1_501);
  assert.equal(fragments.at(-1)!.holders.length, 1_099);
  // The directory answered pages of 1,000 at most: more than one of each.
  const page = await (await fetch(`${directory.url}/peers?limit=1000`)).json();
  assert.equal(page.peers.length, 1_000);
});

Deno.test("Presence keeps its id across a directory restart: the new directory adopts it with its secret", async () => {
  const first = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1 });
  const { port, url } = first;
  const client = new DirectoryClient(url);
  const { lines, log } = logged();
  const presence = new Presence(client, {
    state: () => state(6001, []),
    manifest: () => undefined,
    log,
  });
  try {
    await eventually(async () => (await client.listPeers()).length === 1);
    const id = presence.id;
    await first.close();
    await using _again = startDirectory({ port, hostname: "127.0.0.1", ttl: 1 });
    await eventually(async () => (await client.listPeers()).length === 1);
    assert.deepEqual((await client.listPeers()).map((peer) => peer.id), [id]);
    assert.equal(presence.id, id);
  } finally {
    await presence.close();
    await first.close();
  }
  assert.equal(lines.filter((line) => /another owner|registering again/.test(line)).length, 0);
});

Deno.test("Presence registers afresh, saying so, when another owner took its id after a directory restart", async () => {
  const first = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 3 });
  const { port, url } = first;
  const client = new DirectoryClient(url);
  const { lines, log } = logged();
  const presence = new Presence(client, {
    state: () => state(6001, []),
    manifest: () => undefined,
    log,
  });
  try {
    await eventually(async () => (await client.listPeers()).length === 1);
    const id = presence.id!;
    await first.close();
    await using _again = startDirectory({ port, hostname: "127.0.0.1", ttl: 3 });
    // Someone who saw its id in GET /peers claims it first, before its next heartbeat.
    await client.heartbeat({ id, secret: newSecret() }, state(7777, []));
    await eventually(async () => (await client.listPeers()).length === 2);
    assert.notEqual(presence.id, id);
    const ports = (await client.listPeers()).map((peer) => [peer.id === id, peer.port]);
    assert.deepEqual(ports, [[true, 7777], [false, 6001]]);
  } finally {
    await presence.close();
    await first.close();
  }
  assert.equal(
    lines.filter((line) => /another owner's.*; registering again$/.test(line)).length,
    1,
    lines.join("\n"),
  );
});

Deno.test("Presence registers again with its own secret when the answer to its registration was lost, and is not refused as another owner", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  const register = client.register;
  let lost = 0;
  client.register = async (s, o) => {
    const registration = await register.call(client, s, o);
    if (lost++ > 0) return registration;
    throw new DirectoryError("no answer", 0, "TIMEOUT"); // it registered all the same
  };
  const { lines, log } = logged();
  const presence = new Presence(client, {
    state: () => state(6001, ["clip_0.bin"]),
    manifest: () => undefined,
    log,
    retryMs: 20,
  });
  try {
    await eventually(() => Promise.resolve(presence.reachable));
    const peers = await client.listPeers();
    assert.deepEqual(peers.map((peer) => peer.id), [presence.id]);
  } finally {
    await presence.close();
  }
  assert.equal(lost, 2);
  assert.equal(lines.filter((line) => /CONFLICT|another owner/.test(line)).length, 0, lines.join());
});

Deno.test("Presence says once that the directory lists it elsewhere than the host it advertised", async () => {
  // A ttl of 3 s: a heartbeat every second, so that three beats come well within the wait.
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 3 });
  const client = new DirectoryClient(directory.url);
  const { lines, log } = logged();
  let beats = 0;
  const presence = new Presence(client, {
    state: () => (beats++, { ...state(6001, []), host: "peer1.example" }),
    manifest: () => undefined,
    log,
    retryMs: 20,
  });
  try {
    await eventually(async () => (await client.listPeers()).length === 1);
    presence.poke();
    await eventually(() => Promise.resolve(beats >= 3));
    assert.deepEqual((await client.listPeers()).map((peer) => peer.host), ["127.0.0.1"]);
  } finally {
    await presence.close();
  }
  assert.deepEqual(lines, [
    '[DIRECTORY] Listed at "127.0.0.1", not at the advertised "peer1.example": the directory ' +
    "takes the address a peer registers from, unless started with --trust-advertise",
  ]);
});

/**
 * A "directory" on a raw socket that answers every request with 200 and a JSON body that never
 * ends (or, with `declare`, says it is 1 GiB long), counting the bytes it got out.
 */
function endlessDirectory({ declare = false } = {}) {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const conns = new Set<Deno.Conn>();
  const handlers = new Set<Promise<void>>();
  let sent = 0;
  const serving = (async () => {
    for await (const conn of listener) {
      conns.add(conn);
      const handler = (async () => {
        await conn.read(new Uint8Array(64 * 1024)); // the request: its contents do not matter
        const length = declare ? `content-length: ${1024 ** 3}\r\n` : "";
        await conn.write(
          new TextEncoder().encode(
            `HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n${length}connection: close\r\n\r\n[`,
          ),
        );
        const filler = new TextEncoder().encode("0,".repeat(32 * 1024));
        while (true) sent += await conn.write(filler);
      })().catch(() => {}).finally(() => {
        conns.delete(conn);
        try {
          conn.close();
        } catch { /* closed */ }
      });
      handlers.add(handler);
    }
  })().catch(() => {});
  return {
    url: `http://127.0.0.1:${(listener.addr as Deno.NetAddr).port}`,
    get sent() {
      return sent;
    },
    async [Symbol.asyncDispose]() {
      listener.close();
      for (const conn of conns) {
        try {
          conn.close();
        } catch { /* closed */ }
      }
      await serving;
      await Promise.all(handlers);
    },
  };
}

for (const declare of [false, true]) {
  Deno.test(`DirectoryClient stops reading an answer past 8 MiB ${declare ? "that says it is 1 GiB" : "that never ends"}, with a BAD_RESPONSE error`, async () => {
    await using hostile = endlessDirectory({ declare });
    const client = new DirectoryClient(hostile.url, { timeoutMs: 10_000 });
    const start = performance.now();
    const error = await rejection(() => client.listFiles());
    assert.deepEqual([error.status, error.code], [200, "BAD_RESPONSE"]);
    assert.equal(
      error.message,
      `GET /files answered more than 8 MiB: is "${hostile.url}" a directory?`,
    );
    assert.ok(performance.now() - start < 5_000, "well before the call's timeout");
    // What it got out is the cap and what socket buffers hold, not the endless rest.
    await idle(100);
    assert.ok(hostile.sent < 32 * 1024 ** 2, `the directory wrote ${hostile.sent} bytes`);
  });
}

Deno.test("DirectoryClient reads an answer up to its maxResponseBytes", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const health = await new DirectoryClient(directory.url, { maxResponseBytes: 1000 }).health();
  assert.ok(health);
  const error = await rejection(() =>
    new DirectoryClient(directory.url, { maxResponseBytes: 10 }).health()
  );
  assert.equal(error.code, "BAD_RESPONSE");
  assert.match(error.message, /^GET \/health answered more than 10 bytes: is ".*" a directory\?$/);
});

/** A fake directory that answers registrations and heartbeats with `ttl` (absent: none). */
function directoryAnswering(ttl: unknown) {
  let requests = 0;
  const server = Deno.serve({ hostname: "127.0.0.1", port: 0, onListen: () => {} }, (request) => {
    requests++;
    if (request.method === "DELETE") return new Response(null, { status: 204 });
    const body = { id: "p1", secret: "s".repeat(32), host: "127.0.0.1", recreated: false };
    return Response.json(ttl === undefined ? body : { ...body, ttl });
  });
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    get requests() {
      return requests;
    },
    [Symbol.asyncDispose]: () => server.shutdown(),
  };
}

Deno.test("Presence heartbeats every third of a second, not in a busy loop, for a ttl of 0", async () => {
  await using directory = directoryAnswering(0);
  const presence = new Presence(new DirectoryClient(directory.url), {
    state: () => state(6001, []),
    manifest: () => undefined,
    log: () => {},
  });
  try {
    await idle(1_200);
  } finally {
    await presence.close();
  }
  // The registration and a heartbeat every 333 ms (the ttl taken as 1 s), and the leave.
  assert.ok(directory.requests >= 4 && directory.requests <= 8, `${directory.requests} requests`);
});

for (const [what, ttl] of [["missing", undefined], ["absurd", 1e12], ["not a number", "x"]]) {
  Deno.test(`Presence does not heartbeat at once for a ttl that is ${what}`, async () => {
    await using directory = directoryAnswering(ttl);
    const presence = new Presence(new DirectoryClient(directory.url), {
      state: () => state(6001, []),
      manifest: () => undefined,
      log: () => {},
    });
    try {
      await idle(500);
      assert.equal(directory.requests, 1); // the registration alone
    } finally {
      await presence.close();
    }
  });
}

Deno.test("clampTtl() takes a directory's ttl between 1 s and a day, 30 s when missing", () => {
  assert.deepEqual(
    [undefined, null, "30", NaN, 0, -5, 0.5, 1, 30, 86_400, 1e12, Infinity].map(clampTtl),
    [30, 30, 30, 30, 1, 1, 1, 1, 30, 86_400, 86_400, 86_400],
  );
});

Deno.test("Presence logs what a directory says with its control characters escaped", async () => {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    () =>
      Response.json(
        { error: { code: "BAD_REQUEST", message: "no\x1b[2J\x1b]0;pwned\x07" } },
        { status: 400 },
      ),
  );
  await using _server = { [Symbol.asyncDispose]: () => server.shutdown() };
  const { lines, log } = logged();
  const presence = new Presence(new DirectoryClient(`http://127.0.0.1:${server.addr.port}`), {
    state: () => state(6001, []),
    manifest: () => undefined,
    log,
    retryMs: 20,
  });
  try {
    await eventually(() => Promise.resolve(lines.length > 0));
  } finally {
    await presence.close();
  }
  assert.equal(
    lines[0],
    "[DIRECTORY] POST /peers failed: no\\x1b[2J\\x1b]0;pwned\\x07; retrying",
  );
});
