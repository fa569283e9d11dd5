/**
 * `deno task bench directory`: the directory with 10,000 peers holding 10 fragments each and the
 * 1,000 files they seed, under locate (`GET /fragments/{name}?file=`) and heartbeat
 * (`PUT /peers/{id}`) load, beside bare Hono routes doing the same JSON work without validation
 * or state, in the same run. A heartbeat is authenticated: its bare route reads the secret (which
 * makes Deno build the request's headers); the ratio against one that does not is printed beside.
 * Fragments are named as split.ts names them, `fragment_<i>.bin` in every file: each name has
 * 10,000 holders, 10 of each file, and a locate asks for one file's.
 *
 * Both servers run as child processes: the directory exactly as its task runs it, the bare app as
 * this file with `--bare`. The load generator (keep-alive bare sockets, a few at once) shares
 * the 2 cores with them, so req/s alone flatters whoever is cheaper to call; each server's own
 * CPU time per request (utime + stime from /proc/<pid>/stat) is the fair figure and the one the
 * targets use.
 * @module
 */
import { Hono } from "hono";
import { createHash } from "node:crypto";
import { fileURLToPath } from "node:url";
import { newSecret } from "../directory.ts";
import { Child, startTask } from "../tests/_util.ts";
import { cpuSeconds, printTable, ratio, type Row, rssMiB } from "./_report.ts";
import { HttpConnection } from "./_http_load.ts";

const PEERS = 10_000;
export const FRAGMENTS_PER_PEER = 10;
/** Peer i seeds file i % FILES whole, so every fragment has PEERS / FILES holders. */
export const FILES = 1_000;
const WORKERS = 8;
/** Requests that warm a route up: as many as there are (fragment, file) pairs to locate. */
const WARMUP = FRAGMENTS_PER_PEER * FILES;
/**
 * Rounds per route, the best counting. The machine's slow spells last seconds and slow the
 * directory, whose state is spread over far more memory, more than the bare app: with 3 rounds
 * (about 5 s of locates) one full bench in six read 0.76x where quiet ones read 0.86-0.92x.
 */
const ROUNDS = 6;
const REQUESTS = 20_000;
const PHASE_DEADLINE_MS = 60_000;
const LISTENING = /Listening on (http:\/\/\S+)/;
const JSON_HEADERS = { "content-type": "application/json" };

/** As split.ts names them: the same names in every file. */
const fragmentName = (index: number) => `fragment_${index}.bin`;
const fileName = (file: number) => `file${file}.webm`;
/** Each file's id, its SHA-256 as a manifest gives it: distinct, as content ids are. */
const FILE_IDS = Array.from(
  { length: FILES },
  (_, file) => createHash("sha256").update(fileName(file)).digest("hex"),
);
export const fileId = (file: number) => FILE_IDS[file]!;

/** Peer i's state: one address per peer, seeding file i % FILES whole. */
export function peerState(i: number) {
  return {
    host: `10.${i >> 16}.${(i >> 8) & 255}.${i & 255}`, // one address per peer: no dedupe
    port: 6001,
    grpcPort: 50051,
    httpPort: 8001,
    fragments: Array.from({ length: FRAGMENTS_PER_PEER }, (_, j) => fragmentName(j)),
    file: fileName(i % FILES),
    fileId: fileId(i % FILES),
  };
}

const SHA256 = "0".repeat(64);
const FRAGMENT_SIZE = 1_000;

/** The manifest of file `file`, which peers i with i % FILES === file seed whole. */
function manifest(file: number) {
  return {
    version: 1,
    file: fileName(file),
    mime: "video/webm",
    size: FRAGMENTS_PER_PEER * FRAGMENT_SIZE,
    sha256: fileId(file),
    fragments: Array.from({ length: FRAGMENTS_PER_PEER }, (_, index) => ({
      index,
      name: fragmentName(index),
      offset: index * FRAGMENT_SIZE,
      size: FRAGMENT_SIZE,
      sha256: SHA256,
    })),
  };
}

/** The bare app: the same JSON in and out as the directory's routes, no validation, no state. */
function bareApp(): Hono {
  const app = new Hono();
  // The holders of one file as the directory lists them (toHolder), its id in each: the answer
  // is as long as the directory's, so both servers send the same bytes.
  const holders = Array.from({ length: PEERS / FILES }, (_, i) => {
    const { host, port, grpcPort, httpPort, fileId } = peerState(i * FILES);
    return { id: crypto.randomUUID(), host, port, grpcPort, httpPort, fileId };
  });
  app.get("/fragments/:name", (c) => {
    c.req.query("file"); // read, as the directory does
    return c.json({ name: c.req.param("name"), holders }, 200);
  });
  // A heartbeat is authenticated: the least a route for it does is read the secret, which makes
  // Deno build the request's headers (the route below it skips that, for the record).
  app.put("/peers/:id", async (c) => {
    c.req.header("authorization");
    await c.req.json();
    return c.json({ id: c.req.param("id"), ttl: 600, recreated: false }, 200);
  });
  app.put("/unauthenticated/peers/:id", async (c) => {
    await c.req.json();
    return c.json({ id: c.req.param("id"), ttl: 600, recreated: false }, 200);
  });
  return app;
}

/** A request to send: the URL and its init, as fetch takes them. */
type Call = [string, RequestInit?];

interface LoadResult {
  requests: number;
  seconds: number;
  cpuSeconds: number;
  latencies: number[];
  failures: number;
}

/**
 * Sends `count` requests from WORKERS keep-alive connections, one request in flight on each, and
 * measures them. `request(i)` builds the i-th request; a non-2xx answer counts as a failure. The
 * connections are bare sockets (`_http_load.ts`): a `fetch` loop cost this process more CPU than
 * the servers it measures, and on 2 cores that came out of theirs.
 */
async function load(
  pid: number,
  count: number,
  request: (i: number) => Call,
): Promise<LoadResult> {
  const latencies: number[] = [];
  let next = 0;
  let failures = 0;
  const deadline = Date.now() + PHASE_DEADLINE_MS;
  const connections = await Promise.all(
    Array.from({ length: WORKERS }, () => HttpConnection.open(request(0)[0])),
  );
  // Built before the clock starts: the load generator's CPU comes out of the servers' cores.
  const requests = Array.from({ length: count }, (_, i) => {
    const [url, init = {}] = request(i);
    const { pathname, search } = new URL(url);
    return connections[0]!.encode({
      method: init.method,
      path: pathname + search,
      headers: init.headers as Record<string, string> | undefined,
      body: init.body as string | undefined,
    });
  });
  const cpuBefore = cpuSeconds(pid);
  const start = performance.now();
  await Promise.all(connections.map(async (connection) => {
    for (let i = next++; i < count && Date.now() < deadline; i = next++) {
      const sent = performance.now();
      const [status] = await connection.sendAll(requests[i]!, 1);
      latencies.push(performance.now() - sent);
      if (status! < 200 || status! > 299) failures++;
    }
  }));
  const seconds = (performance.now() - start) / 1000;
  const cpu = cpuSeconds(pid) - cpuBefore;
  for (const connection of connections) connection[Symbol.dispose]();
  return { requests: latencies.length, seconds, cpuSeconds: cpu, latencies, failures };
}

/** The figures of a route over its rounds: the best round (noise only ever adds), pooled tails. */
interface Figures {
  perSecond: number;
  cpuMicros: number;
  p50: number;
  p99: number;
  failures: number;
}

function figures(rounds: LoadResult[]): Figures {
  const latencies = rounds.flatMap((round) => round.latencies).sort((a, b) => a - b);
  const at = (q: number) =>
    latencies[Math.min(latencies.length - 1, Math.floor(q * latencies.length))];
  return {
    perSecond: Math.max(...rounds.map((round) => round.requests / round.seconds)),
    cpuMicros: Math.min(...rounds.map((round) => (round.cpuSeconds / round.requests) * 1e6)),
    p50: at(0.5),
    p99: at(0.99),
    failures: rounds.reduce((sum, round) => sum + round.failures, 0),
  };
}

/**
 * A route under load: the server's pid, the i-th request to send it, and the i-th to warm it up
 * with (`request` when none).
 */
interface Route {
  pid: number;
  request: (i: number) => Call;
  warmup?: (i: number) => Call;
}

/**
 * Warms the routes up (JIT, connection pool, caches), then measures them in alternating rounds,
 * so a burst of noise from the shared cores does not land on one side only: their figures, in
 * order.
 */
async function compare(...routes: Route[]): Promise<Figures[]> {
  for (const route of routes) await load(route.pid, WARMUP, route.warmup ?? route.request);
  const rounds = routes.map((): LoadResult[] => []);
  for (let round = 0; round < ROUNDS; round++) {
    for (const [i, route] of routes.entries()) {
      rounds[i]!.push(await load(route.pid, REQUESTS, route.request));
    }
  }
  return rounds.map(figures);
}

/** Runs the bench; false when a target was missed. Both servers are stopped on return. */
async function main(): Promise<boolean> {
  // Every peer registers from this machine, naming its own address: the directory must take
  // the hosts they name, and as many peers from one address as there are.
  const directoryArgs = [
    ...["--port", "0", "--hostname", "127.0.0.1", "--ttl", "600", "--trust-advertise"],
    ...["--max-peers-per-address", String(PEERS)],
  ];
  await using directory = startTask("directory", directoryArgs);
  await using bare = new Child(["run", "-q", "-P=bench", fileURLToPath(import.meta.url), "--bare"]);
  const [, directoryUrl] = await directory.waitFor(LISTENING, { stream: "stdout" });
  const [, bareUrl] = await bare.waitFor(LISTENING, { stream: "stdout" });
  const [ourPid, barePid] = [directory.process.pid, bare.process.pid];
  const emptyRss = rssMiB(ourPid);

  // Each peer registers with a secret of its own, as a peer's presence does.
  const secrets = Array.from({ length: PEERS }, () => newSecret());
  const registration = await load(ourPid, PEERS, (i) => {
    const body = JSON.stringify(peerState(i));
    const headers = { ...JSON_HEADERS, authorization: `Bearer ${secrets[i]}` };
    return [`${directoryUrl}/peers`, { method: "POST", headers, body }];
  });
  const { peers, fragments } = await (await fetch(`${directoryUrl}/health`)).json();
  const memory = rssMiB(ourPid);
  const publication = await load(ourPid, FILES, (i) => {
    const body = JSON.stringify(manifest(i));
    return [`${directoryUrl}/files`, { method: "POST", headers: JSON_HEADERS, body }];
  });
  const withFiles = rssMiB(ourPid);
  // GET /peers lists peers a page at a time, in the order their registrations landed, which the
  // concurrent workers shuffle: match each id to its peer by host (one per peer), so heartbeat i
  // repeats peer i.
  const idByHost = new Map<string, string>();
  let cursor: string | undefined;
  do {
    const query = cursor === undefined ? "" : `&cursor=${cursor}`;
    const page: { peers: { id: string; host: string }[]; next?: string } =
      await (await fetch(`${directoryUrl}/peers?limit=1000${query}`)).json();
    for (const peer of page.peers) idByHost.set(peer.host, peer.id);
    cursor = page.next;
  } while (cursor !== undefined);
  const ids = Array.from({ length: PEERS }, (_, i) => idByHost.get(peerState(i).host) ?? "");

  const randomFragment = () =>
    `${fragmentName(Math.floor(Math.random() * FRAGMENTS_PER_PEER))}?file=${
      fileId(Math.floor(Math.random() * FILES))
    }`;
  // Warmed up on every (fragment, file) pair once: the directory builds a pair's answer on its
  // first locate and keeps it while its holders stay (Registry.locateJson). Random pairs left a
  // tenth of them to build in the second round, work the bare app, which keeps nothing, skips.
  const everyFragment = (i: number) =>
    `${fragmentName(i % FRAGMENTS_PER_PEER)}?file=${fileId(Math.floor(i / FRAGMENTS_PER_PEER))}`;
  const [bareLocate, locate] = await compare(
    {
      pid: barePid,
      request: () => [`${bareUrl}/fragments/${randomFragment()}`],
      warmup: (i) => [`${bareUrl}/fragments/${everyFragment(i)}`],
    },
    {
      pid: ourPid,
      request: () => [`${directoryUrl}/fragments/${randomFragment()}`],
      warmup: (i) => [`${directoryUrl}/fragments/${everyFragment(i)}`],
    },
  );
  // A heartbeat repeats the peer's full state, as registered, with its secret (which the bare
  // app reads, and the bare unauthenticated route ignores).
  const heartbeat = (url: string) => (i: number): Call => {
    const body = JSON.stringify(peerState(i % PEERS));
    const headers = { ...JSON_HEADERS, authorization: `Bearer ${secrets[i % PEERS]}` };
    return [`${url}/peers/${ids[i % PEERS]}`, { method: "PUT", headers, body }];
  };
  const [bareBeat, unauthenticatedBeat, beat] = await compare(
    { pid: barePid, request: heartbeat(bareUrl) },
    { pid: barePid, request: heartbeat(`${bareUrl}/unauthenticated`) },
    { pid: ourPid, request: heartbeat(directoryUrl) },
  );
  // Refreshing peers must not evict any: every one is still there after the heartbeats, and so
  // is every file they seed.
  const after: { peers: number; files: number } = await (await fetch(`${directoryUrl}/health`))
    .json();
  const afterBeats = after.peers;
  // Again after the load, for the record: the locates reached nearly every fragment and what
  // they built stays, but most of the growth is V8's young generation, which grows to ~50 MiB
  // once enough survives (five re-registrations of the peers take the directory there as well).
  const loadedMemory = rssMiB(ourPid);

  const show = (result: Figures) =>
    `${Math.round(result.perSecond)} req/s, ${result.cpuMicros.toFixed(1)} µs CPU/req` +
    (result.failures ? `, ${result.failures} FAILED` : "");
  const versus = (ours: Figures, base: Figures) => base.cpuMicros / ours.cpuMicros;
  const rows: Row[] = [
    {
      name: `register ${PEERS} peers x ${FRAGMENTS_PER_PEER} fragments`,
      value: `${peers} peers, ${fragments} fragment names, ${
        Math.round(registration.requests / registration.seconds)
      } req/s`,
      target: `${PEERS} peers`,
      pass: peers === PEERS && registration.failures === 0,
    },
    {
      name: `directory RSS with ${PEERS} peers`,
      value: `${memory.toFixed(1)} MiB (${emptyRss.toFixed(1)} MiB empty)`,
      target: "< 150 MiB",
      pass: memory < 150,
    },
    {
      name: `publish the ${FILES} files they seed`,
      value: `${Math.round(publication.requests / publication.seconds)} req/s, ${
        withFiles.toFixed(1)
      } MiB RSS with them, ${after.files} listed after the load`,
      target: `${FILES} files`,
      pass: publication.failures === 0 && after.files === FILES,
    },
    {
      name: "directory RSS after the locate and heartbeat load",
      value: `${loadedMemory.toFixed(1)} MiB`,
    },
    { name: "bare Hono GET /fragments/:name", value: show(bareLocate) },
    {
      name: `GET /fragments/{name}?file=, ${PEERS / FILES} holders of ${PEERS}`,
      value: show(locate),
      pass: locate.failures === 0,
    },
    {
      name: "locate vs bare: server CPU per request",
      value: `${ratio(versus(locate, bareLocate))} (req/s ${
        ratio(locate.perSecond / bareLocate.perSecond)
      })`,
      target: ">= 0.80x",
      pass: versus(locate, bareLocate) >= 0.8,
    },
    { name: "bare Hono PUT /peers/:id, reading the secret", value: show(bareBeat) },
    { name: "bare Hono PUT /peers/:id, unauthenticated", value: show(unauthenticatedBeat) },
    {
      name: "PUT /peers/{id} heartbeat",
      value: show(beat) + (afterBeats === PEERS ? "" : `, ${afterBeats} peers left`),
      pass: beat.failures === 0 && afterBeats === PEERS,
    },
    {
      name: "heartbeat vs bare: server CPU per request",
      value: `${ratio(versus(beat, bareBeat))} (req/s ${
        ratio(beat.perSecond / bareBeat.perSecond)
      }); ${ratio(versus(beat, unauthenticatedBeat))} of the unauthenticated route`,
      target: ">= 0.80x",
      pass: versus(beat, bareBeat) >= 0.8,
    },
    {
      name: `heartbeat latency, ${WORKERS} concurrent`,
      value: `p50 ${beat.p50.toFixed(2)} ms, p99 ${beat.p99.toFixed(2)} ms`,
      target: "p99 < 5 ms",
      pass: beat.p99 < 5,
    },
  ];
  return printTable(rows);
}

/** `--bare`: serve the bare app on a free port until SIGTERM. */
async function serveBare() {
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, onListen: () => {} },
    bareApp().fetch,
  );
  console.log(`Listening on http://127.0.0.1:${server.addr.port}`);
  Deno.addSignalListener("SIGTERM", () => server.shutdown());
  await server.finished;
}

if (import.meta.main) {
  if (Deno.args.includes("--bare")) await serveBare();
  // Exit only after main() has returned: exiting inside it would skip the `await using` that
  // stops both servers, and leave them running.
  else if (!(await main())) Deno.exit(1);
}
