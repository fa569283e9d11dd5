/**
 * Runs one split or join in its own process for the split bench and prints its peak memory, so
 * the figure is the splitter's alone: `deno run -P=bench bench/_split_child.ts split IN OUT`.
 * @module
 */
import { joinFragments, splitFile } from "../split.ts";
import { peakRssMiB } from "./_report.ts";

const [command, from, to] = Deno.args;
if (command === "split") await splitFile(from!, { out: to! });
else await joinFragments(from!, to!);
console.log(JSON.stringify({ peakRssMiB: peakRssMiB() }));
