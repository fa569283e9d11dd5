/**
 * The standard gRPC services the peer's server offers beside `p2p.FileTransfer`, so that tools
 * nobody here wrote work with it: `grpc.health.v1.Health` (Check and Watch; SERVING for "" and
 * "p2p.FileTransfer") and server reflection (v1 and v1alpha), with which `grpcurl list` and
 * `grpcurl describe` need no proto file.
 * @module
 */
import "./grpc_env_check.ts"; // before grpc-js, which reads the environment as it loads
import type * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { HealthImplementation, protoPath as HEALTH_PROTO_PATH } from "grpc-health-check";
import { ReflectionService } from "@grpc/reflection";
import { fileTransferDefinition } from "./grpc_wire.ts";

/** The service names Health answers SERVING for: the server as a whole, and FileTransfer. */
const HEALTHY_SERVICES = ["", "p2p.FileTransfer"];

/** Adds Health and reflection to `server`. */
export function addStandardServices(server: grpc.Server): void {
  new HealthImplementation(Object.fromEntries(HEALTHY_SERVICES.map((name) => [name, "SERVING"])))
    .addToServer(server);
  // Reflection describes what it is given: FileTransfer and Health, each with its messages.
  const health = protoLoader.loadSync(HEALTH_PROTO_PATH, { keepCase: true });
  new ReflectionService({ ...fileTransferDefinition(), ...health }).addToServer(server);
}
