/**
 * How a user names a file: files are content-addressed, so a file's id is its whole-file SHA-256
 * (the manifest's `sha256`), and a name may be shared by several files. A reference is an id, a
 * prefix of one, or a name; the directory resolves it for a peer that holds no file yet.
 * @module
 */

/** The fewest hex digits of an id that name a file by its prefix. */
export const MIN_ID_PREFIX = 6;
/** A file's id: its whole-file SHA-256, in lowercase hex. */
export const FILE_ID_PATTERN = /^[0-9a-f]{64}$/;

/** True when `ref` can be a prefix of an id: at least {@link MIN_ID_PREFIX} lowercase hex digits. */
export function isIdPrefix(ref: string): boolean {
  return ref.length >= MIN_ID_PREFIX && ref.length <= 64 && /^[0-9a-f]+$/.test(ref);
}

/** True when `ref` names the file of `manifest`: by its name, its id, or a prefix of its id. */
export function refersTo(ref: string, manifest: { file: string; sha256: string }): boolean {
  return ref === manifest.file || (isIdPrefix(ref) && manifest.sha256.startsWith(ref));
}

/** The first 12 hex digits of an id: enough to tell files apart on a console line. */
export function shortId(id: string): string {
  return id.slice(0, 12);
}
