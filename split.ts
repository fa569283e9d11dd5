#!/usr/bin/env -S deno run --allow-read --allow-write
/**
 * The splitter: cuts a video (or any file) into N fragments with a manifest of SHA-256 hashes,
 * deals subsets of them to peers' stores, and joins and verifies them again.
 *
 * ```sh
 * deno run split.ts samples/sample.webm --fragments 10 --out fragments --peers 6001,6002
 * deno run split.ts join fragments out.webm
 * deno run split.ts verify fragments/6001
 * ```
 *
 * Memory stays bounded whatever the file's size: bytes stream through a few 4 MiB buffers, each
 * read once, written once and hashed on two worker threads as it passes. Every store is replaced
 * atomically enough that an interrupted run never leaves a store that looks complete: the
 * manifest goes last.
 * @module
 */
import { createHash } from "node:crypto";
import { parseArgs } from "node:util";
import { basename, dirname, extname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { isDiskFull, runMain, UserError } from "./common/cli.ts";
import { LocalHash, WorkerHash } from "./common/hash_worker.ts";

/** What a fragment or peer folder may be called: this rule keeps `../` out of every store. */
export const NAME_PATTERN = /^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$/;
/** The name of the manifest inside a store. */
export const MANIFEST_NAME = "manifest.json";
/** The video `split` uses when given none. */
export const SAMPLE_VIDEO = fileURLToPath(new URL("./samples/sample.webm", import.meta.url));
/** More fragments than this is a typo, not a plan: each one is a file and a manifest line. */
export const MAX_FRAGMENTS = 5_000;

const CHUNK = 4 * 1024 * 1024;
const BUFFERS = 3; // one being read and written, two the hash workers may still be on
/** Up to this size a file is hashed on the main thread: a worker costs more to start. */
const LOCAL_HASH_MAX = 32 * 1024 * 1024;
// Bigger writes make the kernel allocate large page-cache folios, which cost several times more
// here (1 GiB to ext4 in 4 MiB writes: 1.9 s of system time; in 256 KiB writes: 0.33 s).
const WRITE_SLICE = 256 * 1024;
const HEX64 = /^[0-9a-f]{64}$/;
const MIME_TYPES: Record<string, string> = {
  ".webm": "video/webm",
  ".mp4": "video/mp4",
  ".m4v": "video/mp4",
  ".mkv": "video/x-matroska",
  ".mov": "video/quicktime",
  ".ogv": "video/ogg",
  ".ogg": "video/ogg",
};

/** One fragment of a file, as the manifest lists it. */
export interface FragmentEntry {
  index: number;
  name: string;
  offset: number;
  size: number;
  sha256: string;
}

/** A store's `manifest.json`: the whole file's hash and each fragment's place and hash. */
export interface Manifest {
  version: 1;
  file: string;
  mime: string;
  size: number;
  sha256: string;
  fragments: FragmentEntry[];
}

/** What a write that ran out of disk says; nothing it began is left behind. */
const FULL = "the disk is full (no space left on device); nothing was written";

/** A mistake in what the user asked for (bad path, bad count, corrupt store): one clear line. */
export class SplitError extends UserError {
  override name = "SplitError";
}

export interface SplitOptions {
  /** @default 10 */
  fragments?: number;
  /** The folder that receives every fragment and the manifest. @default "fragments" */
  out?: string;
  /** Peer folder names: fragments are also dealt round-robin into `out/<peer>/`. */
  peers?: string[];
}

/** The state of one fragment in a store, as {@link verifyStore} finds it. */
export interface FragmentStatus {
  name: string;
  status: "ok" | "missing" | "corrupt";
}

/** True when `name` is a valid fragment, file or peer-folder name. */
export function isValidName(name: string): boolean {
  return NAME_PATTERN.test(name);
}

/** The name of fragment `index`: `fragment_3.bin`. */
export function fragmentName(index: number): string {
  return `fragment_${index}.bin`;
}

/** Sizes of `count` fragments of a `size`-byte file: as even as possible, larger ones first. */
export function fragmentSizes(size: number, count: number): number[] {
  const base = Math.floor(size / count);
  return Array.from({ length: count }, (_, i) => base + (i < size % count ? 1 : 0));
}

/**
 * Splits `input` into fragments and a manifest in `options.out`, and deals them to peers.
 * Everything is checked before anything is created.
 */
export async function splitFile(input: string, options: SplitOptions = {}): Promise<Manifest> {
  const { fragments: count = 10, out = "fragments", peers = [] } = options;
  const info = await statInput(input);
  if (info.size === 0) throw new SplitError(`Cannot split "${input}": the file is empty`);
  if (!Number.isInteger(count) || count < 1 || count > Math.min(info.size, MAX_FRAGMENTS)) {
    throw new SplitError(
      `Cannot split "${input}" into ${count} fragments: choose a whole number from 1 to ` +
        `${Math.min(info.size, MAX_FRAGMENTS)}`,
    );
  }
  const file = basename(input);
  if (file === MANIFEST_NAME) {
    throw new SplitError(`Cannot split "${input}": "${MANIFEST_NAME}" is the store's own file`);
  }
  if (!isValidName(file)) {
    throw new SplitError(`Cannot split "${input}": rename it to letters, digits, ".", "_", "-"`);
  }
  if (Array.from({ length: count }, (_, i) => fragmentName(i)).includes(file)) {
    throw new SplitError(`Cannot split "${input}": a fragment would take its name`);
  }
  const badPeer = peers.find((peer) => !isValidName(peer) || peer === MANIFEST_NAME);
  if (badPeer !== undefined) throw new SplitError(`Invalid peer folder name "${badPeer}"`);
  // A peer folder may not take the name of a file the store itself will hold.
  const taken = new Set([file, ...Array.from({ length: count }, (_, i) => fragmentName(i))]);
  const clash = peers.find((peer) => taken.has(peer));
  if (clash !== undefined) {
    throw new SplitError(`Invalid peer folder name "${clash}": the store has a file of that name`);
  }
  if (new Set(peers).size !== peers.length) throw new SplitError("Peer folder names repeat");
  await ensureFolder(out);
  await removeStaleStaging(out);

  const staging = await Deno.makeTempDir({ dir: out, prefix: ".split-" });
  try {
    const manifest = await writeFragments(input, info.size, count, staging);
    await replaceStore(out, staging, manifest);
    for (const [p, peer] of peers.entries()) {
      const subset = manifest.fragments.filter((f) => f.index % peers.length === p);
      await dealToPeer(out, join(out, peer), manifest, subset);
    }
    return manifest;
  } catch (error) {
    // Every store is staged and swapped whole: one that did not fit is left as it was.
    if (isDiskFull(error)) {
      throw new SplitError(`Cannot split "${input}" into "${out}": ${FULL}`, { cause: error });
    }
    throw error;
  } finally {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
  }
}

/**
 * Joins the fragments in `dir` into `output` (by default `dir/<file>`), checking each fragment
 * and the whole file against the manifest. Nothing is written unless every hash matches.
 */
export async function joinFragments(dir: string, output?: string): Promise<Manifest> {
  const manifest = await readManifest(dir);
  const target = output ?? join(dir, manifest.file);
  if ((await statOrNull(target))?.isDirectory) {
    throw new SplitError(`Cannot write "${target}": it is a folder`);
  }
  const missing = [];
  const sizes: number[] = [];
  for (const fragment of manifest.fragments) {
    // lstat: a symlink (or any other non-regular file) is never joined, as if it were missing.
    const info = await Deno.lstat(join(dir, fragment.name)).catch((error) => {
      ignoreNotFound(error);
      return null;
    });
    if (!info?.isFile) missing.push(fragment.name);
    sizes.push(info?.size ?? 0);
  }
  if (missing.length > 0) {
    throw new SplitError(`Cannot join "${dir}": missing ${missing.join(", ")}`);
  }
  // A fragment of the wrong size is corrupt whatever its bytes: name them all, write nothing.
  if (manifest.fragments.some((fragment, i) => sizes[i] !== fragment.size)) {
    throw await corruptFragments(dir, manifest, sizes);
  }
  await ensureFolder(dirname(target));
  // One pass: the bytes are hashed on their way into a temporary file, which is renamed once the
  // whole file's hash matched and removed otherwise. The whole hash alone proves every fragment
  // (SHA-256 of their concatenation), so fragments are hashed one by one only to name the
  // corrupt ones after a mismatch: half the hashing of checking both on every join.
  const temp = await Deno.makeTempFile({ dir: dirname(target), prefix: `.${basename(target)}.` });
  try {
    using copier = new HashedCopy(manifest.size, { legs: false });
    const { whole } = await copier.copy(manifest.fragments.map((fragment) => ({
      from: join(dir, fragment.name),
      to: temp,
      length: fragment.size,
    })));
    if (whole !== manifest.sha256) throw await corruptFragments(dir, manifest, sizes);
    // makeTempFile makes it private (0600); the joined video is an ordinary file, as fragments are.
    await Deno.chmod(temp, 0o644);
    await Deno.rename(temp, target);
    return manifest;
  } catch (error) {
    await Deno.remove(temp).catch(() => {});
    if (isDiskFull(error)) {
      throw new SplitError(`Cannot write "${target}": ${FULL}`, { cause: error });
    }
    throw error;
  }
}

/**
 * Why a join failed its hash: the fragments of the wrong size or whose own hash is wrong, or,
 * when each matches, a manifest whose fragments do not make its file.
 */
async function corruptFragments(dir: string, manifest: Manifest, sizes: number[]) {
  const corrupt = [];
  for (const [i, fragment] of manifest.fragments.entries()) {
    if (sizes[i] !== fragment.size || await checkFragment(dir, fragment) !== "ok") {
      corrupt.push(fragment.name);
    }
  }
  if (corrupt.length > 0) {
    return new SplitError(`Cannot join "${dir}": corrupt ${corrupt.join(", ")}`);
  }
  return new SplitError(`Cannot join "${dir}": the joined file does not match the manifest`);
}

/** Checks every fragment the manifest in `dir` lists: ok, missing or corrupt. */
export async function verifyStore(dir: string): Promise<FragmentStatus[]> {
  const manifest = await readManifest(dir);
  const report: FragmentStatus[] = [];
  for (const fragment of manifest.fragments) {
    report.push({ name: fragment.name, status: await checkFragment(dir, fragment) });
  }
  return report;
}

/** Whether the fragment file in `dir` exists and matches its manifest entry. */
export async function checkFragment(
  dir: string,
  fragment: FragmentEntry,
): Promise<"ok" | "missing" | "corrupt"> {
  const path = join(dir, fragment.name);
  const before = await Deno.lstat(path).catch((error) => {
    ignoreNotFound(error);
    return null;
  });
  if (!before?.isFile) return "missing"; // a symlink or special file is not a fragment
  let file;
  try {
    file = await Deno.open(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return "missing";
    throw error;
  }
  using _ = file;
  const stat = await file.stat();
  if (!stat.isFile || stat.ino !== before.ino) return "missing"; // swapped since the lstat
  if (stat.size !== fragment.size) return "corrupt";
  return await hashReader(file) === fragment.sha256 ? "ok" : "corrupt";
}

/** SHA-256 (hex) of everything left in `file`, read in chunks. */
export async function hashReader(file: Deno.FsFile): Promise<string> {
  const hash = createHash("sha256");
  const buffer = new Uint8Array(CHUNK);
  for (let n; (n = await file.read(buffer)) !== null;) hash.update(buffer.subarray(0, n));
  return hash.digest("hex");
}

/** Reads and checks `dir/manifest.json`; a missing or malformed one is a {@link SplitError}. */
export async function readManifest(dir: string): Promise<Manifest> {
  const path = join(dir, MANIFEST_NAME);
  let text;
  try {
    text = await Deno.readTextFile(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new SplitError(`No manifest in "${dir}": split a file into it first`);
    }
    throw error;
  }
  let data;
  try {
    data = JSON.parse(text);
  } catch {
    throw new SplitError(`Manifest "${path}" is not valid JSON`);
  }
  const problem = manifestProblem(data);
  if (problem) throw new SplitError(`Manifest "${path}" is invalid: ${problem}`);
  return data as Manifest;
}

/** Why `data` is not a valid manifest, or undefined when it is. */
export function manifestProblem(data: unknown): string | undefined {
  const m = data as Partial<Manifest> | null;
  if (typeof m !== "object" || m === null) return "not an object";
  if (m.version !== 1) return "version is not 1";
  if (typeof m.file !== "string" || !isValidName(m.file) || m.file === MANIFEST_NAME) {
    return "bad file name";
  }
  if (typeof m.mime !== "string") return "mime is not a string";
  if (!isSize(m.size)) return "bad size";
  if (typeof m.sha256 !== "string" || !HEX64.test(m.sha256)) return "bad sha256";
  if (!Array.isArray(m.fragments) || m.fragments.length === 0) return "no fragments";
  let offset = 0;
  const names = new Set<string>();
  for (const [i, f] of m.fragments.entries()) {
    const ok = typeof f === "object" && f !== null && f.index === i &&
      typeof f.name === "string" && isValidName(f.name) && f.name !== MANIFEST_NAME &&
      f.name !== m.file &&
      !names.has(f.name) && f.offset === offset && isSize(f.size) &&
      typeof f.sha256 === "string" && HEX64.test(f.sha256);
    if (!ok) return `fragment ${i} is malformed`;
    names.add(f.name);
    offset += f.size;
  }
  return offset === m.size ? undefined : "fragment sizes do not add up to the file's size";
}

function isSize(value: unknown): value is number {
  return Number.isSafeInteger(value) && (value as number) >= 0;
}

/** Streams `input` into fragment files in `folder`, hashing each and the whole as they pass. */
async function writeFragments(
  input: string,
  size: number,
  count: number,
  folder: string,
): Promise<Manifest> {
  const sizes = fragmentSizes(size, count);
  using copier = new HashedCopy(size);
  const { legs, whole } = await copier.copy(sizes.map((length, index) => ({
    from: input,
    to: join(folder, fragmentName(index)),
    length,
  })));
  const fragments: FragmentEntry[] = [];
  let offset = 0;
  for (const [index, fragmentSize] of sizes.entries()) {
    const name = fragmentName(index);
    fragments.push({ index, name, offset, size: fragmentSize, sha256: legs[index]! });
    offset += fragmentSize;
  }
  const file = basename(input);
  const mime = MIME_TYPES[extname(file).toLowerCase()] ?? "application/octet-stream";
  const manifest: Manifest = {
    version: 1,
    file,
    mime,
    size,
    sha256: whole,
    fragments,
  };
  await Deno.writeTextFile(join(folder, MANIFEST_NAME), JSON.stringify(manifest, null, 2) + "\n");
  return manifest;
}

/**
 * `length` bytes to copy from the file at `from` to the file at `to`, which is new or empty. A
 * leg naming the same file as the leg before it goes on where that one stopped: split reads one
 * file into many, join writes many into one.
 */
interface Leg {
  from: string;
  to: string;
  length: number;
}

/**
 * Copies legs from file to file, hashing each leg on one worker thread and all of them (the whole
 * file) on another. The main thread reads a chunk, hands it to both workers and writes it while
 * they hash; a buffer is reused once both are done with it. Nothing waits at the end of a leg,
 * so the pipeline only drains at the end.
 *
 * Reads and writes are synchronous calls: an async one hops to a thread pool and back, 4,000
 * times per GiB with 256 KiB writes, which made a run a tenth slower. The main thread has nothing
 * else to do meanwhile, and it yields to the event loop whenever it waits for a worker.
 */
class HashedCopy implements Disposable {
  #buffers = Array.from({ length: BUFFERS }, () => new Uint8Array(new SharedArrayBuffer(CHUNK)));
  #whole: WorkerHash | LocalHash;
  /** Undefined when legs are not hashed one by one (join: the whole hash proves them). */
  #legs: WorkerHash | LocalHash | undefined;

  /**
   * Hashes on two worker threads (one without `legs`), or on this one for `size` bytes up to
   * LOCAL_HASH_MAX.
   */
  constructor(size: number, { legs = true } = {}) {
    const Hash = size <= LOCAL_HASH_MAX ? LocalHash : WorkerHash;
    this.#whole = new Hash();
    this.#legs = legs ? new Hash() : undefined;
  }

  /**
   * Copies every leg in order; returns each leg's SHA-256 (none without `legs`) and that of all
   * of them in a row.
   */
  async copy(legs: Leg[]): Promise<{ legs: string[]; whole: string }> {
    const free: Promise<unknown>[] = this.#buffers.map(() => Promise.resolve());
    const digests: Promise<string>[] = [];
    let source: { path: string; file: Deno.FsFile } | undefined;
    let sink: { path: string; file: Deno.FsFile } | undefined;
    let turn = 0;
    try {
      for (const [index, leg] of legs.entries()) {
        if (source?.path !== leg.from) {
          source?.file.close();
          source = undefined; // so that `finally` does not close it again if the open fails
          source = { path: leg.from, file: await Deno.open(leg.from) };
        }
        if (sink?.path !== leg.to) {
          sink?.file.close();
          sink = undefined;
          // Not `truncate`: ext4 takes a truncation to zero for a rewrite of the file and
          // flushes it all to disk on close (auto_da_alloc), 0.3 s per GiB here.
          sink = { path: leg.to, file: await Deno.open(leg.to, { write: true, create: true }) };
        }
        // The first leg is where the whole file starts, so the whole hash as it stands at the
        // leg's end is the leg's hash too: its bytes need hashing only once.
        const first = index === 0;
        for (let left = leg.length; left > 0;) {
          const b = turn++ % BUFFERS;
          await free[b];
          const view = this.#buffers[b]!.subarray(0, Math.min(CHUNK, left));
          const chunk = readExact(source.file, view);
          left -= chunk.length;
          const hashed = [this.#whole.update(chunk)];
          if (!first && this.#legs) hashed.push(this.#legs.update(chunk));
          free[b] = Promise.all(hashed);
          writeAll(sink.file, chunk);
        }
        if (this.#legs) digests.push(first ? this.#whole.peek() : this.#legs.digest());
      }
      return { legs: await Promise.all(digests), whole: await this.#whole.digest() };
    } finally {
      // On failure, let the workers finish with the buffers, so no rejection goes unobserved.
      await Promise.allSettled([...free, ...digests]);
      source?.file.close();
      sink?.file.close();
    }
  }

  [Symbol.dispose](): void {
    this.#whole[Symbol.dispose]();
    this.#legs?.[Symbol.dispose]();
  }
}

function readExact<T extends Uint8Array>(file: Deno.FsFile, view: T): T {
  for (let filled = 0; filled < view.length;) {
    const n = file.readSync(view.subarray(filled));
    if (n === null) throw new SplitError("A file became shorter while it was being read");
    filled += n;
  }
  return view;
}

function writeAll(file: Deno.FsFile, view: Uint8Array): void {
  for (let written = 0; written < view.length;) {
    written += file.writeSync(view.subarray(written, written + WRITE_SLICE));
  }
}

/**
 * Moves the fragments and manifest staged in `staging` into `store`. The old manifest goes
 * first and the new one last, so a store caught half-way never looks complete; fragments of an
 * earlier split that the new manifest does not list are removed.
 */
async function replaceStore(store: string, staging: string, manifest: Manifest): Promise<void> {
  const keep = new Set(manifest.fragments.map((f) => f.name));
  const stale = new Set<string>();
  const old = await readManifest(store).catch(() => undefined);
  for (const f of old?.fragments ?? []) stale.add(f.name);
  for await (const entry of Deno.readDir(store)) {
    if (/^fragment_\d+\.bin$/.test(entry.name)) stale.add(entry.name);
  }
  await Deno.remove(join(store, MANIFEST_NAME)).catch(ignoreNotFound);
  for (const name of stale) {
    if (!keep.has(name)) await Deno.remove(join(store, name)).catch(ignoreNotFound);
  }
  for await (const entry of Deno.readDir(staging)) {
    if (entry.name !== MANIFEST_NAME) {
      await Deno.rename(join(staging, entry.name), join(store, entry.name));
    }
  }
  await Deno.rename(join(staging, MANIFEST_NAME), join(store, MANIFEST_NAME));
}

/** Gives a peer's store its subset of fragments (copied from `from`) and the whole manifest. */
async function dealToPeer(
  from: string,
  store: string,
  manifest: Manifest,
  subset: FragmentEntry[],
): Promise<void> {
  await ensureFolder(store);
  await removeStaleStaging(store);
  const staging = await Deno.makeTempDir({ dir: store, prefix: ".split-" });
  try {
    for (const f of subset) await Deno.copyFile(join(from, f.name), join(staging, f.name));
    await Deno.copyFile(join(from, MANIFEST_NAME), join(staging, MANIFEST_NAME));
    await replaceStore(store, staging, { ...manifest, fragments: subset });
  } finally {
    await Deno.remove(staging, { recursive: true }).catch(() => {});
  }
}

/** Removes what an interrupted earlier run left staged in `store`. */
async function removeStaleStaging(store: string): Promise<void> {
  for await (const entry of Deno.readDir(store)) {
    if (entry.name.startsWith(".split-")) {
      await Deno.remove(join(store, entry.name), { recursive: true });
    }
  }
}

async function statInput(input: string): Promise<Deno.FileInfo> {
  let info;
  try {
    info = await Deno.stat(input);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) throw new SplitError(`No such file "${input}"`);
    if (error instanceof Deno.errors.PermissionDenied) {
      throw new SplitError(`Cannot read "${input}": permission denied`);
    }
    throw error;
  }
  if (info.isDirectory) throw new SplitError(`Cannot split "${input}": it is a folder`);
  try {
    (await Deno.open(input)).close();
  } catch (error) {
    if (error instanceof Deno.errors.PermissionDenied) {
      throw new SplitError(`Cannot read "${input}": permission denied`);
    }
    throw error;
  }
  return info;
}

async function ensureFolder(path: string): Promise<void> {
  const info = await statOrNull(path);
  if (info && !info.isDirectory) throw new SplitError(`"${path}" is a file, not a folder`);
  if (!info) await Deno.mkdir(path, { recursive: true });
}

async function statOrNull(path: string): Promise<Deno.FileInfo | null> {
  try {
    return await Deno.stat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) return null;
    throw error;
  }
}

function ignoreNotFound(error: unknown): void {
  if (!(error instanceof Deno.errors.NotFound)) throw error;
}

const USAGE = `Usage:
  deno task split [VIDEO] [--fragments 10] [--out fragments] [--peers 6001,6002,...]
  deno task split join [DIR] [OUTPUT]
  deno task split verify [DIR]

Splits VIDEO (default: the bundled samples/sample.webm) into fragment_0.bin ... with a
manifest.json of SHA-256 hashes in --out. With --peers, also deals the fragments round-robin
into --out/<peer>/, each with the manifest, so every peer starts with a subset.

  join    reassembles DIR (default: fragments) into OUTPUT (default: DIR/<file>), checking
          every fragment and the whole file; writes nothing if any is missing or corrupt
  verify  reports each fragment in DIR (default: fragments) as ok, missing or corrupt;
          exits 1 unless all are ok

Options:
  -n, --fragments N   how many fragments (1 to the file's size in bytes, at most ${MAX_FRAGMENTS})
  -o, --out DIR       where to write them (default: fragments)
  -p, --peers LIST    comma-separated peer folder names, e.g. 6001,6002,6003
  -h, --help          show this help`;

async function main(args = Deno.args): Promise<number> {
  const { values, positionals } = parseArgs({
    args,
    allowPositionals: true,
    options: {
      fragments: { type: "string", short: "n", default: "10" },
      out: { type: "string", short: "o", default: "fragments" },
      peers: { type: "string", short: "p" },
      help: { type: "boolean", short: "h" },
    },
  });
  if (values.help) {
    console.log(USAGE);
    return 0;
  }
  const [command, ...rest] = positionals;
  if (command === "join") {
    if (rest.length > 2) throw new SplitError("join takes at most a folder and an output file");
    const [dir = values.out, output] = rest;
    const manifest = await joinFragments(dir, output);
    const target = output ?? join(dir, manifest.file);
    console.log(
      `Joined ${manifest.fragments.length} fragments into ${target} (sha256 verified).`,
    );
    return 0;
  }
  if (command === "verify") {
    if (rest.length > 1) throw new SplitError("verify takes at most one folder");
    const report = await verifyStore(rest[0] ?? values.out);
    for (const { name, status } of report) console.log(`${status.padEnd(8)}${name}`);
    const bad = report.filter((r) => r.status !== "ok").length;
    console.log(bad === 0 ? `All ${report.length} fragments ok.` : `${bad} not ok.`);
    return bad === 0 ? 0 : 1;
  }
  if (positionals.length > 1) throw new SplitError(`Unexpected argument "${positionals[1]}"`);
  const input = command ?? SAMPLE_VIDEO;
  if (!/^\d+$/.test(values.fragments)) {
    throw new SplitError(`--fragments takes a whole number, not "${values.fragments}"`);
  }
  const count = Number(values.fragments);
  const peers = values.peers?.split(",").map((peer) => peer.trim()) ?? [];
  const manifest = await splitFile(input, { fragments: count, out: values.out, peers });
  console.log(`Video split into ${manifest.fragments.length} fragments.`);
  console.log(`Fragments and ${MANIFEST_NAME} are in ${resolve(values.out)}`);
  for (const [p, peer] of peers.entries()) {
    const names = manifest.fragments.filter((f) => f.index % peers.length === p).map((f) => f.name);
    console.log(`  ${join(values.out, peer)}: ${names.join(", ")}`);
  }
  return 0;
}

if (import.meta.main) await runMain(main);
