/**
 * What a new user meets first, from the README and the design card's own command lines: the
 * hints a peer gives when its store is empty or its directory is not one, ports held only by a
 * recent connection, and a quiet stop.
 * @module
 */
import { join } from "node:path";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { peerArgs, ROOT, startTask, tempDir } from "./_util.ts";
import { startBroker } from "../broker.ts";
import { DirectoryClient } from "../directory.ts";
import { startScene } from "./_player_source.ts";

Deno.test("a --directory that answers but not in HTTP gets the hint, not a raw client error", async () => {
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(`http://127.0.0.1:${broker.port}`);
  const error = await client.listFiles().then(() => undefined, (error) => error);
  assert(error instanceof Error, "listing files at a broker fails");
  assertMatch(error.message, /it answered, but not in HTTP: is it a directory\?/);
  assert(!/SendRequest|hyper|client error/.test(error.message), error.message);
});

Deno.test("a --directory that is a peer's player gets the hint too, though it answers in JSON", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const client = new DirectoryClient(scene.url);
  const error = await client.register({ port: 6001, grpcPort: 7001, httpPort: 8001, fragments: [] })
    .then(
      () => undefined,
      (error) => error,
    );
  assert(error instanceof Error, "registering at a player fails");
  assertMatch(
    error.message,
    /GET, HEAD only, not POST: is "http:\/\/127\.0\.0\.1:\d+" a directory\?$/,
  );
});

Deno.test("a peer pointed at a broker as its directory says so on one line, and serves", async () => {
  await using dir = await tempDir();
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  await using peer = startTask("peer", [
    "0",
    ...peerArgs(join(dir.path, "store"), `http://127.0.0.1:${broker.port}`),
    "--no-console",
  ]);
  const [line] = await peer.waitFor(/\[DIRECTORY\].*/);
  assertMatch(line, /not in HTTP: is it a directory\?.*working with neighbours only/);
  await peer.waitFor(/Node listening on port \d+/);
  assertEquals(peer.stderr.includes("Uncaught"), false, peer.stderr);
});

Deno.test("a peer whose store is empty at start says so, and how to fill it", async () => {
  await using dir = await tempDir();
  // As the design card has it: a port and a neighbour, the store fragments/<port>/ by default.
  await using peer = startTask("peer", [
    "0",
    "localhost:6002",
    "--directory",
    "http://127.0.0.1:1",
    "--broker",
    "127.0.0.1:1",
    "--grpc-port",
    "0",
    "--http-port",
    "0",
    "--no-console",
  ], { cwd: dir.path });
  const [line] = await peer.waitFor(/\[SERVER\] The store .* is empty.*/);
  // Without a console there is nothing to type a name at; the neighbour may be full already.
  assertEquals(
    line,
    '[SERVER] The store "fragments/0" is empty: split a file into it with ' +
      "`deno task split --peers 0,6002` and restart, or fetch from peers that have fragments " +
      "(start with --fetch-all)",
  );
});

Deno.test("a peer with a console says a name can be typed, and ends the prompt's line when input ends", async () => {
  await using dir = await tempDir();
  const store = join(dir.path, "store");
  await using peer = startTask("peer", ["0", ...peerArgs(store, "http://127.0.0.1:1")], {
    stdin: true,
  });
  const [line] = await peer.waitFor(/\[SERVER\] The store .* is empty.*/);
  assertMatch(line, /fetch from peers that have fragments \(type a fragment name or 'all', or/);
  // Once it has said what it says by itself, an empty line gets a prompt that stays the last.
  await peer.waitFor(/\[DIRECTORY\] Cannot reach/);
  await peer.waitFor(/\[BROKER\] Cannot connect/);
  await peer.write("\n");
  await peer.waitFor(/\n\S.*\nFragment to request \(or 'exit'\): $/, { stream: "stdout" });
  await peer.closeStdin();
  await peer.waitFor(/\[CONSOLE\] Input ended; still serving/, { stream: "stderr" });
  assert(peer.stdout.endsWith("Fragment to request (or 'exit'): \n"), JSON.stringify(peer.stdout));
});

Deno.test("Ctrl-C while 'all' runs at the console stops the peer quietly: no 'Cancelled', no prompt", async () => {
  await using dir = await tempDir();
  const args = peerArgs(join(dir.path, "store"), "http://127.0.0.1:1");
  // With a neighbour, whose fragments it could fetch by name: the line says why it still waits.
  await using peer = startTask("peer", ["0", "127.0.0.1:1", ...args], { stdin: true });
  await peer.waitFor(/\[SERVER\] The store .* is empty/);
  await peer.write("all\n");
  await peer.waitFor(
    /\[swarm\] Cannot reach the directory .* to find a file to fetch \(neighbours serve fragments by name, not the file's manifest\); waiting up to \d+ s more/,
  );
  peer.kill("SIGINT");
  assertEquals((await peer.status()).code, 0);
  assert(!/Cancelled/.test(peer.stdout + peer.stderr), peer.stderr);
  assert(!peer.stdout.trimEnd().endsWith("(or 'exit'):"), JSON.stringify(peer.stdout));
});

Deno.test("a line logged while the prompt waits goes below it, and the prompt comes again", async () => {
  await using dir = await tempDir();
  await using peer = startTask("peer", [
    "0",
    ...peerArgs(join(dir.path, "store"), "http://127.0.0.1:1"),
  ], {
    stdin: true,
  });
  const [, port] = await peer.waitFor(/Node listening on port (\d+)/);
  await peer.waitFor(/\[BROKER\] Cannot connect/);
  await peer.write("\n");
  await peer.waitFor(/Fragment to request \(or 'exit'\): $/, { stream: "stdout" });
  // A client's first request makes the peer log a line by itself, while the prompt waits.
  using conn = await Deno.connect({ hostname: "127.0.0.1", port: Number(port) });
  await conn.write(new TextEncoder().encode("GET fragment_0.bin\n"));
  await peer.waitFor(/\n\[\+\] Connected from \S+\nFragment to request \(or 'exit'\): $/, {
    stream: "stdout",
  });
  assert(!/: \[\+\]/.test(peer.stdout), JSON.stringify(peer.stdout));
});

// Python, because Deno cannot pick a connection's local port: it holds a port as the local end of
// a connection, as a recent outgoing connection would, prints it, and lets go when told (the
// server side closing first, so the port is not left in TIME_WAIT).
const HOLD_PORT = `
import socket, sys
server = socket.socket()
server.bind(("127.0.0.1", 0))
server.listen()
client = socket.socket()
client.bind(("127.0.0.1", 0))
client.connect(server.getsockname())
accepted, _ = server.accept()
print("holding", client.getsockname()[1], flush=True)
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
  name: "a lone peer waits out a derived port that only a recent connection holds, and says so",
  ignore: !hasPython,
  fn: async () => {
    await using dir = await tempDir();
    const holder = new Deno.Command("python3", {
      args: ["-c", HOLD_PORT],
      stdin: "piped",
      stdout: "piped",
    }).spawn();
    const reader = holder.stdout.pipeThrough(new TextDecoderStream()).getReader();
    let said = "";
    while (!/holding \d+\n/.test(said)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`python3 did not hold a port: ${said}`);
      said += value;
    }
    const held = Number(said.match(/holding (\d+)/)![1]);
    // The peer's HTTP port is derived: its TCP port + 2000.
    await using peer = startTask("peer", [
      String(held - 2000),
      "--dir",
      join(dir.path, "store"),
      "--directory",
      "http://127.0.0.1:1",
      "--broker",
      "127.0.0.1:1",
      "--grpc-port",
      "0",
      "--no-console",
    ]);
    const [line] = await peer.waitFor(/\[SERVER\] Port \d+ .*held by a recent connection.*/);
    assertMatch(line, new RegExp(`Port ${held} \\(the peer's HTTP player port\\)`));
    const writer = holder.stdin.getWriter();
    await writer.write(new TextEncoder().encode("\n"));
    await writer.close();
    await holder.status;
    await reader.cancel();
    await peer.waitFor(new RegExp(`\\[PLAYER\\] Watch at http://localhost:${held}/`));
  },
});

Deno.test({
  name: "`deno run peer.ts PORT NEIGHBOUR` in a terminal asks once per kind, none for a variable",
  ignore: Deno.build.os !== "linux",
  fn: async () => {
    await using dir = await tempDir();
    const placeholder = Deno.listen({ hostname: "127.0.0.1", port: 0 });
    const port = (placeholder.addr as Deno.NetAddr).port;
    placeholder.close();
    // The design card's command line, in a terminal that util-linux's `script` gives it; every
    // question is answered "y" (this port only), which would prompt again at the next port.
    const command = [Deno.execPath(), "run", join(ROOT, "peer.ts"), String(port), "localhost:1"]
      .concat(["--dir", join(dir.path, "store"), "--grpc-port", "0", "--http-port", "0"])
      .map((word) => `'${word}'`).join(" ");
    const child = new Deno.Command("script", {
      args: ["-qfec", command, "/dev/null"],
      cwd: dir.path,
      env: { NO_COLOR: "1", DIRECTORY_URL: "http://127.0.0.1:1", BROKER_ADDR: "127.0.0.1:1" },
      stdin: "piped",
      stdout: "piped",
      stderr: "null",
    }).spawn();
    const writer = child.stdin.getWriter();
    const questions: string[] = [];
    let text = "";
    const stop = () => {
      try {
        child.kill("SIGKILL");
      } catch { /* it has exited already */ }
    };
    const timer = setTimeout(stop, 30_000);
    try {
      for await (const chunk of child.stdout.pipeThrough(new TextDecoderStream())) {
        text += chunk;
        const asked = [...text.matchAll(/Deno requests ([^\r\n]*)/g)].map((m) => m[1]!);
        if (questions.length < asked.length && /Allow\?[^\n]*> *$/.test(text)) {
          questions.push(asked[questions.length]!);
          // Deno drops what was typed before its question had been drawn (no type-ahead).
          await new Promise((resolve) => setTimeout(resolve, 300));
          await writer.write(new TextEncoder().encode("y\n"));
        }
        if (/Node listening on port/.test(text)) break;
      }
    } finally {
      clearTimeout(timer);
      stop();
      await child.status;
    }
    assertMatch(text, /Node listening on port/, text.slice(-2000));
    const kinds = questions.map((question) => question.split(" ")[0]);
    assertEquals(new Set(kinds).size, kinds.length, `one question per kind: ${questions}`);
    assertEquals(kinds.includes("env"), false, `no question for a variable: ${questions}`);
  },
});
