/**
 * A check, as it is imported, that grpc-js may read its environment (grpc_env.ts): grpc-js reads
 * it as it is imported, so without access the import itself throws, with a stack from deep
 * inside grpc-js. Every module that imports grpc-js imports this first.
 * @module
 */
import { exitForPermission } from "../common/cli.ts";
import { GRPC_ENV } from "./grpc_env.ts";

// In a terminal Deno asks for each one when grpc-js reads it; elsewhere say so in one line.
if (!Deno.stdin.isTerminal()) {
  const denied = GRPC_ENV.find((variable) =>
    Deno.permissions.querySync({ name: "env", variable }).state !== "granted"
  );
  if (denied !== undefined) exitForPermission(`Requires env access to "${denied}"`);
}
