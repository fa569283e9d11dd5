/**
 * Broker bench (`deno task bench broker`): floods 200,000 messages of about 40 bytes to 1 and to
 * 10 subscribers, through broker.ts and through a naive broker (below) that awaits one socket
 * write per message, each in its own child process; then measures latency at a paced 5,000
 * msg/s and the broker's memory. The clients are bare sockets that only count lines, so the
 * figures are the brokers', not the client's. Exits 1 when a target is missed.
 * @module
 */
import { fileURLToPath } from "node:url";
import { peakRssMiB, printTable, ratio, type Row, rssMiB } from "./_report.ts";

const ROOT = fileURLToPath(new URL("../", import.meta.url));
const MESSAGES = 200_000;
const PAYLOAD = "x".repeat(24); // `MSG:flood:<6-digit n> <24 x>` is 41 bytes with its newline
// The publisher stays at most this many messages ahead of the slowest subscriber, as a real
// publisher paced by its readers would; it keeps each subscriber's backlog under 1 MB, far from
// the 8 MiB at which the broker would cut it off.
const WINDOW = 20_000;
const BATCH = 1_000; // messages per publisher write
const STALL_MS = 5_000; // no progress for this long ends a run, counting what is missing as lost
const LATENCY_RATE = 5_000;
const LATENCY_SECONDS = 1;
// The latency is measured this many times and the median run reported, so that one burst of
// another process on a shared 2-core machine does not decide the p99.
const LATENCY_RUNS = 5;
const encoder = new TextEncoder();
const decoder = new TextDecoder();

// ---------------------------------------------------------------------------------------------
// The naive broker: one awaited write per message and subscriber, no queue, no batching.

async function naiveBroker() {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  console.log(`[NAIVE] Listening on port ${listener.addr.port}`);
  const topics = new Map<string, Set<Deno.Conn>>();
  const writeAll = async (conn: Deno.Conn, text: string) => {
    const bytes = encoder.encode(text);
    for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
  };
  const serve = async (conn: Deno.Conn) => {
    const mine = new Set<string>();
    const buffer = new Uint8Array(64 * 1024);
    let partial = "";
    try {
      for (let count; (count = await conn.read(buffer)) !== null;) {
        const lines = (partial + decoder.decode(buffer.subarray(0, count))).split("\n");
        partial = lines.pop()!;
        for (const line of lines) {
          if (line === "PING") await writeAll(conn, "PONG\n");
          else if (line.startsWith("SUB:")) {
            const topic = line.slice(4);
            mine.add(topic);
            if (!topics.has(topic)) topics.set(topic, new Set());
            topics.get(topic)!.add(conn);
            await writeAll(conn, `OK:SUB:${topic}\n`);
          } else if (line.startsWith("PUB:")) {
            const rest = line.slice(4);
            const subscribers = topics.get(rest.slice(0, rest.indexOf(":"))) ?? [];
            for (const subscriber of subscribers) await writeAll(subscriber, `MSG:${rest}\n`);
          }
        }
      }
    } catch {
      /* a client went away */
    } finally {
      for (const topic of mine) topics.get(topic)?.delete(conn);
      conn.close();
    }
  };
  for await (const conn of listener) serve(conn);
}

// ---------------------------------------------------------------------------------------------
// Bench clients: bare sockets

/** A broker in a child process, with the flags of its task. */
class BrokerProcess implements AsyncDisposable {
  readonly process: Deno.ChildProcess;
  readonly port: Promise<number>;

  constructor(args: string[]) {
    const process = new Deno.Command(Deno.execPath(), {
      args: ["run", "-q", "-P=broker", "--config", `${ROOT}deno.json`, ...args],
      stdout: "piped",
      stderr: "inherit",
    }).spawn();
    this.process = process;
    this.port = (async () => {
      const reader = process.stdout.getReader();
      let text = "";
      while (!/Listening on port \d+/.test(text)) {
        const { value, done } = await reader.read();
        if (done) throw new Error(`Broker exited before listening: ${args.join(" ")}`);
        text += decoder.decode(value);
      }
      reader.releaseLock(); // the rest of its stdout is not needed
      return Number(text.match(/Listening on port (\d+)/)![1]);
    })();
  }

  async [Symbol.asyncDispose]() {
    this.process.kill("SIGKILL");
    await this.process.status;
    await this.process.stdout.cancel().catch(() => {});
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array) {
  for (let done = 0; done < bytes.length;) done += await conn.write(bytes.subarray(done));
}

/** Subscribes a bare connection and resolves once the broker acknowledged it. */
async function subscribe(port: number, topic: string): Promise<Deno.TcpConn> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  conn.setNoDelay(true);
  await writeAll(conn, encoder.encode(`SUB:${topic}\n`));
  const buffer = new Uint8Array(64);
  let reply = "";
  while (!reply.includes("\n")) {
    const count = await conn.read(buffer);
    if (count === null) throw new Error("Broker closed the subscriber");
    reply += decoder.decode(buffer.subarray(0, count));
  }
  if (reply !== `OK:SUB:${topic}\n`) throw new Error(`Unexpected reply ${JSON.stringify(reply)}`);
  return conn;
}

/** Counts the lines arriving on `conn`, calling `progress` after each read. */
async function countLines(conn: Deno.Conn, counts: number[], index: number, progress: () => void) {
  const buffer = new Uint8Array(256 * 1024);
  try {
    for (let count; (count = await conn.read(buffer)) !== null;) {
      for (let at = buffer.indexOf(10); at !== -1 && at < count; at = buffer.indexOf(10, at + 1)) {
        counts[index]++;
      }
      progress();
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.BadResource || error instanceof Deno.errors.Interrupted)) {
      throw error;
    }
  }
}

/** The publisher's writes: `PUB:flood:<n> <payload>` lines, `BATCH` to a buffer. */
function batches(): Uint8Array[] {
  const result = [];
  for (let start = 0; start < MESSAGES; start += BATCH) {
    let text = "";
    for (let n = start; n < start + BATCH; n++) {
      text += `PUB:flood:${String(n).padStart(6, "0")} ${PAYLOAD}\n`;
    }
    result.push(encoder.encode(text));
  }
  return result;
}

/** Floods `MESSAGES` to `subscribers` subscribers; returns delivered msg/s and lost messages. */
async function flood(port: number, subscribers: number): Promise<{ rate: number; lost: number }> {
  const conns = await Promise.all(
    Array.from({ length: subscribers }, () => subscribe(port, "flood")),
  );
  const counts = conns.map(() => 0);
  let wake: (() => void) | null = null;
  const readers = conns.map((conn, i) => countLines(conn, counts, i, () => wake?.()));
  const slowest = () => Math.min(...counts);
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
  const publisher = await Deno.connect({ hostname: "127.0.0.1", port });
  const writes = batches();
  const start = performance.now();
  try {
    for (const [i, bytes] of writes.entries()) {
      await waitFor((i + 1) * BATCH - WINDOW);
      await writeAll(publisher, bytes);
    }
    await waitFor(MESSAGES);
  } finally {
    publisher.close();
    for (const conn of conns) conn.close();
    await Promise.all(readers);
  }
  const elapsed = (performance.now() - start) / 1000;
  const delivered = counts.reduce((sum, count) => sum + count, 0);
  return { rate: delivered / elapsed, lost: MESSAGES * subscribers - delivered };
}

/** Publishes at `LATENCY_RATE` msg/s for `LATENCY_SECONDS`; returns p50 and p99 in ms. */
async function latency(port: number): Promise<{ p50: number; p99: number }> {
  const subscriber = await subscribe(port, "latency");
  const publisher = await Deno.connect({ hostname: "127.0.0.1", port });
  publisher.setNoDelay(true);
  const total = LATENCY_RATE * LATENCY_SECONDS;
  const samples: number[] = [];
  const reading = (async () => {
    const buffer = new Uint8Array(64 * 1024);
    let partial = "";
    while (samples.length < total) {
      const count = await subscriber.read(buffer);
      if (count === null) break;
      const now = performance.now();
      const lines = (partial + decoder.decode(buffer.subarray(0, count))).split("\n");
      partial = lines.pop()!;
      for (const line of lines) samples.push(now - Number(line.slice("MSG:latency:".length)));
    }
  })();
  const start = performance.now();
  let sent = 0;
  // Each timer tick sends the messages that are due by now, stamped with the time they leave.
  while (sent < total && performance.now() - start < LATENCY_SECONDS * 2000) {
    const due = Math.min(total, Math.floor((performance.now() - start) * LATENCY_RATE / 1000));
    let text = "";
    for (; sent < due; sent++) text += `PUB:latency:${performance.now()}\n`;
    if (text) await writeAll(publisher, encoder.encode(text));
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  await Promise.race([reading, new Promise((resolve) => setTimeout(resolve, STALL_MS))]);
  publisher.close();
  subscriber.close();
  await reading.catch(() => {});
  samples.sort((a, b) => a - b);
  const at = (q: number) => samples[Math.min(samples.length - 1, Math.floor(q * samples.length))];
  return { p50: at(0.5), p99: at(0.99) };
}

/** Runs {@link latency} `LATENCY_RUNS` times; returns the run with the median p99. */
async function medianLatency(port: number): Promise<{ p50: number; p99: number }> {
  const runs = [];
  for (let i = 0; i < LATENCY_RUNS; i++) runs.push(await latency(port));
  runs.sort((a, b) => a.p99 - b.p99);
  return runs[Math.floor(runs.length / 2)];
}

async function main() {
  await using broker = new BrokerProcess([
    `${ROOT}broker.ts`,
    "--port",
    "0",
    "--hostname",
    "127.0.0.1",
  ]);
  await using naive = new BrokerProcess([fileURLToPath(import.meta.url), "--naive"]);
  const [port, naivePort] = await Promise.all([broker.port, naive.port]);

  // Latency first, on brokers that have not been flooded yet: as a broker usually runs.
  const ours = await medianLatency(port);
  const theirs = await medianLatency(naivePort);
  let rss = 0;
  const sampler = setInterval(() => rss = Math.max(rss, rssMiB(broker.process.pid)), 20);
  const ours1 = await flood(port, 1);
  const ours10 = await flood(port, 10);
  clearInterval(sampler);
  const peak = peakRssMiB(broker.process.pid);
  const naive1 = await flood(naivePort, 1);
  const naive10 = await flood(naivePort, 10);

  const rate = (value: number) => `${(value / 1e6).toFixed(2)} M msg/s`;
  const ms = (value: number) => `${value.toFixed(3)} ms`;
  const rows: Row[] = [
    { name: "naive broker, 1 subscriber", value: rate(naive1.rate) },
    { name: "naive broker, 10 subscribers", value: rate(naive10.rate) },
    {
      name: "broker.ts, 1 subscriber",
      value: `${rate(ours1.rate)} (${ratio(ours1.rate / naive1.rate)})`,
      target: ">= 2x naive",
      pass: ours1.rate >= 2 * naive1.rate,
    },
    {
      name: "broker.ts, 10 subscribers",
      value: `${rate(ours10.rate)} (${ratio(ours10.rate / naive10.rate)})`,
      target: ">= 3x naive",
      pass: ours10.rate >= 3 * naive10.rate,
    },
    {
      name: "broker.ts, messages lost",
      value: String(ours1.lost + ours10.lost),
      target: "0",
      pass: ours1.lost + ours10.lost === 0,
    },
    { name: "naive broker, messages lost", value: String(naive1.lost + naive10.lost) },
    {
      name: "broker.ts latency p50 / p99 at 5k msg/s (median of 5 runs)",
      value: `${ms(ours.p50)} / ${ms(ours.p99)}`,
      target: "p99 <= 1 ms",
      pass: ours.p99 <= 1,
    },
    { name: "naive latency p50 / p99 at 5k msg/s", value: `${ms(theirs.p50)} / ${ms(theirs.p99)}` },
    {
      name: "broker.ts RSS during the floods (sampled / peak)",
      value: `${rss.toFixed(1)} / ${peak.toFixed(1)} MiB`,
      target: "< 100 MiB",
      pass: peak < 100,
    },
  ];
  // An exit code rather than Deno.exit(), so the brokers are still disposed of.
  if (!printTable(rows)) Deno.exitCode = 1;
}

if (import.meta.main) {
  if (Deno.args[0] === "--naive") await naiveBroker();
  else await main();
}
