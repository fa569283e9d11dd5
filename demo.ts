#!/usr/bin/env -S deno run --allow-run --allow-read --allow-write --allow-net
/**
 * The whole set on this machine with the bundled sample: the directory, the broker, three
 * seeding peers (6001-6003, each with a subset of the fragments), an empty viewing peer (6004)
 * that fetches the video from the swarm and plays it in the browser, and a subscriber printing
 * `fragmentos` as fragments spread. Ctrl-C stops everything.
 *
 * `deno task demo --check` runs the same set headless until the viewer holds the whole verified
 * video, then exits 0 (or 1, saying why). Usage: `deno task demo [--check]`.
 * @module
 */
import { parseArgs } from "node:util";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import { runMain, UserError } from "./common/cli.ts";
import { canListen, isServed, TIME_WAIT_MS } from "./common/ports.ts";
import { SAMPLE_VIDEO, splitFile } from "./split.ts";

const ROOT = fileURLToPath(new URL("./", import.meta.url));
const SEEDERS = [6001, 6002, 6003];
const VIEWER = 6004;
/**
 * Each seeder's upload limit. Together the three send 120 KB/s, about 1.2x the sample's bitrate
 * (813 kbit/s, 24 s): fast enough to play from the start without a stall, and slow enough that
 * the map fills over some 20 s while it plays, which is what there is to see.
 */
const SEED_RATE = "40KB/s";
/** With --check nobody watches: as fast as the check may go. */
const CHECK_SEED_RATE = "250KB/s";
const CHECK_TIMEOUT_MS = 90_000;

/** What the demo needs free, with who needs it. */
function neededPorts(): [number, string][] {
  const ports: [number, string][] = [[5000, "the directory"], [5555, "the broker"]];
  for (const port of [...SEEDERS, VIEWER]) {
    ports.push([port, `peer ${port}`], [port + 44050, `peer ${port} (gRPC)`], [
      port + 2000,
      `peer ${port} (HTTP)`,
    ]);
  }
  return ports;
}

/**
 * Fails with the first port something listens on. A port that only a recent outgoing connection
 * holds (its local end, up to a minute in TIME_WAIT; 50051-50054 are in Linux's ephemeral range)
 * frees itself, so that one is waited for.
 */
async function checkPorts(): Promise<void> {
  for (const [port, who] of neededPorts()) {
    const deadline = Date.now() + TIME_WAIT_MS;
    for (let said = false; !canListen(port); said = true) {
      if (await isServed(port) || Date.now() > deadline) {
        throw new UserError(
          `Port ${port} is taken (${who} needs it): stop what holds it and retry`,
        );
      }
      if (!said) {
        console.error(`[DEMO] Port ${port} is held by a recent connection; waiting for it`);
      }
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
}

/** A child process running one of the scripts with its narrow permission set. */
class Service {
  readonly name: string;
  readonly process: Deno.ChildProcess;
  readonly done: Promise<Deno.CommandStatus>;

  constructor(
    name: string,
    set: string,
    script: string,
    args: string[],
    onLine: (line: string) => void,
  ) {
    this.name = name;
    this.process = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-q",
        `-P=${set}`,
        "--config",
        join(ROOT, "deno.json"),
        join(ROOT, script),
        ...args,
      ],
      cwd: ROOT,
      stdin: "null",
      stdout: "piped",
      stderr: "piped",
      env: { NO_COLOR: "1" },
    }).spawn();
    const pumps = [this.process.stdout, this.process.stderr].map(async (stream) => {
      let pending = "";
      for await (const text of stream.pipeThrough(new TextDecoderStream())) {
        pending += text;
        const lines = pending.split("\n");
        pending = lines.pop()!;
        lines.forEach(onLine);
      }
    });
    this.done = Promise.all(pumps).then(() => this.process.status);
  }

  stop(): void {
    try {
      this.process.kill("SIGTERM");
    } catch { /* already gone */ }
  }
}

async function main(args = Deno.args): Promise<number> {
  const { values } = parseArgs({
    args,
    options: { check: { type: "boolean" }, help: { type: "boolean", short: "h" } },
  });
  if (values.help) {
    console.log(`Usage: deno task demo [--check]

Starts the directory (5000), the broker (5555), three seeding peers (6001-6003) and an empty
viewing peer (6004) with the bundled sample video. Open the player it prints to watch the video
arrive from the swarm. Ctrl-C stops everything.

  --check   headless: exit 0 once the viewer holds the whole verified video (1 if it does not)`);
    return 0;
  }
  await checkPorts();
  const fragments = join(ROOT, "fragments");
  await Deno.remove(join(fragments, String(VIEWER)), { recursive: true }).catch(() => {});
  await splitFile(SAMPLE_VIDEO, { out: fragments, peers: SEEDERS.map(String) });
  console.log(`[DEMO] Split the sample into ${fragments} and dealt it to ${SEEDERS.join(", ")}`);

  const services: Service[] = [];
  // Ctrl-C reaches every child at once (they share the terminal): what they say while they all
  // stop (a holder gone mid-fragment, say) is noise, not news.
  let stopping = false;
  const start = (
    name: string,
    set: string,
    script: string,
    args: string[],
    readyLine: RegExp,
    show: (line: string) => boolean,
  ) => {
    const signal = Promise.withResolvers<void>();
    const service = new Service(name, set, script, args, (line) => {
      if (readyLine.test(line)) signal.resolve();
      if (!stopping && show(line)) console.log(line.startsWith("[") ? line : `[${name}] ${line}`);
    });
    services.push(service);
    const died = service.done.then(({ code }) => {
      throw new UserError(`The ${name} exited (code ${code}) before it was ready`);
    });
    return Promise.race([signal.promise, died]);
  };
  const errors = (line: string) => /error|\[x\]|\[!\]/i.test(line);
  const stopAll = async () => {
    services.forEach((service) => service.stop());
    await Promise.all(services.map((service) => service.done));
  };
  try {
    await Promise.all([
      start("directory", "directory", "directory.ts", [], /Listening/, errors),
      start("broker", "broker", "broker.ts", [], /Listening/, errors),
    ]);
    await start(
      "subscriber",
      "subscribe",
      "subscribe.ts",
      ["fragmentos"],
      /Subscribed/,
      (line) => line.startsWith("[fragmentos]"),
    );
    await Promise.all(
      SEEDERS.map((port) =>
        start(
          `peer ${port}`,
          "peer",
          "peer.ts",
          [
            String(port),
            "--no-console",
            "--max-upload",
            values.check ? CHECK_SEED_RATE : SEED_RATE,
          ],
          /Node listening/,
          errors,
        )
      ),
    );
    const viewerArgs = [
      String(VIEWER),
      "--no-console",
      "--fetch-all",
      ...(values.check ? ["--exit-when-done"] : []),
    ];
    const complete = Promise.withResolvers<void>();
    services.push(
      new Service(`peer ${VIEWER}`, "peer", "peer.ts", viewerArgs, (line) => {
        if (/complete: .*sha256 verified/.test(line)) complete.resolve();
        if (!stopping && (errors(line) || /complete|\[swarm\]/.test(line))) console.log(line);
      }),
    );
    console.log(`[DEMO] Player:     http://localhost:${VIEWER + 2000}/`);
    console.log(`[DEMO] Swagger UI: http://localhost:5000/apidocs`);
    if (values.check) {
      const viewer = services.at(-1)!;
      const timeout = new Promise<string>((resolve) =>
        setTimeout(
          () => resolve(`the viewer did not finish within ${CHECK_TIMEOUT_MS / 1000} s`),
          CHECK_TIMEOUT_MS,
        )
      );
      const exited = viewer.done.then((status) =>
        status.code === 0 ? "" : `the viewer exited with code ${status.code}`
      );
      const problem = await Promise.race([complete.promise.then(() => exited), exited, timeout]);
      if (problem) throw new UserError(`Demo check failed: ${problem}`);
      console.log("[DEMO] Check passed: the viewer holds the whole verified video");
      return 0;
    }
    console.log("[DEMO] Running; Ctrl-C stops everything");
    const stop = Promise.withResolvers<void>();
    for (const signal of ["SIGINT", "SIGTERM"] as const) {
      Deno.addSignalListener(signal, () => {
        stopping = true;
        stop.resolve();
      });
    }
    await stop.promise;
    console.log("\n[DEMO] Stopping");
    return 0;
  } finally {
    await stopAll();
  }
}

if (import.meta.main) await runMain(main);
