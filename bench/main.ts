/**
 * `deno task bench`: runs every `bench/*_bench.ts` (or those named on the command line, e.g.
 * `deno task bench split`) in its own process, so one bench's memory never counts in another's.
 * @module
 */
import { fileURLToPath } from "node:url";

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
    const { code } = await new Deno.Command(Deno.execPath(), {
      args: ["run", "-q", "-P=bench", `${BENCH_DIR}${name}_bench.ts`],
      stdout: "inherit",
      stderr: "inherit",
    }).output();
    if (code !== 0) failed++;
  }
  if (failed > 0) {
    console.error(`error: ${failed} benchmark(s) missed a target or failed`);
    Deno.exit(1);
  }
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
