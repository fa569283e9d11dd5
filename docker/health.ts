#!/usr/bin/env -S deno run --allow-net=127.0.0.1
/**
 * The health probe of compose.yaml's services, run by file name in the container:
 *
 * ```sh
 * deno run --allow-net=127.0.0.1 /app/docker/health.ts ping 6001         # a peer or the broker
 * deno run --allow-net=127.0.0.1 /app/docker/health.ts http 5000 /health  # the directory
 * ```
 *
 * `ping` sends `PING` on the line protocol of a peer or of the broker and wants `PONG`; `http`
 * wants a 2xx from `http://127.0.0.1:PORT/PATH`. It exits 0 when the answer came within 3 s, and 1
 * with one line on stderr otherwise (Docker keeps it in the container's health log).
 *
 * Why a file and not a `deno eval` one-liner: Podman 4 splits an exec-form healthcheck argument
 * that holds spaces (containers/podman#26519), so no argument here has one. Neither probe adds a
 * line to a service's log every interval: a peer logs a connection at its first request other
 * than `PING`, the broker logs connections only with `--verbose`, the directory no requests.
 * @module
 */
import { parseArgs } from "node:util";

/** How long a probe may take: under compose's `timeout` (5 s), deno's own start included. */
const PROBE_TIMEOUT_MS = 3_000;
/** A line protocol's answer longer than this is not `PONG`. */
const MAX_ANSWER = 1024;

const USAGE = `Usage:
  deno run --allow-net=127.0.0.1 docker/health.ts ping PORT        PING a peer or the broker
  deno run --allow-net=127.0.0.1 docker/health.ts http PORT PATH   GET a path, e.g. /health

Exits 0 when the service on 127.0.0.1:PORT answered (PONG, or an HTTP 2xx) within ${
  PROBE_TIMEOUT_MS / 1000
} s, 1 otherwise.`;

/** What the service answered that is not healthy. */
class Unhealthy extends Error {
  override name = "Unhealthy";
}

/** Sends `PING` to a line-protocol server on `port` and resolves once it answers `PONG`. */
async function ping(port: number): Promise<void> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  try {
    await conn.write(new TextEncoder().encode("PING\n"));
    const decoder = new TextDecoder();
    const buffer = new Uint8Array(256);
    let text = "";
    while (!text.includes("\n") && text.length <= MAX_ANSWER) {
      const n = await conn.read(buffer);
      if (n === null) throw new Unhealthy(`127.0.0.1:${port} closed the connection unanswered`);
      text += decoder.decode(buffer.subarray(0, n), { stream: true });
    }
    const line = text.split("\n")[0]!.replace(/\r$/, "");
    if (line !== "PONG") {
      throw new Unhealthy(`127.0.0.1:${port} answered "${line.slice(0, 80)}" to PING`);
    }
  } finally {
    conn.close();
  }
}

/** Resolves once `GET http://127.0.0.1:port<path>` answers a 2xx. */
async function get(port: number, path: string, signal: AbortSignal): Promise<void> {
  const url = `http://127.0.0.1:${port}${path}`;
  const response = await fetch(url, { signal });
  await response.body?.cancel();
  if (!response.ok) throw new Unhealthy(`${url} answered ${response.status}`);
}

function parsePort(text: string | undefined): number {
  const port = Number(text);
  if (text === undefined || !/^\d+$/.test(text) || port < 1 || port > 65535) {
    throw new Unhealthy(`Invalid port "${text ?? ""}": expected a number from 1 to 65535`);
  }
  return port;
}

/** Runs the probe the arguments name; resolves with the exit code. */
async function main(args = Deno.args): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: { help: { type: "boolean", short: "h" } },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const [kind, portText, path] = positionals;
  const arity = kind === "ping" ? 2 : kind === "http" ? 3 : 0;
  if (positionals.length !== arity || (kind === "http" && !path!.startsWith("/"))) {
    throw new Unhealthy(`Unexpected arguments "${args.join(" ")}"; see --help`);
  }
  const port = parsePort(portText);
  const signal = AbortSignal.timeout(PROBE_TIMEOUT_MS);
  const aborted = new Promise<never>((_, reject) => {
    signal.addEventListener("abort", () => reject(signal.reason));
  });
  try {
    await Promise.race([kind === "ping" ? ping(port) : get(port, path!, signal), aborted]);
  } catch (error) {
    if (signal.aborted) {
      throw new Unhealthy(`127.0.0.1:${port} did not answer within ${PROBE_TIMEOUT_MS} ms`);
    }
    if (error instanceof Deno.errors.ConnectionRefused || error instanceof TypeError) {
      // Nothing listens there yet (Deno.connect), or fetch could not connect (a TypeError).
      throw new Unhealthy(`127.0.0.1:${port} is not answering: ${error.message}`);
    }
    throw error;
  }
  return 0;
}

if (import.meta.main) {
  try {
    Deno.exit(await main());
  } catch (error) {
    // Every failure is one line and exit 1: Docker reserves 2, and reads any other code as 1.
    console.error(`unhealthy: ${error instanceof Error ? error.message : String(error)}`);
    Deno.exit(1);
  }
}
