/**
 * `deno task bench`: runs every `bench/*_bench.ts` (or those named on the command line, e.g.
 * `deno task bench split`) in its own process, so one bench's memory never counts in another's.
 * @module
 */
import { fileURLToPath } from "node:url";
import { machineTicks } from "./_report.ts";

const BENCH_DIR = fileURLToPath(new URL("./", import.meta.url));

async function main(args = Deno.args) {
  const names = [...Deno.readDirSync(BENCH_DIR)]
    .map((entry) => entry.name.match(/^(.+)_bench\.ts$/)?.[1])
    .filter((name): name is string => name !== undefined)
    .filter((name) => args.length === 0 || args.includes(name))
    .sort();
  if (names.length === 0) {
    console.error(`error: No benchmark named ${args.map((a) => `"${a}"`).join(", ")}`);
    Deno.exit(1);
  }
  let failed = 0;
  for (const [i, name] of names.entries()) {
    console.log(`\n## ${name}\n`);
    if (i > 0) await settle();
    let run = await runBench(name);
    if (!run.passed && run.steal >= RERUN_STEAL) {
      const share = `${percent(run.steal)} (${percent(RERUN_STEAL)} or more)`;
      console.log(
        `\nThe host took ${share} of this machine's CPU time: the bench runs once more.\n`,
      );
      await settle();
      run = await runBench(name);
    }
    if (!run.passed) failed++;
  }
  if (failed > 0) {
    console.error(`error: ${failed} benchmark(s) missed a target or failed`);
    Deno.exit(1);
  }
}

/**
 * A bench that misses a target while the host steals this share of the machine's CPU time runs
 * once more. The ratios hold against noise that hits both sides alike, but steal comes in bursts:
 * in a quarter hour when vmstat showed 23 to 34% steal, joins of 1 GiB took 2.3 to 5.6 s against
 * 0.83 s on a quiet host, and cats 0.6 to 1.5 s. The steal is printed under every bench.
 */
const RERUN_STEAL = 0.05;

/** Runs one bench in its own process; prints the host's steal during it. */
async function runBench(name: string): Promise<{ passed: boolean; steal: number }> {
  const before = machineTicks();
  const { code } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "-q", "-P=bench", `${BENCH_DIR}${name}_bench.ts`],
    stdout: "inherit",
    stderr: "inherit",
  }).output();
  const after = machineTicks();
  const steal = (after.steal - before.steal) / Math.max(1, after.total - before.total);
  console.log(`\nHost steal during the bench: ${percent(steal)} of this machine's CPU time.`);
  return { passed: code === 0, steal };
}

function percent(share: number): string {
  return `${(share * 100).toFixed(1)}%`;
}

/**
 * Lets the machine settle after a bench: what it wrote goes to disk, and the memory it freed goes
 * back to this VM's host, before the next bench measures anything. Run straight after the scale
 * bench (a gigabyte freed), the split bench's joins ran at half speed while cats did not.
 */
async function settle(): Promise<void> {
  await new Deno.Command("sync").output();
  await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
}

const SETTLE_MS = 5_000;

if (import.meta.main) await main();
