/**
 * The player in headless Chromium (Debian's `chromium`, driven by npm `playwright-core` in
 * player_browser_driver.ts): an empty viewing peer (`deno task peer ... --fetch-all`) plays the
 * sample while its fragments still trickle in from a slow seeder, then seeks to the middle and
 * plays on, asking nothing of the internet; and the page on a laptop's screen.
 * @module
 */
import { assert, assertEquals } from "./_assert.ts";
import type { PlayerReport, Scene } from "./player_browser_driver.ts";
import { ROOT } from "./_util.ts";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
/**
 * The seeder's upload: the 2.4 MB sample takes about 12 s to arrive, half its length, so that
 * playback passes 2 s before the last fragment even on a busy machine (at 8 s it did not always).
 */
const SEEDER_RATE = 200_000;

/** Runs the driver with `scene` and returns its report. */
async function drive(scene: Omit<Scene, "chromium">): Promise<PlayerReport> {
  const driver = new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "-A",
      "--config",
      `${ROOT}deno.json`,
      `${ROOT}tests/player_browser_driver.ts`,
      JSON.stringify({ chromium: CHROMIUM, ...scene }),
    ],
    env: { NO_COLOR: "1" },
    stdin: "null",
    signal: AbortSignal.timeout(50_000),
  });
  const { code, stdout, stderr } = await driver.output();
  const decoder = new TextDecoder();
  assertEquals(code, 0, decoder.decode(stderr));
  return JSON.parse(decoder.decode(stdout));
}

Deno.test({
  name: "An empty viewer plays past 2 s while fragments are missing, then seeks to the middle",
  ignore: !hasChromium,
  async fn() {
    const report = await drive({ scene: "seek", rate: SEEDER_RATE, fetchAll: true });
    assertEquals(report.errors, []);
    assertEquals(report.outside, [], "the page asked for something outside the player");
    assertEquals(report.cells, 10, "the map has one cell per fragment");
    assert(
      report.heldAtTwoSeconds! < report.fragments,
      `every fragment was already held when playback passed 2 s (${report.heldAtTwoSeconds})`,
    );
    assert(report.afterSeek! > 12, `the seek to 12 s did not play on (${report.afterSeek})`);
  },
});

Deno.test({
  name:
    "At 1280x800 the legend shows, cells say where fragments came from, and muted offers unmute",
  ignore: !hasChromium,
  async fn() {
    const report = await drive({ scene: "page", rate: SEEDER_RATE, fetchAll: true, held: 3 });
    assertEquals(report.errors, []);
    assertEquals(report.outside, [], "the page asked for something outside the player");
    const page = report.page!;
    assert(page.legend.visible, "the legend is hidden");
    assert(
      page.legend.top >= 0 && page.legend.bottom <= page.windowHeight,
      `the legend is out of the window: ${JSON.stringify(page.legend)}`,
    );
    assertEquals(page.atStart, 3, "the fragments held at start say so");
    assert(page.fromHolder > 0, "no cell names the holder a fragment came from");
    assert(page.unmuteShownWhileMuted, "no unmute button while the video plays muted");
    assertEquals(page.mutedAfterClick, false);
    assertEquals(page.unmuteShownAfterClick, false);
  },
});

if (!hasChromium) console.warn(`Skipping the player browser test: "${CHROMIUM}" is missing`);
