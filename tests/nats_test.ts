/**
 * Announcements on NATS, against Debian's real nats-server on free ports: the `nats://` client,
 * a three-node cluster losing a node, the bridge of `broker.ts --nats` both ways, between two
 * brokers and while NATS is down, subscribe.ts / notify.ts as child processes, and a peer's
 * announcements.
 * @module
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import {
  type BrokerConnection,
  BrokerError,
  connect,
  type Message,
  startBridgedBroker,
} from "../broker.ts";
import { ORIGIN_HEADER } from "../broker/nats_client.ts";
import { LineBuffer } from "../common/lines.ts";
import { startNatsCluster, startNatsServer } from "./_nats_server.ts";
import { runTask, startTask, tempDir } from "./_util.ts";
import { startPeer } from "../peer.ts";
import { SAMPLE_VIDEO, splitFile } from "../split.ts";

const encoder = new TextEncoder();

/** Polls `check` until true, or fails after `timeoutMs`. */
async function eventually(what: string, check: () => boolean, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    assert.ok(Date.now() < deadline, `Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** A bare TCP connection speaking the broker's lines, as a client of the documents would. */
class LineSocket implements AsyncDisposable {
  readonly lines: string[] = [];
  readonly #conn: Deno.TcpConn;
  readonly #reading: Promise<void>;

  constructor(conn: Deno.TcpConn) {
    this.#conn = conn;
    this.#reading = this.#read();
  }

  static async open(port: number): Promise<LineSocket> {
    return new LineSocket(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  async send(text: string): Promise<void> {
    const bytes = encoder.encode(text);
    for (let done = 0; done < bytes.length;) done += await this.#conn.write(bytes.subarray(done));
  }

  /** Waits for a line equal to `line` (it stays in {@link lines}). */
  async waitFor(line: string, timeoutMs = 10_000): Promise<void> {
    await eventually(`${JSON.stringify(line)} arrives`, () => this.lines.includes(line), timeoutMs);
  }

  async #read() {
    const buffer = new Uint8Array(64 * 1024);
    const lines = new LineBuffer(1 << 20);
    try {
      for (let count; (count = await this.#conn.read(buffer)) !== null;) {
        lines.push(buffer.subarray(0, count));
        for (let line; (line = lines.shift()) !== undefined;) this.lines.push(line);
      }
    } catch {
      // Closed by us.
    }
  }

  async [Symbol.asyncDispose]() {
    this.#conn.close();
    await this.#reading;
  }
}

/** Collects what a subscription's callback receives. */
async function collect(client: BrokerConnection, topic: string): Promise<Message[]> {
  const received: Message[] = [];
  await client.subscribe(topic, (message) => received.push(message));
  return received;
}

Deno.test("connect() speaks NATS for a nats:// address: subject fragmentos is topic fragmentos", async () => {
  await using server = await startNatsServer();
  await using subscriber = await connect(server.url);
  await using publisher = await connect(server.url);
  assert.ok(subscriber.isConnected);
  const iterated = (await subscriber.subscribe("fragmentos"))[Symbol.asyncIterator]();
  const called = await collect(subscriber, "fragmentos");

  assert.ok(publisher.publish("fragmentos", "fragment_5.bin localhost:6001 sample.webm"));
  await publisher.flush();
  const first = await iterated.next();
  assert.deepEqual(first.value, {
    topic: "fragmentos",
    message: "fragment_5.bin localhost:6001 sample.webm",
  });
  await eventually("the callback has it", () => called.length === 1);
  assert.deepEqual(called[0], first.value);

  assert.throws(() => publisher.publish("a..b", "x"), /Invalid topic "a..b" for NATS/);
  assert.throws(() => publisher.publish("fragmentos", "two\nlines"), TypeError);
  await assert.rejects(subscriber.subscribe(">"), TypeError);
});

Deno.test("connect() rejects an unreachable NATS with a BrokerError, or waits for it when asked", async () => {
  const server = await startNatsServer();
  const { port } = server;
  await server.kill();
  await assert.rejects(
    connect(`nats://127.0.0.1:${port}`),
    (error: Error) => {
      assert.ok(error instanceof BrokerError);
      assert.equal(
        error.message,
        `Cannot connect to broker at "nats://127.0.0.1:${port}": connection refused`,
      );
      return true;
    },
  );
  await assert.rejects(connect("nats://"), TypeError);
  await assert.rejects(connect("nats://127.0.0.1:4222/path"), /Invalid NATS address/);

  // Down at first: it resolves, holds the subscription and a publication, and catches up.
  const disconnects: Error[] = [];
  let reconnected = false;
  await using client = await connect(`nats://127.0.0.1:${port}`, {
    waitForBroker: true,
    minBackoffMs: 20,
    maxBackoffMs: 100,
    onDisconnect: (error) => disconnects.push(error),
    onReconnect: () => reconnected = true,
  });
  assert.equal(client.isConnected, false);
  assert.equal(disconnects.length, 1);
  const received = await collect(client, "fragmentos");
  assert.ok(client.publish("fragmentos", "held while down"));
  await using _again = await startNatsServer({ port });
  await eventually("the client is connected", () => client.isConnected && reconnected);
  await eventually("the held publication came back", () => received.length === 1);
  assert.equal(received[0].message, "held while down");
});

Deno.test("a three-node NATS cluster loses a node: subscribers and publishers reconnect with their subscriptions", async () => {
  await using cluster = await startNatsCluster(3);
  const [doomed, second, third] = cluster;
  const events: string[] = [];
  const options = (who: string) => ({
    onDisconnect: () => events.push(`${who} lost`),
    onReconnect: () => events.push(`${who} back`),
  });
  // Both start on the node that will die, and learn the others from the cluster.
  await using subscriber = await connect(doomed.url, options("subscriber"));
  await using publisher = await connect(doomed.url, options("publisher"));
  // A client given the whole cluster (in random order, to spread the load) gets the messages too.
  const everyNode = [doomed.url, second.url, third.url].join(",");
  await using elsewhere = await connect(everyNode);
  const received = await collect(subscriber, "fragmentos");
  const seenElsewhere = await collect(elsewhere, "fragmentos");
  // Interest travels between nodes a moment after a subscription is made, and a client given
  // every node may be on another than the publisher's: publish until both have one, boundedly.
  const has = (messages: { message: string }[], prefix: string) =>
    messages.some(({ message }) => message.startsWith(prefix));
  for (let i = 0; i < 100 && !(has(received, "before") && has(seenElsewhere, "before")); i++) {
    publisher.publish("fragmentos", `before ${i}`);
    await publisher.flush();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(has(received, "before") && has(seenElsewhere, "before"), "both subscribers have one");

  await doomed.kill();
  await eventually(
    "both clients are back",
    () => events.includes("subscriber back") && events.includes("publisher back"),
  );
  assert.ok(events.includes("subscriber lost") && events.includes("publisher lost"));
  // Likewise after a subscription is restored.
  for (let i = 0; i < 100 && !(has(received, "after") && has(seenElsewhere, "after")); i++) {
    publisher.publish("fragmentos", `after ${i}`);
    await publisher.flush();
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.ok(has(received, "after"), "the subscription survived the node's death");
  assert.ok(has(seenElsewhere, "after"), "the client given every node still gets them");
  assert.match(received.at(-1)!.message, /^after \d+$/);
  // Nothing came twice across the reconnection.
  const messages = received.map(({ message }) => message);
  assert.equal(new Set(messages).size, messages.length);
});

Deno.test("startBridgedBroker() carries messages both ways between a plain socket client and NATS", async () => {
  await using server = await startNatsServer();
  await using broker = await startBridgedBroker(server.url, { port: 0, hostname: "127.0.0.1" });
  assert.ok(broker.natsConnected);
  await using socket = await LineSocket.open(broker.port);
  await using nats = await connect(server.url);
  await using listener = await connect(server.url);
  const fromSocket = await collect(listener, "fragmentos");

  // NATS -> a SUB: client of the broker.
  await socket.send("SUB:fragmentos\n");
  await socket.waitFor("OK:SUB:fragmentos");
  nats.publish("fragmentos", "fragment_1.bin 10.0.0.7:6001 sample.webm");
  await nats.flush();
  await socket.waitFor("MSG:fragmentos:fragment_1.bin 10.0.0.7:6001 sample.webm");

  // A PUB: of the broker's client -> NATS (and, as ever, the broker's own subscribers).
  await socket.send("PUB:fragmentos:fragment_2.bin 10.0.0.8:6002 sample.webm\nPING\n");
  await socket.waitFor("PONG");
  await eventually("NATS has it", () => fromSocket.length === 2);
  assert.equal(fromSocket[1].message, "fragment_2.bin 10.0.0.8:6002 sample.webm");
  await socket.waitFor("MSG:fragmentos:fragment_2.bin 10.0.0.8:6002 sample.webm");

  // What a line cannot carry, or a subject that is no topic, stays out; a topic that is no
  // subject stays in.
  nats.publish("no.topic-here", "fine"); // a valid topic, just nobody subscribed
  const raw = await startNatsServerClient(server.url);
  raw.publish("fragmentos", "two\nlines");
  raw.publish("fragmentos", "x".repeat(70_000));
  // A message that says it came through this very bridge is not taken back (the no-loop rule).
  const { headers } = await import("@nats-io/transport-node");
  const own = headers();
  own.set(ORIGIN_HEADER, broker.origin);
  raw.publish("fragmentos", "own, back again", { headers: own });
  await raw.flush();
  await raw.close();
  await socket.send("PUB:a..b:local only\nPING\n");
  await socket.waitFor("PONG");
  nats.publish("fragmentos", "last");
  await nats.flush();
  await socket.waitFor("MSG:fragmentos:last");
  assert.deepEqual(
    socket.lines.filter((line) => line.startsWith("MSG:")),
    [
      "MSG:fragmentos:fragment_1.bin 10.0.0.7:6001 sample.webm",
      "MSG:fragmentos:fragment_2.bin 10.0.0.8:6002 sample.webm",
      "MSG:fragmentos:last",
    ],
  );
  const stats = broker.stats();
  assert.equal(stats.dropped, 2);
  assert.equal(stats.toNats, 1, "a..b is no NATS subject: not bridged");
});

/** The official NATS client itself, for what our client refuses to send. */
async function startNatsServerClient(url: string) {
  const { connect: natsConnect } = await import("@nats-io/transport-node");
  return await natsConnect({ servers: url });
}

Deno.test("two brokers bridged to one NATS share a topic, each message delivered once, with no ping-pong", async () => {
  await using server = await startNatsServer();
  await using brokerA = await startBridgedBroker(server.url, { port: 0, hostname: "127.0.0.1" });
  await using brokerB = await startBridgedBroker(server.url, { port: 0, hostname: "127.0.0.1" });
  assert.notEqual(brokerA.origin, brokerB.origin);
  await using onA = await LineSocket.open(brokerA.port);
  await using onB = await LineSocket.open(brokerB.port);
  await using nats = await connect(server.url);
  const onNats = await collect(nats, "fragmentos");
  for (const socket of [onA, onB]) {
    await socket.send("SUB:fragmentos\n");
    await socket.waitFor("OK:SUB:fragmentos");
  }

  const sent = Array.from({ length: 20 }, (_, i) => `fragment_${i}.bin`);
  await onA.send(sent.map((message) => `PUB:fragmentos:${message}\n`).join("") + "PING\n");
  await onB.send("PUB:fragmentos:from B\n");
  await onA.waitFor("MSG:fragmentos:from B");
  await onB.waitFor(`MSG:fragmentos:${sent.at(-1)}`);
  await eventually("NATS has all 21", () => onNats.length === 21);
  // Anything that went round would come after: a last round trip each way flushes it out.
  await onA.send("PUB:fragmentos:end A\n");
  await onB.send("PUB:fragmentos:end B\n");
  for (const socket of [onA, onB]) {
    await socket.waitFor("MSG:fragmentos:end A");
    await socket.waitFor("MSG:fragmentos:end B");
  }
  await eventually("NATS has all 23", () => onNats.length === 23);
  await new Promise((resolve) => setTimeout(resolve, 200));

  const expected = [...sent, "from B", "end A", "end B"].sort();
  for (const socket of [onA, onB]) {
    const messages = socket.lines.filter((line) => line.startsWith("MSG:")).map((line) =>
      line.slice("MSG:fragmentos:".length)
    );
    assert.deepEqual(messages.toSorted(), expected, "each message exactly once");
    const fromA = messages.filter((message) => sent.includes(message));
    assert.deepEqual(fromA, sent, "in the order A's client published them");
  }
  assert.deepEqual(onNats.map(({ message }) => message).toSorted(), expected);
  assert.equal(brokerA.stats().toNats, 21);
  assert.equal(brokerB.stats().toNats, 2);
  assert.equal(brokerA.stats().fromNats, 2, "only B's, never its own back");
  assert.equal(brokerB.stats().fromNats, 21);
});

Deno.test("broker.ts --nats bridges; a bad --nats is one line and exit 1", async () => {
  await using server = await startNatsServer();
  await using broker = startTask("broker", ["--port", "0", "--nats", server.url]);
  const [, port] = await broker.waitFor(
    /\[BROKER\] Listening on port (\d+), bridged to NATS at "nats:\/\/127\.0\.0\.1:\d+"/,
    { stream: "stdout" },
  );
  await using socket = await LineSocket.open(Number(port));
  await socket.send("SUB:fragmentos\n");
  await socket.waitFor("OK:SUB:fragmentos");
  await using nats = await connect(server.url);
  nats.publish("fragmentos", "fragment_3.bin");
  await nats.flush();
  await socket.waitFor("MSG:fragmentos:fragment_3.bin");
  broker.kill("SIGTERM");
  assert.equal((await broker.status()).code, 0);

  const bad = await runTask("broker", ["--port", "0", "--nats", "http://localhost:4222"]);
  assert.equal(bad.code, 1);
  assert.equal(
    bad.stderr,
    'error: Invalid NATS address "http://localhost:4222": expected nats://host:port, e.g. nats://localhost:4222\n',
  );
});

Deno.test("subscribe.ts and notify.ts work with --broker nats://, printing the same lines", async () => {
  await using server = await startNatsServer();
  await using subscriber = startTask("subscribe", ["fragmentos", "--broker", server.url]);
  await subscriber.waitFor(
    /\[SUBSCRIBER\] Subscribed to 'fragmentos'\. Waiting for messages\.\.\./,
    { stream: "stderr" },
  );
  const notify = await runTask("notify", ["fragment_5.bin", "--broker", server.url]);
  assert.equal(notify.code, 0, notify.stderr);
  assert.equal(notify.stderr, "[NOTIFY] Published 'fragment_5.bin' on 'fragmentos'\n");
  await subscriber.waitFor(/^\[fragmentos\] fragment_5\.bin$/m, { stream: "stdout" });
  subscriber.kill("SIGINT");
  assert.equal((await subscriber.status()).code, 0);
  assert.equal(subscriber.stdout, "[fragmentos] fragment_5.bin\n");

  const { port } = server;
  await server.kill();
  const down = await runTask("notify", ["fragment_5.bin", "--broker", `nats://127.0.0.1:${port}`]);
  assert.equal(down.code, 1);
  assert.equal(
    down.stderr,
    `error: Cannot connect to broker at "nats://127.0.0.1:${port}": connection refused\n`,
  );
});

Deno.test("a bridged broker serves while NATS is down, says so once, and bridges once NATS is up", async () => {
  const server = await startNatsServer();
  const { port } = server;
  await server.kill();
  const warnings: string[] = [];
  await using broker = await startBridgedBroker(`nats://127.0.0.1:${port}`, {
    port: 0,
    hostname: "127.0.0.1",
    warn: (line) => warnings.push(line),
  });
  assert.equal(broker.natsConnected, false);
  assert.deepEqual(warnings, [
    `[BROKER] Cannot connect to broker at "nats://127.0.0.1:${port}": connection refused; ` +
    "bridging resumes once it is back",
  ]);
  await using socket = await LineSocket.open(broker.port);
  await socket.send("SUB:fragmentos\nPUB:fragmentos:local\n");
  await socket.waitFor("MSG:fragmentos:local");

  await using _up = await startNatsServer({ port });
  await eventually("the bridge is connected", () => broker.natsConnected);
  await using nats = await connect(`nats://127.0.0.1:${port}`);
  // Its subscription to NATS is made on connection: publish until it is there, boundedly.
  for (
    let i = 0;
    i < 100 && !socket.lines.some((line) => line.startsWith("MSG:fragmentos:n"));
    i++
  ) {
    nats.publish("fragmentos", `n${i}`);
    await nats.flush();
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
  assert.ok(socket.lines.some((line) => line.startsWith("MSG:fragmentos:n")));
  assert.equal(warnings.length, 2);
  assert.equal(warnings[1], `[BROKER] Bridging to NATS at "nats://127.0.0.1:${port}" again`);
});

Deno.test("a peer given a nats:// broker announces the fragments it stores on NATS", async () => {
  await using dir = await tempDir();
  await splitFile(SAMPLE_VIDEO, { out: join(dir.path, "fragments"), peers: ["a", "b"] });
  await using server = await startNatsServer();
  await using listener = await connect(server.url);
  const announcements = await collect(listener, "fragmentos");
  const common = {
    port: 0,
    hostname: "127.0.0.1",
    advertise: "127.0.0.1",
    directory: null,
    broker: server.url,
    grpcPort: null,
    httpPort: null,
    log: () => {},
  };
  await using seeder = await startPeer({ ...common, dir: join(dir.path, "fragments", "a") });
  await using viewer = await startPeer({
    ...common,
    dir: join(dir.path, "fragments", "b"),
    neighbours: [`127.0.0.1:${seeder.port}`],
  });
  await viewer.fetch("fragment_0.bin");
  await eventually("the announcement is on NATS", () => announcements.length > 0);
  const [name, holder, file] = announcements[0].message.split(" ");
  assert.deepEqual([name, holder, file], [
    "fragment_0.bin",
    `127.0.0.1:${viewer.port}`,
    "sample.webm",
  ]);
});
