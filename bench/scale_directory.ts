/**
 * The directory section of `deno task bench scale`: locate (`GET /fragments/{name}?file=`) and
 * heartbeat (`PUT /peers/{id}`, repeating the registration) with 10,000 peers, through two
 * directory replicas on one Debian redis-server against one in-memory directory, all measured in
 * the same run; then the memory Redis uses for 100,000 peers (INFO memory).
 *
 * Peers are as in `bench/directory_bench.ts`: 10 fragments each, peer i seeding file i % 1,000,
 * so a locate for one file lists 10 holders. The load generator shares the 2 cores with the
 * servers, so it must cost them as little as it can: 16 keep-alive connections over bare sockets,
 * requests built beforehand and pipelined 8 deep (`_http_load.ts`; wrk's pipelining, in effect),
 * about 10 µs of CPU a request where a `fetch` loop took 55 and left the servers under half the
 * machine. Each side's CPU per request (its servers' utime + stime from /proc, Redis included) is
 * given beside its req/s, and the load generator's own.
 *
 * Target: two replicas on Redis serve at least 1.2x the locate rate of one in-memory directory.
 * Beside it, the ceiling this machine allows, measured in the same run: the load generator's
 * rate against the cheapest server there is (`GET /health` of two empty in-memory directories,
 * which reads no index and serializes almost nothing), and the replicas' share of it.
 * @module
 */
import { createClient } from "@redis/client";
import { RedisStore } from "../directory.ts";
import { startRedisServer } from "../tests/_redis_server.ts";
import { type Child, startTask } from "../tests/_util.ts";
import { cpuSeconds, ratio, type Row } from "./_report.ts";
import { fileId, FILES, FRAGMENTS_PER_PEER, peerState } from "./directory_bench.ts";
import { type HttpCall, HttpConnection, pipeline } from "./_http_load.ts";

const PEERS = 10_000;
const MEMORY_PEERS = 100_000;
const WORKERS = 16;
/** Requests each connection sends back to back before it reads their answers. */
const PIPELINE = 8;
const WARMUP = 5_000;
const REQUESTS = 40_000;
const ROUNDS = 3;
const PHASE_DEADLINE_MS = 30_000;
/** Upserts in flight at once while filling Redis directly: node-redis pipelines them. */
const FILL_BATCH = 500;
const LISTENING = /Listening on (http:\/\/\S+)/;
const JSON_HEADERS = { "content-type": "application/json" };

/** A request: the worker's URL (one per server) and what it sends. */
type Call = [string, HttpCall];

/**
 * A side's figures: req/s, its servers' CPU per request, that of the last of them alone, and
 * the load generator's (this process).
 */
interface Figures {
  perSecond: number;
  cpuMicros: number;
  lastMicros: number;
  loaderMicros: number;
  failures: number;
}

/**
 * Sends `count` requests from WORKERS keep-alive connections (bare sockets, the requests built
 * beforehand: see `_http_load.ts`), worker w sending requests w, w + WORKERS, …: req/s and CPU
 * per request.
 */
async function load(
  pids: number[],
  count: number,
  request: (i: number, worker: number) => Call,
): Promise<Figures> {
  let done = 0;
  let failures = 0;
  const deadline = Date.now() + PHASE_DEADLINE_MS;
  const workers = await Promise.all(Array.from({ length: WORKERS }, async (_, worker) => {
    const connection = await HttpConnection.open(request(0, worker)[0]);
    const batches: { bytes: Uint8Array; count: number }[] = [];
    for (let first = worker; first < count; first += WORKERS * PIPELINE) {
      const requests = [];
      for (let i = first; i < count && requests.length < PIPELINE; i += WORKERS) {
        requests.push(connection.encode(request(i, worker)[1]));
      }
      batches.push({ bytes: pipeline(requests), count: requests.length });
    }
    return { connection, batches };
  }));
  const cpuBefore = pids.map(cpuSeconds);
  const loaderBefore = cpuSeconds(Deno.pid);
  const start = performance.now();
  await Promise.all(workers.map(async ({ connection, batches }) => {
    for (const batch of batches) {
      if (Date.now() >= deadline) break;
      for (const status of await connection.sendAll(batch.bytes, batch.count)) {
        if (status < 200 || status > 299) failures++;
        done++;
      }
    }
  }));
  for (const { connection } of workers) connection[Symbol.dispose]();
  const seconds = (performance.now() - start) / 1000;
  const loaderMicros = (cpuSeconds(Deno.pid) - loaderBefore) / done * 1e6;
  const each = pids.map((pid, k) => (cpuSeconds(pid) - cpuBefore[k]!) / done * 1e6);
  const cpuMicros = each.reduce((sum, micros) => sum + micros, 0);
  return { perSecond: done / seconds, cpuMicros, lastMicros: each.at(-1)!, loaderMicros, failures };
}

/** A directory process with these flags, its URL and pid. */
async function startDirectoryProcess(args: string[]): Promise<{ child: Child; url: string }> {
  const child = startTask("directory", [
    ...["--port", "0", "--hostname", "127.0.0.1", "--ttl", "600", "--trust-advertise"],
    ...["--max-peers-per-address", String(PEERS * 2)],
    ...args,
  ]);
  try {
    return { child, url: (await child.waitFor(LISTENING))[1]! };
  } catch (error) {
    await child[Symbol.asyncDispose]();
    throw error;
  }
}

/** One side of the comparison: where each worker sends, and whose CPU counts. */
interface Side {
  urls: string[];
  pids: number[];
  peers: { id: string; secret: string; body: string }[];
}

/** Registers PEERS peers through the side's first URL. */
async function register(side: Side): Promise<void> {
  const bodies = Array.from({ length: PEERS }, (_, i) => JSON.stringify(peerState(i)));
  let next = 0;
  await Promise.all(Array.from({ length: WORKERS }, async () => {
    for (let i = next++; i < PEERS; i = next++) {
      const response = await fetch(`${side.urls[0]}/peers`, {
        method: "POST",
        headers: JSON_HEADERS,
        body: bodies[i],
      });
      if (response.status !== 201) throw new Error(`Registering failed: ${response.status}`);
      const { id, secret } = await response.json();
      side.peers[i] = { id, secret, body: bodies[i]! };
    }
  }));
}

const locate = (side: Side) => (i: number, worker: number): Call => [
  side.urls[worker % side.urls.length]!,
  { path: `/fragments/fragment_${i % FRAGMENTS_PER_PEER}.bin?file=${fileId(i % FILES)}` },
];

/** The cheapest request a directory answers: its counts, no index read. */
const health = (side: Side) => (_i: number, worker: number): Call => [
  side.urls[worker % side.urls.length]!,
  { path: "/health" },
];

const heartbeat = (side: Side) => (i: number, worker: number): Call => {
  const peer = side.peers[i % PEERS]!;
  return [side.urls[worker % side.urls.length]!, {
    method: "PUT",
    path: `/peers/${peer.id}`,
    headers: { ...JSON_HEADERS, authorization: `Bearer ${peer.secret}` },
    body: peer.body,
  }];
};

/** The best of ROUNDS after a warm-up, the two sides taking turns. */
async function compare(
  sides: Side[],
  request: (side: Side) => (i: number, worker: number) => Call,
) {
  for (const side of sides) await load(side.pids, WARMUP, request(side));
  const best = sides.map((): Figures => ({
    perSecond: 0,
    cpuMicros: Infinity,
    lastMicros: Infinity,
    loaderMicros: Infinity,
    failures: 0,
  }));
  for (let round = 0; round < ROUNDS; round++) {
    for (const [k, side] of sides.entries()) {
      const result = await load(side.pids, REQUESTS, request(side));
      best[k]!.perSecond = Math.max(best[k]!.perSecond, result.perSecond);
      if (result.cpuMicros < best[k]!.cpuMicros) {
        best[k]!.cpuMicros = result.cpuMicros;
        best[k]!.lastMicros = result.lastMicros;
      }
      best[k]!.loaderMicros = Math.min(best[k]!.loaderMicros, result.loaderMicros);
      best[k]!.failures += result.failures;
    }
  }
  return best;
}

/** Redis's used_memory in bytes. */
async function usedMemory(url: string): Promise<number> {
  const client = createClient({ url });
  await client.connect();
  try {
    const info = await client.info("memory");
    return Number(info.match(/^used_memory:(\d+)/m)?.[1] ?? NaN);
  } finally {
    await client.close();
  }
}

/** Fills an empty Redis with MEMORY_PEERS peers through the store itself; bytes it took. */
async function memoryFor100k(url: string): Promise<number> {
  const store = new RedisStore(url, {
    ttl: 600,
    maxPeers: MEMORY_PEERS,
    maxPeersPerAddress: MEMORY_PEERS,
    maxIndexedFragments: MEMORY_PEERS * FRAGMENTS_PER_PEER,
  });
  try {
    await store.ready();
    const before = await usedMemory(url);
    for (let start = 0; start < MEMORY_PEERS; start += FILL_BATCH) {
      await Promise.all(Array.from({ length: FILL_BATCH }, async (_, k) => {
        const i = start + k;
        const state = peerState(i);
        const outcome = await store.upsert(`peer-${i}`, state, {
          secret: `secret-${i}-${"x".repeat(32)}`,
          source: "127.0.0.1",
          body: JSON.stringify(state),
        });
        if (outcome !== "created") throw new Error(`Filling Redis: ${outcome}`);
      }));
    }
    return await usedMemory(url) - before;
  } finally {
    await store.close();
  }
}

/** The section: its rows. */
export async function directoryScale(): Promise<Row[]> {
  await using redis = await startRedisServer();
  const memory = await startDirectoryProcess([]);
  await using _memory = memory.child;
  const replicas = [
    await startDirectoryProcess(["--store", redis.url]),
    await startDirectoryProcess(["--store", redis.url]),
  ];
  await using _a = replicas[0]!.child;
  await using _b = replicas[1]!.child;
  const empty = [await startDirectoryProcess([]), await startDirectoryProcess([])];
  await using _c = empty[0]!.child;
  await using _d = empty[1]!.child;
  const inMemory: Side = { urls: [memory.url], pids: [memory.child.process.pid], peers: [] };
  const onRedis: Side = {
    urls: replicas.map((replica) => replica.url),
    pids: [...replicas.map((replica) => replica.child.process.pid), redis.child.process.pid],
    peers: [],
  };
  await register(inMemory);
  await register(onRedis);
  const [memLocate, redisLocate] = await compare([inMemory, onRedis], locate);
  const cheapest: Side = {
    urls: empty.map((directory) => directory.url),
    pids: empty.map((directory) => directory.child.process.pid),
    peers: [],
  };
  const [ceiling] = await compare([cheapest], health);
  const [memBeat, redisBeat] = await compare([inMemory, onRedis], heartbeat);
  // The HTTP side is done: the same Redis, emptied, is filled with 100k peers directly.
  const client = createClient({ url: redis.url });
  await client.connect();
  await client.flushAll();
  await client.close();
  const bytes = await memoryFor100k(redis.url);

  const rate = (figures: { perSecond: number }) => `${Math.round(figures.perSecond)} req/s`;
  const cpu = (figures: Figures) =>
    `${Math.round(figures.cpuMicros)} µs CPU/req (load generator ${
      Math.round(figures.loaderMicros)
    })`;
  const split = (figures: Figures) =>
    `${Math.round(figures.cpuMicros)} µs CPU/req (replicas ` +
    `${Math.round(figures.cpuMicros - figures.lastMicros)}, Redis ` +
    `${Math.round(figures.lastMicros)}, load generator ${Math.round(figures.loaderMicros)})`;
  const failures = memLocate!.failures + redisLocate!.failures + memBeat!.failures +
    redisBeat!.failures + ceiling!.failures;
  // The most any side could show against the in-memory locate on this machine.
  const ceilingRatio = ceiling!.perSecond / memLocate!.perSecond;
  const redisRatio = redisLocate!.perSecond / memLocate!.perSecond;
  return [
    { name: "locate, 1 directory in memory", value: `${rate(memLocate!)}, ${cpu(memLocate!)}` },
    {
      name: "locate, 2 replicas on Redis",
      value: `${rate(redisLocate!)} (${ratio(redisRatio)}; ceiling ${ratio(ceilingRatio)}), ` +
        split(redisLocate!),
      target: ">= 1.2x in memory",
      pass: redisLocate!.perSecond >= 1.2 * memLocate!.perSecond,
    },
    {
      name: "ceiling: the load generator against GET /health of 2 empty directories in memory",
      value: `${rate(ceiling!)} (${ratio(ceilingRatio)} the in-memory locate), ${cpu(ceiling!)}; ` +
        `the replicas' locate reaches ${Math.round(redisRatio / ceilingRatio * 100)}% of it`,
    },
    { name: "heartbeat, 1 directory in memory", value: `${rate(memBeat!)}, ${cpu(memBeat!)}` },
    {
      name: "heartbeat, 2 replicas on Redis",
      value: `${rate(redisBeat!)} (${ratio(redisBeat!.perSecond / memBeat!.perSecond)}), ` +
        split(redisBeat!),
    },
    { name: "failed requests", value: String(failures), target: "0", pass: failures === 0 },
    {
      name: `Redis used memory, ${MEMORY_PEERS / 1000}k peers of ${FRAGMENTS_PER_PEER} fragments`,
      value: `${(bytes / 2 ** 20).toFixed(1)} MiB (${Math.round(bytes / MEMORY_PEERS)} B/peer)`,
    },
  ];
}
