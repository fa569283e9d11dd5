/**
 * Runs one split or join in its own process for the split bench and prints its peak memory, so
 * the figure is the splitter's alone: `deno run -P=bench bench/_split_child.ts split IN OUT`.
 * `start N` does only what no Deno splitter can skip: Deno starts, starts N SHA-256 workers (see
 * common/hash_worker.ts; split has two, join one), and exits. split.ts is not loaded for it, so its own load counts
 * against split and join.
 * @module
 */
import { WorkerHash } from "../common/hash_worker.ts";
import { peakRssMiB } from "./_report.ts";

const [command, from, to] = Deno.args;
if (command === "split") {
  const { splitFile } = await import("../split.ts");
  await splitFile(from!, { out: to! });
} else if (command === "join") {
  const { joinFragments } = await import("../split.ts");
  await joinFragments(from!, to!);
} else if (command === "start") {
  const workers = Array.from({ length: Number(from) }, () => new WorkerHash());
  await Promise.all(workers.map((worker) => worker.peek()));
  for (const worker of workers) worker[Symbol.dispose]();
} else throw new Error(`Unknown command "${command}": split, join or start`);
console.log(JSON.stringify({ peakRssMiB: peakRssMiB() }));
