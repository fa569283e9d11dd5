/**
 * What the peer's own process knows of its gRPC service without loading grpc-js: the port, where
 * the proto is, and the environment grpc-js reads. The peer imports only this (and the front and
 * supervisor built on it) until gRPC is used, so a peer nobody talks gRPC to never loads grpc-js.
 * @module
 */
import { fileURLToPath } from "node:url";

/** Where the service is declared; the supervised child may read it and the store, nothing else. */
export const PROTO_PATH = fileURLToPath(new URL("../proto/file_transfer.proto", import.meta.url));

/** The port the server listens on unless told otherwise. */
export const DEFAULT_PORT = 50051;

/**
 * The folders of the .proto files that the standard services' packages (grpc-health-check,
 * @grpc/reflection) read as they load: the supervised child may read them too. Resolved through
 * deno.json's import map (in Deno's npm cache, or node_modules).
 */
export function standardProtoDirs(): string[] {
  return [
    new URL("../../proto", import.meta.resolve("grpc-health-check")),
    new URL("../proto", import.meta.resolve("@grpc/reflection")),
  ].map((url) => fileURLToPath(url));
}
