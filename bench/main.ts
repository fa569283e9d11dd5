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
  for (const name of names) {
    console.log(`\n## ${name}\n`);
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

if (import.meta.main) await main();
