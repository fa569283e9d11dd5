/**
 * The environment variables grpc-js reads, and a check of them that runs before grpc-js loads:
 * it reads them as it is imported, so without access the import itself throws, with a stack from
 * deep inside grpc-js. Every module that imports grpc-js imports this first.
 * @module
 */
import { exitForPermission } from "../common/cli.ts";

/**
 * The environment variables grpc-js reads (logging, tracing, proxies): a process that loads it
 * needs `--allow-env` for these names, as the `grpc` permission set in deno.json grants.
 */
export const GRPC_ENV = [
  "GRPC_DEFAULT_SSL_ROOTS_FILE_PATH",
  "GRPC_EXPERIMENTAL_ENABLE_OUTLIER_DETECTION",
  "GRPC_NODE_DEBUG_SEND_ERROR_DETAILS",
  "GRPC_NODE_TRACE",
  "GRPC_NODE_USE_ALTERNATIVE_RESOLVER",
  "GRPC_NODE_VERBOSITY",
  "GRPC_SSL_CIPHER_SUITES",
  "GRPC_TRACE",
  "GRPC_VERBOSITY",
  "grpc_proxy",
  "http_proxy",
  "https_proxy",
  "no_grpc_proxy",
  "no_proxy",
];

// In a terminal Deno asks for each one when grpc-js reads it; elsewhere say so in one line.
if (!Deno.stdin.isTerminal()) {
  const denied = GRPC_ENV.find((variable) =>
    Deno.permissions.querySync({ name: "env", variable }).state !== "granted"
  );
  if (denied !== undefined) exitForPermission(`Requires env access to "${denied}"`);
}
