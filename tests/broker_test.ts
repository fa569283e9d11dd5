import assert from "node:assert/strict";
import { LineBuffer } from "../common/lines.ts";
import {
  type BrokerStats,
  connect,
  formatAnnouncement,
  type Message,
  parseAddress,
  parseAnnouncement,
  startBroker,
  type Subscription,
} from "../broker.ts";

const encoder = new TextEncoder();

/** A bare TCP connection speaking the broker's lines, for what the client would never send. */
class RawClient implements AsyncDisposable {
  readonly conn: Deno.TcpConn;
  readonly #lines = new LineBuffer(1 << 20);
  readonly #buffer = new Uint8Array(64 * 1024);
  #closed = false;

  private constructor(conn: Deno.TcpConn) {
    this.conn = conn;
  }

  static async open(port: number): Promise<RawClient> {
    return new RawClient(await Deno.connect({ hostname: "127.0.0.1", port }));
  }

  async send(text: string): Promise<void> {
    const bytes = encoder.encode(text);
    for (let done = 0; done < bytes.length;) done += await this.conn.write(bytes.subarray(done));
  }

  /** The next line, or null once the broker closed the connection; fails after `timeoutMs`. */
  async line(timeoutMs = 5000): Promise<string | null> {
    const timer = setTimeout(() => this.close(), timeoutMs);
    try {
      while (true) {
        const line = this.#lines.shift();
        if (line !== undefined) return line;
        let count: number | null;
        try {
          count = await this.conn.read(this.#buffer);
        } catch (error) {
          if (error instanceof Deno.errors.ConnectionReset) return null;
          if (this.#closed) throw new Error(`No line within ${timeoutMs} ms`);
          throw error;
        }
        if (count === null) return null;
        this.#lines.push(this.#buffer.subarray(0, count));
      }
    } finally {
      clearTimeout(timer);
    }
  }

  /** Sends `text` and returns the replies to it (those before the answer to a following line). */
  async ask(text: string): Promise<string[]> {
    await this.send(`${text}UNSUB:end-of-replies\n`);
    const replies = [];
    for (let line; (line = await this.line()) !== "OK:UNSUB:end-of-replies";) {
      if (line === null) throw new Error(`Connection closed after ${JSON.stringify(text)}`);
      replies.push(line);
    }
    return replies;
  }

  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.conn.close();
  }

  [Symbol.asyncDispose](): Promise<void> {
    this.close();
    return Promise.resolve();
  }
}

/** Polls `check` until it holds, failing after `timeoutMs`. */
async function eventually(check: () => boolean, what: string, timeoutMs = 5000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!check()) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}

/** Collects `count` messages from a subscription. */
async function take(subscription: Subscription, count: number): Promise<string[]> {
  const messages: string[] = [];
  if (count === 0) return messages;
  for await (const { message } of subscription) {
    messages.push(message);
    if (messages.length === count) break;
  }
  return messages;
}

/**
 * Makes socket reads fail as the OS might: until disposed, each read on a socket for which
 * `pick` returns an error rejects with it instead (once per socket: pick remembers). Deno
 * offers no way to make a real socket fail with, say, ETIMEDOUT or EHOSTUNREACH on demand.
 */
function failReads(
  sample: Deno.TcpConn,
  pick: (conn: Deno.TcpConn) => Error | undefined,
): Disposable {
  const prototype = Object.getPrototypeOf(sample);
  const read = prototype.read;
  prototype.read = function (this: Deno.TcpConn, buffer: Uint8Array) {
    const error = pick(this);
    return error ? Promise.reject(error) : read.call(this, buffer);
  };
  return { [Symbol.dispose]: () => delete prototype.read };
}

const numbers = (count: number) => Array.from({ length: count }, (_, i) => String(i));
const empty: BrokerStats = { connections: 0, subscriptions: 0, topics: 0, slowConsumers: 0 };

Deno.test("startBroker() answers each good and bad line and keeps the connection usable", async () => {
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1" });
  await using client = await RawClient.open(broker.port);
  const table: [sent: string, replies: string[]][] = [
    ["PING\n", ["PONG"]],
    ["PING\r\n", ["PONG"]],
    ["SUB:news\n", ["OK:SUB:news"]],
    ["SUB:a.b_c-D9\r\n", ["OK:SUB:a.b_c-D9"]],
    [`SUB:${"t".repeat(128)}\n`, [`OK:SUB:${"t".repeat(128)}`]],
    ["PUB:news:hello\n", ["MSG:news:hello"]],
    ["PUB:news:a:b::c\n", ["MSG:news:a:b::c"]],
    ["PUB:news:\n", ["MSG:news:"]],
    ["PUB:nobody:listens\n", []],
    ["UNSUB:news\n", ["OK:UNSUB:news"]],
    ["PUB:news:gone\n", []],
    ["UNSUB:never-subscribed\n", ["OK:UNSUB:never-subscribed"]],
    ["PONG\n", []],
    ["\n", ["ERR:empty line"]],
    ["\r\n", ["ERR:empty line"]],
    ["SUB:\n", ["ERR:SUB needs a topic: SUB:<topic>"]],
    ["SUB\n", ["ERR:SUB needs a topic: SUB:<topic>"]],
    ["UNSUB:\n", ["ERR:UNSUB needs a topic: UNSUB:<topic>"]],
    ["SUB:bad topic\n", ['ERR:invalid topic "bad topic"']],
    ["SUB:ñ\n", ['ERR:invalid topic "ñ"']],
    [`SUB:${"t".repeat(129)}\n`, [`ERR:invalid topic "${"t".repeat(40)}..."`]],
    ["PUB:news\n", ["ERR:PUB needs a topic and a message: PUB:<topic>:<message>"]],
    ["PUB\n", ["ERR:PUB needs a topic and a message: PUB:<topic>:<message>"]],
    ["PUB::x\n", ['ERR:invalid topic ""']],
    ["PUB:a/b:x\n", ['ERR:invalid topic "a/b"']],
    ["HELLO\n", ['ERR:unknown command "HELLO"']],
    ["sub:news\n", ['ERR:unknown command "sub"']],
    ["PING \n", ['ERR:unknown command "PING "']],
    ["PI\0NG\n", ["ERR:NUL byte in line"]],
    ["PUB:a.b_c-D9:x\0y\n", ["ERR:NUL byte in line"]],
  ];
  for (const [sent, replies] of table) {
    assert.deepEqual(await client.ask(sent), replies, `after sending ${JSON.stringify(sent)}`);
  }
});

Deno.test("startBroker() closes a connection whose line is too long, after saying why", async () => {
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1", maxLine: 100 });
  await using client = await RawClient.open(broker.port);
  assert.deepEqual(await client.ask(`PUB:t:${"x".repeat(94)}\n`), [], "100 bytes are fine");
  await client.send(`PUB:t:${"x".repeat(95)}\n`);
  assert.equal(await client.line(), "ERR:line too long");
  assert.equal(await client.line(), null);
});

Deno.test("startBroker() closes a client streaming with no newline at the line limit", async () => {
  await using broker = startBroker({ port: 0, hostname: "127.0.0.1", maxLine: 1024 });
  await using client = await RawClient.open(broker.port);
  const chunk = "x".repeat(16 * 1024);
  let sent = 0;
  try {
    for (; sent < 64 * 1024 * 1024; sent += chunk.length) await client.send(chunk);
  } catch (error) {
    if (
      !(error instanceof Deno.errors.BrokenPipe || error instanceof Deno.errors.ConnectionReset)
    ) {
      throw error;
    }
  }
  // The broker may reset the connection with our bytes unread, so its ERR line can be lost.
  let last;
  for (let line; (line = await client.line()) !== null;) last = line;
  assert.ok(last === undefined || last === "ERR:line too long", `got ${last}`);
  assert.ok(sent < 64 * 1024 * 1024, "the broker cut the stream off");
  await eventually(() => broker.stats().connections === 0, "the connection is gone");
});

Deno.test("startBroker() cuts off a subscriber that stops reading, while another gets every message in order", async () => {
  await using broker = startBroker({ port: 0, maxPending: 256 * 1024 });
  await using slow = await RawClient.open(broker.port);
  assert.deepEqual(await slow.ask("SUB:flood\n"), ["OK:SUB:flood"]);
  await using fast = await connect(`localhost:${broker.port}`);
  const subscription = await fast.subscribe("flood");
  await using publisher = await connect(`localhost:${broker.port}`);

  const padding = "p".repeat(1000);
  const received: string[] = [];
  let expected = 0;
  let caughtUp = Promise.withResolvers<void>();
  const receiving = (async () => {
    for await (const { message } of subscription) {
      received.push(message);
      if (received.length === expected) caughtUp.resolve();
      if (message === "done") break;
    }
  })();
  // Publish in batches of 100 KB, each once the fast subscriber has the one before (so it never
  // lags past the limit itself), until the slow one is cut off: its socket buffers some MB first.
  while (broker.stats().slowConsumers === 0 && expected < 100_000) {
    caughtUp = Promise.withResolvers();
    for (let i = 0; i < 100; i++) publisher.publish("flood", `${expected++} ${padding}`);
    await caughtUp.promise;
  }
  assert.equal(broker.stats().slowConsumers, 1, "the slow subscriber was cut off");
  assert.equal(broker.stats().subscriptions, 1, "only the fast subscriber is left");
  const slowLines: string[] = [];
  for (let line; (line = await slow.line()) !== null;) slowLines.push(line);

  publisher.publish("flood", "done");
  await receiving;
  assert.equal(received.length, expected + 1);
  assert.ok(
    received.every((message, i) => message === (i < expected ? `${i} ${padding}` : "done")),
  );
  // The slow one got an in-order prefix of the messages, then the reason it was cut off.
  assert.equal(slowLines.at(-1), "ERR:slow consumer");
  const prefix = slowLines.slice(0, -1);
  assert.ok(prefix.length < expected);
  assert.ok(prefix.every((line, i) => line === `MSG:flood:${i} ${padding}`));
});

Deno.test("startBroker() delivers 500 messages in order to each of 100 subscribers", async () => {
  await using broker = startBroker({ port: 0 });
  const clients = await Promise.all(
    Array.from({ length: 100 }, () => connect(`localhost:${broker.port}`)),
  );
  try {
    const subscriptions = await Promise.all(clients.map((client) => client.subscribe("scale")));
    const expected = numbers(500);
    const receiving = subscriptions.map((subscription) => take(subscription, expected.length));
    for (const message of expected) clients[0].publish("scale", message);
    for (const messages of await Promise.all(receiving)) assert.deepEqual(messages, expected);
  } finally {
    await Promise.all(clients.map((client) => client.close()));
  }
  await eventually(() => broker.stats().connections === 0, "every client is gone");
});

Deno.test("startBroker() takes 200 clients connecting at once", async () => {
  await using broker = startBroker({ port: 0 });
  const clients = await Promise.all(
    Array.from({ length: 200 }, () => connect(`localhost:${broker.port}`)),
  );
  try {
    await Promise.all(clients.map((client) => client.flush()));
    assert.equal(broker.stats().connections, 200);
  } finally {
    await Promise.all(clients.map((client) => client.close()));
  }
  await eventually(() => broker.stats().connections === 0, "every client is gone");
});

Deno.test("startBroker() leaves no connection or subscription behind when clients go", async () => {
  await using broker = startBroker({ port: 0 });
  {
    await using a = await connect(`localhost:${broker.port}`);
    await using b = await connect(`localhost:${broker.port}`);
    await a.subscribe("one");
    await a.subscribe("two");
    const b1 = await b.subscribe("one");
    await b.subscribe("one"); // a second subscription to the same topic shares the broker's
    assert.deepEqual(broker.stats(), {
      connections: 2,
      subscriptions: 3,
      topics: 2,
      slowConsumers: 0,
    });
    await b1.unsubscribe();
    assert.equal(broker.stats().subscriptions, 3, "b still has its other 'one' subscription");
    await using raw = await RawClient.open(broker.port);
    assert.deepEqual(await raw.ask("SUB:three\n"), ["OK:SUB:three"]);
    assert.equal(broker.stats().topics, 3);
  }
  await eventually(() => broker.stats().connections === 0, "every client is gone");
  assert.deepEqual(broker.stats(), empty);
});

Deno.test("startBroker() pings an idle client and drops it after two missed PONGs", async () => {
  await using broker = startBroker({ port: 0, pingIntervalMs: 20 });
  await using silent = await RawClient.open(broker.port);
  await using client = await connect(`localhost:${broker.port}`); // answers PINGs by itself
  assert.equal(await silent.line(), "PING");
  assert.equal(await silent.line(), "PING");
  assert.equal(await silent.line(), null, "dropped");
  await client.flush();
  assert.equal(broker.stats().connections, 1, "the client that answers stays");
});

Deno.test("startBroker() ends only the connection whose socket fails, saying so once if unusual", async () => {
  const warnings: string[] = [];
  await using broker = startBroker({ port: 0, warn: (line) => warnings.push(line) });
  await using unusual = await RawClient.open(broker.port); // EHOSTUNREACH: worth a line
  await using timedOut = await RawClient.open(broker.port); // a dead keepalive: no news
  await using bystander = await RawClient.open(broker.port);
  assert.deepEqual(await bystander.ask("SUB:news\n"), ["OK:SUB:news"]);
  const failing = new Map<number, Error>([
    [unusual.conn.localAddr.port, new Error("No route to host (os error 113)")],
    [timedOut.conn.localAddr.port, new Deno.errors.TimedOut("Connection timed out (os error 110)")],
  ]);
  {
    // The broker's side of each socket: its next read fails.
    using _ = failReads(unusual.conn, (conn) => {
      if (conn.localAddr.port !== broker.port) return undefined;
      const error = failing.get(conn.remoteAddr.port);
      failing.delete(conn.remoteAddr.port);
      return error;
    });
    await unusual.send("PING\n");
    await timedOut.send("PING\n");
    assert.equal(await unusual.line(), "PONG");
    assert.equal(await unusual.line(), null, "its connection is closed");
    assert.equal(await timedOut.line(), "PONG");
    assert.equal(await timedOut.line(), null, "its connection is closed");
  }
  await eventually(() => broker.stats().connections === 1, "two clients are gone");
  assert.deepEqual(warnings, [
    `[BROKER] Dropped 127.0.0.1:${unusual.conn.localAddr.port}: no route to host`,
  ]);
  await using publisher = await connect(`127.0.0.1:${broker.port}`);
  publisher.publish("news", "still here");
  await publisher.flush();
  assert.equal(await bystander.line(), "MSG:news:still here");
});

Deno.test("Broker.close() tells clients it is shutting down and finishes within a second", async () => {
  const broker = startBroker({ port: 0, maxPending: 1024 * 1024 });
  await using idle = await RawClient.open(broker.port);
  await using stuck = await RawClient.open(broker.port); // never reads: its socket fills up
  assert.deepEqual(await stuck.ask("SUB:big\n"), ["OK:SUB:big"]);
  await using publisher = await connect(`localhost:${broker.port}`);
  for (let i = 0; i < 500; i++) publisher.publish("big", "z".repeat(1000));
  await publisher.flush();
  const start = performance.now();
  await broker.close();
  assert.ok(performance.now() - start < 1000, "closed within a second");
  assert.equal(await idle.line(), "ERR:shutting down");
  assert.equal(await idle.line(), null);
});

Deno.test("connect() restores its subscriptions after the broker restarts on the same port", async () => {
  const first = startBroker({ port: 0 });
  const { port } = first;
  const events: string[] = [];
  const reconnected = Promise.withResolvers<void>();
  await using client = await connect(`localhost:${port}`, {
    minBackoffMs: 10,
    maxBackoffMs: 50,
    onDisconnect: () => events.push("disconnected"),
    onReconnect: () => {
      events.push("reconnected");
      reconnected.resolve();
    },
  });
  const subscription = await client.subscribe("fragmentos");
  await first.close();
  await using second = startBroker({ port });
  await reconnected.promise;
  assert.deepEqual(events, ["disconnected", "reconnected"]);
  assert.equal(second.stats().subscriptions, 1);
  await using publisher = await connect(`localhost:${port}`);
  publisher.publish("fragmentos", "fragment_5.bin");
  assert.deepEqual(await take(subscription, 1), ["fragment_5.bin"]);
});

Deno.test("BrokerClient reconnects after its socket fails in any way, and resubscribes", async () => {
  await using broker = startBroker({ port: 0 });
  const errors: string[] = [];
  const reconnected = Promise.withResolvers<void>();
  await using client = await connect(`127.0.0.1:${broker.port}`, {
    minBackoffMs: 10,
    onDisconnect: (error) => errors.push(error.message),
    onReconnect: () => reconnected.resolve(),
  });
  const subscription = await client.subscribe("t");
  await using sample = await RawClient.open(broker.port);
  const failures = [
    new Deno.errors.TimedOut("Connection timed out (os error 110)"), // a keepalive gave up
    new Error("No route to host (os error 113)"), // EHOSTUNREACH: Deno has no class for it
  ];
  for (const error of failures) {
    let fired = false;
    const before = errors.length;
    {
      // The client's side of its connection: its next read fails.
      using _ = failReads(sample.conn, (conn) => {
        if (fired || conn === sample.conn || conn.remoteAddr.port !== broker.port) return undefined;
        fired = true;
        return error;
      });
      await client.flush().catch(() => {}); // its PONG wakes the read that then fails
      await eventually(() => errors.length > before, "the client noticed");
    }
    await eventually(() => client.isConnected, "the client is back");
    await client.flush();
  }
  await reconnected.promise;
  assert.deepEqual(errors, [
    `Connection to broker at "127.0.0.1:${broker.port}" lost: timed out`,
    `Connection to broker at "127.0.0.1:${broker.port}" failed: no route to host`,
  ]);
  await using publisher = await connect(`127.0.0.1:${broker.port}`);
  publisher.publish("t", "after");
  assert.deepEqual(await take(subscription, 1), ["after"]);
});

Deno.test("connect() rejects with a clear error when no broker listens", async () => {
  const broker = startBroker({ port: 0 });
  await broker.close(); // the port is now known to be free
  await assert.rejects(
    connect(`localhost:${broker.port}`),
    {
      name: "BrokerError",
      message: `Cannot connect to broker at "localhost:${broker.port}": connection refused`,
    },
  );
});

Deno.test("connect() with waitForBroker keeps trying until a broker appears", async () => {
  const placeholder = startBroker({ port: 0 });
  const { port } = placeholder;
  await placeholder.close();
  const reconnected = Promise.withResolvers<void>();
  const errors: Error[] = [];
  await using client = await connect(`localhost:${port}`, {
    waitForBroker: true,
    minBackoffMs: 10,
    maxBackoffMs: 50,
    onDisconnect: (error) => errors.push(error),
    onReconnect: () => reconnected.resolve(),
  });
  assert.equal(client.isConnected, false);
  assert.equal(client.publish("t", "held"), true, "publishing while down holds the message");
  await assert.rejects(client.flush(), { name: "BrokerError" });
  const subscription = await client.subscribe("t");
  assert.equal(errors.length, 1, "the failure is reported once");
  await using _broker = startBroker({ port });
  await reconnected.promise;
  client.publish("t", "hello");
  assert.deepEqual(await take(subscription, 2), ["held", "hello"], "held first, in order");
});

Deno.test("BrokerClient holds publications while down only up to maxPending", async () => {
  const placeholder = startBroker({ port: 0 });
  const { port } = placeholder;
  await placeholder.close();
  const reconnected = Promise.withResolvers<void>();
  await using client = await connect(`localhost:${port}`, {
    waitForBroker: true,
    minBackoffMs: 10,
    maxBackoffMs: 50,
    // "PUB:t:" + 40 characters + "\n" is 47 bytes: room for two, and for the SUB and PING
    // sent with them on reconnection.
    maxPending: 110,
    onReconnect: () => reconnected.resolve(),
  });
  const subscription = await client.subscribe("t");
  const messages = ["1", "2", "3", "4"].map((n) => n.repeat(40));
  assert.deepEqual(messages.slice(0, 3).map((m) => client.publish("t", m)), [true, true, false]);
  await using _broker = startBroker({ port });
  await reconnected.promise;
  client.publish("t", messages[3]!);
  assert.deepEqual(await take(subscription, 3), [messages[0], messages[1], messages[3]]);
  await client.close();
  assert.equal(client.publish("t", "late"), false, "a closed client drops what is published");
});

Deno.test("BrokerClient refuses bad topics and messages before sending them", async () => {
  await using broker = startBroker({ port: 0 });
  await using client = await connect(`127.0.0.1:${broker.port}`);
  assert.throws(() => client.publish("bad topic", "x"), TypeError);
  assert.throws(() => client.publish("t", "two\nlines"), TypeError);
  await assert.rejects(client.subscribe(""), TypeError);
  const messages: Message[] = [];
  const subscription = await client.subscribe("t");
  client.publish("t", "fine: with colons");
  for await (const message of subscription) {
    messages.push(message);
    break; // leaving the loop unsubscribes
  }
  assert.deepEqual(messages, [{ topic: "t", message: "fine: with colons" }]);
  await eventually(() => broker.stats().subscriptions === 0, "the subscription is gone");
});

Deno.test("parseAnnouncement() reads what formatAnnouncement() writes, and nothing else", () => {
  assert.equal(formatAnnouncement("fragment_5.bin"), "fragment_5.bin");
  const holder = { hostname: "10.0.0.7", port: 6001 };
  assert.equal(formatAnnouncement("fragment_5.bin", holder), "fragment_5.bin 10.0.0.7:6001");
  assert.deepEqual(parseAnnouncement("fragment_5.bin 10.0.0.7:6001"), {
    name: "fragment_5.bin",
    holder,
  });
  assert.deepEqual(parseAnnouncement("fragment_5.bin"), { name: "fragment_5.bin" });
  assert.deepEqual(parseAnnouncement("f.bin [::1]:6002")?.holder, { hostname: "::1", port: 6002 });
  assert.equal(formatAnnouncement("f.bin", { hostname: "::1", port: 6002 }), "f.bin [::1]:6002");
  for (const bad of ["", "../etc/passwd", "f.bin host", "f.bin host:99999", "f.bin a:1 extra"]) {
    assert.equal(parseAnnouncement(bad), undefined, JSON.stringify(bad));
  }
  assert.throws(() => formatAnnouncement("../x"), TypeError);
  assert.deepEqual(parseAddress("broker:5555"), { hostname: "broker", port: 5555 });
  assert.throws(() => parseAddress("5555"), TypeError);
});
