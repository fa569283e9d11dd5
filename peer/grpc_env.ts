/**
 * The environment variables grpc-js reads, as a list only: importing this loads nothing, so the
 * peer's own process can name them (for its gRPC child's permissions) without loading grpc-js.
 * grpc_env_check.ts checks them before grpc-js loads.
 * @module
 */
/**
 * The environment variables grpc-js reads (logging, tracing, proxies) as it is imported: a
 * process that loads it needs `--allow-env` for these names, as the `grpc` permission set in
 * deno.json grants.
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

/**
 * The first of {@link GRPC_ENV} this process may not read, where there is no terminal to ask in
 * (in one, Deno asks as grpc-js reads it); undefined when grpc-js may load.
 */
export function deniedGrpcEnv(): string | undefined {
  if (Deno.stdin.isTerminal()) return undefined;
  return GRPC_ENV.find((variable) =>
    Deno.permissions.querySync({ name: "env", variable }).state !== "granted"
  );
}
