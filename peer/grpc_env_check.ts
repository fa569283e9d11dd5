/**
 * A check, as it is imported, that grpc-js may read its environment (grpc_env.ts): grpc-js reads
 * it as it is imported, so without access the import itself throws, with a stack from deep
 * inside grpc-js. Every module that imports grpc-js imports this first.
 * @module
 */
import { exitForPermission } from "../common/cli.ts";
import { deniedGrpcEnv } from "./grpc_env.ts";

const denied = deniedGrpcEnv();
if (denied !== undefined) exitForPermission(`Requires env access to "${denied}"`);
