/**
 * The peer's gRPC client, loaded (with grpc-js) only when a gRPC fetch is first needed: a peer
 * that never fetches over gRPC never loads grpc-js, nor reads the environment grpc-js reads.
 * @module
 */
import type { GrpcClient } from "./grpc_client.ts";
import { deniedGrpcEnv } from "./grpc_env.ts";
import type { Download } from "./tcp.ts";

/** {@link GrpcClient.download}, with grpc-js imported on the first call. */
export class LazyGrpcClient implements Disposable {
  #loading: Promise<GrpcClient> | undefined;
  #client: GrpcClient | undefined;

  /** Starts downloading fragment `name` from the peer at `address` (see GrpcClient.download). */
  async download(
    address: string,
    name: string,
    options: { signal?: AbortSignal; peer?: string } = {},
  ): Promise<Download> {
    this.#loading ??= load().then((GrpcClient) => this.#client = new GrpcClient());
    return await (await this.#loading).download(address, name, options);
  }

  /** Closes the channels, if any; the client may still be used. */
  close(): void {
    this.#client?.close();
  }

  [Symbol.dispose](): void {
    this.close();
  }
}

/**
 * Imports the client. Without access to grpc-js's environment (and no terminal to ask in), the
 * import would end the process (grpc_env_check.ts): this fetch fails instead, in one line.
 */
async function load(): Promise<typeof GrpcClient> {
  const denied = deniedGrpcEnv();
  if (denied !== undefined) {
    throw new Error(`gRPC requires env access to "${denied}"; \`deno task peer\` grants it`);
  }
  return (await import("./grpc_client.ts")).GrpcClient;
}
