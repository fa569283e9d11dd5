import assert from "node:assert/strict";
import { startBroker } from "../broker.ts";
import { escapeControl } from "../common/cli.ts";
import { Child, ROOT, runTask, startTask, taskArgv } from "./_util.ts";

/** Starts `deno task broker --port 0 ...` and reads back the port it got. */
async function startBrokerTask(args: string[] = ["--port", "0"]): Promise<[Child, number]> {
  const child = startTask("broker", args);
  const [, port] = await child.waitFor(/\[BROKER\] Listening on port (\d+)/, { stream: "stdout" });
  return [child, Number(port)];
}

/** A port where nothing listens: one a broker just gave up. */
async function freePort(): Promise<number> {
  const broker = startBroker({ port: 0 });
  await broker.close();
  return broker.port;
}

Deno.test("notify.ts announces a fragment that subscribe.ts prints, and Ctrl-C ends both services cleanly", async () => {
  const [broker, port] = await startBrokerTask();
  await using _broker = broker;
  await using subscriber = startTask("subscribe", ["fragmentos", "--broker", `localhost:${port}`]);
  await subscriber.waitFor(
    /\[SUBSCRIBER\] Subscribed to 'fragmentos'\. Waiting for messages\.\.\./,
    { stream: "stderr" },
  );

  const notify = await runTask("notify", ["fragment_5.bin", "--broker", `localhost:${port}`]);
  assert.equal(notify.code, 0, notify.stderr);
  await subscriber.waitFor(/^\[fragmentos\] fragment_5\.bin$/m, { stream: "stdout" });

  subscriber.kill("SIGINT");
  assert.equal((await subscriber.status()).code, 0);
  assert.equal(subscriber.stdout, "[fragmentos] fragment_5.bin\n", "stdout holds only messages");

  const start = performance.now();
  broker.kill("SIGTERM");
  assert.equal((await broker.status()).code, 0);
  assert.ok(performance.now() - start < 1500, "the broker exits promptly"); // 1 s + process exit
});

Deno.test("subscribe.ts survives a broker restart and gets what is published afterwards", async () => {
  const [first, port] = await startBrokerTask();
  await using _first = first;
  await using subscriber = startTask("subscribe", ["fragmentos", "--broker", `localhost:${port}`]);
  await subscriber.waitFor(/Waiting for messages/);

  first.kill("SIGTERM");
  await first.status();
  await subscriber.waitFor(/\[SUBSCRIBER\] Disconnected/, { stream: "stderr" });
  const [second] = await startBrokerTask(["--port", String(port)]);
  await using _second = second;
  await subscriber.waitFor(/\[SUBSCRIBER\] Reconnected/, { stream: "stderr" });

  const notify = await runTask("notify", ["fragment_7.bin", "--broker", `localhost:${port}`]);
  assert.equal(notify.code, 0, notify.stderr);
  await subscriber.waitFor(/^\[fragmentos\] fragment_7\.bin$/m, { stream: "stdout" });
});

Deno.test("subscribe.ts asks for the topics when none is given", async () => {
  const [broker, port] = await startBrokerTask();
  await using _broker = broker;
  await using subscriber = startTask("subscribe", ["--broker", `localhost:${port}`], {
    stdin: true,
  });
  await subscriber.waitFor(/Topic to subscribe:/);
  await subscriber.write("news fragmentos\n");
  await subscriber.waitFor(/Subscribed to 'news', 'fragmentos'\. Waiting for messages/);
  const notify = await runTask("notify", [
    "fragment_1.bin",
    "--topic",
    "news",
    "--broker",
    `localhost:${port}`,
  ]);
  assert.equal(notify.code, 0, notify.stderr);
  await subscriber.waitFor(/^\[news\] fragment_1\.bin$/m, { stream: "stdout" });
});

Deno.test("notify.ts says in one line that the broker cannot be reached, and exits 1", async () => {
  const port = await freePort();
  const { code, stdout, stderr } = await runTask("notify", [
    "fragment_5.bin",
    "--broker",
    `localhost:${port}`,
  ]);
  assert.equal(code, 1);
  assert.equal(stdout, "");
  assert.equal(
    stderr,
    `error: Cannot connect to broker at "localhost:${port}": connection refused\n`,
  );
});

Deno.test("the CLIs refuse user mistakes with one line on stderr and exit 1", async () => {
  const port = await freePort();
  using taken = Deno.listen({ hostname: "0.0.0.0", port: 0 });
  const mistakes: [task: string, args: string[], error: RegExp][] = [
    ["notify", ["../etc/passwd"], /^error: Invalid fragment name "\.\.\/etc\/passwd": /],
    ["notify", [], /^error: Give exactly one fragment name/],
    ["notify", ["f.bin", "--topic", "a b"], /^error: Invalid topic "a b"/],
    ["notify", ["f.bin", "--broker", "nohost"], /^error: Invalid address "nohost"/],
    ["subscribe", ["bad/topic", "--broker", `localhost:${port}`], /^error: Invalid topic/],
    ["subscribe", ["t", "--broker", `localhost:${port}`], /^error: Cannot connect to broker/],
    ["broker", ["--port", "x"], /^error: Invalid --port "x": expected a number from 0 to 65535$/m],
    ["broker", ["--port", "99999"], /^error: Invalid --port "99999": expected a number from 0/],
    ["broker", ["--max-line", "0"], /^error: --max-line must be a positive whole number/],
    ["broker", ["--bogus"], /^error: Unknown option '--bogus' \(see --help\)$/m],
    ["broker", ["--max-pending", "-5"], /^error: Option '--max-pending' argument is ambiguous/],
    ["broker", ["--max-connections", "0"], /^error: --max-connections must be a positive whole/],
    [
      "broker",
      ["--max-connections", "100", "--max-connections-per-address", "200"],
      /^error: --max-connections-per-address must be at most --max-connections \(100\), got 200$/m,
    ],
    ["broker", ["--line-timeout", "1.5"], /^error: --line-timeout must be a positive whole number/],
    ["broker", ["--max-queued", "lots"], /^error: --max-queued must be a positive whole number/],
    ["broker", ["--hostname", "192.0.2.1"], /^error: Cannot listen on "192\.0\.2\.1": it is not/],
    [
      "broker",
      ["--hostname", "nosuchhost.invalid"],
      /^error: Cannot listen on "nosuchhost\.invalid": the name does not resolve/,
    ],
    ["notify", ["f.bin", "--bogus"], /^error: Unknown option '--bogus' \(see --help\)$/m],
    [
      "broker",
      ["--port", String(taken.addr.port)],
      new RegExp(
        `^error: Port ${taken.addr.port} is already in use \\(the broker's port\\): choose another with --port or stop what holds it$`,
        "m",
      ),
    ],
  ];
  await Promise.all(mistakes.map(async ([task, args, error]) => {
    const { code, stderr } = await runTask(task, args);
    assert.equal(code, 1, `${task} ${args.join(" ")}`);
    assert.match(stderr, error);
    assert.equal(stderr.trimEnd().split("\n").length, 1, `one line: ${stderr}`);
  }));
});

Deno.test("broker.ts, subscribe.ts and notify.ts run from a pipe without net access name the command to run instead", async () => {
  // The design card's bare `deno run`, with no terminal to ask in.
  for (
    const [script, args] of [
      ["broker", ["--port", "1", "--hostname", "127.0.0.1"]],
      ["subscribe", ["fragmentos", "--broker", "127.0.0.1:1"]],
      ["notify", ["fragment_5.bin", "--broker", "nats://127.0.0.1:1"]],
    ] as const
  ) {
    const { code, stderr } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-q", "--config", `${ROOT}deno.json`, `${ROOT}${script}.ts`, ...args],
      stdin: "null",
      stderr: "piped",
    }).output();
    assert.equal(code, 1);
    assert.equal(
      new TextDecoder().decode(stderr),
      `error: Requires net access to "127.0.0.1:1", run again with the --allow-net flag; ` +
        `\`deno task ${script} ${args.join(" ")}\` runs it with the ones it needs\n`,
    );
  }
});

Deno.test("the CLIs print their usage with --help", async () => {
  await Promise.all(["broker", "subscribe", "notify"].map(async (task) => {
    const { code, stdout } = await runTask(task, ["--help"]);
    assert.equal(code, 0);
    assert.match(stdout, /^Usage: /);
  }));
});

Deno.test("notify.ts gives up on a listener that never answers, saying so", async () => {
  // Accepts connections (the kernel does, for a listener) but never reads or answers.
  using silent = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (silent.addr as Deno.NetAddr).port;
  const { code, stderr } = await runTask("notify", ["f.bin", "--broker", `127.0.0.1:${port}`]);
  assert.equal(code, 1);
  assert.equal(stderr.trim(), `error: The broker at "127.0.0.1:${port}" did not answer within 5 s`);
});

Deno.test("deno task broker keeps serving when it runs out of file descriptors, saying so once", async () => {
  // The broker in a shell limited to 64 descriptors: accepting fails (EMFILE) for real.
  await using broker = new Child(
    [
      "-c",
      'ulimit -n 64 && exec "$@"',
      "bash",
      Deno.execPath(),
      ...taskArgv("broker"),
      "--port",
      "0",
    ],
    { command: "bash" },
  );
  const [, port] = await broker.waitFor(/\[BROKER\] Listening on port (\d+)/, { stream: "stdout" });
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < 100 && !/Cannot accept/.test(broker.stderr); i++) {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port: Number(port) }));
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await broker.waitFor(
      /^\[BROKER\] Cannot accept connections: too many open files; retrying$/m,
      { stream: "stderr" },
    );
  } finally {
    conns.forEach((conn) => conn.close());
  }
  // Those clients gone, a new one is served.
  const { code, stderr } = await runTask("notify", ["f.bin", "--broker", `127.0.0.1:${port}`]);
  assert.equal(code, 0, stderr);
  await broker.waitFor(/Accepting connections again/, { stream: "stderr" });
  assert.equal(broker.stderr.match(/Cannot accept/g)?.length, 1, broker.stderr);
});

Deno.test("subscribe.ts prints a message's control characters escaped, so it stays one line of plain text", async () => {
  const [broker, port] = await startBrokerTask();
  await using _broker = broker;
  await using subscriber = startTask("subscribe", ["fragmentos", "--broker", `localhost:${port}`]);
  await subscriber.waitFor(/Waiting for messages/, { stream: "stderr" });
  // A publisher on a raw socket: a terminal title, a screen wipe, C1 CSI, a carriage return and
  // a right-to-left override, all inside one message.
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    const message = "fragment_1.bin\x1b]0;pwned\x07\x1b[2J\x9b31m\rend\u202e!";
    await conn.write(new TextEncoder().encode(`PUB:fragmentos:${message}\nPING\n`));
    const reply = new Uint8Array(64);
    const n = await conn.read(reply);
    assert.match(new TextDecoder().decode(reply.subarray(0, n ?? 0)), /PONG/);
  } finally {
    conn.close();
  }
  await subscriber.waitFor(/^\[fragmentos\] fragment_1\.bin.*$/m, { stream: "stdout" });
  subscriber.kill("SIGINT");
  await subscriber.status();
  assert.equal(
    subscriber.stdout,
    "[fragmentos] fragment_1.bin\\x1b]0;pwned\\x07\\x1b[2J\\x9b31m\\x0dend\\u202e!\n",
  );
});

Deno.test("escapeControl() escapes control, separator and bidi characters and leaves the rest", () => {
  assert.equal(
    escapeControl("fragment_5.bin localhost:6001 sample.webm"),
    "fragment_5.bin localhost:6001 sample.webm",
  );
  assert.equal(escapeControl("é ✓ 日本 \\x1b"), "é ✓ 日本 \\x1b");
  assert.equal(
    escapeControl("\x00\t\n\x7f\x85\u2028\u2066"),
    "\\x00\\x09\\x0a\\x7f\\x85\\u2028\\u2066",
  );
});
