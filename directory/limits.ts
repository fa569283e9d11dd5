/**
 * The directory's limits: what it holds at most, how long it waits, and the defaults of the
 * flags that change them. Only declarations, re-exported by `directory/schemas.ts`.
 * @module
 */

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
/** Live peers the directory lists at most, unless told otherwise. */
export const DEFAULT_MAX_PEERS = 100_000;
/**
 * Fragments one peer's state names at most: a store holds one file, of at most 5,000 fragments
 * (split.ts), and room is left for loose ones fetched by name.
 */
export const MAX_PEER_FRAGMENTS = 10_000;
/** Request bodies larger than this get a 413. */
export const MAX_BODY_BYTES = 1024 * 1024;
/**
 * Live peers registered from one client address at most, unless told otherwise: one client
 * cannot fill the directory by itself. Every address counts, loopback too.
 */
export const DEFAULT_MAX_PEERS_PER_ADDRESS = 100;
/**
 * Fragments indexed at most, across all peers (each peer's list counts whole), unless told
 * otherwise: what bounds the index's memory. A fragment takes about 40 bytes when peers share
 * its name (as split.ts names every file's), and about 1.3 KiB of the process's memory when
 * every peer names its own (the attack): 500,000 of those take the directory to about 700 MiB.
 */
export const DEFAULT_MAX_INDEXED_FRAGMENTS = 500_000;
/** Connections open at once at most, and from one client address, unless told otherwise. */
export const DEFAULT_MAX_CONNECTIONS = 1_024;
/** See {@link DEFAULT_MAX_CONNECTIONS}. */
export const DEFAULT_MAX_CONNECTIONS_PER_ADDRESS = 64;
/**
 * Seconds a connection may go without a request: to send a request's headers once it opened,
 * or once it had its last answer (so idle keep-alive connections go too).
 */
export const DEFAULT_HEADER_TIMEOUT = 30;
/**
 * Seconds a request body may take, and the rate a longer one must keep: each
 * {@link DEFAULT_MIN_BODY_RATE} bytes received buy one second more (a 1 MiB body gets 74 s).
 */
export const DEFAULT_BODY_TIMEOUT = 10;
/** Bytes per second: see {@link DEFAULT_BODY_TIMEOUT}. */
export const DEFAULT_MIN_BODY_RATE = 16 * 1024;
/**
 * Bytes of request bodies held at once, across all requests being read; those of one client
 * address may hold a quarter of it (at least one body of {@link MAX_BODY_BYTES}).
 */
export const DEFAULT_MAX_BODY_MEMORY = 64 * 1024 * 1024;
/** Entries a list page holds unless `?limit=` says otherwise, and at most. */
export const DEFAULT_PAGE_LIMIT = 100;
/** See {@link DEFAULT_PAGE_LIMIT}. */
export const MAX_PAGE_LIMIT = 1_000;
/**
 * A list page ends early once its entries hold this many fragment names (`GET /peers`) or
 * holders (`GET /fragments`), after at least one entry.
 */
export const MAX_PAGE_ITEMS = 10_000;
/** Holders `GET /files/{file}` lists per fragment at most (a random sample of them past that). */
export const MAX_FILE_HOLDERS = 50;
/**
 * The longest request target (path and query) answered, in bytes; a longer one gets a 414. Past
 * 64 KiB Deno's HTTP server answers a bare 400 itself, before the app sees the request.
 */
export const MAX_TARGET = 8 * 1024;
