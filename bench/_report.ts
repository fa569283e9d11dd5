/** Shared bench helpers: a markdown table, timing, and peak memory of a process. @module */

/** One row of a bench table: a name, a measured figure, and the target it must meet. */
export interface Row {
  name: string;
  value: string;
  target?: string;
  pass?: boolean;
}

/** Prints rows as a markdown table and returns true when every target was met. */
export function printTable(rows: Row[]): boolean {
  console.log("| measure | value | target | |");
  console.log("| --- | --- | --- | --- |");
  for (const row of rows) {
    const mark = row.pass === undefined ? "" : row.pass ? "ok" : "MISSED";
    console.log(`| ${row.name} | ${row.value} | ${row.target ?? ""} | ${mark} |`);
  }
  return rows.every((row) => row.pass !== false);
}

/** Runs `work` and returns how long it took in seconds. */
export async function seconds(work: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  await work();
  return (performance.now() - start) / 1000;
}

/** Peak resident memory (VmHWM) of a process in MiB; this one by default. */
export function peakRssMiB(pid: number = Deno.pid): number {
  return procStatusMiB(pid, "VmHWM");
}

/** Current resident memory (VmRSS) of a process in MiB; this one by default. */
export function rssMiB(pid: number = Deno.pid): number {
  return procStatusMiB(pid, "VmRSS");
}

/** Linux's USER_HZ: /proc/<pid>/stat counts CPU time in these, whatever the kernel's HZ. */
const CLOCK_TICKS_PER_SECOND = 100;

/** CPU seconds (user + system) a process has used so far; this one by default. */
export function cpuSeconds(pid: number = Deno.pid): number {
  const stat = procFile(pid, "stat");
  // The command name may hold spaces: fields are counted after its closing parenthesis.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS_PER_SECOND;
}

/**
 * This machine's CPU time so far, in ticks over all cores, from /proc/stat: `steal` is the time
 * its hypervisor ran something else while this VM had work (the `st` column of vmstat).
 */
export function machineTicks(): { steal: number; total: number } {
  const line = procText("/proc/stat").split("\n")[0]!;
  // cpu  user nice system idle iowait irq softirq steal guest guest_nice (guest counts in user)
  const ticks = line.trim().split(/\s+/).slice(1, 9).map(Number);
  return { steal: ticks[7] ?? 0, total: ticks.reduce((sum, n) => sum + n, 0) };
}

function procStatusMiB(pid: number, field: string): number {
  const status = procFile(pid, "status");
  const kib = Number(status.match(new RegExp(`^${field}:\\s+(\\d+) kB`, "m"))?.[1] ?? NaN);
  return kib / 1024;
}

/**
 * A file of a process's /proc folder, read through `cat`: Deno grants /proc only with
 * --allow-all, and the benches run with -P=bench, which may run programs.
 */
function procFile(pid: number, name: string): string {
  return procText(`/proc/${pid}/${name}`);
}

function procText(path: string): string {
  const { success, stdout } = new Deno.Command("cat", { args: [path] }).outputSync();
  if (!success) throw new Error(`Cannot read "${path}"`);
  return new TextDecoder().decode(stdout);
}

/** Formats a ratio like `0.83x`. */
export function ratio(value: number): string {
  return `${value.toFixed(2)}x`;
}
