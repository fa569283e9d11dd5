/**
 * The `p2p.FileTransfer` service as both ends of peer_grpc.ts see it: the proto, loaded once, the
 * shapes of its messages, the limits they keep to, and how a failed call is reported.
 * @module
 */
import "./grpc_env_check.ts"; // before grpc-js, which reads the environment as it loads
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { PROTO_PATH } from "./grpc_constants.ts";
import type { FragmentInfo } from "./store.ts";
import type { Holder as DirectoryHolder } from "../directory.ts";

export { DEFAULT_PORT, PROTO_PATH } from "./grpc_constants.ts";

/**
 * A peer that holds a fragment, as the directory names it; `fileId` is the id (whole-file
 * SHA-256) of the file its store holds, when the directory says.
 */
export type Holder = Pick<DirectoryHolder, "host" | "port" | "grpcPort" | "httpPort"> & {
  fileId?: string;
};

/** The largest piece of a fragment in one message. */
export const CHUNK_SIZE = 1024 * 1024;
/** A chunk plus room for the other fields: a bigger message is refused with RESOURCE_EXHAUSTED. */
export const MAX_MESSAGE = CHUNK_SIZE + 64 * 1024;

/** `FileTransfer.ListFiles`: what a peer holds, and the file its manifest describes. */
export interface FileList {
  /** The manifest's file name; empty when the peer has no manifest. */
  file: string;
  /** The file's id, its whole-file SHA-256 (the manifest's sha256); empty without a manifest. */
  fileId: string;
  fragments: FragmentInfo[];
}

/** `FileTransfer.Locate`: whether a peer holds a fragment, and the holders it knows of. */
export interface Location {
  held: boolean;
  fragment?: FragmentInfo;
  holders: Holder[];
  /** The id of the file the holders were asked for, when known. */
  fileId?: string;
}

/** A fragment arriving, over gRPC as over TCP: the TCP protocol's type, so `fetch.ts` takes either. */
export type { Download } from "./tcp.ts";

/** A `Fragment` message as protobufjs decodes it. */
export interface WireFragment {
  name: string;
  size: number;
  sha256: string;
}
/** A `Holder` message, with the proto's snake_case field names. */
export interface WireHolder {
  host: string;
  port: number;
  grpc_port: number;
  http_port: number;
  file_id: string;
}
/** A `Chunk` of a Download: only the first carries size and sha256. */
export interface Chunk {
  size?: number;
  sha256?: string;
  data: Uint8Array;
}
/** An `UploadChunk`: only the first carries name, size and sha256. */
export interface UploadChunk extends Chunk {
  name?: string;
}

let definition: protoLoader.PackageDefinition | undefined;
let service: grpc.ServiceClientConstructor | undefined;

/** The proto as proto-loader loads it (with its descriptors, which reflection serves), once. */
export function fileTransferDefinition(): protoLoader.PackageDefinition {
  definition ??= protoLoader.loadSync(PROTO_PATH, {
    keepCase: true,
    longs: Number, // sizes are uint64 on the wire, but a fragment fits a JS number
    defaults: true,
  });
  return definition;
}

/** The `p2p.FileTransfer` service, loaded from the proto on first use only. */
export function fileTransfer(): grpc.ServiceClientConstructor {
  if (!service) {
    const p2p = grpc.loadPackageDefinition(fileTransferDefinition()).p2p as grpc.GrpcObject;
    service = p2p.FileTransfer as grpc.ServiceClientConstructor;
  }
  return service;
}

/** A failed call with its gRPC status name (`NOT_FOUND`, `DATA_LOSS`, `UNAVAILABLE`...). */
export class GrpcError extends Error {
  override name = "GrpcError";
  constructor(readonly code: string, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/** The trailing metadata of a Download pointed elsewhere: peers' gRPC `host:port`, by commas. */
export const ELSEWHERE_KEY = "p2p-elsewhere";

/** A gRPC status for a handler to answer with (or a client to fail with). */
export function statusError(code: grpc.status, details: string): Partial<grpc.ServiceError> {
  return { code, details, message: details };
}

/** What a server says when its port is taken; the supervisor reads it in the child's error. */
export function portInUseMessage(port: number): string {
  return `Port ${port} is already in use`;
}

/** A name shown in an error: quoted, and cut short so a 1 MB name cannot flood a log. */
export function quote(name: string): string {
  return JSON.stringify(name.length > 64 ? `${name.slice(0, 64)}…` : name);
}
