/**
 * A crowd of viewers sharing peer to peer. Everything is a real child process started with its
 * task's flags: a directory and a broker on port 0, one seeder and the viewers on port 0, all on
 * 127.0.0.1, each viewer its own process (with its gRPC child). Two parts:
 *
 * **A downloading crowd.** One seeder holds a 6,000,000-byte file of random data in 30 fragments
 * and uploads at `--max-upload 1MB/s`; N empty viewers start at once with
 * `--fetch-all --exit-when-done --max-upload 1MB/s`, for N = 6 and N = 12: one round each, which
 * keeps the bench near three minutes on a two-core machine even for a scheduler that only reaches
 * client-server speed; the first viewer's time is printed beside the last's. With F
 * the file's size and u the rate of everyone, no schedule can beat the fluid bound
 * T = max(F/u_s, N·F/(u_s + Σu_i)) = 6 s for both N, while a client-server download, where only
 * the seeder uploads, needs N·F/u_s (36 s, 72 s). Measured, per N:
 *
 * - a viewer's time, from its `[gRPC] Listening` line (its servers are up) to its
 *   `[✓] '...' complete: ... sha256 verified` line, as swarm_bench.ts counts it; the figure is the
 *   last viewer's, beside the first's, and the speedup is client-server time / last viewer's time;
 * - the seeder's upload in copies of the file: its `[✓] Fragment '<name>' sent to <addr>` lines
 *   (one per whole fragment sent over TCP) times the fragment's size, over F. Sends cut off midway
 *   (a duplicate request that lost the race) print nothing, so this is a lower bound; the seeder's
 *   gRPC server is not counted, as the swarm fetches over TCP;
 * - for each viewer, the share of its fragments that came from other viewers: its
 *   `[swarm] <fragment> from <host:port> (k/30)` lines, where a fragment came from the seeder
 *   when the port is the seeder's TCP port (`[SERVER] Node listening on port P`).
 *
 * Targets: the last viewer within 1.5x the fluid bound, the seeder's upload at most 1.5 copies,
 * and at least half of every viewer's fragments from other viewers.
 *
 * **A watching crowd.** One seeder holds the bundled sample (samples/sample.webm, 10 fragments
 * as the demo splits it) and uploads at 2.5x its bitrate (size over the duration ffprobe reads);
 * six empty viewers, without `--fetch-all`, upload at the same rate. Each is watched by its own
 * player, `ffmpeg -re` reading `/stream/sample.webm` from the viewer's HTTP port in real time, all
 * six started together. First, as the page does, each viewer's `/events` stream is opened until
 * it sends the manifest, so the time an empty viewer takes to find the video in the directory is
 * reported apart from ffmpeg's (`/stream/` alone would find it too, as mpv's request does). ffmpeg's `-progress` reports the media time it has reached
 * every 0.1 s, which gives, per viewer:
 *
 * - the first frame: from ffmpeg's start to its first report with a media time above 0. Not a
 *   separate fetch of the first byte: a seventh request would change the load it measures, and
 *   the player sends a fragment only once it is whole and verified, so its first byte and the
 *   first frame are a probe apart;
 * - stalls, as defined at {@link stalls};
 * - whether ffmpeg exited 0 having reached the end of the video.
 *
 * Target: no stall, and every player to the end. Every wait has a deadline and every child is
 * stopped at the end, so a crowd that is served too slowly is reported, not waited for.
 * @module
 */
import { join } from "node:path";
import { parseArgs } from "node:util";
import { type Manifest, SAMPLE_VIDEO, splitFile } from "../split.ts";
import { parseRate } from "../common/throttle.ts";
import { isUserError, UserError, userMessage } from "../common/cli.ts";
import { type Child, peerArgs, startTask } from "../tests/_util.ts";
import { printTable, ratio, type Row } from "./_report.ts";

const SIZE = 6_000_000;
const FRAGMENTS = 30;
const RATE = "1MB/s";
const CROWDS = [6, 12];
const FILE = "crowd-bench.bin";
/** Targets of the downloading crowd. */
const MAX_FLUID_FACTOR = 1.5;
const MAX_SEEDER_COPIES = 1.5;
const MIN_SHARE = 0.5;
/** The watching crowd: how many players, and everyone's upload as a multiple of the bitrate. */
const WATCHERS = 6;
const WATCH_RATE_FACTOR = 2.5;

/** A watching crowd's size and upload, other than the bench's own for trying harder crowds. */
interface WatchingOptions {
  watchers: number;
  rateFactor: number;
}
/** A stall starts when playback falls this far behind the wall clock, and ends back within END. */
const STALL_S = 1;
const STALL_END_S = 0.5;
/** How often ffmpeg reports progress (`-stats_period`), in seconds. */
const PROGRESS_PERIOD_S = 0.1;
/** Longest a process may take to print its listening line, even with two dozen starting at once. */
const START_TIMEOUT_MS = 60_000;
/** Longest the directory may take to list the seeder and its file. */
const SETTLE_TIMEOUT_MS = 15_000;
/** Longest a viewer's page may wait for the manifest. */
const MANIFEST_TIMEOUT_MS = 15_000;
/** Past the video's own length, how long a player may take before it is killed. */
const PLAY_GRACE_MS = 40_000;

const DIRECTORY_LISTENING = /\[DIRECTORY\] Listening on (http:\/\/\S+) /;
const BROKER_LISTENING = /\[BROKER\] Listening on port (\d+)/;
const TCP_LISTENING = /\[SERVER\] Node listening on port (\d+)/;
const GRPC_LISTENING = /\[gRPC\] Listening on port \d+/;
const PLAYER_LISTENING = /\[PLAYER\] Watch at http:\/\/\S+?:(\d+)\//;
const COMPLETE = /\[✓\] '\S+' complete: \d+\/\d+ fragments, sha256 verified/;
const SENT = /^\[✓\] Fragment '(\S+)' sent to \S+$/gm;
const ARRIVAL = /^\[swarm\] (\S+) from (\S+) \(\d+\/\d+\)$/gm;

/** Child processes stopped together on dispose: SIGTERM first, then SIGKILL after a grace. */
class Children implements AsyncDisposable {
  readonly #children: Child[] = [];

  /** Starts `deno task <name> ...args` and keeps it to stop later. */
  start(name: string, args: string[]): Child {
    const child = startTask(name, args);
    this.#children.push(child);
    return child;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    const children = this.#children.splice(0);
    for (const child of children.toReversed()) child.kill("SIGTERM");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const grace = new Promise((resolve) => timer = setTimeout(resolve, 5_000));
    await Promise.all(children.map((child) => Promise.race([child.status(), grace])));
    clearTimeout(timer);
    await Promise.all(children.map((child) => child[Symbol.asyncDispose]()));
  }
}

/** Where the peers find the directory and the broker. */
interface Services {
  directory: string;
  broker: string;
}

/** Starts a directory and a broker, both on port 0. */
async function startServices(children: Children): Promise<Services> {
  const loopback = ["--port", "0", "--hostname", "127.0.0.1"];
  const directory = children.start("directory", loopback);
  const broker = children.start("broker", loopback);
  const options = { stream: "stdout" as const, timeoutMs: START_TIMEOUT_MS };
  const [url, port] = await Promise.all([
    directory.waitFor(DIRECTORY_LISTENING, options).then((match) => match[1]!),
    broker.waitFor(BROKER_LISTENING, options).then((match) => match[1]!),
  ]);
  return { directory: url, broker: `127.0.0.1:${port}` };
}

/** A peer's flags: {@link peerArgs} with the live broker instead of its dead one, on loopback. */
function peerFlags(dir: string, services: Services, rate: string): string[] {
  const args = peerArgs(dir, services.directory);
  args[args.indexOf("--broker") + 1] = services.broker;
  return ["0", "--hostname", "127.0.0.1", "--max-upload", rate, ...args];
}

/** Starts a seeder on `store`; resolves with it and its TCP port once the directory lists it. */
async function startSeeder(
  store: string,
  rate: string,
  services: Services,
  children: Children,
): Promise<{ seeder: Child; port: string }> {
  const seeder = children.start("peer", [...peerFlags(store, services, rate), "--no-console"]);
  const options = { stream: "stdout" as const, timeoutMs: START_TIMEOUT_MS };
  const port = (await seeder.waitFor(TCP_LISTENING, options))[1]!;
  await seeder.waitFor(GRPC_LISTENING, options);
  await settled(services.directory);
  return { seeder, port };
}

/** Waits until the directory lists one peer holding fragments, and a file. */
async function settled(url: string): Promise<void> {
  const deadline = Date.now() + SETTLE_TIMEOUT_MS;
  while (true) {
    const peers = entries<{ fragments?: string[] }>(
      (await (await fetch(`${url}/peers`)).json()).peers,
    );
    const files = entries((await (await fetch(`${url}/files`)).json()).files);
    if (peers.length === 1 && (peers[0]!.fragments?.length ?? 0) > 0 && files.length > 0) return;
    if (Date.now() > deadline) {
      throw new Error(`The directory never settled: ${JSON.stringify(peers)}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** The entries of a list the directory answers: an array, or a page of one (`{ entries }`). */
function entries<T>(list: unknown): T[] {
  if (Array.isArray(list)) return list;
  const page = (list as { entries?: unknown } | undefined)?.entries;
  return Array.isArray(page) ? page : [];
}

/** Copies of the file the seeder sent whole over TCP, from its `sent` lines. */
function seederCopies(seeder: Child, manifest: Manifest): { fragments: number; copies: number } {
  const sizes = new Map(manifest.fragments.map((f) => [f.name, f.size]));
  let fragments = 0, bytes = 0;
  for (const [, name] of seeder.stdout.matchAll(SENT)) {
    fragments++;
    bytes += sizes.get(name!) ?? 0;
  }
  return { fragments, copies: bytes / manifest.size };
}

/** A viewer's arrivals, and how many came from a peer other than the seeder. */
function arrivals(viewer: Child, seederPort: string): { total: number; fromViewers: number } {
  let total = 0, fromViewers = 0;
  for (const [, , from] of viewer.stdout.matchAll(ARRIVAL)) {
    total++;
    if (from!.slice(from!.lastIndexOf(":") + 1) !== seederPort) fromViewers++;
  }
  return { total, fromViewers };
}

/** What one viewer of the downloading crowd did. */
interface Download {
  /** Seconds from its listening line to its complete line; undefined when it never completed. */
  seconds?: number;
  /** Share of its fragments that came from other viewers (0 when none arrived). */
  share: number;
  /** Why it did not complete. */
  failure?: string;
}

/** What a downloading crowd of N did. */
interface CrowdResult {
  n: number;
  viewers: Download[];
  /** Seconds from the first viewer's listening line to the last one's complete line. */
  wallSeconds?: number;
  seeder: { fragments: number; copies: number };
}

/** Runs a downloading crowd of `n` viewers against a fresh directory, broker and seeder. */
async function downloadingCrowd(
  n: number,
  root: string,
  seedStore: string,
  manifest: Manifest,
): Promise<CrowdResult> {
  await using children = new Children();
  const services = await startServices(children);
  const { seeder, port: seederPort } = await startSeeder(seedStore, RATE, services, children);
  // Long enough for a client-server download and then some; the bench stays bounded if it fails.
  const deadline = performance.now() + 1.5 * (n * SIZE / parseRate(RATE)) * 1000 + 15_000;
  const dirs = Array.from({ length: n }, (_, i) => join(root, `crowd-${n}-viewer-${i}`));
  const viewers = dirs.map((dir) =>
    children.start("peer", [...peerFlags(dir, services, RATE), "--fetch-all", "--exit-when-done"])
  );
  const share = (viewer: Child) => {
    const { total, fromViewers } = arrivals(viewer, seederPort);
    return total === 0 ? 0 : fromViewers / total;
  };
  const started: number[] = [], finished: number[] = [];
  const downloads = await Promise.all(viewers.map(async (viewer, i): Promise<Download> => {
    const options = () => ({
      stream: "stdout" as const,
      timeoutMs: Math.max(0, deadline - performance.now()),
    });
    let listening: number | undefined;
    try {
      await viewer.waitFor(GRPC_LISTENING, options());
      listening = performance.now();
      started.push(listening);
      await viewer.waitFor(COMPLETE, options());
      finished.push(performance.now());
      const seconds = (performance.now() - listening) / 1000;
      const { code } = await viewer.status();
      if (code !== 0) throw new Error(`exited ${code}`);
      const size = (await Deno.stat(join(dirs[i]!, FILE))).size;
      if (size !== SIZE) throw new Error(`joined ${size} bytes, not ${SIZE}`);
      return { seconds, share: share(viewer) };
    } catch (error) {
      const reason = (error as Error).message.split("\n")[0]!;
      const line = viewer.stderr.trim().split("\n").at(-1) ?? "";
      const failure = listening === undefined
        ? `never listening (${reason})`
        : `${reason}${line ? `: ${line}` : ""}`;
      return { share: share(viewer), failure };
    }
  }));
  const complete = downloads.every((d) => d.seconds !== undefined);
  return {
    n,
    viewers: downloads,
    wallSeconds: complete ? (Math.max(...finished) - Math.min(...started)) / 1000 : undefined,
    seeder: seederCopies(seeder, manifest),
  };
}

/** The table rows of a downloading crowd. */
function crowdRows({ n, viewers, wallSeconds, seeder }: CrowdResult): Row[] {
  const rate = parseRate(RATE);
  const fluid = Math.max(SIZE / rate, n * SIZE / (rate + n * rate));
  const clientServer = n * SIZE / rate;
  const times = viewers.map((v) => v.seconds).filter((s): s is number => s !== undefined);
  const done = times.length === n;
  const last = done ? Math.max(...times) : undefined;
  const failures = viewers.flatMap((v, i) => v.failure ? [`viewer ${i}: ${v.failure}`] : []);
  const shares = viewers.map((v) => v.share);
  const minShare = Math.min(...shares);
  const meanShare = shares.reduce((a, b) => a + b, 0) / n;
  const s = (seconds: number) => `${seconds.toFixed(2)} s`;
  const label = `N=${n}:`;
  return [
    {
      name: `${label} last viewer holds the verified file (from its listening line)`,
      value: last === undefined
        ? `${n - times.length} of ${n} never did (${failures.join("; ")})`
        : `${s(last)} (${ratio(last / fluid)} the fluid bound)`,
      target: `<= ${s(MAX_FLUID_FACTOR * fluid)} (${ratio(MAX_FLUID_FACTOR)})`,
      pass: last !== undefined && last <= MAX_FLUID_FACTOR * fluid,
    },
    {
      name: `${label} first / last viewer`,
      value: times.length === 0
        ? "none completed"
        : `${s(Math.min(...times))} / ${last === undefined ? "-" : s(last)}`,
    },
    {
      name: `${label} first viewer listening to last viewer complete (wall clock)`,
      value: wallSeconds === undefined ? "-" : s(wallSeconds),
    },
    {
      name: `${label} fluid bound max(F/u_s, N·F/(u_s+Σu_i)); client-server N·F/u_s`,
      value: `${s(fluid)}; ${s(clientServer)}`,
    },
    {
      name: `${label} speedup over client-server`,
      value: last === undefined ? "-" : ratio(clientServer / last),
    },
    {
      name: `${label} seeder's upload (whole fragments sent over TCP)`,
      value: `${seeder.copies.toFixed(2)} copies (${seeder.fragments} fragments)`,
      target: `<= ${MAX_SEEDER_COPIES.toFixed(2)} copies`,
      pass: seeder.copies <= MAX_SEEDER_COPIES,
    },
    {
      name: `${label} fragments from other viewers, min / mean over viewers`,
      value: `${minShare.toFixed(2)} / ${meanShare.toFixed(2)}`,
      target: `min >= ${MIN_SHARE.toFixed(2)}`,
      pass: minShare >= MIN_SHARE,
    },
  ];
}

/** One progress report of ffmpeg: when it came (ms, performance.now()) and the media time (s). */
interface Sample {
  at: number;
  media: number;
}

/** What one player (ffmpeg) did. */
interface Playback {
  started: number;
  samples: Sample[];
  /** When ffmpeg exited, or was killed at its deadline. */
  exited: number;
  code: number;
  /** ffmpeg said `progress=end`. */
  ended: boolean;
  stderr: string;
}

/** Plays `url` in real time with ffmpeg (`-re`), recording its progress; killed at `timeoutMs`. */
async function play(url: string, timeoutMs: number): Promise<Playback> {
  const started = performance.now();
  const child = new Deno.Command("ffmpeg", {
    args: [
      "-hide_banner",
      "-nostats",
      "-nostdin",
      "-progress",
      "pipe:1",
      "-stats_period",
      String(PROGRESS_PERIOD_S),
      "-re",
      "-i",
      url,
      "-f",
      "null",
      "-",
    ],
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const timer = setTimeout(() => {
    try {
      child.kill("SIGKILL");
    } catch { /* it has just exited */ }
  }, timeoutMs);
  const samples: Sample[] = [];
  let ended = false, stderr = "";
  const out = (async () => {
    let media = 0, partial = "";
    for await (const text of child.stdout.pipeThrough(new TextDecoderStream())) {
      const at = performance.now();
      const lines = (partial + text).split("\n");
      partial = lines.pop()!;
      for (const line of lines) {
        const [key, value = ""] = line.trim().split("=", 2);
        if (key === "out_time_us") media = Math.max(0, Number(value) / 1e6 || 0);
        if (key === "progress") {
          samples.push({ at, media });
          if (value === "end") ended = true;
        }
      }
    }
  })();
  const err = (async () => {
    for await (const text of child.stderr.pipeThrough(new TextDecoderStream())) {
      stderr = (stderr + text).slice(-4096);
    }
  })();
  try {
    const [{ code }] = await Promise.all([child.status, out, err]);
    return { started, samples, exited: performance.now(), code, ended, stderr };
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Counts a playback's stalls. From the first frame on (the first report with a media time above
 * 0, at wall clock w0 and media time m0), playback is behind by
 * lag(w) = (w - w0) - (m(w) - m0): the wall clock since the first frame minus the media played
 * since. ffmpeg `-re` never plays ahead of real time, so the lag stays near 0 while the bytes keep
 * up. A stall is an episode in which the lag exceeds {@link STALL_S} (1 s); it ends when the lag
 * is back under {@link STALL_END_S} (0.5 s), and counts once. Between two reports ffmpeg has
 * played nothing it has not reported, so the lag is also taken just before each report (the new
 * wall clock with the previous media time) and at exit: a player stuck waiting for bytes, which
 * reports nothing, is seen stalling all the same.
 *
 * After a stall ffmpeg reads as fast as it can until it is back in step with the wall clock since
 * it started, where a browser would resume from where it stopped and stay behind; so a later late
 * fragment can count as a second stall where a browser would have had the slack. The count is
 * strict, never lenient.
 */
function stalls(
  playback: Playback,
): { count: number; worstLag: number; firstAt?: number; firstMedia?: number } | undefined {
  const { samples } = playback;
  const first = samples.findIndex((s) => s.media > 0);
  if (first < 0) return undefined;
  const { at: w0, media: m0 } = samples[first]!;
  const points: Sample[] = [];
  for (let i = first + 1; i < samples.length; i++) {
    points.push({ at: samples[i]!.at, media: samples[i - 1]!.media }, samples[i]!);
  }
  if (!playback.ended) points.push({ at: playback.exited, media: samples.at(-1)!.media });
  let count = 0, worstLag = 0, stalled = false;
  let firstAt: number | undefined, firstMedia: number | undefined;
  for (const { at, media } of points) {
    const lag = (at - w0) / 1000 - (media - m0);
    worstLag = Math.max(worstLag, lag);
    if (!stalled && lag > STALL_S) {
      if (count++ === 0) [firstAt, firstMedia] = [at, media];
      stalled = true;
    } else if (stalled && lag < STALL_END_S) stalled = false;
  }
  return { count, worstLag, firstAt, firstMedia };
}

/** A fragment event a viewer's page was told of, and when (performance.now()). */
interface Seen {
  at: number;
  name: string;
  state: string;
  from?: string;
}

/**
 * Opens a viewer's `/events` as its page does; resolves in the ms until the manifest arrives.
 * It then keeps the stream open, as the page does, and adds each fragment event to `timeline`
 * until `stop` aborts: what a stall report needs to say which fragment was late, and whose.
 */
async function openPage(httpPort: string, timeline: Seen[], stop: AbortSignal): Promise<number> {
  const start = performance.now();
  // The stream ends when `stop` aborts; until the manifest comes, also at its deadline.
  const open = new AbortController();
  stop.addEventListener("abort", () => open.abort(), { once: true });
  const late = setTimeout(() => open.abort(), MANIFEST_TIMEOUT_MS);
  let text = "";
  let reader: ReadableStreamDefaultReader<string> | undefined;
  try {
    const response = await fetch(`http://127.0.0.1:${httpPort}/events`, { signal: open.signal });
    if (!response.ok || !response.body) throw new Error(`/events answered ${response.status}`);
    reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    while (!/^event: manifest$/m.test(text)) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`/events ended before the manifest: ${text.slice(-200)}`);
      text += value;
    }
  } catch (error) {
    open.abort();
    throw error;
  } finally {
    clearTimeout(late);
  }
  const ms = performance.now() - start;
  const events = reader;
  (async () => {
    while (true) {
      const { value, done } = await events.read();
      if (done) return;
      text += value;
      const blocks = text.split("\n\n");
      text = blocks.pop()!;
      for (const block of blocks) {
        const data = block.match(/^event: fragment\ndata: (.*)$/m)?.[1];
        if (data === undefined) continue;
        const { name, state, from } = JSON.parse(data);
        timeline.push({ at: performance.now(), name, state, from });
      }
    }
  })().catch(() => {});
  return ms;
}

/**
 * One line on a stalled viewer: when it stalled, and when each fragment went in flight (from
 * whom) and was held, in seconds since its player started.
 */
function stallReport(i: number, playback: Playback, at: number, media: number, timeline: Seen[]) {
  const since = (t: number) => ((t - playback.started) / 1000).toFixed(1);
  const byName = new Map<string, string[]>();
  for (const event of timeline) {
    const said = `${event.state} ${since(event.at)}` + (event.from ? ` (${event.from})` : "");
    byName.set(event.name, [...byName.get(event.name) ?? [], said]);
  }
  const fragments = [...byName].map(([name, said]) => `${name}: ${said.join(", ")}`);
  return `viewer ${i} stalled at ${since(at)} s, media ${media.toFixed(1)} s; ${
    fragments.join("; ")
  }`;
}

/** The media's duration in seconds, as ffprobe reads it. */
async function duration(path: string): Promise<number> {
  const { code, stdout, stderr } = await new Deno.Command("ffprobe", {
    args: ["-v", "error", "-show_entries", "format=duration", "-of", "csv=p=0", path],
    stdin: "null",
  }).output();
  const decoder = new TextDecoder();
  const seconds = Number(decoder.decode(stdout).trim());
  if (code !== 0 || !(seconds > 0)) {
    throw new Error(`ffprobe cannot read the duration of "${path}": ${decoder.decode(stderr)}`);
  }
  return seconds;
}

/** Runs the watching crowd and returns its rows. */
async function watchingCrowd(
  root: string,
  { watchers, rateFactor }: WatchingOptions,
): Promise<{ rows: Row[]; notes: string[] }> {
  const seconds = await duration(SAMPLE_VIDEO);
  const bitrate = (await Deno.stat(SAMPLE_VIDEO)).size / seconds; // bytes per second
  const rate = String(Math.round(rateFactor * bitrate));
  const seedStore = join(root, "sample-seed");
  const manifest = await splitFile(SAMPLE_VIDEO, { out: seedStore });
  await using children = new Children();
  const services = await startServices(children);
  const { seeder, port: seederPort } = await startSeeder(seedStore, rate, services, children);
  const viewers = Array.from({ length: watchers }, (_, i) =>
    children.start("peer", [
      ...peerFlags(join(root, `watcher-${i}`), services, rate),
      "--no-console",
    ]));
  const options = { stream: "stdout" as const, timeoutMs: START_TIMEOUT_MS };
  const httpPorts = await Promise.all(viewers.map(async (viewer) => {
    await viewer.waitFor(GRPC_LISTENING, options);
    return (await viewer.waitFor(PLAYER_LISTENING, options))[1]!;
  }));
  // A page that never gets the manifest is reported below; its player then finds no video.
  const timelines = httpPorts.map((): Seen[] => []);
  const pagesOpen = new AbortController();
  const pageMs = await Promise.all(
    httpPorts.map((port, i) =>
      openPage(port, timelines[i]!, pagesOpen.signal).catch(() => undefined)
    ),
  );
  const pagesMissed = pageMs.filter((ms) => ms === undefined).length;
  const url = (port: string) => `http://127.0.0.1:${port}/stream/${manifest.file}`;
  const playbacks = await Promise.all(
    httpPorts.map((port) => play(url(port), seconds * 1000 + PLAY_GRACE_MS)),
  );
  pagesOpen.abort();

  const kBps = (bytes: number) => `${(bytes / 1000).toFixed(1)} kB/s`;
  const rows: Row[] = [
    {
      name: `watching: bitrate of ${manifest.file} (its size over ffprobe's ${seconds} s); ` +
        `everyone uploads at ${rateFactor}x`,
      value: `${kBps(bitrate)}; ${kBps(Number(rate))}`,
    },
    {
      name: `watching: page opened to manifest, slowest of ${watchers} viewers`,
      value: pagesMissed > 0
        ? `${pagesMissed} of ${watchers} never got it within ${MANIFEST_TIMEOUT_MS / 1000} s`
        : `${Math.round(Math.max(...pageMs.map((ms) => ms!)))} ms`,
    },
  ];
  let total = 0, allGood = true;
  const notes: string[] = [];
  playbacks.forEach((playback, i) => {
    const first = playback.samples.find((s) => s.media > 0);
    const seen = stalls(playback);
    const media = playback.samples.at(-1)?.media ?? 0;
    const whole = playback.code === 0 && playback.ended && media >= seconds - 1;
    const good = seen !== undefined && seen.count === 0 && whole;
    total += seen?.count ?? 0;
    allGood &&= good;
    const parts = [
      first ? `first frame ${((first.at - playback.started) / 1000).toFixed(2)} s` : "no frame",
      seen ? `${seen.count} stall(s), worst lag ${seen.worstLag.toFixed(2)} s` : "-",
      `ffmpeg exited ${playback.code}` + (playback.ended ? ", at the end" : ""),
      `played ${media.toFixed(1)} of ${seconds.toFixed(1)} s`,
    ];
    const reason = whole ? "" : playback.stderr.trim().split("\n").at(-1) ?? "";
    if (seen?.firstAt !== undefined) {
      notes.push(stallReport(i, playback, seen.firstAt, seen.firstMedia!, timelines[i]!));
    }
    rows.push({
      name: `watching: viewer ${i}`,
      value: parts.join("; ") + (reason ? ` (${reason})` : ""),
      target: "0 stalls, to the end",
      pass: good,
    });
  });
  const copies = seederCopies(seeder, manifest);
  const shares = viewers.map((viewer) => {
    const { total, fromViewers } = arrivals(viewer, seederPort);
    return total === 0 ? 0 : fromViewers / total;
  });
  rows.push(
    {
      name: `watching: stalls over all ${watchers} viewers`,
      value: String(total),
      target: "0, every player to the end",
      pass: total === 0 && allGood,
    },
    {
      name: "watching: seeder's upload (whole fragments sent over TCP)",
      value: `${copies.copies.toFixed(2)} copies (${copies.fragments} fragments)`,
    },
    {
      name: "watching: fragments from other viewers, min / mean over viewers",
      value: `${Math.min(...shares).toFixed(2)} / ${
        (shares.reduce((a, b) => a + b, 0) / shares.length).toFixed(2)
      }`,
    },
  );
  return { rows, notes };
}

/** Writes `size` bytes of random data to `path`. */
async function makeInput(path: string, size: number): Promise<void> {
  using file = await Deno.open(path, { write: true, createNew: true });
  const chunk = new Uint8Array(65536);
  for (let written = 0; written < size; written += chunk.length) {
    crypto.getRandomValues(chunk);
    await file.write(chunk.subarray(0, Math.min(chunk.length, size - written)));
  }
}

/**
 * `deno task bench crowd` runs the bench as above. Run directly, it can try the watching crowd
 * alone, harder and several times, to judge a change to the swarm by its stall timelines:
 * `deno run -P=bench bench/crowd_bench.ts --watching-only --watchers 8 --rate-factor 2 --runs 3`.
 */
async function main() {
  let options;
  try {
    options = parseOptions(Deno.args);
  } catch (error) {
    if (!isUserError(error)) throw error;
    console.error(`error: ${userMessage(error)}`);
    Deno.exit(2);
  }
  if (options === "help") {
    console.log(USAGE);
    return;
  }
  const { watchingOnly, watching, runs } = options;
  for (const tool of ["ffmpeg", "ffprobe"]) {
    const found = await new Deno.Command(tool, { args: ["-version"], stdout: "null" }).output()
      .then(({ code }) => code === 0, () => false);
    if (!found) {
      console.error(
        `error: Cannot run the crowd bench: "${tool}" is missing (apt-get install ffmpeg)`,
      );
      Deno.exit(1);
    }
  }
  for (let run = 0; run < runs; run++) await benchOnce(watchingOnly, watching);
}

const USAGE = `Usage: deno run -P=bench bench/crowd_bench.ts [options]

  --watching-only     the watching crowd alone, without the downloading crowds
  --watchers N        players in the watching crowd (default ${WATCHERS})
  --rate-factor X     everyone's upload as a multiple of the video's bitrate (default ${WATCH_RATE_FACTOR})
  --runs N            run it N times (default 1)`;

/** The command line's options, "help", or a UserError saying what is wrong. */
function parseOptions(args: string[]) {
  const { values } = parseArgs({
    args,
    options: {
      "watching-only": { type: "boolean", default: false },
      watchers: { type: "string", default: String(WATCHERS) },
      "rate-factor": { type: "string", default: String(WATCH_RATE_FACTOR) },
      runs: { type: "string", default: "1" },
      help: { type: "boolean", short: "h", default: false },
    },
  });
  if (values.help) return "help" as const;
  const watching = { watchers: Number(values.watchers), rateFactor: Number(values["rate-factor"]) };
  const runs = Number(values.runs);
  if (
    !Number.isInteger(watching.watchers) || watching.watchers < 1 ||
    !(watching.rateFactor > 0) || !Number.isInteger(runs) || runs < 1
  ) {
    throw new UserError(
      "--watchers and --runs take a whole number >= 1, --rate-factor a number > 0",
    );
  }
  return { watchingOnly: values["watching-only"], watching, runs };
}

/** One run of the bench: both downloading crowds (unless `watchingOnly`), then the watching one. */
async function benchOnce(watchingOnly: boolean, options: WatchingOptions): Promise<void> {
  // Not /dev/shm: the peers run with the peer task's own permissions, which cannot reach /dev
  // (denoland/deno#30979); at 1MB/s the disk does not matter.
  const root = await Deno.makeTempDir({ prefix: "crowd-bench-" });
  try {
    const rows: Row[] = [];
    if (!watchingOnly) {
      const input = join(root, FILE);
      await makeInput(input, SIZE);
      const seedStore = join(root, "seed");
      const manifest = await splitFile(input, { out: seedStore, fragments: FRAGMENTS });
      for (const n of CROWDS) {
        const result = await downloadingCrowd(n, root, seedStore, manifest);
        rows.push(...crowdRows(result));
      }
    }
    const watching = await watchingCrowd(root, options);
    rows.push(...watching.rows);
    if (!printTable(rows)) Deno.exitCode = 1;
    // Which fragment a stalled viewer waited for, and whose it was: the next step's evidence.
    for (const note of watching.notes) console.log(`\n${note}`);
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}

if (import.meta.main) await main();
