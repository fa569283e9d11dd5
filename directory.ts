#!/usr/bin/env -S deno run --allow-net
/**
 * The directory: a REST service (Hono) that knows which live peer holds which fragment, and the
 * manifests of the files the swarm shares. State is soft, as in a tracker: peers register,
 * heartbeat with their full state every ttl/3 and are forgotten `--ttl` seconds after the last
 * one, so a restarted directory is whole again within one ttl. The routes and their zod schemas
 * are the validation and the OpenAPI document at once (`/openapi.json`, Swagger UI at `/apidocs`).
 *
 * Usage: `deno task directory [--port 5000] [--ttl 30]`
 * @module
 */
import { createRoute, OpenAPIHono, type RouteConfig, z } from "@hono/zod-openapi";
import { swaggerUI } from "@hono/swagger-ui";
import { bodyLimit } from "hono/body-limit";
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { parseArgs } from "node:util";
import { runMain, UserError } from "./_cli.ts";
import { type Manifest, manifestProblem, NAME_PATTERN } from "./split.ts";

/** The port the directory listens on unless told otherwise. */
export const DEFAULT_PORT = 5000;
/** Seconds a peer stays listed after its last heartbeat. */
export const DEFAULT_TTL = 30;
/** The longest ttl there is: a day. */
export const MAX_TTL = 86_400;
/** Files the directory lists at most, unless told otherwise. */
export const DEFAULT_MAX_FILES = 1_000;
/**
 * Fragments the listed files' manifests hold at most, together, unless told otherwise: what
 * bounds their memory (a manifest of 1 MiB, the largest body, lists about 7,000 fragments and
 * takes about 1.4 MiB of heap).
 */
export const DEFAULT_MAX_FILE_FRAGMENTS = 100_000;
/** Request bodies larger than this get a 413. */
export const MAX_BODY_BYTES = 1024 * 1024;
const DEFAULT_CLIENT_TIMEOUT_MS = 5_000;

// ---------------------------------------------------------------------------------------------
// Schemas: the validation and the OpenAPI document at once

const NAME_RULE = "a name of letters, digits, '.', '_' or '-' (at most 200, not starting with a " +
  "symbol)";
const Name = z.string().regex(NAME_PATTERN, `Must be ${NAME_RULE}`);
/** A peer's host: a hostname or an IP address (with a %zone for IPv6). */
export const HOST_PATTERN = /^[A-Za-z0-9._:%-]{1,253}$/;
const Host = z.string().regex(HOST_PATTERN, "Must be a hostname or an IP address");
const Port = z.int().min(1).max(65535);
/** A port a peer may not serve at all (a peer started without gRPC or without a player). */
const ServicePort = z.int().min(0).max(65535).openapi({ description: "0 when not served" });
const Sha256 = z.string().regex(/^[0-9a-f]{64}$/, "Must be 64 lowercase hex digits");
const Count = z.int().nonnegative();

const PeerStateSchema = z.object({
  host: Host.optional().openapi({
    description: "Where other peers reach this one; defaults to the request's remote address",
    example: "10.0.0.7",
  }),
  port: Port.openapi({ description: "TCP fragment server", example: 6001 }),
  grpcPort: ServicePort.openapi({ example: 50051 }),
  httpPort: ServicePort.openapi({ example: 8001 }),
  fragments: z.array(Name).openapi({ example: ["fragment_0.bin", "fragment_3.bin"] }),
}).openapi("PeerState");

const HolderSchema = z.object({
  id: z.string(),
  host: z.string(),
  port: Port,
  grpcPort: ServicePort,
  httpPort: ServicePort,
}).openapi("Holder");

const PeerSchema = HolderSchema.extend({ fragments: z.array(z.string()) }).openapi("Peer");
const RegistrationSchema = z.object({
  id: z.string(),
  ttl: z.number().openapi({ description: "Seconds; heartbeat every ttl/3" }),
}).openapi("Registration");
const HeartbeatSchema = RegistrationSchema.extend({
  recreated: z.boolean().openapi({
    description: "True when the directory had forgotten this peer (e.g. after a restart): " +
      "the peer should publish its manifests again",
  }),
}).openapi("Heartbeat");
const FragmentHoldersSchema = z.object({ name: z.string(), holders: z.array(HolderSchema) })
  .openapi("FragmentHolders");

const FragmentEntrySchema = z.object({
  index: Count,
  name: Name,
  offset: Count,
  size: Count,
  sha256: Sha256,
}).openapi("FragmentEntry");

const ManifestSchema = z.object({
  version: z.literal(1),
  file: Name,
  mime: z.string().min(1).max(255),
  size: Count,
  sha256: Sha256,
  fragments: z.array(FragmentEntrySchema).min(1),
}).superRefine((manifest, context) => {
  const names = new Set<string>();
  manifest.fragments.forEach((fragment, index) => {
    if (fragment.index !== index) {
      context.addIssue({
        code: "custom",
        path: ["fragments", index, "index"],
        message: `Must be ${index}`,
      });
    }
    if (names.has(fragment.name)) {
      context.addIssue({
        code: "custom",
        path: ["fragments", index, "name"],
        message: "Must be unique",
      });
    }
    names.add(fragment.name);
  });
}).openapi("Manifest") satisfies z.ZodType<Manifest>;

const PublishedSchema = z.object({ file: z.string(), fragments: Count }).openapi("Published");
const FileSummarySchema = z.object({
  file: z.string(),
  mime: z.string(),
  size: Count,
  sha256: z.string(),
  fragments: Count,
  available: z.boolean().openapi({ description: "Every fragment has at least one live holder" }),
}).openapi("FileSummary");
const FileDetailSchema = ManifestSchema.safeExtend({
  fragments: z.array(FragmentEntrySchema.extend({
    holders: z.array(HolderSchema),
    holderCount: Count.openapi({ description: "Live holders: fetch the rarest first" }),
  })),
}).openapi("FileDetail");

const HealthSchema = z.object({
  status: z.literal("ok"),
  peers: Count,
  fragments: Count,
  files: Count,
}).openapi("Health");
const ErrorSchema = z.object({
  error: z.object({ code: z.string().openapi({ example: "NOT_FOUND" }), message: z.string() }),
}).openapi("Error");

/** What a peer tells the directory about itself (`host` defaults to its remote address). */
export type PeerState = z.input<typeof PeerStateSchema>;
/** A live peer that holds a fragment: where to fetch it. */
export type Holder = z.infer<typeof HolderSchema>;
/** A live peer and every fragment it holds. */
export type PeerInfo = z.infer<typeof PeerSchema>;
/** The answer to a registration: the peer's id and the ttl in seconds. */
export type Registration = z.infer<typeof RegistrationSchema>;
/** The answer to a heartbeat; `recreated` says the directory had forgotten the peer. */
export type Heartbeat = z.infer<typeof HeartbeatSchema>;
/** One fragment and its live holders. */
export type FragmentHolders = z.infer<typeof FragmentHoldersSchema>;
/** One published file, as `GET /files` lists it. */
export type FileSummary = z.infer<typeof FileSummarySchema>;
/** A published manifest with, per fragment, its live holders and their count. */
export type FileDetail = z.infer<typeof FileDetailSchema>;
/** The directory's liveness answer, with the sizes of its state. */
export type Health = z.infer<typeof HealthSchema>;

// ---------------------------------------------------------------------------------------------
// State: soft, in memory, indexed for the hot paths (locate and heartbeat)

interface PeerRecord {
  id: string;
  address: string;
  holder: Holder;
  /** As last sent, without duplicates: the next heartbeat usually sends the same list. */
  fragments: string[];
  expiresAt: number;
  /** The body of its last registration or heartbeat, which {@link Registry.refresh} compares. */
  body: string | undefined;
  /** The remote host that stood in for a host that body did not name. */
  from: string | undefined;
}

/** A registration or heartbeat as it was sent, so {@link Registry.refresh} knows it again. */
export interface Sent {
  /** The body, byte for byte. */
  body?: string;
  /** The remote host that stood in for a host the body did not name. */
  from?: string;
}

/** A fragment's holders, and the locate answer built from them. */
interface FragmentRecord {
  holders: Set<PeerRecord>;
  /**
   * The live holders as JSON, as {@link Registry.locateJson} last built them, or undefined once
   * they change. Locates far outnumber changes (a heartbeat that repeats its state changes
   * nothing), and serializing holders scattered over the heap is most of a locate's cost.
   */
  json: string | undefined;
  /** When the first holder in `json` expires, and `json` with it. */
  jsonUntil: number;
}

interface FileRecord {
  manifest: Manifest;
  /**
   * The last moment a live peer was known to hold one of its fragments, or when it was last
   * published: the file is dropped one ttl later unless a live holder turns up.
   */
  backedAt: number;
}

/** A fragment name that published files list: how many, and when a holder last let it go. */
interface ListedName {
  files: number;
  /** The last moment a peer stopped holding it (left, expired, or dropped it): it held it till then. */
  releasedAt: number;
}

/** Options of a {@link Registry}. */
export interface RegistryOptions {
  /** Seconds a peer stays listed after its last heartbeat, at most {@link MAX_TTL}. @default 30 */
  ttl?: number;
  /** The clock in milliseconds; tests pass a fake one. @default Date.now */
  now?: () => number;
  /** Files listed at most; publishing another is refused. @default 1000 */
  maxFiles?: number;
  /** Fragments all listed files' manifests hold at most, together. @default 100000 */
  maxFileFragments?: number;
}

/** What {@link Registry.publish} did with a manifest. */
export type PublishOutcome =
  /** Stored: a new file. */
  | "created"
  /** The same file was already published: it has another ttl to be backed. */
  | "unchanged"
  /** Another file (other contents, or split another way) has its name. */
  | "conflict"
  /** Refused: the directory lists {@link Registry.maxFiles} files already. */
  | "too many files"
  /** Refused: the files' manifests would hold more than {@link Registry.maxFileFragments}. */
  | "too many fragments";

/**
 * The directory's in-memory state: peers, which of them holds which fragment, and files. Reads
 * skip expired peers, so answers hold only live ones; {@link Registry.sweep} (run on a timer by
 * {@link startDirectory}) frees the memory of the dead.
 *
 * A file is soft state too: it stays listed while a live peer holds any of its fragments, and
 * is dropped once none has for one ttl. Publishing it (again) counts as backing it, so a peer may
 * publish before it registers its first fragment.
 */
export class Registry {
  /** Seconds a peer stays listed after its last heartbeat. */
  readonly ttl: number;
  /** Files listed at most. */
  readonly maxFiles: number;
  /** Fragments all listed files' manifests hold at most, together. */
  readonly maxFileFragments: number;
  readonly #ttlMs: number;
  readonly #now: () => number;
  /** Every peer heard from within a ttl, and any expired since the last sweep. */
  readonly #peers = new Map<string, PeerRecord>();
  /** Fragment name -> its holders, kept in step with every heartbeat: locate is O(holders). */
  readonly #fragments = new Map<string, FragmentRecord>();
  /** "host:port" -> peer id, so a peer that restarted and registered again has one entry. */
  readonly #byAddress = new Map<string, string>();
  readonly #files = new Map<string, FileRecord>();
  /** The fragment names the files list: what {@link Registry.#unindex} stamps as released. */
  readonly #listed = new Map<string, ListedName>();
  /** Fragments of all files' manifests, together. */
  #fileFragments = 0;

  constructor(options: RegistryOptions = {}) {
    this.ttl = options.ttl ?? DEFAULT_TTL;
    if (!(this.ttl > 0 && this.ttl <= MAX_TTL)) {
      throw new RangeError(`The ttl must be more than 0 and at most ${MAX_TTL} seconds`);
    }
    this.maxFiles = positive(options.maxFiles ?? DEFAULT_MAX_FILES, "maxFiles");
    this.maxFileFragments = positive(
      options.maxFileFragments ?? DEFAULT_MAX_FILE_FRAGMENTS,
      "maxFileFragments",
    );
    this.#ttlMs = this.ttl * 1000;
    this.#now = options.now ?? Date.now;
  }

  /** Live peers. */
  get peerCount(): number {
    this.sweep();
    return this.#peers.size;
  }

  /** Fragment names with at least one live holder. */
  get fragmentCount(): number {
    this.sweep();
    return this.#fragments.size;
  }

  /** Published files that are still listed. */
  get fileCount(): number {
    this.#sweepFiles(this.#now());
    return this.#files.size;
  }

  /**
   * Forgets every peer whose ttl has run out, and its place in the fragment index, and every
   * file no live peer has backed for a ttl: O(peers + files).
   */
  sweep(): void {
    const now = this.#now();
    for (const peer of this.#peers.values()) {
      if (peer.expiresAt <= now) this.#remove(peer, now);
    }
    this.#sweepFiles(now);
  }

  /**
   * Refreshes live peer `id` when `body` repeats its last registration or heartbeat byte for
   * byte, which would parse to the state it has; if its host came from its remote address, that
   * must not have changed either (`remoteHost` is asked only then). False when it does not
   * refresh, and the caller parses the body and calls {@link Registry.upsert}.
   */
  refresh(id: string, body: string | undefined, remoteHost: () => string | undefined): boolean {
    const now = this.#now();
    const peer = this.#peers.get(id);
    if (body === undefined || peer === undefined || peer.expiresAt <= now) return false;
    if (peer.body !== body || (peer.from !== undefined && peer.from !== remoteHost())) return false;
    peer.expiresAt = now + this.ttl * 1000; // only later: no cached locate answer goes stale
    return true;
  }

  /**
   * Registers or refreshes peer `id` with its full state, parsed from `sent`; true when it was
   * not known.
   */
  upsert(id: string, state: Required<PeerState>, sent: Sent = {}): boolean {
    const now = this.#now();
    const known = this.#peers.get(id);
    const created = known === undefined || known.expiresAt <= now; // expired is forgotten
    // The usual heartbeat repeats the peer's state: only the expiry moves, and only later, so
    // no cached locate answer goes stale. (Same host and port means same address, which
    // #byAddress already maps to this id.)
    if (
      !created && sameHolder(known.holder, state) && sameList(known.fragments, state.fragments)
    ) {
      known.expiresAt = now + this.ttl * 1000;
      known.body = sent.body;
      known.from = sent.from;
      return false;
    }
    const address = `${state.host}:${state.port}`;
    const sameAddress = this.#byAddress.get(address);
    // Another id at the same address is this peer before a restart: keep one entry per peer.
    if (sameAddress !== undefined && sameAddress !== id) {
      this.#remove(this.#peers.get(sameAddress)!, now);
    }
    let peer = known;
    if (peer === undefined) {
      const { body, from } = sent;
      peer = { id, address, holder: toHolder(id, state), fragments: [], expiresAt: 0, body, from };
      this.#peers.set(id, peer);
    } else {
      if (peer.address !== address) this.#byAddress.delete(peer.address);
      if (!sameHolder(peer.holder, state)) peer.holder = toHolder(id, state);
      peer.address = address;
      // Its holder may have changed, or it was expired and left out of the answers: rebuild them.
      for (const name of peer.fragments) this.#fragments.get(name)!.json = undefined;
    }
    this.#index(peer, state.fragments, now);
    peer.expiresAt = now + this.ttl * 1000;
    peer.body = sent.body;
    peer.from = sent.from;
    this.#byAddress.set(address, id);
    return created;
  }

  /** Removes peer `id`; false when it was not known (or had already expired). */
  remove(id: string): boolean {
    const peer = this.#peers.get(id);
    if (peer === undefined) return false;
    const now = this.#now();
    this.#remove(peer, now);
    return peer.expiresAt > now;
  }

  /** The live holders of fragment `name` (empty when none). */
  locate(name: string): Holder[] {
    return this.#live(this.#fragments.get(name), this.#now()).holders;
  }

  /** {@link Registry.locate} as JSON text, kept until the holders change; undefined when none. */
  locateJson(name: string): string | undefined {
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return undefined;
    const now = this.#now();
    if (fragment.json === undefined || fragment.jsonUntil <= now) {
      const { holders, until } = this.#live(fragment, now);
      fragment.json = holders.length === 0 ? undefined : JSON.stringify(holders);
      fragment.jsonUntil = until;
    }
    return fragment.json;
  }

  /** Every live peer with its fragments. */
  peers(): PeerInfo[] {
    const now = this.#now();
    return [...this.#peers.values()]
      .filter((peer) => peer.expiresAt > now)
      .map((peer) => ({ ...peer.holder, fragments: peer.fragments }));
  }

  /** Every fragment with at least one live holder, and its holders. */
  fragments(): FragmentHolders[] {
    return [...this.#fragments.keys()]
      .map((name) => ({ name, holders: this.locate(name) }))
      .filter((fragment) => fragment.holders.length > 0);
  }

  /**
   * Stores a manifest, unless another file has its name or the directory is full (see
   * {@link PublishOutcome}). The same manifest again gives the file another ttl to be backed.
   */
  publish(manifest: Manifest): PublishOutcome {
    const now = this.#now();
    let known = this.#files.get(manifest.file);
    if (known !== undefined && this.#expired(known, now)) {
      this.#drop(known);
      known = undefined;
    }
    if (known !== undefined) {
      // The same file split another way (other fragments) is not the same publication.
      const same = known.manifest.sha256 === manifest.sha256 &&
        JSON.stringify(known.manifest.fragments) === JSON.stringify(manifest.fragments);
      if (!same) return "conflict";
      known.backedAt = Math.max(known.backedAt, now);
      return "unchanged";
    }
    const full = () =>
      this.#files.size >= this.maxFiles
        ? "too many files"
        : this.#fileFragments + manifest.fragments.length > this.maxFileFragments
        ? "too many fragments"
        : undefined;
    // Only a full directory pays for a sweep: a dropped file may make room.
    if (full() !== undefined) this.#sweepFiles(now);
    const refused = full();
    if (refused !== undefined) return refused;
    this.#files.set(manifest.file, { manifest, backedAt: now });
    this.#fileFragments += manifest.fragments.length;
    for (const { name } of manifest.fragments) {
      const listed = this.#listed.get(name);
      if (listed === undefined) this.#listed.set(name, { files: 1, releasedAt: -Infinity });
      else listed.files++;
    }
    return "created";
  }

  /** Every listed file with its fragment count and whether all fragments are held. */
  files(): FileSummary[] {
    const now = this.#now();
    this.#sweepFiles(now);
    const held = (name: string) =>
      [...this.#fragments.get(name)?.holders ?? []].some((peer) => peer.expiresAt > now);
    return [...this.#files.values()].map(({ manifest }) => ({
      file: manifest.file,
      mime: manifest.mime,
      size: manifest.size,
      sha256: manifest.sha256,
      fragments: manifest.fragments.length,
      available: manifest.fragments.every((fragment) => held(fragment.name)),
    }));
  }

  /** The manifest of `file` with each fragment's live holders, or undefined when not listed. */
  file(file: string): FileDetail | undefined {
    const record = this.#files.get(file);
    if (record === undefined) return undefined;
    if (this.#expired(record, this.#now())) {
      this.#drop(record);
      return undefined;
    }
    const fragments = record.manifest.fragments.map((fragment) => {
      const holders = this.locate(fragment.name);
      return { ...fragment, holders, holderCount: holders.length };
    });
    return { ...record.manifest, fragments };
  }

  /**
   * True when no live peer has held any of `file`'s fragments for a ttl; otherwise moves its
   * `backedAt` up to the last moment one is known to have. O(its fragments) at worst, and O(1)
   * for a file known to be backed less than a ttl ago.
   */
  #expired(file: FileRecord, now: number): boolean {
    if (now - file.backedAt < this.#ttlMs) return false;
    let backedAt = file.backedAt;
    for (const { name } of file.manifest.fragments) {
      // A peer expired but not swept yet held it until its expiry; one swept, until releasedAt.
      for (const peer of this.#fragments.get(name)?.holders ?? []) {
        if (peer.expiresAt > now) {
          file.backedAt = now;
          return false;
        }
        backedAt = Math.max(backedAt, peer.expiresAt);
      }
      backedAt = Math.max(backedAt, this.#listed.get(name)!.releasedAt);
    }
    file.backedAt = backedAt;
    return now - backedAt >= this.#ttlMs;
  }

  #sweepFiles(now: number): void {
    for (const file of this.#files.values()) {
      if (this.#expired(file, now)) this.#drop(file);
    }
  }

  #drop(file: FileRecord): void {
    this.#files.delete(file.manifest.file);
    this.#fileFragments -= file.manifest.fragments.length;
    for (const { name } of file.manifest.fragments) {
      const listed = this.#listed.get(name)!;
      if (--listed.files === 0) this.#listed.delete(name);
    }
  }

  /** Brings the fragment index in step with `peer`'s new list, touching only what changed. */
  #index(peer: PeerRecord, names: string[], now: number): void {
    if (sameList(peer.fragments, names)) return; // the usual heartbeat: nothing changed
    const next = new Set(names);
    for (const name of peer.fragments) {
      if (!next.has(name)) this.#unindex(name, peer, now);
    }
    for (const name of next) {
      let fragment = this.#fragments.get(name);
      if (fragment === undefined) {
        fragment = { holders: new Set(), json: undefined, jsonUntil: 0 };
        this.#fragments.set(name, fragment);
      }
      if (fragment.holders.has(peer)) continue;
      fragment.holders.add(peer);
      fragment.json = undefined;
    }
    peer.fragments = [...next];
  }

  /** Takes `peer` out of fragment `name`'s holders, noting until when it held it. */
  #unindex(name: string, peer: PeerRecord, now: number): void {
    const listed = this.#listed.get(name);
    if (listed !== undefined) {
      listed.releasedAt = Math.max(listed.releasedAt, Math.min(now, peer.expiresAt));
    }
    const fragment = this.#fragments.get(name);
    if (fragment === undefined) return;
    fragment.holders.delete(peer);
    fragment.json = undefined;
    if (fragment.holders.size === 0) this.#fragments.delete(name); // no empty sets left behind
  }

  /** The live holders of `fragment`, and when the first of them expires. */
  #live(fragment: FragmentRecord | undefined, now: number): { holders: Holder[]; until: number } {
    const holders: Holder[] = [];
    let until = Infinity;
    for (const peer of fragment?.holders ?? []) {
      if (peer.expiresAt <= now) continue;
      holders.push(peer.holder);
      until = Math.min(until, peer.expiresAt);
    }
    return { holders, until };
  }

  #remove(peer: PeerRecord, now: number): void {
    for (const name of peer.fragments) this.#unindex(name, peer, now);
    this.#peers.delete(peer.id);
    if (this.#byAddress.get(peer.address) === peer.id) this.#byAddress.delete(peer.address);
  }
}

/** `value` when it is a whole number of at least 1; a RangeError naming `option` otherwise. */
function positive(value: number, option: string): number {
  if (Number.isInteger(value) && value >= 1) return value;
  throw new RangeError(`${option} must be a whole number of at least 1, not ${value}`);
}

function sameList(a: string[], b: string[]): boolean {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (a[i] !== b[i]) return false;
  return true;
}

function toHolder(id: string, state: Required<PeerState>): Holder {
  return {
    id,
    host: state.host,
    port: state.port,
    grpcPort: state.grpcPort,
    httpPort: state.httpPort,
  };
}

function sameHolder(holder: Holder, state: Required<PeerState>): boolean {
  return holder.host === state.host && holder.port === state.port &&
    holder.grpcPort === state.grpcPort && holder.httpPort === state.httpPort;
}

// ---------------------------------------------------------------------------------------------
// Routes

const TAG_PEERS = ["peers"];
const TAG_FRAGMENTS = ["fragments"];
const TAG_FILES = ["files"];

function json<T extends z.ZodType>(schema: T, description: string) {
  return { content: { "application/json": { schema } }, description };
}

const ERROR_DESCRIPTIONS = {
  400: "Malformed JSON, or a field that breaks the schema (the message names it)",
  404: "Not found",
  409: "Conflicts with what the directory holds",
  413: `Body larger than ${MAX_BODY_BYTES} bytes`,
  415: 'A body without a Content-Type, or one other than "application/json" (or "+json")',
  429: `The directory lists as many files as it may (${DEFAULT_MAX_FILES} by default), or ` +
    `their manifests as many fragments (${DEFAULT_MAX_FILE_FRAGMENTS} by default); a file no ` +
    "live peer holds goes within a ttl, and makes room",
} as const;
type ErrorStatus = keyof typeof ERROR_DESCRIPTIONS;

/** The declared error responses of a route, all with the error shape. */
function errors<const S extends ErrorStatus[]>(...statuses: S) {
  return Object.fromEntries(
    statuses.map((status) => [status, json(ErrorSchema, ERROR_DESCRIPTIONS[status])]),
  ) as { [K in S[number]]: ReturnType<typeof json<typeof ErrorSchema>> };
}

function jsonBody<T extends z.ZodType>(schema: T) {
  return { body: { content: { "application/json": { schema } }, required: true } };
}

const pathParam = (name: string) => Name.openapi({ param: { name, in: "path" } });

const FILE_LIFETIME = "A file stays listed while a live peer holds any of its fragments, and " +
  "is dropped once none has for one ttl; a new publication has one ttl to be backed, so a peer " +
  "may publish before it registers its first fragment.";

const healthRoute = createRoute({
  method: "get",
  path: "/health",
  summary: "Liveness, with the number of live peers, fragments and files",
  responses: { 200: json(HealthSchema, "The directory is up") },
});

const registerRoute = createRoute({
  method: "post",
  path: "/peers",
  tags: TAG_PEERS,
  summary: "Register a peer with its state",
  request: jsonBody(PeerStateSchema),
  responses: { 201: json(RegistrationSchema, "Registered"), ...errors(400, 413, 415) },
});

const heartbeatRoute = createRoute({
  method: "put",
  path: "/peers/{id}",
  tags: TAG_PEERS,
  summary: "Heartbeat with the peer's full state (idempotent; recreates a forgotten peer)",
  request: { params: z.object({ id: pathParam("id") }), ...jsonBody(PeerStateSchema) },
  responses: { 200: json(HeartbeatSchema, "Refreshed"), ...errors(400, 413, 415) },
});

const leaveRoute = createRoute({
  method: "delete",
  path: "/peers/{id}",
  tags: TAG_PEERS,
  summary: "Leave: forget the peer now",
  request: { params: z.object({ id: pathParam("id") }) },
  responses: { 204: { description: "Forgotten" }, ...errors(400, 404) },
});

const listPeersRoute = createRoute({
  method: "get",
  path: "/peers",
  tags: TAG_PEERS,
  summary: "Every live peer with its fragments",
  responses: { 200: json(z.object({ peers: z.array(PeerSchema) }), "Live peers") },
});

const listFragmentsRoute = createRoute({
  method: "get",
  path: "/fragments",
  tags: TAG_FRAGMENTS,
  summary: "Every fragment with its live holders",
  responses: {
    200: json(z.object({ fragments: z.array(FragmentHoldersSchema) }), "Fragments"),
  },
});

const locateRoute = createRoute({
  method: "get",
  path: "/fragments/{name}",
  tags: TAG_FRAGMENTS,
  summary: "Locate a fragment: its live holders",
  request: { params: z.object({ name: pathParam("name") }) },
  responses: { 200: json(FragmentHoldersSchema, "Its holders"), ...errors(400, 404) },
});

const publishRoute = createRoute({
  method: "post",
  path: "/files",
  tags: TAG_FILES,
  summary: "Publish a file's manifest",
  description: FILE_LIFETIME + " Publishing the same manifest again (200) counts as backing it.",
  request: jsonBody(ManifestSchema),
  responses: {
    200: json(PublishedSchema, "Already published, unchanged"),
    201: json(PublishedSchema, "Published"),
    ...errors(400, 409, 413, 415, 429),
  },
});

const listFilesRoute = createRoute({
  method: "get",
  path: "/files",
  tags: TAG_FILES,
  summary: "Every published file",
  description: FILE_LIFETIME,
  responses: { 200: json(z.object({ files: z.array(FileSummarySchema) }), "Files") },
});

const getFileRoute = createRoute({
  method: "get",
  path: "/files/{file}",
  tags: TAG_FILES,
  summary: "A file's manifest with each fragment's live holders and their count",
  request: { params: z.object({ file: pathParam("file") }) },
  responses: { 200: json(FileDetailSchema, "The manifest with holders"), ...errors(400, 404) },
});

// ---------------------------------------------------------------------------------------------
// Mounting: each route as one handler

/** What a route's handler is given: its path parameters and JSON body, as its schemas parse them. */
interface RouteInput<R extends RouteConfig> {
  param: R["request"] extends { params: infer P extends z.ZodType } ? z.output<P> : undefined;
  json: R["request"] extends
    { body: { content: { "application/json": { schema: infer B extends z.ZodType } } } }
    ? z.output<B>
    : undefined;
  /** The body as sent, before parsing. */
  text: string | undefined;
}

/** Answers a request from its path parameters and body as sent, before parsing; or undefined. */
type Early<R extends RouteConfig> = (
  c: Context<Env>,
  param: RouteInput<R>["param"],
  text: string | undefined,
) => Response | undefined;

/** What c.json() answers with. */
const JSON_HEADERS = { "content-type": "application/json" };

/** The media types a JSON body may have: those @hono/zod-openapi's validator accepts. */
const JSON_TYPE = /^application\/([a-z-.]+\+)?json(;\s*[a-zA-Z0-9-]+=([^;]+))*$/i;

const tooLarge = () =>
  new HTTPException(413, { message: `Body is larger than ${MAX_BODY_BYTES} bytes` });
/** For a body without Content-Length: bodyLimit counts it as it reads it. */
const limitStreamedBody = bodyLimit({
  maxSize: MAX_BODY_BYTES,
  onError: () => {
    throw tooLarge();
  },
});

/**
 * Mounts a route declared with createRoute(): documented exactly as app.openapi() documents it,
 * and validated by the same schemas, but in ONE handler. app.openapi() chains an async middleware
 * per part of the request (body limit, path parameters, media type, body) and parses with zod's
 * slower async path: about a microsecond a step, most of what a heartbeat costs beyond a bare
 * route (bench/directory_bench.ts). A failure throws an HTTPException, which app.onError answers.
 * `early`, on a route with a body, may answer before the body is parsed.
 */
function mount<R extends RouteConfig & { getRoutingPath(): string }>(
  app: OpenAPIHono<Env>,
  route: R,
  handler: (c: Context<Env>, input: RouteInput<R>) => Response,
  early?: Early<R>,
): void {
  app.openAPIRegistry.registerPath(route);
  const params = route.request?.params as z.ZodType | undefined;
  const content = route.request?.body?.content["application/json"];
  const body = content && "schema" in content ? content.schema as z.ZodType : undefined;
  const method = route.method.toUpperCase();
  const path = route.getRoutingPath();
  const param = (c: Context<Env>) =>
    (params && valid(params, c.req.param(), "param")) as RouteInput<R>["param"];
  if (body === undefined) {
    app.on(method, path, (c) => handler(c, { param: param(c) } as RouteInput<R>));
    return;
  }
  app.on(method, path, async (c) => {
    // In the order app.openapi() checks them: size, path parameters, media type, body.
    const length = c.req.header("content-length");
    // The HTTP server holds a body to its Content-Length, so the header is enough to refuse it.
    if (length === undefined) await limitStreamedBody(c, async () => {});
    else if (Number(length) > MAX_BODY_BYTES) throw tooLarge();
    const input = { param: param(c), text: await readText(c) };
    const answer = early?.(c, input.param, input.text);
    if (answer !== undefined) return answer;
    const json = valid(body, parseJson(input.text), "json");
    return handler(c, { ...input, json } as RouteInput<R>);
  });
}

/** `value` as `schema` parses it, or a 400 naming the first field that broke it. */
function valid(schema: z.ZodType, value: unknown, target: "param" | "json"): unknown {
  // Synchronous: no schema here refines asynchronously, and zod compiles sync object parsers.
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  throw new HTTPException(400, { message: describeIssue(result.error.issues[0], target) });
}

/** The body as sent, or undefined when it has neither a body nor a media type; 415 for another. */
async function readText(c: Context<Env>): Promise<string | undefined> {
  const type = c.req.header("content-type");
  if (type && !JSON_TYPE.test(type)) throw unsupportedType();
  const text = await c.req.text();
  if (type) return text;
  if (text === "") return undefined;
  throw unsupportedType();
}

const unsupportedType = () =>
  new HTTPException(415, { message: 'Content-Type must be "application/json"' });

/** `text` as JSON, or a 400. No text at all is an empty object, as app.openapi() has it. */
function parseJson(text: string | undefined): unknown {
  if (text === undefined) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HTTPException(400, { message: "Malformed JSON in request body" });
  }
}

// ---------------------------------------------------------------------------------------------
// The app

/** The error body every failure has: `{"error": {"code", "message"}}`. */
function errorBody(code: string, message: string) {
  return { error: { code, message } };
}

const ERROR_CODES: Record<number, string> = {
  400: "BAD_REQUEST",
  404: "NOT_FOUND",
  409: "CONFLICT",
  413: "PAYLOAD_TOO_LARGE",
  415: "UNSUPPORTED_MEDIA_TYPE",
  429: "TOO_MANY_REQUESTS",
  500: "INTERNAL",
};

const TARGET_NAMES: Record<string, string> = { json: "Field", param: "Path parameter" };

/** One sentence naming the first field that broke the schema. */
function describeIssue(issue: z.core.$ZodIssue, target: string): string {
  const what = TARGET_NAMES[target] ?? "Parameter";
  const field = issue.path.length > 0 ? issue.path.join(".") : "(body)";
  if (issue.code === "invalid_type" && issue.message.endsWith("received undefined")) {
    return `${what} "${field}" is required`;
  }
  const reason = issue.message.replace(/^Invalid input: /, "");
  return `${what} "${field}" is invalid: ${reason[0].toLowerCase()}${reason.slice(1)}`;
}

/** What the Deno server passes as Hono's env: the connection's addresses. */
type Env = { Bindings: Partial<Deno.ServeHandlerInfo<Deno.NetAddr>> };

/** The address the request came from, without the IPv4-mapped IPv6 prefix. */
function remoteHost(env: Env["Bindings"] | undefined): string | undefined {
  return env?.remoteAddr?.hostname.replace(/^::ffff:(?=\d+\.)/, "");
}

/** Options of {@link createApp}. */
export interface AppOptions extends RegistryOptions {
  /** The state to serve; by default a new one with `ttl` and `now`. */
  registry?: Registry;
}

/**
 * Builds the directory's Hono app without listening, so tests can use `app.request()`.
 * @example
 * ```ts
 * const app = createApp({ ttl: 30 });
 * const response = await app.request("/fragments/fragment_0.bin");
 * ```
 */
export function createApp(options: AppOptions = {}): OpenAPIHono<Env> {
  const registry = options.registry ?? new Registry(options);
  const app = new OpenAPIHono<Env>({
    // The directory mounts its own routes with mount(); a route someone adds with app.openapi()
    // still answers a validation failure the same way, with one 400 naming the field.
    defaultHook: (result, c) => {
      if (result.success) return undefined;
      const message = describeIssue(result.error.issues[0], result.target);
      return c.json(errorBody("BAD_REQUEST", message), 400);
    },
  });

  app.onError((error, c) => {
    if (error instanceof HTTPException) {
      const status = error.status as ContentfulStatusCode;
      return c.json(errorBody(ERROR_CODES[status] ?? `HTTP_${status}`, error.message), status);
    }
    console.error(`[DIRECTORY] ${c.req.method} ${c.req.path} failed:`, error);
    return c.json(errorBody("INTERNAL", "Internal server error"), 500);
  });
  app.notFound((c) =>
    c.json(errorBody("NOT_FOUND", `No route for ${c.req.method} "${c.req.path}"`), 404)
  );
  mount(app, healthRoute, (c) =>
    c.json({
      status: "ok" as const,
      peers: registry.peerCount,
      fragments: registry.fragmentCount,
      files: registry.fileCount,
    }, 200));

  /** The state with `host` filled in, or undefined when neither the body nor the socket says. */
  function withHost(state: PeerState, env: Env["Bindings"] | undefined) {
    const host = state.host ?? remoteHost(env);
    return host === undefined ? undefined : { ...state, host };
  }
  const noHost = errorBody(
    "BAD_REQUEST",
    'Field "host" is required: the remote address is unknown',
  );

  /** What the registry keeps of a request, to know a heartbeat that repeats it. */
  const sent = (json: PeerState, state: Required<PeerState>, body: string | undefined): Sent => ({
    body,
    from: json.host === undefined ? state.host : undefined,
  });

  mount(app, registerRoute, (c, { json, text }) => {
    const state = withHost(json, c.env);
    if (state === undefined) return c.json(noHost, 400);
    const id = crypto.randomUUID();
    registry.upsert(id, state, sent(json, state, text));
    return c.json({ id, ttl: registry.ttl }, 201);
  });

  mount(
    app,
    heartbeatRoute,
    (c, { param: { id }, json, text }) => {
      const state = withHost(json, c.env);
      if (state === undefined) return c.json(noHost, 400);
      const recreated = registry.upsert(id, state, sent(json, state, text));
      return c.json({ id, ttl: registry.ttl, recreated }, 200);
    },
    // The usual heartbeat repeats the last one byte for byte: it needs no parsing.
    (c, { id }, text) =>
      registry.refresh(id, text, () => remoteHost(c.env))
        ? c.json({ id, ttl: registry.ttl, recreated: false }, 200)
        : undefined,
  );

  mount(app, leaveRoute, (c, { param: { id } }) => {
    if (!registry.remove(id)) return c.json(errorBody("NOT_FOUND", `No peer "${id}"`), 404);
    return c.body(null, 204);
  });

  mount(app, listPeersRoute, (c) => c.json({ peers: registry.peers() }, 200));
  mount(app, listFragmentsRoute, (c) => c.json({ fragments: registry.fragments() }, 200));

  mount(app, locateRoute, (c, { param: { name } }) => {
    const holders = registry.locateJson(name);
    if (holders === undefined) {
      return c.json(errorBody("NOT_FOUND", `No live peer holds "${name}"`), 404);
    }
    // What c.json({ name, holders }) would send, with the holders serialized once, not per call.
    return c.body(`{"name":${JSON.stringify(name)},"holders":${holders}}`, 200, JSON_HEADERS);
  });

  mount(app, publishRoute, (c, { json: manifest }) => {
    // The schema checks each field; this checks that they agree (offsets, sizes, indexes), as
    // a peer will before it trusts the manifest.
    const problem = manifestProblem(manifest);
    if (problem) return c.json(errorBody("BAD_REQUEST", `Invalid manifest: ${problem}`), 400);
    const outcome = registry.publish(manifest);
    if (outcome === "conflict") {
      const message = `File "${manifest.file}" is already published with other contents`;
      return c.json(errorBody("CONFLICT", message), 409);
    }
    if (outcome === "too many files" || outcome === "too many fragments") {
      const full = outcome === "too many files"
        ? `the directory already lists ${registry.maxFiles} files, its limit`
        : `the directory's files would list more than ${registry.maxFileFragments} ` +
          "fragments, its limit";
      const message = `Cannot publish "${manifest.file}": ${full}; a file no live peer ` +
        "holds is dropped within a ttl";
      return c.json(errorBody("TOO_MANY_FILES", message), 429);
    }
    const body = { file: manifest.file, fragments: manifest.fragments.length };
    return outcome === "created" ? c.json(body, 201) : c.json(body, 200);
  });

  mount(app, listFilesRoute, (c) => c.json({ files: registry.files() }, 200));

  mount(app, getFileRoute, (c, { param: { file } }) => {
    const detail = registry.file(file);
    if (detail === undefined) return c.json(errorBody("NOT_FOUND", `No file "${file}"`), 404);
    return c.json(detail, 200);
  });

  // OpenAPI 3.0 rather than 3.1: validators check 3.0 schema objects strictly, 3.1 barely.
  app.doc("/openapi.json", {
    openapi: "3.0.3",
    info: {
      title: "P2P video directory",
      version: "1.0.0",
      description: "Which live peer holds which fragment, and the manifests of shared files",
    },
  });
  app.get(
    "/apidocs",
    // baseUrl points the page's <script> and <link> at the route below instead of a CDN.
    swaggerUI({ url: "/openapi.json", baseUrl: "/apidocs", title: "P2P directory API" }),
  );
  app.get("/apidocs/swagger-ui-dist/:asset", async (c) => {
    const asset = SWAGGER_ASSETS.get(c.req.param("asset"));
    if (asset === undefined) return c.notFound();
    return c.body(await asset.load(), 200, {
      "content-type": asset.type,
      "cache-control": "public, max-age=86400",
    });
  });
  return app;
}

/**
 * Swagger UI's own files, from npm `swagger-ui-dist`, so /apidocs works with no internet. Loaded
 * as text modules on first use: no file-system path and no read permission needed.
 */
const SWAGGER_ASSETS = new Map([
  ["swagger-ui.css", {
    type: "text/css; charset=utf-8",
    load: once(() => import("swagger-ui-dist/swagger-ui.css", { with: { type: "text" } })),
  }],
  ["swagger-ui-bundle.js", {
    type: "text/javascript; charset=utf-8",
    load: once(() => import("swagger-ui-dist/swagger-ui-bundle.js", { with: { type: "text" } })),
  }],
]);

function once(load: () => Promise<{ default: string }>): () => Promise<string> {
  let text: Promise<string> | undefined;
  return () => text ??= load().then((module) => module.default);
}

// ---------------------------------------------------------------------------------------------
// The server

/** Options of {@link startDirectory}. */
export interface DirectoryOptions extends AppOptions {
  /** 0 picks any free port. @default 5000 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
}

/** A running directory; close it, or `await using` it. */
export interface DirectoryServer extends AsyncDisposable {
  /** The port it listens on (the real one when started on port 0). */
  readonly port: number;
  /** Its base URL, e.g. `http://localhost:5000`. */
  readonly url: string;
  /** The state it serves. */
  readonly registry: Registry;
  /** Resolves once the server has stopped. */
  readonly finished: Promise<void>;
  /** Stops listening, lets requests in flight finish, and stops the sweep. */
  close(): Promise<void>;
}

/**
 * Starts the directory on a port; the handle closes it.
 * @example
 * ```ts
 * await using directory = startDirectory({ port: 0, ttl: 30 });
 * const client = new DirectoryClient(directory.url);
 * ```
 */
export function startDirectory(options: DirectoryOptions = {}): DirectoryServer {
  const registry = options.registry ?? new Registry(options);
  const app = createApp({ registry });
  const server = Deno.serve({
    port: options.port ?? DEFAULT_PORT,
    hostname: options.hostname ?? "0.0.0.0",
    onListen: () => {}, // the caller prints its own line
  }, app.fetch);
  // Reads already skip the expired; sweeping every ttl/4 frees their memory soon after.
  const sweeper = setInterval(() => registry.sweep(), Math.max(100, registry.ttl * 250));
  const { hostname, port } = server.addr;
  const shown = hostname === "0.0.0.0" || hostname === "::" ? "localhost" : hostname;
  const url = `http://${shown.includes(":") ? `[${shown}]` : shown}:${port}`;
  let closing: Promise<void> | undefined;
  const close = () => {
    clearInterval(sweeper);
    return closing ??= server.shutdown();
  };
  return {
    port,
    url,
    registry,
    finished: server.finished,
    close,
    [Symbol.asyncDispose]: close,
  };
}

// ---------------------------------------------------------------------------------------------
// The client peer.ts uses

/** A failed directory call: `status` is the HTTP status, 0 when there was no answer. */
export class DirectoryError extends Error {
  override name = "DirectoryError";
  constructor(
    message: string,
    /** The HTTP status, or 0 when the directory was unreachable or too slow. */
    readonly status: number,
    /** The error code from the body (e.g. `NOT_FOUND`), or `UNREACHABLE` / `TIMEOUT`. */
    readonly code: string,
    options?: ErrorOptions,
  ) {
    super(message, options);
  }
}

/** Options of {@link DirectoryClient}. */
export interface DirectoryClientOptions {
  /** Give up on a call after this long. @default 5000 */
  timeoutMs?: number;
}

/**
 * A typed client of the directory's REST API. Every call throws a {@link DirectoryError} on a
 * non-2xx answer, on a timeout, or when the directory cannot be reached.
 * @example
 * ```ts
 * const directory = new DirectoryClient("http://localhost:5000");
 * const { id, ttl } = await directory.register({ port: 6001, grpcPort: 50051, httpPort: 8001, fragments: [] });
 * const holders = await directory.locate("fragment_5.bin");
 * ```
 */
export class DirectoryClient {
  /** The directory's base URL, without a trailing slash. */
  readonly url: string;
  readonly #timeoutMs: number;

  constructor(url: string | URL, options: DirectoryClientOptions = {}) {
    this.url = String(url).replace(/\/+$/, "");
    this.#timeoutMs = options.timeoutMs ?? DEFAULT_CLIENT_TIMEOUT_MS;
  }

  /** Liveness, with the sizes of the directory's state. */
  health(): Promise<Health> {
    return this.#call("GET", "/health");
  }

  /** Registers this peer; heartbeat every `ttl / 3` seconds with the returned id. */
  register(state: PeerState): Promise<Registration> {
    return this.#call("POST", "/peers", state);
  }

  /** Refreshes this peer with its full state; re-creates it if the directory forgot it. */
  heartbeat(id: string, state: PeerState): Promise<Heartbeat> {
    return this.#call("PUT", `/peers/${encodeURIComponent(id)}`, state);
  }

  /** Leaves the directory (status 404 when it did not know `id`). */
  async leave(id: string): Promise<void> {
    await this.#call("DELETE", `/peers/${encodeURIComponent(id)}`);
  }

  /** The live holders of a fragment; an empty list when no live peer holds it. */
  async locate(name: string): Promise<Holder[]> {
    try {
      const found = await this.#call<FragmentHolders>(
        "GET",
        `/fragments/${encodeURIComponent(name)}`,
      );
      return found.holders;
    } catch (error) {
      if (error instanceof DirectoryError && error.status === 404) return [];
      throw error;
    }
  }

  /** Every live peer with its fragments. */
  async listPeers(): Promise<PeerInfo[]> {
    return (await this.#call<{ peers: PeerInfo[] }>("GET", "/peers")).peers;
  }

  /** Every fragment with its live holders. */
  async listFragments(): Promise<FragmentHolders[]> {
    return (await this.#call<{ fragments: FragmentHolders[] }>("GET", "/fragments")).fragments;
  }

  /** Publishes a file's manifest (status 409 when another file has its name). */
  async publishFile(manifest: Manifest): Promise<void> {
    await this.#call("POST", "/files", manifest);
  }

  /** Every published file. */
  async listFiles(): Promise<FileSummary[]> {
    return (await this.#call<{ files: FileSummary[] }>("GET", "/files")).files;
  }

  /** A file's manifest with each fragment's live holders (status 404 when unknown). */
  getFile(file: string): Promise<FileDetail> {
    return this.#call("GET", `/files/${encodeURIComponent(file)}`);
  }

  async #call<T>(method: string, path: string, body?: unknown): Promise<T> {
    const controller = new AbortController();
    // A timer of our own, not AbortSignal.timeout(), so it is cleared the moment we are done.
    const timer = setTimeout(() => controller.abort(), this.#timeoutMs);
    let response: Response;
    let text: string;
    try {
      response = await fetch(this.url + path, {
        method,
        headers: body === undefined ? {} : { "content-type": "application/json" },
        body: body === undefined ? undefined : JSON.stringify(body),
        signal: controller.signal,
      });
      text = await response.text();
    } catch (error) {
      if (controller.signal.aborted) {
        const message = `Directory at "${this.url}" did not answer within ${this.#timeoutMs} ms`;
        throw new DirectoryError(message, 0, "TIMEOUT", { cause: error });
      }
      const message = `Cannot reach directory at "${this.url}": ${fetchFailure(error)}`;
      throw new DirectoryError(message, 0, "UNREACHABLE", { cause: error });
    } finally {
      clearTimeout(timer);
    }
    if (!response.ok) {
      const { code, message } = parseError(text, response.status);
      throw new DirectoryError(`${method} ${path} failed: ${message}`, response.status, code);
    }
    return (text === "" ? undefined : JSON.parse(text)) as T;
  }
}

/** Why fetch failed, short: Deno hides the reason in `cause`, in a long sentence. */
function fetchFailure(error: unknown): string {
  const inner = error instanceof Error && error.cause instanceof Error ? error.cause : error;
  const text = inner instanceof Error ? inner.message : String(inner);
  return /connection refused/i.test(text) ? "connection refused" : text;
}

/** The code and message of an error body, or the status when the body is not one. */
function parseError(text: string, status: number): { code: string; message: string } {
  try {
    const { error } = JSON.parse(text);
    if (typeof error?.code === "string" && typeof error?.message === "string") return error;
  } catch {
    // not our error shape (a proxy in between?): fall back to the status
  }
  return { code: ERROR_CODES[status] ?? `HTTP_${status}`, message: `HTTP ${status}` };
}

// ---------------------------------------------------------------------------------------------
// The command line

const USAGE =
  `Usage: deno task directory [--port ${DEFAULT_PORT}] [--ttl ${DEFAULT_TTL}] [--hostname 0.0.0.0]

The REST directory: which live peer holds which fragment, and the published manifests.

Options:
  --port PORT      port to listen on, 0 for any free one (default ${DEFAULT_PORT})
  --ttl SECONDS    forget a peer this long after its last heartbeat, and a file this long
                   after no live peer holds any of it (default ${DEFAULT_TTL}, at most ${MAX_TTL})
  --hostname HOST  address to listen on (default 0.0.0.0)
  -h, --help       show this help`;

/** Reads the flags; a mistake throws a {@link UserError} (parseArgs' own errors count as one). */
function parseCli(args: string[]): { port: number; ttl: number; hostname: string } | "help" {
  const { values } = parseArgs({
    args,
    options: {
      port: { type: "string" },
      ttl: { type: "string" },
      hostname: { type: "string" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) return "help";
  const port = Number(values.port ?? DEFAULT_PORT);
  if (!Number.isInteger(port) || port < 0 || port > 65535) {
    throw new UserError(`Invalid --port "${values.port}": expected a number from 0 to 65535`);
  }
  const ttl = Number(values.ttl ?? DEFAULT_TTL);
  if (Number.isNaN(ttl) || ttl <= 0) {
    throw new UserError(`Invalid --ttl "${values.ttl}": expected a positive number of seconds`);
  }
  if (ttl > MAX_TTL) {
    throw new UserError(
      `Invalid --ttl "${values.ttl}": expected at most ${MAX_TTL} seconds (a day)`,
    );
  }
  return { port, ttl, hostname: values.hostname ?? "0.0.0.0" };
}

async function main(args = Deno.args): Promise<void> {
  const options = parseCli(args);
  if (options === "help") return console.log(USAGE);
  let directory: DirectoryServer;
  try {
    directory = startDirectory(options);
  } catch (error) {
    if (error instanceof Deno.errors.AddrInUse) {
      throw new UserError(`Cannot listen on port ${options.port}: address already in use`);
    }
    throw error;
  }
  console.log(`[DIRECTORY] Listening on ${directory.url} (Swagger UI: ${directory.url}/apidocs)`);
  const stop = () => directory.close();
  Deno.addSignalListener("SIGINT", stop);
  Deno.addSignalListener("SIGTERM", stop);
  await directory.finished;
  Deno.removeSignalListener("SIGINT", stop);
  Deno.removeSignalListener("SIGTERM", stop);
}

if (import.meta.main) await runMain(() => main());
