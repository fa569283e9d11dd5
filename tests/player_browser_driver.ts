/**
 * Plays the sample through a real viewing peer's player in headless Chromium (Debian's
 * `chromium`, driven by npm `playwright-core`) for player_browser_test.ts and
 * bench/player_bench.ts, and prints one JSON line with what it saw. The scene: a directory and a
 * seeder holding the whole sample (its upload throttled) in this process, an empty viewer started
 * as `deno task peer` exactly as a user would, and the browser on the viewer's player. A separate
 * process because playwright-core reads /proc/sys at import time, which Deno allows only with
 * `-A`, and the tests run with `-P`.
 *
 * Usage (the argument is a {@link Scene}):
 *
 * ```sh
 * deno run -A tests/player_browser_driver.ts \
 *   '{"chromium":"/usr/bin/chromium","scene":"seek","rate":300000,"fetchAll":true}'
 * ```
 * @module
 */
import { join } from "node:path";
import type { Page } from "playwright-core"; // types only: nothing is loaded at import
import { startDirectory } from "../directory.ts";
import { startPeer } from "../peer.ts";
import { type Manifest, MANIFEST_NAME, SAMPLE_VIDEO, splitFile } from "../split.ts";
import { startTask } from "./_util.ts";

/** The sample's length in seconds: the rate that keeps up with playback is its size over this. */
export const SAMPLE_SECONDS = 24;

/**
 * What to play: `seek` and `page` (the browser test), `first-frame` or `stall` (the bench). The
 * browser's window is a laptop's, 1280x800.
 */
export interface Scene {
  chromium: string;
  scene: "seek" | "first-frame" | "stall" | "page";
  /** The seeder's upload in bytes per second; 0 for unlimited. */
  rate: number;
  /** Whether the viewer runs with --fetch-all; without it, it fetches what the player asks. */
  fetchAll: boolean;
  /** Where to save a screenshot taken mid-playback. */
  screenshot?: string;
  /** How many of the first fragments (and the manifest) the viewer holds at start. @default 0 */
  held?: number;
}

/** What the `page` scene saw of the page itself. */
export interface PageReport {
  /** The legend's box, and the window's height it should fit in. */
  legend: { top: number; bottom: number; visible: boolean };
  windowHeight: number;
  /** Cells that say "at start", and cells that name the holder ("from <address>"). */
  atStart: number;
  fromHolder: number;
  /** The unmute button while the video plays muted, and after a click on it. */
  unmuteShownWhileMuted: boolean;
  mutedAfterClick: boolean;
  unmuteShownAfterClick: boolean;
}

/** What the driver saw, printed as JSON for the test or the bench to judge. */
export interface PlayerReport {
  fragments: number;
  /** Cells the page's map drew. */
  cells: number;
  /** Milliseconds from navigation to the first frame shown (else to `loadeddata`). */
  firstFrameMs?: number;
  /** Fragments the viewer held when currentTime passed 2 s. */
  heldAtTwoSeconds?: number;
  /** currentTime a moment after the seek to the middle played. */
  afterSeek?: number;
  /** `waiting` events after playback first started. */
  stalls: number;
  duration?: number;
  /** Requests the page made outside the player (refused). */
  outside: string[];
  /** Video errors and page errors. */
  errors: string[];
  page?: PageReport;
}

/** A laptop's screen, where the whole page is to be seen. */
const WINDOW = { width: 1280, height: 800 };

// Installed before the page's own script: media events do not bubble, but a capturing listener
// on the document sees them all.
const PROBE = `
  window.probe = { errors: [], stalls: 0, playing: false, ended: false };
  const at = () => performance.now();
  document.addEventListener("loadeddata", (e) => {
    probe.loadedMs ??= at();
    e.target.requestVideoFrameCallback?.(() => probe.frameMs ??= at());
  }, true);
  document.addEventListener("playing", () => probe.playing = true, true);
  document.addEventListener("waiting", () => { if (probe.playing) probe.stalls++; }, true);
  document.addEventListener("ended", () => probe.ended = true, true);
  document.addEventListener("error", (e) => {
    const target = e.target;
    if (target instanceof HTMLMediaElement) probe.errors.push("video: " + target.error?.message);
  }, true);
`;
// These run in the page: playwright sends their source, so each must stand alone. They see the
// page through `InPage` (the DOM types would clash with Deno's in the tests that import this).
interface InPage {
  document: { querySelector(selector: "video"): { currentTime: number; duration: number } };
  probe: Probe;
}
const readProbe = () => (globalThis as unknown as InPage).probe;
const readVideo = () => {
  const { currentTime, duration } = (globalThis as unknown as InPage).document.querySelector(
    "video",
  );
  return { currentTime, duration };
};
const playedPast = (seconds: number) =>
  (globalThis as unknown as InPage).document.querySelector("video").currentTime > seconds;
const seekTo = (seconds: number) =>
  (globalThis as unknown as InPage).document.querySelector("video").currentTime = seconds;
const sawFirstFrame = () => {
  const { probe } = globalThis as unknown as InPage;
  return probe.frameMs ?? probe.loadedMs;
};
const namesAHolder = () =>
  [
    ...(globalThis as unknown as {
      document: { querySelectorAll(s: string): Iterable<{ textContent: string | null }> };
    }).document.querySelectorAll("#map .cell small"),
  ].some((cell) => /^from \S+:\d+$/.test(cell.textContent ?? ""));
const isMuted = () =>
  (globalThis as unknown as { document: { querySelector(s: "video"): { muted: boolean } } })
    .document.querySelector("video").muted;
const ended = () => (globalThis as unknown as InPage).probe.ended;

async function play(scene: Scene, root: string): Promise<PlayerReport> {
  const manifest = await splitFile(SAMPLE_VIDEO, { out: join(root, "seeder") });
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  await using _seeder = await startPeer({
    port: 0,
    hostname: "127.0.0.1",
    dir: join(root, "seeder"),
    directory: directory.url,
    broker: null,
    grpcPort: null,
    httpPort: null,
    maxUpload: scene.rate > 0 ? scene.rate : undefined,
    log: () => {},
  });
  await published(directory.url);
  const viewerDir = join(root, "viewer");
  await Deno.mkdir(viewerDir);
  if (scene.held) {
    await Deno.copyFile(join(root, "seeder", MANIFEST_NAME), join(viewerDir, MANIFEST_NAME));
  }
  for (const { name } of manifest.fragments.slice(0, scene.held ?? 0)) {
    await Deno.copyFile(join(root, "seeder", name), join(viewerDir, name));
  }
  await using viewer = startTask("peer", [
    "0",
    "--hostname",
    "127.0.0.1",
    "--dir",
    viewerDir,
    "--directory",
    directory.url,
    "--broker",
    "127.0.0.1:1",
    "--grpc-port",
    "0",
    "--http-port",
    "0",
    "--no-console",
    ...(scene.fetchAll ? ["--fetch-all"] : []),
  ]);
  const [, playerPort] = await viewer.waitFor(/\[PLAYER\] Watch at http:\/\/\S+:(\d+)\//);
  const held = () => heldIn(viewerDir);

  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath: scene.chromium,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      "--autoplay-policy=no-user-gesture-required",
    ],
  });
  try {
    const page = await browser.newPage({ viewport: WINDOW });
    const origin = `http://127.0.0.1:${playerPort}`;
    const report: PlayerReport = {
      fragments: manifest.fragments.length,
      cells: 0,
      stalls: 0,
      outside: [],
      errors: [],
    };
    await page.route("**/*", (route) => {
      const requested = route.request().url();
      if (new URL(requested).origin === origin) return route.continue();
      report.outside.push(requested);
      return route.abort("blockedbyclient");
    });
    page.on("pageerror", (error) => report.errors.push(String(error)));
    await page.addInitScript(PROBE);
    await page.goto(`${origin}/`);
    await sceneSteps[scene.scene](page, held, manifest, report, scene);

    const seen = await page.evaluate(readProbe);
    report.firstFrameMs = seen.frameMs ?? seen.loadedMs;
    report.stalls = seen.stalls;
    report.errors.push(...seen.errors);
    report.cells = await page.locator("#map .cell").count();
    report.duration = (await page.evaluate(readVideo)).duration;
    return report;
  } finally {
    await browser.close();
  }
}

/** What {@link PROBE} records in the page. */
interface Probe {
  loadedMs?: number;
  frameMs?: number;
  stalls: number;
  ended: boolean;
  errors: string[];
}

type Steps = (
  page: Page,
  held: () => number,
  manifest: Manifest,
  report: PlayerReport,
  scene: Scene,
) => Promise<void>;

const sceneSteps: Record<Scene["scene"], Steps> = {
  /** Plays past 2 s while the swarm still fetches, then seeks to the middle and plays on. */
  async seek(page, held, _manifest, report, scene) {
    await page.waitForFunction(playedPast, 2, {
      timeout: 20_000,
      polling: 50,
    });
    report.heldAtTwoSeconds = held();
    if (scene.screenshot) await page.screenshot({ path: scene.screenshot });
    await page.evaluate(seekTo, 12);
    await page.waitForFunction(playedPast, 13, {
      timeout: 20_000,
      polling: 50,
    });
    report.afterSeek = (await page.evaluate(readVideo)).currentTime;
  },
  /**
   * Plays until cells say both "at start" and a holder's address, then looks at the legend and
   * the unmute button, and clicks it.
   */
  async page(page, _held, _manifest, report) {
    await page.waitForFunction(playedPast, 1, { timeout: 20_000, polling: 50 });
    const cells = page.locator("#map .cell small");
    const count = async (pattern: RegExp) =>
      (await cells.allTextContents()).filter((text) => pattern.test(text)).length;
    await page.waitForFunction(namesAHolder, null, { timeout: 20_000, polling: 50 });
    const legend = page.locator("#legend");
    const box = (await legend.boundingBox())!;
    const unmute = page.locator("#unmute");
    const shownWhileMuted = await unmute.isVisible();
    if (shownWhileMuted) await unmute.click();
    report.page = {
      legend: { top: box.y, bottom: box.y + box.height, visible: await legend.isVisible() },
      windowHeight: WINDOW.height,
      atStart: await count(/^at start$/),
      fromHolder: await count(/^from \S+:\d+$/),
      unmuteShownWhileMuted: shownWhileMuted,
      mutedAfterClick: await page.evaluate(isMuted),
      unmuteShownAfterClick: await unmute.isVisible(),
    };
  },
  /** Waits for the first frame. */
  async "first-frame"(page) {
    await page.waitForFunction(sawFirstFrame, null, {
      timeout: 10_000,
    });
  },
  /** Plays the whole video, counting stalls. */
  async stall(page) {
    await page.waitForFunction(ended, null, { timeout: 60_000, polling: 100 });
  },
};

/** Waits until the directory lists the seeder's file, so the viewer finds it at once. */
async function published(directory: string): Promise<void> {
  for (let tries = 0; tries < 200; tries++) {
    const { files } = await (await fetch(`${directory}/files`)).json();
    if (files.length > 0) return;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error("The seeder never published its file in the directory");
}

/** Fragments the viewer holds: whole ones only, since the store renames them in when verified. */
function heldIn(dir: string): number {
  try {
    return [...Deno.readDirSync(dir)].filter((e) => /^fragment_\d+\.bin$/.test(e.name)).length;
  } catch {
    return 0;
  }
}

if (import.meta.main) {
  const scene: Scene = JSON.parse(Deno.args[0] ?? "{}");
  const root = await Deno.makeTempDir({ prefix: "p2p-player-" });
  try {
    console.log(JSON.stringify(await play(scene, root)));
  } finally {
    await Deno.remove(root, { recursive: true });
  }
}
