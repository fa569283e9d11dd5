import assert from "node:assert/strict";
import net from "node:net";
import { LineBuffer } from "../common/lines.ts";
import { rssMiB } from "../bench/_report.ts";
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
import { addressKey } from "../common/connection_counts.ts";
import { Child, startTask, taskArgv } from "./_util.ts";

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

/** Collects `count` messages from a subscription; fails when they are not all in within 10 s. */
async function take(subscription: Subscription, count: number): Promise<string[]> {
  const messages: string[] = [];
  if (count === 0) return messages;
  const timer = setTimeout(() => subscription.unsubscribe(), 10_000); // ends the loop below
  try {
    for await (const { message } of subscription) {
      messages.push(message);
      if (messages.length === count) break;
    }
  } finally {
    clearTimeout(timer);
  }
  if (messages.length < count) throw new Error(`Only ${messages.length} of ${count} messages came`);
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

/**
 * A bare connection from another loopback address (`127.0.0.2`, ...), as from a second machine:
 * `Deno.connect` cannot choose the address it connects from, `node:net` can.
 */
class AddressedClient implements AsyncDisposable {
  readonly #socket: net.Socket;
  readonly #lines: string[] = [];
  readonly #closed: Promise<void>;
  #partial = "";
  #ended = false;
  #wake: (() => void) | null = null;

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      const parts = (this.#partial + text).split("\n");
      this.#partial = parts.pop()!;
      this.#lines.push(...parts);
      this.#wake?.();
    });
    const end = () => {
      this.#ended = true;
      this.#wake?.();
    };
    socket.on("end", end);
    socket.on("error", end);
    this.#closed = new Promise((resolve) => socket.once("close", () => resolve()));
  }

  static open(port: number, localAddress: string): Promise<AddressedClient> {
    return new Promise((resolve, reject) => {
      const socket = net.connect({ host: "127.0.0.1", port, localAddress });
      socket.once("error", reject);
      socket.once("connect", () => {
        socket.off("error", reject);
        resolve(new AddressedClient(socket));
      });
    });
  }

  /** True once the broker closed the connection (lines may still wait to be taken). */
  get closed(): boolean {
    return this.#ended;
  }

  /** The next line, or null once the broker closed the connection; fails after `timeoutMs`. */
  async line(timeoutMs = 5000): Promise<string | null> {
    const deadline = Date.now() + timeoutMs;
    while (this.#lines.length === 0) {
      if (this.#ended) return null;
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`No line within ${timeoutMs} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      this.#wake = null;
    }
    return this.#lines.shift()!;
  }

  send(text: string): void {
    this.#socket.write(text);
  }

  async close(): Promise<void> {
    this.#socket.destroy();
    await this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Starts `deno task broker --port 0 ...args` as a child process and reads back its port. */
async function startBrokerTask(args: string[] = []): Promise<[Child, number]> {
  const child = startTask("broker", ["--port", "0", "--hostname", "127.0.0.1", ...args]);
  const [, port] = await child.waitFor(/\[BROKER\] Listening on port (\d+)/, { stream: "stdout" });
  return [child, Number(port)];
}

/** Reads `client` to its end (the broker closed it), dropping the bytes; the last few as text. */
async function readToEnd(client: RawClient, timeoutMs = 5000): Promise<string> {
  const buffer = new Uint8Array(256 * 1024);
  let tail = new Uint8Array(0);
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    client.close();
  }, timeoutMs);
  try {
    for (let count; (count = await client.conn.read(buffer)) !== null;) {
      const joined = new Uint8Array(tail.length + count);
      joined.set(tail);
      joined.set(buffer.subarray(0, count), tail.length);
      tail = joined.slice(-64);
    }
  } catch (error) {
    if (timedOut) throw new Error(`The broker did not close the connection within ${timeoutMs} ms`);
    if (!(error instanceof Deno.errors.ConnectionReset)) throw error;
  } finally {
    clearTimeout(timer);
  }
  return new TextDecoder().decode(tail);
}

/** Waits until the RSS of process `pid` is under `mib` (it fails after 5 s); returns it. */
async function memoryBack(pid: number, mib: number): Promise<number> {
  const deadline = Date.now() + 5000;
  while (true) {
    const rss = rssMiB(pid);
    if (rss < mib) return rss;
    if (Date.now() > deadline) throw new Error(`RSS stayed at ${rss} MiB, over ${mib} MiB`);
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
}

/** Samples the RSS of process `pid` every 20 ms until stopped; `stop()` returns the peak. */
function sampleRss(pid: number): { stop(): number } {
  let peak = rssMiB(pid);
  const timer = setInterval(() => peak = Math.max(peak, rssMiB(pid)), 20);
  return {
    stop() {
      clearInterval(timer);
      return Math.max(peak, rssMiB(pid));
    },
  };
}

const numbers = (count: number) => Array.from({ length: count }, (_, i) => String(i));
const empty: BrokerStats = {
  connections: 0,
  subscriptions: 0,
  topics: 0,
  slowConsumers: 0,
  queued: 0,
  refused: 0,
};

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
    assert.deepEqual(broker.stats(), { ...empty, connections: 2, subscriptions: 3, topics: 2 });
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

// ---------------------------------------------------------------------------------------------
// Hostile clients: every limit, the ERR line that says so, and the clients that go on meanwhile

Deno.test("startBroker() refuses connections past maxConnections with a reason, and takes new ones once some leave", async () => {
  await using broker = startBroker({ port: 0, maxConnections: 3, maxConnectionsPerAddress: 3 });
  const held = await Promise.all([1, 2, 3].map(() => RawClient.open(broker.port)));
  try {
    for (const client of held) assert.deepEqual(await client.ask("PING\n"), ["PONG"]);
    await using refused = await RawClient.open(broker.port);
    assert.equal(await refused.line(), "ERR:too many connections");
    assert.equal(await refused.line(), null, "closed");
    assert.equal(broker.stats().refused, 1);
    assert.equal(broker.stats().connections, 3);
    held[0].close();
    await eventually(() => broker.stats().connections === 2, "one client is gone");
    await using next = await RawClient.open(broker.port);
    assert.deepEqual(await next.ask("PING\n"), ["PONG"], "its slot is free again");
  } finally {
    for (const client of held) client.close();
  }
});

Deno.test("startBroker() lets no one address take every connection: past its share only that address is refused", async () => {
  await using broker = startBroker({ port: 0, maxConnections: 10, maxConnectionsPerAddress: 4 });
  const hostile: AddressedClient[] = [];
  try {
    for (let i = 0; i < 6; i++) hostile.push(await AddressedClient.open(broker.port, "127.0.0.2"));
    for (const refused of hostile.slice(4)) {
      assert.equal(await refused.line(), "ERR:too many connections from your address");
      assert.equal(await refused.line(), null, "closed");
    }
    assert.equal(broker.stats().connections, 4);
    assert.equal(broker.stats().refused, 2);
    // Another address is served as usual.
    await using client = await connect(`127.0.0.1:${broker.port}`);
    const subscription = await client.subscribe("t");
    client.publish("t", "served");
    assert.deepEqual(await take(subscription, 1), ["served"]);
    // Once the first address lets a connection go, it may open one again.
    await hostile[0].close();
    await eventually(() => broker.stats().connections === 4, "its connection is gone");
    await using again = await AddressedClient.open(broker.port, "127.0.0.2");
    again.send("PING\n");
    assert.equal(await again.line(), "PONG");
  } finally {
    await Promise.all(hostile.map((client) => client.close()));
  }
  // IPv4-mapped addresses count as IPv4; an IPv6 /64, which one host is usually given, as one.
  assert.equal(addressKey("::ffff:127.0.0.2"), "127.0.0.2");
  assert.equal(addressKey("10.0.0.7"), "10.0.0.7");
  assert.equal(addressKey("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
  assert.equal(addressKey("2001:db8:1:2::ffff"), "2001:db8:1:2::/64");
  assert.equal(addressKey("2001:0db8:0001:0003::1"), "2001:db8:1:3::/64");
  assert.equal(addressKey("::1"), "0:0:0:0::/64");
});

Deno.test("startBroker() refuses subscriptions past maxSubscriptions and keeps the connection open", async () => {
  await using broker = startBroker({ port: 0, maxSubscriptions: 3 });
  await using raw = await RawClient.open(broker.port);
  assert.deepEqual(await raw.ask("SUB:a\nSUB:b\nSUB:c\nSUB:d\nSUB:a\n"), [
    "OK:SUB:a",
    "OK:SUB:b",
    "OK:SUB:c",
    "ERR:too many subscriptions",
    "OK:SUB:a", // one it holds already is no new subscription
  ]);
  assert.deepEqual(await raw.ask("UNSUB:b\nSUB:d\nPING\n"), ["OK:UNSUB:b", "OK:SUB:d", "PONG"]);
  // A flood of subscriptions costs no more than the limit.
  const flood = Array.from({ length: 5000 }, (_, i) => `SUB:flood-${i}\n`).join("");
  const replies = await raw.ask(flood);
  assert.equal(replies.length, 5000);
  assert.ok(replies.every((reply) => reply === "ERR:too many subscriptions"));
  assert.equal(broker.stats().subscriptions, 3);
  assert.equal(broker.stats().topics, 3);

  // The client's subscribe() rejects, saying why; its other subscriptions go on.
  const errors: string[] = [];
  await using client = await connect(`127.0.0.1:${broker.port}`, {
    onError: (reason) => errors.push(reason),
  });
  const subscriptions = await Promise.all(["x", "y", "z"].map((t) => client.subscribe(t)));
  await assert.rejects(client.subscribe("w"), {
    name: "BrokerError",
    message:
      `The broker at "127.0.0.1:${broker.port}" refused the subscription to "w": too many subscriptions`,
  });
  assert.deepEqual(errors, ["too many subscriptions"]);
  client.publish("z", "still here");
  assert.deepEqual(await take(subscriptions[2], 1), ["still here"]);
  assert.equal(broker.stats().connections, 2, "the connection stays open");
});

Deno.test("startBroker() closes a client trickling a line it never finishes, and keeps slow but whole lines", async () => {
  await using broker = startBroker({ port: 0, lineTimeoutMs: 300 });
  await using reader = await connect(`127.0.0.1:${broker.port}`);
  const subscription = await reader.subscribe("t");
  await using trickler = await RawClient.open(broker.port);
  await using slow = await RawClient.open(broker.port);
  const start = performance.now();
  // One byte every 20 ms of a line that never ends: heard from all along, so no ping drops it.
  const trickling = (async () => {
    await trickler.send("PUB:t:");
    try {
      for (let i = 0; i < 200; i++) {
        await trickler.send("x");
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    } catch {
      // The broker closed it.
    }
  })();
  // Whole lines, each sent in two halves 100 ms apart, for longer than the timeout.
  for (let i = 0; i < 6; i++) {
    await slow.send(`PUB:t:mes`);
    await new Promise((resolve) => setTimeout(resolve, 100));
    await slow.send(`sage ${i}\n`);
  }
  assert.equal(await trickler.line(), "ERR:line timeout");
  assert.equal(await trickler.line(), null, "closed");
  const elapsed = performance.now() - start;
  assert.ok(elapsed >= 300 && elapsed < 3000, `closed after ${elapsed} ms`);
  await trickling;
  assert.deepEqual(await slow.ask("PING\n"), ["PONG"], "the slow client is still served");
  assert.deepEqual(await take(subscription, 6), numbers(6).map((i) => `message ${i}`));
  assert.equal(broker.stats().connections, 2);
});

Deno.test("startBroker() cuts off a subscriber whose output waits unread past writeTimeoutMs, however little", async () => {
  await using broker = startBroker({ port: 0, writeTimeoutMs: 300 });
  await using stalled = await RawClient.open(broker.port);
  assert.deepEqual(await stalled.ask("SUB:t\n"), ["OK:SUB:t"]);
  await using reader = await connect(`127.0.0.1:${broker.port}`);
  const subscription = await reader.subscribe("t");
  await using publisher = await connect(`127.0.0.1:${broker.port}`);
  // Fill its socket until some output waits in the broker: far below maxPending (8 MiB).
  const padding = "p".repeat(1000);
  let sent = 0;
  while (broker.stats().queued === 0 && sent < 20_000) {
    for (let i = 0; i < 100; i++) publisher.publish("t", `${sent++} ${padding}`);
    await publisher.flush();
  }
  assert.ok(broker.stats().queued > 0, "output waits for the stalled subscriber");
  assert.equal(broker.stats().slowConsumers, 0, "not cut off before its deadline");
  await eventually(() => broker.stats().slowConsumers === 1, "it is cut off", 3000);
  assert.equal(broker.stats().queued, 0, "what waited for it is let go");
  assert.equal(broker.stats().subscriptions, 1);
  const tail = await readToEnd(stalled);
  assert.ok(tail.endsWith("ERR:slow consumer\n"), `ends with ${JSON.stringify(tail)}`);
  const received = await take(subscription, sent);
  assert.ok(received.every((message, i) => message === `${i} ${padding}`), "the reader got all");
});

Deno.test("startBroker() caps the output queued for all clients, cutting off the one with the most first", async () => {
  const maxQueued = 2 * 1024 * 1024;
  await using broker = startBroker({ port: 0, maxQueued });
  await using most = await RawClient.open(broker.port); // stops reading, on two topics
  await using less = await RawClient.open(broker.port); // stops reading, on one
  assert.deepEqual(await most.ask("SUB:big\nSUB:all\n"), ["OK:SUB:big", "OK:SUB:all"]);
  assert.deepEqual(await less.ask("SUB:all\n"), ["OK:SUB:all"]);
  await using reader = await connect(`127.0.0.1:${broker.port}`);
  const subscription = await reader.subscribe("all");
  await using publisher = await connect(`127.0.0.1:${broker.port}`);
  const padding = "p".repeat(1000);
  // First `most` alone falls behind: its socket fills up, then about 1 MiB waits for it.
  for (let i = 0; broker.stats().queued < 1024 * 1024 && i < 200; i++) {
    for (let j = 0; j < 100; j++) publisher.publish("big", padding);
    await publisher.flush();
  }
  // Then both fall behind, until the total passes the limit: `most` goes, `less` stays.
  let sent = 0;
  while (broker.stats().slowConsumers === 0 && sent < 20_000) {
    for (let i = 0; i < 100; i++) publisher.publish("all", `${sent++} ${padding}`);
    await publisher.flush();
    assert.ok(broker.stats().queued <= maxQueued, `${broker.stats().queued} bytes queued`);
  }
  assert.equal(broker.stats().slowConsumers, 1);
  assert.equal(broker.stats().subscriptions, 2, "the reader and `less` are still subscribed");
  assert.ok((await readToEnd(most)).endsWith("ERR:slow consumer\n"));
  // `less` lost nothing: once it reads, every message is there, in order.
  for (let i = 0; i < sent; i++) assert.equal(await less.line(), `MSG:all:${i} ${padding}`);
  const received = await take(subscription, sent);
  assert.ok(received.every((message, i) => message === `${i} ${padding}`), "the reader got all");
});

Deno.test("BrokerClient backs off while the broker refuses it, and gets in once there is room", async () => {
  await using broker = startBroker({ port: 0, maxConnections: 1 });
  await using holder = await RawClient.open(broker.port);
  assert.deepEqual(await holder.ask("PING\n"), ["PONG"]);
  const errors: string[] = [];
  const reconnected = Promise.withResolvers<void>();
  await using client = await connect(`127.0.0.1:${broker.port}`, {
    minBackoffMs: 50,
    onError: (reason) => errors.push(reason),
    onReconnect: () => reconnected.resolve(),
  });
  const subscription = await client.subscribe("t"); // held until it gets in
  await new Promise((resolve) => setTimeout(resolve, 600));
  const refused = broker.stats().refused;
  // At once again each time, it would have been refused hundreds of times by now.
  assert.ok(refused >= 2 && refused <= 8, `refused ${refused} times in 600 ms`);
  assert.equal(errors[0], "too many connections");
  holder.close();
  await reconnected.promise;
  client.publish("t", "in at last");
  assert.deepEqual(await take(subscription, 1), ["in at last"]);
});

Deno.test("deno task broker bounds the output queued for 100 subscribers that stop reading, serves a reader throughout, and gives the memory back", async () => {
  const maxQueued = 32 * 1024 * 1024;
  // What the limit leaves (it only keeps the total under) goes at the write timeout.
  const [broker, port] = await startBrokerTask([
    "--max-queued",
    String(maxQueued),
    "--write-timeout",
    "1",
    "--verbose",
  ]);
  await using _broker = broker;
  const pid = broker.process.pid;
  await using reader = await connect(`127.0.0.1:${port}`);
  const subscription = await reader.subscribe("flood");
  const stalled = await Promise.all(Array.from({ length: 100 }, async () => {
    const client = await RawClient.open(port);
    assert.deepEqual(await client.ask("SUB:flood\n"), ["OK:SUB:flood"]);
    return client;
  }));
  try {
    await using publisher = await connect(`127.0.0.1:${port}`);
    const before = rssMiB(pid);
    const padding = "p".repeat(1000);
    let received = 0;
    let inOrder = true;
    const receiving = (async () => {
      for await (const { message } of subscription) {
        if (message === "end") break;
        inOrder &&= message === `${received++} ${padding}`;
      }
    })();
    // 8 MB, in batches of 1 MB that the reader keeps up with: each stalled subscriber's socket
    // takes about 4 MB, then output waits for it in the broker until the limit cuts it off.
    const rss = sampleRss(pid);
    let sent = 0;
    for (let batch = 0; batch < 8; batch++) {
      for (let i = 0; i < 1000; i++) publisher.publish("flood", `${sent++} ${padding}`);
      await publisher.flush();
      await eventually(() => received === sent, "the reader keeps up", 10_000);
    }
    const during = rss.stop();
    publisher.publish("flood", "end");
    const timer = setTimeout(() => subscription.unsubscribe(), 10_000); // ends `receiving`
    await receiving;
    clearTimeout(timer);
    assert.equal(received, sent);
    assert.ok(inOrder, "the reader got every message in order");
    // Every stalled subscriber is cut off, most of them as soon as the total passes the limit.
    const cutOff = (why: string) => broker.stderr.split(why).length - 1;
    await eventually(() => cutOff("slow consumer") === 100, "all are cut off");
    assert.ok(cutOff("over --max-queued") >= 50, broker.stderr);
    await Promise.all(stalled.map((client) => readToEnd(client)));
    for (const client of stalled) client.close();
    // Unbounded, each would hold its 8 MiB of --max-pending: 800 MiB in all, kept for good.
    assert.ok(during < before + maxQueued / 2 ** 20 + 64, `RSS ${before} -> ${during} MiB`);
    const after = await memoryBack(pid, before + 32); // V8 keeps some of its heap
    console.error(
      `  100 stalled subscribers: RSS ${before.toFixed(1)} MiB before, ` +
        `${during.toFixed(1)} peak, ${after.toFixed(1)} after; cut off over --max-queued: ` +
        `${cutOff("over --max-queued")}, at --write-timeout: ${cutOff("--write-timeout")}`,
    );
    await reader.flush(); // it answers afterwards
  } finally {
    for (const client of stalled) client.close();
  }
});

Deno.test("deno task broker refuses a flood of connections from one address, and serves the others throughout", async () => {
  const [broker, port] = await startBrokerTask(); // the defaults: 1024 in all, 256 per address
  await using _broker = broker;
  const pid = broker.process.pid;
  await using reader = await connect(`127.0.0.1:${port}`);
  const subscription = await reader.subscribe("t");
  await using publisher = await connect(`127.0.0.1:${port}`);
  const before = rssMiB(pid);
  const rss = sampleRss(pid);
  const hostile: AddressedClient[] = [];
  try {
    for (let i = 0; i < 400; i += 50) {
      const opened = Array.from({ length: 50 }, () => AddressedClient.open(port, "127.0.0.2"));
      hostile.push(...await Promise.all(opened));
      publisher.publish("t", String(i)); // the others are served all the while
    }
    await eventually(() => hostile.filter((client) => client.closed).length >= 144, "refusals");
    const during = rss.stop();
    const refused = hostile.filter((client) => client.closed);
    assert.equal(refused.length, 400 - 256, "all but 256 refused");
    for (const client of refused) {
      assert.equal(await client.line(), "ERR:too many connections from your address");
    }
    assert.deepEqual(
      await take(subscription, 8),
      Array.from({ length: 8 }, (_, i) => String(i * 50)),
    );
    await using newcomer = await connect(`127.0.0.1:${port}`); // another address gets in
    await newcomer.flush();
    await using more = await AddressedClient.open(port, "127.0.0.2");
    assert.equal(await more.line(), "ERR:too many connections from your address");
    await Promise.all(hostile.map((client) => client.close()));
    // Once they are gone, the address may connect again.
    await using _back = await (async () => {
      for (let tries = 0;; tries++) {
        const client = await AddressedClient.open(port, "127.0.0.2");
        client.send("PING\n");
        if (await client.line() === "PONG") return client;
        await client.close();
        if (tries > 50) throw new Error("127.0.0.2 is still refused");
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
    })();
    assert.ok(during < before + 64, `RSS ${before} -> ${during} MiB`);
    const after = await memoryBack(pid, before + 24);
    console.error(
      `  400 connections from one address: RSS ${before.toFixed(1)} MiB before, ` +
        `${during.toFixed(1)} peak, ${after.toFixed(1)} after`,
    );
  } finally {
    await Promise.all(hostile.map((client) => client.close()));
  }
});

Deno.test("deno task broker out of file descriptors delivers to its subscribers, and serves new clients once the attackers go", async () => {
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
      "--hostname",
      "127.0.0.1",
    ],
    { command: "bash" },
  );
  const [, portText] = await broker.waitFor(/\[BROKER\] Listening on port (\d+)/, {
    stream: "stdout",
  });
  const port = Number(portText);
  const pid = broker.process.pid; // bash exec-ed the broker: the same process
  await using reader = await connect(`127.0.0.1:${port}`);
  const subscription = await reader.subscribe("t");
  await using publisher = await connect(`127.0.0.1:${port}`);
  const before = rssMiB(pid);
  const conns: Deno.Conn[] = [];
  try {
    for (let i = 0; i < 100 && !/Cannot accept/.test(broker.stderr); i++) {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port }));
      await new Promise((resolve) => setTimeout(resolve, 5));
    }
    await broker.waitFor(/Cannot accept connections: too many open files; retrying/);
    // Out of descriptors, it still delivers to the clients it has.
    for (let i = 0; i < 100; i++) publisher.publish("t", String(i));
    assert.deepEqual(await take(subscription, 100), numbers(100));
  } finally {
    conns.forEach((conn) => conn.close());
  }
  const during = rssMiB(pid);
  await using newcomer = await connect(`127.0.0.1:${port}`);
  await newcomer.flush();
  await broker.waitFor(/Accepting connections again/);
  const after = await memoryBack(pid, before + 24);
  console.error(
    `  out of descriptors: RSS ${before.toFixed(1)} MiB before, ${during.toFixed(1)} during, ` +
      `${after.toFixed(1)} after`,
  );
});

Deno.test("parseAnnouncement() reads what formatAnnouncement() writes, file included, and nothing else", () => {
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
  assert.equal(formatAnnouncement("f.bin", holder, "a.webm"), "f.bin 10.0.0.7:6001 a.webm");
  assert.deepEqual(parseAnnouncement("f.bin 10.0.0.7:6001 a.webm"), {
    name: "f.bin",
    holder,
    file: "a.webm",
  });
  assert.throws(() => formatAnnouncement("f.bin", holder, "../a"), TypeError);
  const bads = [
    "",
    "../etc/passwd",
    "f.bin host",
    "f.bin host:99999",
    "f.bin a:1 ../x",
    "f a:1 b c",
  ];
  for (const bad of bads) {
    assert.equal(parseAnnouncement(bad), undefined, JSON.stringify(bad));
  }
  assert.throws(() => formatAnnouncement("../x"), TypeError);
  assert.deepEqual(parseAddress("broker:5555"), { hostname: "broker", port: 5555 });
  assert.throws(() => parseAddress("5555"), TypeError);
});
