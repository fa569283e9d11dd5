/**
 * `deno task directory` as a real child process with the task's own flags: the listening line,
 * signals, flag mistakes, and real expiry with a short ttl.
 * @module
 */
import assert from "node:assert/strict";
import { DirectoryClient } from "../directory.ts";
import type { Manifest } from "../split.ts";
import { runTask, startTask } from "./_util.ts";
import { startRedisServer } from "./_redis_server.ts";

const LISTENING =
  /\[DIRECTORY\] Listening on (http:\/\/\S+) \(Swagger UI: (http:\/\/\S+\/apidocs)\), (state .*)/;

/** Polls `check` until it returns true, or fails after `timeoutMs`. */
async function eventually(check: () => Promise<boolean>, timeoutMs = 10_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Condition not met within ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

for (const signal of ["SIGTERM", "SIGINT"] as const) {
  Deno.test(`deno task directory prints its address and Swagger UI, and stops cleanly on ${signal}`, async () => {
    await using child = startTask("directory", ["--port", "0"]);
    const [, url, docs, state] = await child.waitFor(LISTENING, { stream: "stdout" });
    assert.doesNotMatch(url, /:0$/);
    assert.equal(docs, `${url}/apidocs`);
    assert.equal(state, "state in memory");
    const page = await (await fetch(docs)).text();
    const script = page.match(/src="([^"]+\.js)"/)?.[1];
    assert.ok(script, page);
    const bundle = await fetch(new URL(script, url)); // served under the task's narrow permissions
    assert.equal(bundle.status, 200);
    assert.match(await bundle.text(), /SwaggerUIBundle/);
    assert.equal((await new DirectoryClient(url).health()).status, "ok");
    child.kill(signal);
    const { code } = await child.status();
    assert.equal(code, 0, child.stderr);
    assert.equal(child.stdout.trim().split("\n").length, 1, "one listening line, nothing more");
    assert.equal(child.stderr, "");
  });
}

Deno.test("deno task directory --store redis:// says where its state is, without the password", async () => {
  await using redis = await startRedisServer();
  const store = `redis://:secret@127.0.0.1:${redis.port}/2`;
  await using child = startTask("directory", ["--port", "0", "--store", store]);
  const [, , , state] = await child.waitFor(LISTENING, { stream: "stdout" });
  assert.equal(state, `state in Redis at "redis://127.0.0.1:${redis.port}/2"`);
  assert.doesNotMatch(child.stdout + child.stderr, /secret/);
});

Deno.test("deno task directory --help prints the usage and exits 0", async () => {
  const { code, stdout, stderr } = await runTask("directory", ["--help"]);
  assert.equal(code, 0);
  assert.match(stdout, /^Usage: deno task directory \[--port 5000\] \[--ttl 30\]/);
  assert.equal(stderr, "");
});

Deno.test("deno task directory refuses bad flags with one line and a non-zero exit", async () => {
  const cases: [string[], RegExp][] = [
    [["--port", "abc"], /^error: Invalid --port "abc": expected a number from 0 to 65535$/],
    [["--port", "70000"], /^error: Invalid --port "70000"/],
    [["--ttl", "0"], /^error: Invalid --ttl "0": expected 1 to 86400 seconds \(a day\)$/],
    [["--ttl", "0.5"], /^error: Invalid --ttl "0.5": expected 1 to 86400 seconds \(a day\)$/],
    [
      ["--ttl", "86401"],
      /^error: Invalid --ttl "86401": expected 1 to 86400 seconds \(a day\)$/,
    ],
    [["--ttl", "Infinity"], /^error: Invalid --ttl "Infinity": expected 1 to 86400 seconds/],
    [["--bogus"], /^error: Unknown option '--bogus'/],
    [["extra"], /^error: Unexpected argument 'extra'/],
  ];
  const results = await Promise.all(cases.map(([args]) => runTask("directory", args)));
  results.forEach(({ code, stdout, stderr }, i) => {
    assert.notEqual(code, 0);
    assert.equal(stdout, "");
    assert.match(stderr.trimEnd(), cases[i][1]);
    assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  });
});

Deno.test("deno task directory says so in one line when its port is taken", async () => {
  using taken = Deno.listen({ hostname: "0.0.0.0", port: 0 });
  const port = String(taken.addr.port);
  const { code, stderr } = await runTask("directory", ["--port", port]);
  assert.notEqual(code, 0);
  assert.equal(
    stderr.trimEnd(),
    `error: Port ${port} is already in use (the directory's port): choose another with --port or stop what holds it`,
  );
});

Deno.test("deno task directory says so in one line when --hostname is not an address of this machine", async () => {
  const cases: [string, RegExp][] = [
    ["10.9.9.9", /^error: Cannot listen on "10\.9\.9\.9": it is not an address of this machine$/],
    [
      "nosuchhost.invalid",
      /^error: Cannot listen on "nosuchhost\.invalid": the name does not resolve \(.+\)$/,
    ],
  ];
  const results = await Promise.all(
    cases.map(([hostname]) => runTask("directory", ["--port", "0", "--hostname", hostname])),
  );
  results.forEach(({ code, stdout, stderr }, i) => {
    assert.equal(code, 1, stderr);
    assert.equal(stdout, "");
    assert.match(stderr.trimEnd(), cases[i][1]);
  });
});

Deno.test("deno task directory --ttl 86400 takes the longest ttl there is", async () => {
  await using child = startTask("directory", ["--port", "0", "--ttl", "86400"]);
  const [, url] = await child.waitFor(LISTENING, { stream: "stdout" });
  const { ttl } = await new DirectoryClient(url).register({
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
    fragments: [],
  });
  assert.equal(ttl, 86400);
});

Deno.test("deno task directory --ttl 1 forgets a peer that stops heartbeating, then its file", async () => {
  await using child = startTask("directory", ["--port", "0", "--ttl", "1"]);
  const [, url] = await child.waitFor(LISTENING, { stream: "stdout" });
  const client = new DirectoryClient(url);
  const registered = Date.now();
  const { ttl } = await client.register({
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
    fragments: ["x.bin"],
    fileId: MANIFEST.sha256,
    file: "x.webm",
  });
  await client.publishFile(MANIFEST);
  assert.equal(ttl, 1);
  assert.equal((await client.locate("x.bin")).length, 1);
  await eventually(async () => (await client.locate("x.bin")).length === 0);
  assert.ok(Date.now() - registered >= 900, "expired before its ttl");
  assert.equal((await client.listFiles()).length, 1, "the file went with its last holder");
  await eventually(async () => (await client.listFiles()).length === 0);
  assert.ok(Date.now() - registered >= 1_900, "the file went before one ttl without a holder");
  assert.deepEqual(await client.health(), { status: "ok", peers: 0, fragments: 0, files: 0 });
});

const MANIFEST: Manifest = {
  version: 1,
  file: "x.webm",
  mime: "video/webm",
  size: 1,
  sha256: "0".repeat(64),
  fragments: [{ index: 0, name: "x.bin", offset: 0, size: 1, sha256: "0".repeat(64) }],
};

Deno.test("deno task directory --help lists --trust-advertise and every limit with its default", async () => {
  const { code, stdout } = await runTask("directory", ["--help"]);
  assert.equal(code, 0);
  for (
    const line of [
      /--trust-advertise {2}list a peer at the host it names/,
      /--max-peers N .*\(default 100000\)/,
      /--max-peers-per-address N\s.*\(default 100\)/,
      /--max-indexed-fragments N\s.*\(default 500000\)/,
      /--max-connections N .*\(default 1024\)/,
      /--max-connections-per-address N\s.*\(default 64\)/,
      /--header-timeout SECONDS\s[^-]*\(default 30\)/,
      /--body-timeout SECONDS [^-]*\(default 10\)/,
      /--min-body-rate RATE .*\(default 16384\)/,
      /--max-body-memory BYTES\s[^-]*\(default 67108864\)/,
    ]
  ) {
    assert.match(stdout, line);
  }
});

Deno.test("deno task directory refuses a limit that is not a whole number of at least 1, in one line", async () => {
  const cases: [string[], RegExp][] = [
    [
      ["--max-peers", "0"],
      /^error: Invalid --max-peers "0": expected a whole number of at least 1$/,
    ],
    [["--max-peers-per-address", "1.5"], /^error: Invalid --max-peers-per-address "1\.5"/],
    [["--max-connections", "many"], /^error: Invalid --max-connections "many"/],
    [["--header-timeout", "soon"], /^error: Invalid --header-timeout "soon"/],
    [["--max-indexed-fragments", "1e6"], /^error: Invalid --max-indexed-fragments "1e6"/],
    [
      ["--min-body-rate", "fast"],
      /^error: Invalid --min-body-rate "fast": expected e\.g\. 16KiB\/s/,
    ],
    [["--trust-advertise=yes"], /^error: Option '--trust-advertise' does not take an argument/],
  ];
  const results = await Promise.all(cases.map(([args]) => runTask("directory", args)));
  results.forEach(({ code, stdout, stderr }, i) => {
    assert.notEqual(code, 0);
    assert.equal(stdout, "");
    assert.match(stderr.trimEnd(), cases[i][1]);
    assert.equal(stderr.trimEnd().split("\n").length, 1, stderr);
  });
});

Deno.test("deno task directory lists a peer where it registers from, and at the host it names with --trust-advertise", async () => {
  for (
    const [flags, host] of [[[], "127.0.0.1"], [["--trust-advertise"], "peer1.example"]] as const
  ) {
    await using child = startTask("directory", [
      "--port",
      "0",
      "--hostname",
      "127.0.0.1",
      ...flags,
    ]);
    const [, url] = await child.waitFor(LISTENING, { stream: "stdout" });
    const client = new DirectoryClient(url);
    const state = {
      host: "peer1.example",
      port: 6001,
      grpcPort: 0,
      httpPort: 0,
      fragments: ["x.bin"],
    };
    assert.equal((await client.register(state)).host, host);
    assert.deepEqual((await client.locate("x.bin")).map((holder) => holder.host), [host]);
  }
});

Deno.test("deno task directory --header-timeout closes a connection that sends no request, and --max-connections-per-address makes room", async () => {
  const args = ["--header-timeout", "1", "--max-connections-per-address", "2"];
  await using child = startTask("directory", ["--port", "0", "--hostname", "127.0.0.1", ...args]);
  const [, url] = await child.waitFor(LISTENING, { stream: "stdout" });
  const port = Number(new URL(url).port);
  const silent = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const started = Date.now();
    // The server closes it: the read ends (or fails), well before the guard below.
    const guard = setTimeout(() => silent.close(), 10_000);
    const read = await silent.read(new Uint8Array(16)).catch(() => null);
    clearTimeout(guard);
    assert.equal(read, null);
    const took = Date.now() - started;
    assert.ok(took >= 900 && took < 5_000, `closed after ${took} ms`);
  } finally {
    try {
      silent.close();
    } catch {
      // closed by the server
    }
  }
  // Two idle connections from this address, then a third client: it is answered.
  const idle = await Promise.all([1, 2].map(() => Deno.connect({ hostname: "127.0.0.1", port })));
  try {
    assert.equal((await new DirectoryClient(url).health()).status, "ok");
  } finally {
    for (const conn of idle) conn.close();
  }
});
