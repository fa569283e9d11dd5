/**
 * The close storm's clients (tests/grpc_supervisor_test.ts), in a process of their own: `count`
 * downloads of `name` from `address`, `parallel` at a time, each on a fresh connection closed
 * after it, all but every tenth hung up after the first chunk. Deno 2.9.6's HTTP/2 client can
 * die inside nghttp2 when a closing session gets the server's GOAWAY (denoland/deno#36788); here
 * that costs this process, which the test starts again for the downloads left, not the test
 * runner. Prints a line per download done, so the test knows how many are left.
 * Usage: deno run -P=peer tests/_storm_clients.ts <host:port> <name> <sha256> <count> <parallel>
 * @module
 */
import { createHash } from "node:crypto";
import { GrpcClient } from "../peer/grpc_client.ts";
import { GrpcError } from "../peer/grpc_wire.ts";

const [address, name, expected, count, parallel] = Deno.args;

/** One download on a fresh connection, retried while the server restarts (up to 20 s). */
async function downloadOnce(cut: boolean): Promise<void> {
  const deadline = Date.now() + 20_000;
  for (;;) {
    const client = new GrpcClient({ deadlineMs: 5000 });
    try {
      const { sha256: announced, chunks } = await client.download(address!, name!);
      const hash = createHash("sha256");
      for await (const chunk of chunks) {
        if (cut) break;
        hash.update(chunk);
      }
      const received = cut ? expected : hash.digest("hex");
      if (announced !== expected || received !== expected) {
        throw new Error(`Download of ${name} announced ${announced}, got ${received}`);
      }
      return;
    } catch (error) {
      if (!(error instanceof GrpcError) || Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 50));
    } finally {
      client.close(); // the close that can trip nghttp2 in the server, or here
    }
  }
}

let next = 0;
async function worker() {
  while (next < Number(count)) {
    await downloadOnce(next++ % 10 !== 0);
    console.log("done");
  }
}
await Promise.all(Array.from({ length: Number(parallel) }, worker));
