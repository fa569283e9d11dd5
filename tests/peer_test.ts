/**
 * peer.ts end to end: peers as child processes, exactly as `deno task peer` runs them, with a
 * real directory and broker.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { connect, startBroker } from "../broker.ts";
import { DirectoryClient, startDirectory } from "../directory.ts";
import { SAMPLE_VIDEO, splitFile } from "../split.ts";
import { type Child, peerArgs, ROOT, runTask, startTask, tempDir } from "./_util.ts";

/** Polls `check` until it returns true, or fails after `timeoutMs`. */
async function eventually(what: string, check: () => Promise<boolean>, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!(await check().catch(() => false))) {
    assert(Date.now() < deadline, `Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Starts a peer on a free port and returns it with that port. */
async function startPeerTask(args: string[], options: { stdin?: boolean } = {}) {
  const child = startTask("peer", ["0", ...args, "--grpc-port", "0", "--http-port", "0"], options);
  const port = Number((await child.waitFor(/Node listening on port (\d+)/))[1]);
  return { child, port };
}

/** Splits the sample into the store `fragments/seed` under `dir` and seeds it, with no console. */
async function startSeedTask(dir: string, args: string[]) {
  await splitFile(SAMPLE_VIDEO, { out: join(dir, "fragments"), peers: ["seed"] });
  return await startPeerTask([...args, "--dir", join(dir, "fragments", "seed"), "--no-console"]);
}

async function stopped(child: Child): Promise<number> {
  return (await child.status()).code;
}

Deno.test("two peers fetch from each other at the console, announce it, and leave the directory", async () => {
  await using dir = await tempDir();
  const manifest = await splitFile(SAMPLE_VIDEO, {
    out: join(dir.path, "fragments"),
    peers: ["a", "b"],
  });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 3 });
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  await using listener = await connect(`127.0.0.1:${broker.port}`);
  const announcements = (await listener.subscribe("fragmentos"))[Symbol.asyncIterator]();
  const common = ["--directory", directory.url, "--broker", `127.0.0.1:${broker.port}`];

  const b = await startPeerTask([
    ...common,
    "--dir",
    join(dir.path, "fragments", "b"),
    "--no-console",
  ]);
  await using _b = b.child;
  const a = await startPeerTask(
    [`127.0.0.1:${b.port}`, ...common, "--dir", join(dir.path, "fragments", "a")],
    { stdin: true },
  );
  await using _a = a.child;
  await a.child.waitFor(/Fragment to request \(or 'exit'\): $/, { stream: "stdout" });

  await a.child.write("fragment_1.bin\n");
  await a.child.waitFor(
    new RegExp(`\\[✓\\] Fragment 'fragment_1\\.bin' received from 127\\.0\\.0\\.1:${b.port}`),
  );
  await b.child.waitFor(/\[\+\] Connected from 127\.0\.0\.1:\d+/);
  await b.child.waitFor(/\[✓\] Fragment 'fragment_1\.bin' sent to 127\.0\.0\.1:\d+/);
  assertEquals(
    (await announcements.next()).value?.message,
    // The file's name, for a plain subscriber to read, then its id (its SHA-256).
    `fragment_1.bin localhost:${a.port} sample.webm ${manifest.sha256}`,
  );

  const client = new DirectoryClient(directory.url);
  await eventually(
    "the directory knows both holders",
    async () => (await client.locate("fragment_1.bin")).length === 2,
  );
  assertEquals(
    await Deno.readFile(join(dir.path, "fragments", "a", "fragment_1.bin")),
    await Deno.readFile(join(dir.path, "fragments", "b", "fragment_1.bin")),
  );

  // The same over gRPC, from B's supervised gRPC server.
  const bGrpc = Number((await b.child.waitFor(/\[gRPC\] Listening on port (\d+)/))[1]);
  await a.child.write("grpc fragment_3.bin\n");
  await a.child.waitFor(
    new RegExp(`Fragment 'fragment_3\\.bin' received from 127\\.0\\.0\\.1:${bGrpc}`),
  );

  await a.child.write("list\npeers\nhelp\nfragment_1.bin\n../secret\nfragment_99.bin\nexit\n");
  assertEquals(await stopped(a.child), 0);
  // From a pipe it reads as a transcript: each answer below its prompt's line, one prompt after.
  const prompt = "Fragment to request (or 'exit'): ";
  assert(!a.child.stdout.includes(prompt + prompt), JSON.stringify(a.child.stdout));
  assert(
    a.child.stdout.includes(`${prompt}\n[✓] Fragment 'fragment_1.bin' received`),
    JSON.stringify(a.child.stdout),
  );
  assertMatch(a.child.stdout, /fragment_1\.bin {2}244095 bytes/);
  assertMatch(a.child.stdout, new RegExp(`neighbour 127\\.0\\.0\\.1:${b.port}`));
  assertMatch(a.child.stdout, /grpc <fragment name>/);
  assertMatch(a.child.stdout, /\[=\] Fragment 'fragment_1\.bin' is already here/);
  assertMatch(a.child.stderr, /\[x\] Invalid fragment name "\.\.\/secret"/);
  assertMatch(
    a.child.stderr,
    /\[x\] "fragment_99\.bin" is not a fragment of sample\.webm \(fragment_0\.bin to fragment_9\.bin\)/,
  );
  // It left the directory on exit; B leaves on SIGTERM.
  assertEquals((await client.listPeers()).map((p) => p.port), [b.port]);
  b.child.kill("SIGTERM");
  assertEquals(await stopped(b.child), 0);
  assertEquals(await client.listPeers(), []);
});

Deno.test("a peer fetches from a holder only the directory knows", async () => {
  await using dir = await tempDir();
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const common = ["--directory", directory.url, "--broker", "127.0.0.1:1"];
  const seed = await startSeedTask(dir.path, common);
  await using _seed = seed.child;
  const client = new DirectoryClient(directory.url);
  await eventually(
    "the seeder registered",
    async () => (await client.locate("fragment_3.bin")).length === 1,
  );

  const viewer = await startPeerTask([...common, "--dir", join(dir.path, "viewer")], {
    stdin: true,
  });
  await using _viewer = viewer.child;
  await viewer.child.write("fragment_3.bin\n");
  await viewer.child.waitFor(
    new RegExp(`Fragment 'fragment_3\\.bin' received from 127\\.0\\.0\\.1:${seed.port}`),
  );
  // Without a broker it said so once, and worked all the same.
  assertEquals(viewer.child.stdout.match(/\[BROKER\]/g)?.length, 1);
});

Deno.test("a peer started before the directory registers when it appears, and again after a restart", async () => {
  await using dir = await tempDir();
  const first = startDirectory({ port: 0, hostname: "127.0.0.1", ttl: 1 });
  const { port, url } = first;
  await first.close(); // nothing listens there now

  const peer = await startPeerTask([
    "--directory",
    url,
    "--broker",
    "127.0.0.1:1",
    "--dir",
    dir.path,
    "--no-console",
  ]);
  await using _peer = peer.child;
  await peer.child.waitFor(/\[DIRECTORY\] Cannot reach directory at "http:\/\/127\.0\.0\.1:\d+"/);

  const client = new DirectoryClient(url);
  {
    await using _directory = startDirectory({ port, hostname: "127.0.0.1", ttl: 1 });
    await eventually(
      "the peer registered",
      async () => (await client.listPeers()).length === 1,
      5_000,
    );
  }
  // A restarted directory knows nothing; heartbeats (every ttl/3) bring the peer back within a ttl.
  await using _again = startDirectory({ port, hostname: "127.0.0.1", ttl: 1 });
  await eventually("the peer is back", async () => (await client.listPeers()).length === 1, 2_000);
  assertEquals(peer.child.stdout.match(/Cannot reach directory/g)?.length, 1);
});

Deno.test("peer CLI refuses bad command lines with one line and exit 1", async () => {
  await using dir = await tempDir();
  const store = join(dir.path, "store"); // never made: the mistakes are found before
  const cases: [string[], RegExp][] = [
    [[], /^error: Missing the TCP port/],
    [["600001"], /^error: Invalid port "600001": expected a number from 0 to 65535\n$/],
    [["0", "nohost"], /^error: Invalid neighbour "nohost": expected host:port/],
    [["0", "--max-upload", "fast"], /^error: Invalid rate "fast"/],
    [["0", "--bogus"], /^error: Unknown option '--bogus'/],
    [["0", "--exit-when-done"], /^error: --exit-when-done goes with --fetch-all/],
    [["0", "--directory", "notaurl"], /^error: Invalid directory "notaurl": expected an http/],
    [["0", "--directory", "ftp://x"], /^error: Invalid directory "ftp:\/\/x"/],
    [["0", "--broker", "nope"], /^error: Invalid broker "nope": expected host:port/],
    [["0", "--advertise", "bad host!"], /^error: Invalid --advertise "bad host!"/],
    [["0", "--dir", "README.md"], /^error: The store "README.md" is a file, not a folder/],
    [
      ["30000", "--dir", store],
      /^error: The gRPC port 74050 \(30000 \+ 44050\) would be past 65535: choose it with --grpc-port$/m,
    ],
    [
      ["64000", "--dir", store],
      /^error: The gRPC port 108050 .* and the HTTP port 66000 \(64000 \+ 2000\) would be past 65535: choose them with --grpc-port and --http-port$/m,
    ],
  ];
  for (const [args, pattern] of cases) {
    const { code, stdout, stderr } = await runTask("peer", args);
    assertEquals(code, 1, `${args.join(" ")}: ${stderr}`);
    assertMatch(stderr, pattern);
    assertEquals(stderr.trim().split("\n").length, 1, stderr);
    assertEquals(stdout, "", "nothing claims to listen");
  }
  const help = await runTask("peer", ["--help"]);
  assertEquals(help.code, 0);
  assertMatch(help.stdout, /--max-upload RATE/);
});

Deno.test("peer.ts and peer_grpc.ts run without their permissions say so in one line", async () => {
  // A bare -P loads a "default" permission set, which deno.json does not have: no permissions.
  for (const [script, task] of [["peer.ts", "peer"], ["peer_grpc.ts", "grpc"]]) {
    const { code, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-q", "-P", "--config", `${ROOT}deno.json`, `${ROOT}${script}`, "0"],
      stdin: "null",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(stderr);
    assertEquals(code, 1, text);
    // peer.ts reads no variable it was not granted (it has defaults), so its store comes first.
    const wanted = script === "peer.ts" ? `\\w+ access to "[^"]+"` : `env access to "GRPC_[A-Z_]+"`;
    assertMatch(
      text,
      new RegExp(
        `^error: Requires ${wanted}(, run again with the --allow-\\w+ flag)?; \`deno task ${task} 0\``,
      ),
    );
    assertEquals(text.trim().split("\n").length, 1, text);
  }
});

Deno.test("peer CLI says which port is taken", async () => {
  await using dir = await tempDir();
  using taken = Deno.listen({ port: 0 });
  const port = String((taken.addr as Deno.NetAddr).port);
  // Its gRPC and HTTP ports given: port + 44050 is past 65535 for an ephemeral port.
  const { code, stderr } = await runTask("peer", [
    port,
    "--grpc-port",
    "0",
    "--http-port",
    "0",
    "--dir",
    dir.path,
    "--no-console",
  ]);
  assertEquals(code, 1);
  assertMatch(
    stderr,
    new RegExp(`^error: Port ${port} is already in use \\(the peer's TCP port\\)`),
  );
  // The player's port, not the TCP one, when that is the one taken.
  const http = await runTask("peer", [
    "0",
    "--grpc-port",
    "0",
    "--http-port",
    port,
    "--dir",
    dir.path,
    "--no-console",
  ]);
  assertEquals(http.code, 1);
  assertMatch(http.stderr, new RegExp(`error: Port ${port} is already in use \\(the peer's HTTP`));
  assertEquals(http.stderr.match(/error:/g)?.length, 1, http.stderr);
  assert(!/listening|Watch at/i.test(http.stdout), `nothing claims to listen: ${http.stdout}`);
  const nowhere = await runTask("peer", ["0", "--hostname", "192.0.2.1", "--dir", dir.path]);
  assertEquals(nowhere.code, 1);
  assertMatch(nowhere.stderr, /^error: Cannot listen on "192\.0\.2\.1": it is not an address of/);
});

Deno.test("Ctrl-C during --fetch-all leaves the directory", async () => {
  await using dir = await tempDir();
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const common = ["--directory", directory.url, "--broker", "127.0.0.1:1"];
  // 20 KB/s: the fetch-all takes minutes, so it is surely still going when interrupted.
  const seed = await startSeedTask(dir.path, [...common, "--max-upload", "20KB/s"]);
  await using _seed = seed.child;
  const client = new DirectoryClient(directory.url);
  await eventually("the seeder registered", async () => (await client.listPeers()).length === 1);
  const viewer = await startPeerTask([...common, "--dir", join(dir.path, "v"), "--fetch-all"]);
  await using _viewer = viewer.child;
  await eventually("the viewer registered", async () => (await client.listPeers()).length === 2);
  viewer.child.kill("SIGINT");
  assertEquals(await stopped(viewer.child), 130);
  assertEquals((await client.listPeers()).map((p) => p.port), [seed.port]);
});

Deno.test("a peer announces what it fetched while the broker was down once the broker is back", async () => {
  await using dir = await tempDir();
  await splitFile(SAMPLE_VIDEO, { out: join(dir.path, "fragments"), peers: ["seed"] });
  // The broker's port, free for now: the viewer starts while nothing listens there.
  const placeholder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const brokerPort = (placeholder.addr as Deno.NetAddr).port;
  placeholder.close();
  const seed = await startPeerTask([
    "--directory",
    "http://127.0.0.1:1",
    "--broker",
    "127.0.0.1:1",
    "--dir",
    join(dir.path, "fragments", "seed"),
    "--no-console",
  ]);
  await using _seed = seed.child;
  const viewer = await startPeerTask([
    `127.0.0.1:${seed.port}`,
    "--directory",
    "http://127.0.0.1:1",
    "--broker",
    `127.0.0.1:${brokerPort}`,
    "--dir",
    join(dir.path, "viewer"),
  ], { stdin: true });
  await using _viewer = viewer.child;
  await viewer.child.waitFor(/\[BROKER\] Cannot connect to broker/);
  await viewer.child.write("fragment_3.bin\n");
  await viewer.child.waitFor(/Fragment 'fragment_3\.bin' received from/);

  // What the viewer sends once a broker listens again, read off the wire: its subscription to
  // the HAVE announcements, then the announcement it held, before anything else it publishes.
  using broker = Deno.listen({ hostname: "127.0.0.1", port: brokerPort });
  using conn = await broker.accept();
  let received = "";
  const buffer = new Uint8Array(4096);
  const deadline = Date.now() + 10_000;
  while (!received.includes("PING\n")) {
    assert(Date.now() < deadline, `No PING after the held lines: ${JSON.stringify(received)}`);
    const n = await conn.read(buffer);
    if (n === null) break;
    received += new TextDecoder().decode(buffer.subarray(0, n));
  }
  assertEquals(
    received,
    `SUB:fragmentos\nPUB:fragmentos:fragment_3.bin localhost:${viewer.port}\nPING\n`,
  );

  // A fragment deleted behind the peer's back is fetched again, not "already here".
  await Deno.remove(join(dir.path, "viewer", "fragment_3.bin"));
  await viewer.child.write("fragment_3.bin\nexit\n");
  assertEquals(await stopped(viewer.child), 0);
  assertEquals(viewer.child.stdout.match(/Fragment 'fragment_3\.bin' received from/g)?.length, 2);
});

Deno.test("the console takes a bare 'grpc' or 'tcp' for a command missing its name", async () => {
  await using dir = await tempDir();
  const { code, stdout, stderr } = await runTask(
    "peer",
    ["0", ...peerArgs(dir.path, "http://127.0.0.1:9")],
    { input: "grpc\ntcp\nexit\n" },
  );
  assertEquals(code, 0, stderr);
  assertMatch(stdout, /Give one fragment name: grpc <fragment name>\n/);
  assertMatch(stdout, /Give one fragment name: tcp <fragment name>\n/);
  assert(!/\[x\]/.test(stderr), stderr);
});

Deno.test("a running peer offers what its folder holds: fragments removed or copied in behind its back", async () => {
  await using dir = await tempDir();
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const seed = await startSeedTask(dir.path, [
    "--directory",
    directory.url,
    "--broker",
    "127.0.0.1:1",
  ]);
  await using _seed = seed.child;
  const client = new DirectoryClient(directory.url);
  const held = async () => (await client.listPeers())[0]?.fragments.length ?? 0;
  await eventually("the seed is listed with 10 fragments", async () => await held() === 10);
  const store = join(dir.path, "fragments", "seed");
  const kept = await Deno.readFile(join(store, "fragment_0.bin"));
  await Deno.remove(join(store, "fragment_0.bin"));
  await Deno.remove(join(store, "fragment_1.bin"));
  await eventually("the directory hears two are gone", async () => await held() === 8);
  await seed.child.waitFor(
    /\[STORE\] Gone from \S+, no longer offered: fragment_0\.bin, fragment_1\.bin/,
  );
  // One copied back is offered again once it verifies; a corrupt one never is.
  await Deno.writeFile(join(store, "fragment_1.bin"), new Uint8Array(kept.length));
  await Deno.writeFile(join(store, "fragment_0.bin"), kept);
  await eventually("the directory hears one is back", async () => await held() === 9);
  await seed.child.waitFor(/\[STORE\] New in \S+, verified and offered: fragment_0\.bin\n/);
  await seed.child.waitFor(/\[!\] Corrupt in \S+, not offered: fragment_1\.bin\n/);
  await new Promise((resolve) => setTimeout(resolve, 2_500)); // another look at the folder
  assertEquals(await held(), 9);
});
