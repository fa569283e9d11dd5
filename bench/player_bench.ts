/**
 * `deno task bench player`: the player in headless Chromium on loopback, through
 * tests/player_browser_driver.ts (a child process with `-A`, as playwright-core needs).
 *
 * - Time from opening the page to the first frame, for a viewer that holds no fragment yet and
 *   fetches them from an unthrottled seeder: the median of a few runs. Target: under 1.5 s.
 * - Stalls: the whole sample played while it arrives from a seeder whose upload is throttled to
 *   twice the video's bitrate; `waiting` events after playback started. Target: none.
 * @module
 */
import { fileURLToPath } from "node:url";
import { SAMPLE_VIDEO } from "../split.ts";
import type { PlayerReport, Scene } from "../tests/player_browser_driver.ts";
import { SAMPLE_SECONDS } from "../tests/player_browser_driver.ts";
import { printTable, type Row } from "./_report.ts";

const CHROMIUM = "/usr/bin/chromium";
const DRIVER = fileURLToPath(new URL("../tests/player_browser_driver.ts", import.meta.url));
const CONFIG = fileURLToPath(new URL("../deno.json", import.meta.url));
const FIRST_FRAME_RUNS = 5;
const FIRST_FRAME_TARGET_MS = 1500;
/** The swarm's rate as a multiple of the video's bitrate, for the stall check. */
const RATE_FACTOR = 2;

/** Plays `scene` in the driver and returns what it saw. */
async function drive(scene: Omit<Scene, "chromium">): Promise<PlayerReport> {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--config",
      CONFIG,
      DRIVER,
      JSON.stringify({ chromium: CHROMIUM, ...scene }),
    ],
    stdin: "null",
    signal: AbortSignal.timeout(90_000),
  }).output();
  const decoder = new TextDecoder();
  if (code !== 0) throw new Error(`The player driver failed:\n${decoder.decode(stderr)}`);
  return JSON.parse(decoder.decode(stdout));
}

function median(values: number[]): number {
  const sorted = values.toSorted((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)]!;
}

async function main() {
  if (!await Deno.stat(CHROMIUM).then(() => true, () => false)) {
    console.error(`error: Cannot run the player bench: "${CHROMIUM}" is missing`);
    Deno.exit(1);
  }
  const firstFrames: number[] = [];
  for (let run = 0; run < FIRST_FRAME_RUNS; run++) {
    const report = await drive({ scene: "first-frame", rate: 0, fetchAll: false });
    if (report.firstFrameMs === undefined) throw new Error("No first frame was seen");
    firstFrames.push(report.firstFrameMs);
  }
  const firstFrame = median(firstFrames);

  const bitrate = (await Deno.stat(SAMPLE_VIDEO)).size / SAMPLE_SECONDS; // bytes per second
  const played = await drive({ scene: "stall", rate: RATE_FACTOR * bitrate, fetchAll: true });
  const rows: Row[] = [
    {
      name: `first frame, empty viewer on loopback (median of ${FIRST_FRAME_RUNS})`,
      value: `${Math.round(firstFrame)} ms`,
      target: `< ${FIRST_FRAME_TARGET_MS} ms`,
      pass: firstFrame < FIRST_FRAME_TARGET_MS,
    },
    {
      name: `stalls after start, seeder at ${RATE_FACTOR}x the bitrate ` +
        `(${Math.round(RATE_FACTOR * bitrate / 1000)} kB/s)`,
      value: String(played.stalls),
      target: "0",
      pass: played.stalls === 0 && played.errors.length === 0,
    },
    {
      name: `first frame at ${RATE_FACTOR}x the bitrate`,
      value: `${Math.round(played.firstFrameMs ?? NaN)} ms`,
    },
  ];
  if (played.errors.length > 0) console.error(`Playback errors: ${played.errors.join("; ")}`);
  if (!printTable(rows)) Deno.exit(1);
}

if (import.meta.main) await main();
