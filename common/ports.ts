/**
 * Ports that something holds without serving: a recent outgoing connection's local end (Linux
 * keeps a closed one up to a minute in TIME_WAIT, and the peers' derived ports 50051-50054 lie in
 * its ephemeral range) frees itself, so a server waits for it instead of failing.
 * @module
 */

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
