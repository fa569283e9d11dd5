/**
 * Ports that something holds without serving: a recent outgoing connection's local end (Linux
 * keeps a closed one up to a minute in TIME_WAIT, and the peers' derived ports 50051-50054 lie in
 * its ephemeral range) frees itself, so a server waits for it instead of failing.
 * @module
 */

import { UserError } from "./cli.ts";

/** Linux keeps a closed connection's local port in TIME_WAIT for 60 s; a little more. */
export const TIME_WAIT_MS = 65_000;

/** Whether a listener could bind `port` on `hostname` now. */
export function canListen(port: number, hostname = "0.0.0.0"): boolean {
  try {
    Deno.listen({ port, hostname }).close();
    return true;
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) return false;
    throw error;
  }
}

/** Whether a server accepts connections on `port` of `hostname` (loopback for a wildcard). */
export async function isServed(port: number, hostname = "0.0.0.0"): Promise<boolean> {
  const target = hostname === "0.0.0.0" || hostname === "::" ? "127.0.0.1" : hostname;
  try {
    (await Deno.connect({ hostname: target, port })).close();
    return true;
  } catch {
    return false;
  }
}

/**
 * Parses a port given on a command line as `what` (`port`, `--port`...), or throws a UserError
 * saying what is wrong: every script says it in the same words.
 */
export function parsePort(text: string, what: string): number {
  const port = Number(text);
  if (!/^\d+$/.test(text) || port > 65535) {
    throw new UserError(`Invalid ${what} "${text}": expected a number from 0 to 65535`);
  }
  return port;
}

/** A taken port, in the words every script uses: whose port it is (`the broker's`), and what to do. */
export function portTakenMessage(port: number, whose: string, choose = "choose another"): string {
  return `Port ${port} is already in use (${whose} port): ${choose} or stop what holds it`;
}
