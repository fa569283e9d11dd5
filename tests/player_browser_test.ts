/**
 * The player in headless Chromium (Debian's `chromium`, driven by npm `playwright-core` in
 * player_browser_driver.ts): an empty viewing peer (`deno task peer ... --fetch-all`) plays the
 * sample while its fragments still trickle in from a slow seeder, then seeks to the middle and
 * plays on, asking nothing of the internet.
 * @module
 */
import { assert, assertEquals } from "./_assert.ts";
import type { PlayerReport, Scene } from "./player_browser_driver.ts";
import { ROOT } from "./_util.ts";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);
/** The seeder's upload: the 2.4 MB sample takes about 8 s to arrive, a third of its length. */
const SEEDER_RATE = 300_000;

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

if (!hasChromium) console.warn(`Skipping the player browser test: "${CHROMIUM}" is missing`);
