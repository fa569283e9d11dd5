/**
 * Scale-out bench (`deno task bench scale`), in sections, each a table of its own:
 *
 * - **fan-out**: 50,000 messages of about 40 bytes to 1 and to 10 subscribers through Debian's
 *   nats-server and through broker.ts, both measured in this run, each in its own process. The
 *   clients are bare sockets speaking each server's own protocol and only counting messages, so
 *   the figures are the servers', not a client library's; each is the best of five runs.
 *   Target: NATS within 0.8x of broker.ts, or better.
 *
 * - **directory**: locate and heartbeat req/s with 10,000 peers, two directory replicas on one
 *   redis-server against one in-memory directory, with CPU per request; and the memory Redis
 *   uses for 100,000 peers (`bench/scale_directory.ts`). Target: the replicas serve at least
 *   1.2x the in-memory locate rate.
 *
 * Exits 1 when a target is missed.
 * @module
 */
import { fileURLToPath } from "node:url";
import { printTable, ratio, type Row } from "./_report.ts";
import { startNatsServer } from "../tests/_nats_server.ts";
import { directoryScale } from "./scale_directory.ts";

const ROOT = fileURLToPath(new URL("../", import.meta.url));
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------
// Fan-out: NATS against the built-in broker

const MESSAGES = 50_000;
const PAYLOAD = "x".repeat(24); // `<6-digit n> <24 x>`: 31 bytes, as in the broker bench
// The publisher stays at most this many messages ahead of the slowest subscriber, as a publisher
// paced by its readers would: far below either server's slow-consumer limit.
const WINDOW = 20_000;
const BATCH = 1_000; // messages per publisher write
const RUNS = 5; // of each server and subscriber count; the best is reported
const STALL_MS = 5_000; // no progress for this long ends a run, counting what is missing as lost
// broker.ts fans out on one thread; nats-server gets one thread too (Go's GOMAXPROCS), so that
// each server has one core and the bench's own clients the other, on a 2-core machine.
const GOMAXPROCS = "1";

/** What differs between the two servers: how a bare client subscribes, publishes and counts. */
interface Protocol {
  name: string;
  /** Subscribes `conn` to `topic`; resolves once the server has the subscription. */
  subscribe(conn: Deno.TcpConn, topic: string): Promise<void>;
  /** Readies a publisher's connection. */
  hello(conn: Deno.TcpConn): Promise<void>;
  /** The bytes that publish one message. */
  publish(topic: string, payload: string): string;
  /** The bytes that deliver one message (counting bytes costs the bench client next to nothing). */
  delivery(topic: string, payload: string): string;
}

/** Our line protocol. */
const LINES: Protocol = {
  name: "broker.ts",
  async subscribe(conn, topic) {
    await writeAll(conn, encoder.encode(`SUB:${topic}\n`));
    await readUntil(conn, `OK:SUB:${topic}\n`);
  },
  async hello() {},
  publish: (topic, payload) => `PUB:${topic}:${payload}\n`,
  delivery: (topic, payload) => `MSG:${topic}:${payload}\n`,
};

/** NATS's client protocol, at its simplest (no echo, no verbose acknowledgements). */
const NATS: Protocol = {
  name: "nats-server",
  async subscribe(conn, topic) {
    await this.hello(conn);
    await writeAll(conn, encoder.encode(`SUB ${topic} 1\r\nPING\r\n`));
    await readUntil(conn, "PONG\r\n");
  },
  async hello(conn) {
    await readUntil(conn, "\r\n"); // INFO {...}
    const options = { verbose: false, pedantic: false, echo: false, lang: "bench", version: "1" };
    await writeAll(conn, encoder.encode(`CONNECT ${JSON.stringify(options)}\r\n`));
  },
  publish: (topic, payload) => `PUB ${topic} ${encoder.encode(payload).length}\r\n${payload}\r\n`,
  delivery: (topic, payload) =>
    `MSG ${topic} 1 ${encoder.encode(payload).length}\r\n${payload}\r\n`,
};

async function writeAll(conn: Deno.Conn, bytes: Uint8Array) {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** Reads until what arrived ends with `end` (used only before any message flows). */
async function readUntil(conn: Deno.Conn, end: string): Promise<void> {
  const buffer = new Uint8Array(4096);
  let text = "";
  while (!text.endsWith(end)) {
    const count = await conn.read(buffer);
    if (count === null) {
      throw new Error(`Server closed the connection before ${JSON.stringify(end)}`);
    }
    text += decoder.decode(buffer.subarray(0, count));
    if (text.startsWith("-ERR") || text.startsWith("ERR:")) throw new Error(text.trim());
  }
}

/** Counts the bytes arriving on `conn`, calling `progress` after each read. */
async function countBytes(
  conn: Deno.Conn,
  counts: number[],
  index: number,
  progress: () => void,
) {
  const buffer = new Uint8Array(256 * 1024);
  try {
    for (let count; (count = await conn.read(buffer)) !== null;) {
      counts[index] += count;
      progress();
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted)) {
      throw error;
    }
  }
}

/** Floods `MESSAGES` to `subscribers` subscribers; returns delivered msg/s and lost messages. */
async function flood(
  protocol: Protocol,
  port: number,
  subscribers: number,
): Promise<{ rate: number; lost: number }> {
  const topic = `flood${subscribers}`;
  const conns = await Promise.all(Array.from({ length: subscribers }, async () => {
    const conn = await Deno.connect({ hostname: "127.0.0.1", port });
    conn.setNoDelay(true);
    await protocol.subscribe(conn, topic);
    return conn;
  }));
  const bytes = conns.map(() => 0);
  // Every message is as long as every other (its number is padded to 6 digits).
  const size = encoder.encode(protocol.delivery(topic, `000000 ${PAYLOAD}`)).length;
  let wake: (() => void) | null = null;
  const readers = conns.map((conn, i) => countBytes(conn, bytes, i, () => wake?.()));
  const slowest = () => Math.floor(Math.min(...bytes) / size);
  // Waits for the subscribers to reach `target`, or gives up after STALL_MS without progress.
  const waitFor = async (target: number) => {
    let last = slowest();
    let since = performance.now();
    while (slowest() < target) {
      if (slowest() !== last) [last, since] = [slowest(), performance.now()];
      else if (performance.now() - since > STALL_MS) return;
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        wake = resolve;
        timer = setTimeout(resolve, STALL_MS);
      });
      clearTimeout(timer);
      wake = null;
    }
  };
  const writes: Uint8Array[] = [];
  for (let start = 0; start < MESSAGES; start += BATCH) {
    let text = "";
    for (let n = start; n < start + BATCH; n++) {
      text += protocol.publish(topic, `${String(n).padStart(6, "0")} ${PAYLOAD}`);
    }
    writes.push(encoder.encode(text));
  }
  const publisher = await Deno.connect({ hostname: "127.0.0.1", port });
  publisher.setNoDelay(true);
  await protocol.hello(publisher);
  const start = performance.now();
  try {
    for (const [i, write] of writes.entries()) {
      await waitFor((i + 1) * BATCH - WINDOW);
      await writeAll(publisher, write);
    }
    await waitFor(MESSAGES);
  } finally {
    publisher.close();
    for (const conn of conns) conn.close();
    await Promise.all(readers);
  }
  const elapsed = (performance.now() - start) / 1000;
  const delivered = Math.floor(bytes.reduce((sum, count) => sum + count, 0) / size);
  return { rate: delivered / elapsed, lost: MESSAGES * subscribers - delivered };
}

/** broker.ts in a child process, with the flags of its task; resolves with its port. */
async function startBrokerProcess(): Promise<{ port: number } & AsyncDisposable> {
  const process = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-q",
      "-P=broker",
      "--config",
      `${ROOT}deno.json`,
      `${ROOT}broker.ts`,
      "--port",
      "0",
      "--hostname",
      "127.0.0.1",
    ],
    stdout: "piped",
    stderr: "inherit",
  }).spawn();
  const dispose = async () => {
    process.kill("SIGKILL");
    await process.status;
    await process.stdout.cancel().catch(() => {});
  };
  try {
    const reader = process.stdout.getReader();
    let text = "";
    while (!/Listening on port \d+/.test(text)) {
      const { value, done } = await reader.read();
      if (done) throw new Error("broker.ts exited before listening");
      text += decoder.decode(value);
    }
    reader.releaseLock();
    return {
      port: Number(text.match(/Listening on port (\d+)/)![1]),
      [Symbol.asyncDispose]: dispose,
    };
  } catch (error) {
    await dispose();
    throw error;
  }
}

async function fanOut(): Promise<Row[]> {
  await using broker = await startBrokerProcess();
  await using nats = await startNatsServer({ env: { GOMAXPROCS: GOMAXPROCS } });
  // Each figure is the best of five runs, the two servers taking turns, so that a burst of
  // another process on a shared 2-core machine does not decide the ratio.
  const best = async (subscribers: number) => {
    let ours = { rate: 0, lost: 0 };
    let theirs = { rate: 0, lost: 0 };
    for (let i = 0; i < RUNS; i++) {
      const run = await flood(LINES, broker.port, subscribers);
      const natsRun = await flood(NATS, nats.port, subscribers);
      ours = { rate: Math.max(ours.rate, run.rate), lost: ours.lost + run.lost };
      theirs = { rate: Math.max(theirs.rate, natsRun.rate), lost: theirs.lost + natsRun.lost };
    }
    return [ours, theirs];
  };
  const [ours1, nats1] = await best(1);
  const [ours10, nats10] = await best(10);
  const rate = (value: number) => `${(value / 1e6).toFixed(2)} M msg/s`;
  const lost = ours1.lost + ours10.lost + nats1.lost + nats10.lost;
  return [
    { name: "broker.ts, 1 subscriber", value: rate(ours1.rate) },
    {
      name: "NATS, 1 subscriber",
      value: `${rate(nats1.rate)} (${ratio(nats1.rate / ours1.rate)})`,
      target: ">= 0.8x broker.ts",
      pass: nats1.rate >= 0.8 * ours1.rate,
    },
    { name: "broker.ts, 10 subscribers", value: rate(ours10.rate) },
    {
      name: "NATS, 10 subscribers",
      value: `${rate(nats10.rate)} (${ratio(nats10.rate / ours10.rate)})`,
      target: ">= 0.8x broker.ts",
      pass: nats10.rate >= 0.8 * ours10.rate,
    },
    { name: "messages lost (all runs)", value: String(lost), target: "0", pass: lost === 0 },
  ];
}

// ---------------------------------------------------------------------------------------------
// The sections, in the order they run (each prints its own table).

const SECTIONS: [string, () => Promise<Row[]>][] = [
  ["fan-out: 1 and 10 subscribers, NATS against broker.ts", fanOut],
  ["directory: 2 replicas on Redis against 1 in memory, 10k peers", directoryScale],
];

async function main() {
  let ok = true;
  for (const [title, run] of SECTIONS) {
    console.log(`### ${title}\n`);
    ok = printTable(await run()) && ok;
    console.log();
  }
  // An exit code rather than Deno.exit(), so that every server is still disposed of.
  if (!ok) Deno.exitCode = 1;
}

if (import.meta.main) await main();
