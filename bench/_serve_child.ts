/**
 * A TCP server in its own process for the peer bench, so its memory is its own and it competes
 * with the client for the CPU as a real peer would. Prints `PORT n`, then serves until SIGTERM
 * (or until its stdin closes, so a bench that died leaves no orphan). It runs with `-A` because
 * its folder may be in /dev/shm, which Deno lets nothing less reach (denoland/deno#30979).
 *
 * - `deno run -A bench/_serve_child.ts store DIR`: the peer's own server, startTcpServer
 *   over a Store opened on DIR.
 * - `deno run -A bench/_serve_child.ts raw FILE`: the baseline, a plain 1 MiB read/write
 *   loop that sends FILE to each connection and closes it.
 * @module
 */
import { startTcpServer } from "../peer/tcp.ts";
import { Store } from "../peer/store.ts";

const CHUNK = 1024 * 1024;

async function serveStore(dir: string, stop: Promise<void>): Promise<void> {
  const store = await Store.open(dir);
  await using server = startTcpServer(store, { port: 0, hostname: "127.0.0.1" });
  console.log(`PORT ${server.port}`);
  await stop;
}

async function serveRaw(path: string, stop: Promise<void>): Promise<void> {
  const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  console.log(`PORT ${(listener.addr as Deno.NetAddr).port}`);
  stop.then(() => listener.close());
  const buffer = new Uint8Array(CHUNK);
  try {
    for await (const conn of listener) {
      try {
        using file = await Deno.open(path);
        for (let n; (n = await file.read(buffer)) !== null;) {
          for (let sent = 0; sent < n;) sent += await conn.write(buffer.subarray(sent, n));
        }
      } finally {
        conn.close();
      }
    }
  } catch (error) {
    if (!(error instanceof Deno.errors.BadResource)) throw error; // the listener was closed
  }
}

const { promise: stop, resolve } = Promise.withResolvers<void>();
Deno.addSignalListener("SIGTERM", resolve);
(async () => {
  for await (const _ of Deno.stdin.readable) { /* nothing is sent; wait for the end */ }
})().finally(resolve);

const [mode, path] = Deno.args;
if (mode === "store") await serveStore(path!, stop);
else if (mode === "raw") await serveRaw(path!, stop);
else throw new Error(`Unknown mode "${mode}": expected "store DIR" or "raw FILE"`);
Deno.exit(0);
