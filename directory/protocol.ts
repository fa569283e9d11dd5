/**
 * What the directory and its clients agree on beyond the shapes of bodies: the patterns of
 * hosts and secrets, and the codes of the error shape. Kept apart from `directory/schemas.ts`,
 * which re-exports it, so that a client (a peer) loads no zod, Hono or Redis: those took 250 ms
 * of every peer's start.
 * @module
 */

/** A peer's secret: what `POST /peers` gives, and what a peer may choose itself. */
export const SECRET_PATTERN = /^[A-Za-z0-9_-]{32,128}$/;
/** A peer's host: a hostname or an IP address (with a %zone for IPv6). */
export const HOST_PATTERN = /^[A-Za-z0-9._:%-]{1,253}$/;

/**
 * The `code` of the error shape for each status that has one code: what the app answers with
 * (and the client assumes of a body not in the error shape). A 429 says which bound was met:
 * {@link TOO_MANY_FILES}, {@link TOO_MANY_PEERS}, {@link TOO_MANY_PEERS_FROM_ADDRESS} or
 * {@link TOO_MANY_FRAGMENTS}.
 */
export const ERROR_CODES = {
  400: "BAD_REQUEST",
  401: "UNAUTHORIZED",
  403: "FORBIDDEN",
  404: "NOT_FOUND",
  405: "METHOD_NOT_ALLOWED",
  408: "REQUEST_TIMEOUT",
  409: "CONFLICT",
  413: "PAYLOAD_TOO_LARGE",
  414: "URI_TOO_LONG",
  415: "UNSUPPORTED_MEDIA_TYPE",
  500: "INTERNAL",
  503: "SERVICE_UNAVAILABLE",
} as const;
/** The code of a 409 to a file named by a name that several files share. */
export const AMBIGUOUS_FILE = "AMBIGUOUS_FILE";
/** The code of a 429 to a publication: the directory lists as many files as it may. */
export const TOO_MANY_FILES = "TOO_MANY_FILES";
/** The code of a 429 to a new peer: the directory lists as many live peers as it may. */
export const TOO_MANY_PEERS = "TOO_MANY_PEERS";
/** The code of a 429 to a new peer: as many live peers came from its client address as may. */
export const TOO_MANY_PEERS_FROM_ADDRESS = "TOO_MANY_PEERS_FROM_ADDRESS";
/** The code of a 429 to a peer's state: the index would hold more fragments than it may. */
export const TOO_MANY_FRAGMENTS = "TOO_MANY_FRAGMENTS";

/** The JSON every error answer of the directory has: `{"error":{"code","message"}}`. */
export function errorBody(
  code: string,
  message: string,
): { error: { code: string; message: string } } {
  return { error: { code, message } };
}

/** The code for an error status: the one {@link ERROR_CODES} names, or `HTTP_<status>`. */
export function errorCode(status: number): string {
  return (ERROR_CODES as Record<number, string>)[status] ?? `HTTP_${status}`;
}

/** A new secret: 32 random bytes, base64url (43 characters), as {@link SECRET_PATTERN} has it. */
export function newSecret(): string {
  const bytes = crypto.getRandomValues(new Uint8Array(32));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_")
    .replace(/=+$/, "");
}
