#!/usr/bin/env -S deno run --allow-net --allow-read --allow-write
/**
 * The peer's gRPC half (DESIGN.md "gRPC", proto/file_transfer.proto): the `FileTransfer` server
 * over a fragment store (with the standard health and reflection services), the client peer.ts
 * fetches and pushes with, and a supervisor that runs the server as a child process, started by
 * the peer's gRPC port (peer/grpc_front.ts) only when a client first talks gRPC. Why a child:
 * Deno 2.9.6's `node:http2` can abort the whole process inside nghttp2 when a client closes its
 * connection (denoland/deno#36788), so a remote client must only ever be able to cost a restart
 * of this child, never the peer.
 *
 * This file is that child's command line and the API the rest of the project imports; the work
 * is in the modules beside it:
 *
 * - `peer/grpc_wire.ts`: what both ends share: the proto, the message shapes and limits, GrpcError;
 * - `peer/grpc_server.ts`: startGrpcServer and one handler per RPC;
 * - `peer/grpc_services.ts`: the standard health and reflection services;
 * - `peer/grpc_client.ts`: GrpcClient, one channel per peer;
 * - `peer/grpc_supervisor.ts`: superviseGrpcServer, which runs this file as a child and restarts it;
 * - `peer/grpc_front.ts`: startGrpcFront, the port in the peer's process that starts it on first use.
 *
 * Usage: `deno task grpc fragments/6001 --port 50051 [--hostname 0.0.0.0] [--directory URL]`
 * @module
 */
import { parseArgs } from "node:util";
import { runMain, UserError } from "./common/cli.ts";
import { parsePort } from "./common/ports.ts";
import { parseRate } from "./common/throttle.ts";
import { Store } from "./peer/store.ts";
import { Steering } from "./peer/steering.ts";
import { DEFAULT_PORT } from "./peer/grpc_wire.ts";
import { type GrpcServerOptions, quietBindFailures, startGrpcServer } from "./peer/grpc_server.ts";
import { listeningLine, storedLine } from "./peer/grpc_supervisor.ts";

export type { FragmentInfo } from "./peer/store.ts";
export {
  CHUNK_SIZE,
  type Download,
  type FileList,
  GrpcError,
  type Holder,
  type Location,
  PROTO_PATH,
} from "./peer/grpc_wire.ts";
export { type GrpcServer, type GrpcServerOptions, startGrpcServer } from "./peer/grpc_server.ts";
export { GrpcClient, type GrpcClientOptions } from "./peer/grpc_client.ts";
export { GRPC_ENV } from "./peer/grpc_env.ts";
export {
  type GrpcSupervisor,
  superviseGrpcServer,
  type SupervisorOptions,
} from "./peer/grpc_supervisor.ts";
export { type GrpcFront, type GrpcFrontOptions, startGrpcFront } from "./peer/grpc_front.ts";

const USAGE = `Usage: deno task grpc <store dir> [options]

Serves the fragments in <store dir> over gRPC (p2p.FileTransfer, proto/file_transfer.proto).
Prints "[gRPC] Listening on port N", and "STORED <name>" for each fragment an Upload stored.

Options:
  --port P          port to listen on; 0 picks a free one (default 50051)
  --hostname H      address to listen on (default 0.0.0.0)
  --directory URL   directory whose holders Locate names (e.g. http://localhost:5000)
  --max-upload RATE download bytes per second it may send, e.g. 20MB/s
  --supervised      exit when stdin closes (set by the supervising peer)
  --help            show this help`;

async function main(args = Deno.args): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      port: { type: "string", default: String(DEFAULT_PORT) },
      hostname: { type: "string", default: "0.0.0.0" },
      directory: { type: "string" },
      "max-upload": { type: "string" },
      supervised: { type: "boolean", default: false },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  if (positionals.length !== 1) throw new UserError("Expected one store folder (see --help)");
  const port = parsePort(values.port, "--port");
  let locate: GrpcServerOptions["locate"];
  if (values.directory !== undefined) {
    // Only loaded when asked for: it brings the REST stack along.
    const { DirectoryClient } = await import("./directory.ts");
    const directory = new DirectoryClient(values.directory);
    locate = (name, file) => directory.locate(name, file === undefined ? {} : { file });
  }
  let maxUpload;
  try {
    maxUpload = values["max-upload"] === undefined ? undefined : parseRate(values["max-upload"]);
  } catch (error) {
    throw new UserError((error as Error).message);
  }
  const store = await Store.open(positionals[0]);
  quietBindFailures();
  const server = await startGrpcServer(store, {
    port,
    hostname: values.hostname,
    maxUpload,
    locate,
    onStored: (info) => console.log(storedLine(info.name)),
    steering: new Steering(store),
  });
  console.log(listeningLine(server.port));

  const { promise: stop, resolve } = Promise.withResolvers<void>();
  Deno.addSignalListener("SIGINT", resolve);
  Deno.addSignalListener("SIGTERM", resolve);
  if (values.supervised) {
    // The supervisor holds the other end: when it is gone (even SIGKILLed), so are we.
    (async () => {
      for await (const _ of Deno.stdin.readable) { /* nothing is sent; wait for the end */ }
    })().finally(resolve);
  }
  await stop;
  await server.close();
  return 0;
}

if (import.meta.main) await runMain(main);
