/**
 * The directory's contract: the zod schemas of every body it takes and gives (the validation
 * and the OpenAPI document at once), the routes declared with them, and the codes of its error
 * shape; it re-exports its limits (`directory/limits.ts`) and what clients need without zod
 * (`directory/protocol.ts`). Only declarations: the registry and the app import them.
 * @module
 */
import { createRoute, z } from "@hono/zod-openapi";
import { type Manifest, NAME_PATTERN } from "../split.ts";
import { FILE_ID_PATTERN, MIN_ID_PREFIX } from "../common/file_ref.ts";
import {
  DEFAULT_BODY_TIMEOUT,
  DEFAULT_MAX_BODY_MEMORY,
  DEFAULT_MAX_FILE_FRAGMENTS,
  DEFAULT_MAX_FILES,
  DEFAULT_MAX_INDEXED_FRAGMENTS,
  DEFAULT_MAX_PEERS,
  DEFAULT_MAX_PEERS_PER_ADDRESS,
  DEFAULT_MIN_BODY_RATE,
  DEFAULT_PAGE_LIMIT,
  MAX_BODY_BYTES,
  MAX_FILE_HOLDERS,
  MAX_PAGE_ITEMS,
  MAX_PAGE_LIMIT,
  MAX_PEER_FRAGMENTS,
  MAX_TARGET,
} from "./limits.ts";
import { HOST_PATTERN } from "./protocol.ts";

export * from "./limits.ts";
export * from "./protocol.ts";
export { FILE_ID_PATTERN, MIN_ID_PREFIX };

// ---------------------------------------------------------------------------------------------
// Schemas

const NAME_RULE = "a name of letters, digits, '.', '_' or '-' (at most 200, not starting with a " +
  "symbol)";
const Name = z.string().regex(NAME_PATTERN, `Must be ${NAME_RULE}`);
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
  fragments: z.array(Name).max(MAX_PEER_FRAGMENTS).openapi({
    example: ["fragment_0.bin", "fragment_3.bin"],
  }),
  fileId: Sha256.optional().openapi({
    description: "The id of the file these fragments belong to: the `sha256` of the store's " +
      "manifest; absent when unknown, e.g. loose fragments fetched by name. Split files all " +
      "name their fragments fragment_<i>.bin: a file's holders are only the peers that give " +
      "its id",
    example: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
  }),
  file: Name.optional().openapi({
    description: "The name of that file (the `file` of the store's manifest), for people: two " +
      "files may share a name, never an id",
    example: "sample.webm",
  }),
}).openapi("PeerState");

const HolderSchema = z.object({
  id: z.string(),
  host: z.string(),
  port: Port,
  grpcPort: ServicePort,
  httpPort: ServicePort,
  fileId: z.string().optional().openapi({
    description: "The id of the file the holder's fragments belong to, when it gave one",
  }),
}).openapi("Holder");

const PeerSchema = HolderSchema.extend({
  fragments: z.array(z.string()),
  file: z.string().optional().openapi({
    description: "The name of the file its fragments belong to, if known",
  }),
}).openapi("Peer");
const RegistrationSchema = z.object({
  id: z.string(),
  ttl: z.number().openapi({ description: "Seconds; heartbeat every ttl/3" }),
  secret: z.string().openapi({
    description: "Proves this peer's ownership: send it as `Authorization: Bearer <secret>` " +
      "with every heartbeat and leave. The one the request's Authorization header gave, or a " +
      "new one",
  }),
  host: z.string().openapi({
    description: "Where the directory lists this peer: the address the request came from, or " +
      "the host it named when the directory trusts advertised hosts (--trust-advertise)",
    example: "10.0.0.7",
  }),
}).openapi("Registration");
const HeartbeatSchema = z.object({
  id: z.string(),
  ttl: z.number().openapi({ description: "Seconds; heartbeat every ttl/3" }),
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

const PublishedSchema = z.object({
  id: z.string().openapi({ description: "The file's id: its whole-file SHA-256" }),
  file: z.string(),
  fragments: Count,
}).openapi("Published");
const FileSummarySchema = z.object({
  id: z.string().openapi({ description: "The file's id: its whole-file SHA-256" }),
  file: z.string(),
  mime: z.string(),
  size: Count,
  sha256: z.string(),
  fragments: Count,
  available: z.boolean().openapi({ description: "Every fragment has at least one live holder" }),
  seeders: Count.openapi({ description: "Live peers of this file that hold every fragment" }),
}).openapi("FileSummary");
const FileDetailSchema = ManifestSchema.safeExtend({
  id: z.string().openapi({ description: "The file's id: its whole-file SHA-256" }),
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
  error: z.object({
    files: z.array(FileSummarySchema).optional().openapi({
      description: "With AMBIGUOUS_FILE (409): the files the name could mean",
    }),
    code: z.string().openapi({
      description: "BAD_REQUEST (400), UNAUTHORIZED (401), FORBIDDEN (403), NOT_FOUND (404), " +
        "METHOD_NOT_ALLOWED (405), REQUEST_TIMEOUT (408), CONFLICT (409), PAYLOAD_TOO_LARGE " +
        "(413), URI_TOO_LONG (414), UNSUPPORTED_MEDIA_TYPE (415), AMBIGUOUS_FILE (409: a name " +
        "several files share), TOO_MANY_FILES, TOO_MANY_PEERS, TOO_MANY_PEERS_FROM_ADDRESS or " +
        "TOO_MANY_FRAGMENTS (429), INTERNAL (500), SERVICE_UNAVAILABLE (503)",
      example: "NOT_FOUND",
    }),
    message: z.string(),
  }),
}).openapi("Error");

/** What a peer tells the directory about itself (`host` defaults to its remote address). */
export type PeerState = z.input<typeof PeerStateSchema>;
/** A live peer that holds a fragment: where to fetch it. */
export type Holder = z.infer<typeof HolderSchema>;
/** A live peer and every fragment it holds. */
export type PeerInfo = z.infer<typeof PeerSchema>;
/** The answer to a registration: the peer's id, the ttl in seconds, its secret and host. */
export type Registration = z.infer<typeof RegistrationSchema>;
/** The answer to a heartbeat; `recreated` says the directory had forgotten the peer. */
export type Heartbeat = z.infer<typeof HeartbeatSchema>;
/** What proves a peer's ownership of its entry: its id and the secret of its registration. */
export type PeerKey = Pick<Registration, "id" | "secret">;
/** One fragment and its live holders. */
export type FragmentHolders = z.infer<typeof FragmentHoldersSchema>;
/** One published file, as `GET /files` lists it. */
export type FileSummary = z.infer<typeof FileSummarySchema>;
/** A published manifest with, per fragment, its live holders and their count. */
export type FileDetail = z.infer<typeof FileDetailSchema>;
/** The directory's liveness answer, with the sizes of its state. */
export type Health = z.infer<typeof HealthSchema>;

// ---------------------------------------------------------------------------------------------
// Routes

const TAG_PEERS = ["peers"];
const TAG_FRAGMENTS = ["fragments"];
const TAG_FILES = ["files"];

/** The name of the OpenAPI security scheme of a peer's secret. */
export const PEER_SECRET_SCHEME = "peerSecret";
/** The OpenAPI security scheme of a peer's secret: `Authorization: Bearer <secret>`. */
export const PEER_SECRET = {
  type: "http",
  scheme: "bearer",
  description: "The secret `POST /peers` answered with (or that the peer chose and sent with " +
    "it): heartbeats and leaves must carry it, so only a peer's owner can change or remove it",
} as const;

function json<T extends z.ZodType>(schema: T, description: string) {
  return { content: { "application/json": { schema } }, description };
}

const ERROR_DESCRIPTIONS = {
  400: "Malformed JSON, or a field that breaks the schema (the message names it)",
  401: "No `Authorization: Bearer <secret>` header, or a malformed one",
  403: "The secret is not this peer's: another owner registered it",
  404: "Not found",
  408: `REQUEST_TIMEOUT: the body took more than ${DEFAULT_BODY_TIMEOUT} s and one more for ` +
    `each ${DEFAULT_MIN_BODY_RATE} bytes of it (by default)`,
  409: "Conflicts with what the directory holds",
  413: `Body larger than ${MAX_BODY_BYTES} bytes`,
  414: `URI_TOO_LONG: a request target (path and query) longer than ${MAX_TARGET} bytes`,
  415: 'A body without a Content-Type, or one other than "application/json" (or "+json")',
  429: `TOO_MANY_FILES: the directory lists as many files as it may (${DEFAULT_MAX_FILES} by ` +
    `default), or their manifests as many fragments (${DEFAULT_MAX_FILE_FRAGMENTS} by ` +
    "default); a file no live peer holds goes within a ttl, and makes room",
  503: "SERVICE_UNAVAILABLE: the directory is reading as many request bodies as it may hold " +
    `(${DEFAULT_MAX_BODY_MEMORY} bytes by default, a quarter of it from one client address); ` +
    "try again in a second",
} as const;

/** The 409 of the routes that place a peer at an address. */
const ADDRESS_TAKEN_RESPONSE = {
  409: json(
    ErrorSchema,
    "CONFLICT: a live peer of another owner is listed at that host and port; it goes within a " +
      "ttl once it stops heartbeating (or at once when it leaves)",
  ),
};

/** The 409 of the routes that take a file by its name or a prefix of its id. */
const AMBIGUOUS_FILE_RESPONSE = {
  409: json(
    ErrorSchema,
    "AMBIGUOUS_FILE: several files have that name (or id prefix); `error.files` lists them " +
      "with their ids and seeders: name one by its id",
  ),
};

/** The 429 of the routes that add a peer or change its fragments. */
const TOO_MANY_PEERS_RESPONSE = {
  429: json(
    ErrorSchema,
    `TOO_MANY_PEERS: the directory lists as many live peers as it may (${DEFAULT_MAX_PEERS} by ` +
      "default); TOO_MANY_PEERS_FROM_ADDRESS: as many registered from this client address " +
      `(${DEFAULT_MAX_PEERS_PER_ADDRESS} by default); TOO_MANY_FRAGMENTS: the index would hold ` +
      `more fragments across all peers than it may (${DEFAULT_MAX_INDEXED_FRAGMENTS} by ` +
      "default), and a peer it lists keeps its last state. A peer that stops heartbeating goes " +
      "within a ttl, and makes room; peers it lists still heartbeat",
  ),
};
type ErrorStatus = keyof typeof ERROR_DESCRIPTIONS;

/** The declared error responses of a route, all with the error shape; every route has the 414. */
function errors<const S extends ErrorStatus[]>(...statuses: S) {
  return Object.fromEntries(
    [...statuses, 414 as const].map((status) => [
      status,
      json(ErrorSchema, ERROR_DESCRIPTIONS[status]),
    ]),
  ) as { [K in S[number] | 414]: ReturnType<typeof json<typeof ErrorSchema>> };
}

function jsonBody<T extends z.ZodType>(schema: T) {
  return { body: { content: { "application/json": { schema } }, required: true } };
}

const pathParam = (name: string) => Name.openapi({ param: { name, in: "path" } });
const FILE_REF = "A file: its id (the whole-file SHA-256), a prefix of its id (at least " +
  `${MIN_ID_PREFIX} hex digits), or its name when no other file has that name (else 409 ` +
  "AMBIGUOUS_FILE, listing the files)";
/** `?file=`: only the holders whose fragments belong to that file. */
const FileParam = Name.optional().openapi({
  param: { name: "file", in: "query" },
  description:
    `Only holders whose fragments belong to this file (as their state says). ${FILE_REF}`,
  example: "sample.webm",
});
const fileQuery = z.object({ file: FileParam });

const PAGE_LIMIT_RULE = `Must be a whole number from 1 to ${MAX_PAGE_LIMIT}`;

/** `?limit=&cursor=`: one page of a list. */
const pageQuery = z.object({
  limit: z.coerce.number({ error: PAGE_LIMIT_RULE }).int(PAGE_LIMIT_RULE).min(1, PAGE_LIMIT_RULE)
    .max(MAX_PAGE_LIMIT, PAGE_LIMIT_RULE).optional().openapi({
      param: { name: "limit", in: "query" },
      description: `Entries on this page at most (${DEFAULT_PAGE_LIMIT} by default, at most ` +
        `${MAX_PAGE_LIMIT}); a page also ends once its entries hold ${MAX_PAGE_ITEMS} items`,
      example: DEFAULT_PAGE_LIMIT,
    }),
  cursor: z.string().regex(/^\d{1,15}$/, "Must be the `next` of a page").optional().openapi({
    param: { name: "cursor", in: "query" },
    description: "Where this page starts: the `next` of the page before (opaque); the first " +
      "page without it. Entries are listed in the order they came: one that comes while a " +
      "client pages through the list is listed at its end, and one that goes is not listed",
  }),
});
const Next = z.string().optional().openapi({
  description: "The cursor of the next page; absent on the last page",
});

/** The page of a list a request asked for. */
export type PageQuery = z.output<typeof pageQuery>;

const FILE_LIFETIME = "Files are content-addressed: a file's id is its whole-file SHA-256, and " +
  "two files may share a name. A file stays listed while a live peer of that file (one whose " +
  "state gives its id) holds any of its fragments, and is dropped once none has for one ttl; a new " +
  "publication has one ttl to be backed, so a peer may publish before it registers its first " +
  "fragment.";

const ADDRESS_RULE = "The directory lists a peer at the address the request came from; only " +
  "a directory started with --trust-advertise takes the `host` a peer names.";

const SECURED = [{ [PEER_SECRET_SCHEME]: [] }];
/** Open to anyone: said explicitly, so that no tool takes the operation's security as forgotten. */
const PUBLIC: typeof SECURED = [];

export const healthRoute = createRoute({
  method: "get",
  path: "/health",
  operationId: "getHealth",
  security: PUBLIC,
  summary: "Liveness, with the number of live peers, fragments and files",
  responses: { 200: json(HealthSchema, "The directory is up"), ...errors() },
});

export const registerRoute = createRoute({
  method: "post",
  path: "/peers",
  operationId: "registerPeer",
  tags: TAG_PEERS,
  summary: "Register a peer with its state; the answer holds its secret",
  description: ADDRESS_RULE + " A request with `Authorization: Bearer <secret>` registers with " +
    "that secret, and replaces a live peer of the same secret at the same address (the peer " +
    "restarted); a live peer of another owner there is a 409.",
  // Optional: anonymous, or with the secret the peer chose.
  security: [{}, ...SECURED],
  request: jsonBody(PeerStateSchema),
  responses: {
    201: json(RegistrationSchema, "Registered"),
    ...errors(400, 401, 408, 413, 415, 503),
    ...ADDRESS_TAKEN_RESPONSE,
    ...TOO_MANY_PEERS_RESPONSE,
  },
});

export const heartbeatRoute = createRoute({
  method: "put",
  path: "/peers/{id}",
  operationId: "heartbeatPeer",
  tags: TAG_PEERS,
  summary: "Heartbeat with the peer's full state (idempotent; recreates a forgotten peer)",
  description: "Needs the peer's secret. A peer the directory does not know (after a restart, " +
    "or once it expired) is recreated with that id, and that secret becomes its owner's. " +
    ADDRESS_RULE,
  security: SECURED,
  request: { params: z.object({ id: pathParam("id") }), ...jsonBody(PeerStateSchema) },
  responses: {
    200: json(HeartbeatSchema, "Refreshed"),
    ...errors(400, 401, 403, 408, 413, 415, 503),
    ...ADDRESS_TAKEN_RESPONSE,
    ...TOO_MANY_PEERS_RESPONSE,
  },
});

export const leaveRoute = createRoute({
  method: "delete",
  path: "/peers/{id}",
  operationId: "leavePeer",
  tags: TAG_PEERS,
  summary: "Leave: forget the peer now (needs its secret)",
  security: SECURED,
  request: { params: z.object({ id: pathParam("id") }) },
  responses: { 204: { description: "Forgotten" }, ...errors(400, 401, 403, 404) },
});

export const listPeersRoute = createRoute({
  method: "get",
  path: "/peers",
  operationId: "listPeers",
  security: PUBLIC,
  tags: TAG_PEERS,
  summary: "Live peers with their fragments, a page at a time",
  request: { query: pageQuery },
  responses: {
    200: json(z.object({ peers: z.array(PeerSchema), next: Next }), "Live peers"),
    ...errors(400),
  },
});

export const listFragmentsRoute = createRoute({
  method: "get",
  path: "/fragments",
  operationId: "listFragments",
  security: PUBLIC,
  tags: TAG_FRAGMENTS,
  summary: "Fragments with their live holders (of one file, with ?file=), a page at a time",
  request: { query: fileQuery.extend(pageQuery.shape) },
  responses: {
    200: json(z.object({ fragments: z.array(FragmentHoldersSchema), next: Next }), "Fragments"),
    ...errors(400, 404),
    ...AMBIGUOUS_FILE_RESPONSE,
  },
});

export const locateRoute = createRoute({
  method: "get",
  path: "/fragments/{name}",
  operationId: "locateFragment",
  security: PUBLIC,
  tags: TAG_FRAGMENTS,
  summary: "Locate a fragment: its live holders (of one file, with ?file=)",
  description: "Every file split.ts makes names its fragments fragment_<i>.bin: without ?file= " +
    "this lists the holders of that name in any file.",
  request: { params: z.object({ name: pathParam("name") }), query: fileQuery },
  responses: {
    200: json(FragmentHoldersSchema, "Its holders"),
    ...errors(400, 404),
    ...AMBIGUOUS_FILE_RESPONSE,
  },
});

export const publishRoute = createRoute({
  method: "post",
  path: "/files",
  operationId: "publishFile",
  security: PUBLIC,
  tags: TAG_FILES,
  summary: "Publish a file's manifest",
  description: FILE_LIFETIME + " Publishing the same manifest again (200) counts as backing " +
    "it; another manifest with the same id (split another way) is a 409.",
  request: jsonBody(ManifestSchema),
  responses: {
    200: json(PublishedSchema, "Already published, unchanged"),
    201: json(PublishedSchema, "Published"),
    ...errors(400, 408, 409, 413, 415, 429, 503),
  },
});

export const listFilesRoute = createRoute({
  method: "get",
  path: "/files",
  operationId: "listFiles",
  security: PUBLIC,
  tags: TAG_FILES,
  summary: "Every published file",
  description: FILE_LIFETIME,
  responses: {
    200: json(z.object({ files: z.array(FileSummarySchema) }), "Files"),
    ...errors(),
  },
});

export const getFileRoute = createRoute({
  method: "get",
  path: "/files/{file}",
  operationId: "getFile",
  security: PUBLIC,
  tags: TAG_FILES,
  summary: "A file's manifest with each fragment's live holders of that file and their count",
  description: `Each fragment lists ${MAX_FILE_HOLDERS} of its holders at most, a random ` +
    "sample of them past that; `holderCount` counts them all.",
  request: {
    params: z.object({ file: pathParam("file").openapi({ description: FILE_REF }) }),
  },
  responses: {
    200: json(FileDetailSchema, "The manifest with holders"),
    ...errors(400, 404),
    ...AMBIGUOUS_FILE_RESPONSE,
  },
});
