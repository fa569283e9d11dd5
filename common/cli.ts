/**
 * What every command line here shares: a user mistake is one line on stderr and exit 1, with no
 * stack trace; anything unexpected is rethrown so its stack shows.
 * @module
 */
import { basename } from "node:path";
import { fileURLToPath } from "node:url";

/** A mistake in what the user asked for: its message is shown as it is. */
export class UserError extends Error {
  override name = "UserError";
}

/** True for errors the user caused: a {@link UserError} or a bad flag caught by `parseArgs`. */
export function isUserError(error: unknown): error is Error {
  if (error instanceof UserError) return true;
  const code = (error as { code?: unknown } | null)?.code;
  return typeof code === "string" && code.startsWith("ERR_PARSE_ARGS");
}

/**
 * True for an error that says the disk is full (or the user's disk quota is): no retry helps,
 * and the one line that says so is all a user needs, not a stack.
 */
export function isDiskFull(error: unknown): boolean {
  const code = (error as { code?: unknown } | null)?.code;
  return code === "ENOSPC" || code === "EDQUOT";
}

/**
 * A user mistake's message on one line. parseArgs explains its errors at length, over several
 * lines and with quotes it leaves open; its first sentence says what is wrong.
 */
export function userMessage(error: Error): string {
  const code = (error as { code?: unknown }).code;
  if (typeof code !== "string" || !code.startsWith("ERR_PARSE_ARGS")) return error.message;
  return `${error.message.split(/(?<=\.)\s/)[0]!.replace(/\.$/, "")} (see --help)`;
}

/**
 * An error in a few plain words, for a one-line error or log line: `connection refused` rather
 * than the OS message.
 */
export function describe(error: unknown): string {
  if (error instanceof Deno.errors.ConnectionRefused) return "connection refused";
  if (error instanceof Deno.errors.TimedOut) return "timed out";
  if (error instanceof Deno.errors.ConnectionReset) return "connection reset";
  const message = error instanceof Error ? error.message : String(error);
  return message.replace(/ \(os error \d+\)$/, "").replace(/^./, (c) => c.toLowerCase());
}

/**
 * True for what Deno throws when a hostname does not resolve (a plain Error: it has no class of
 * its own), e.g. `--hostname nosuchhost.invalid`.
 */
export function isLookupError(error: unknown): error is Error {
  return error instanceof Error && error.message.startsWith("failed to lookup address information");
}

/** The one line for a {@link isLookupError} on `hostname`. */
export function lookupMessage(hostname: string, error: Error): string {
  const reason = error.message.replace(/^failed to lookup address information: /, "");
  return `Cannot listen on ${JSON.stringify(hostname)}: the name does not resolve (${
    reason.replace(/^./, (c) => c.toLowerCase())
  })`;
}

// Deno grants these only with --allow-all, whatever --allow-read or --allow-write say.
const SPECIAL_PATH = /^Requires all access to ("(?:[^"\\]|\\.)*")/;

// The task of each script whose task is not named after it.
const TASKS: Record<string, string> = { peer_grpc: "grpc" };

/**
 * Exits 1 with `message` (what Deno said was missing) and the command to run instead: the task
 * that grants what the main script needs, with the same arguments; or, for a path under /dev,
 * /proc or /sys, which no task can grant, with why.
 */
export function exitForPermission(message: string, args: string[] = Deno.args): never {
  const special = message.match(SPECIAL_PATH);
  if (special) {
    console.error(
      `error: Cannot use ${special[1]}: Deno allows /dev, /proc and /sys only with --allow-all`,
    );
    Deno.exit(1);
  }
  const script = basename(fileURLToPath(Deno.mainModule), ".ts");
  const command = [`deno task ${TASKS[script] ?? script}`, ...args.map(shellWord)].join(" ");
  console.error(`error: ${message}; \`${command}\` runs it with the ones it needs`);
  Deno.exit(1);
}

// `word` as a POSIX shell reads it back: bare when it is plain, else single-quoted.
function shellWord(word: string): string {
  return /^[\w@%+=:,./-]+$/.test(word) ? word : `'${word.replaceAll("'", `'\\''`)}'`;
}

/**
 * The environment variable `name` where env access to it is granted, else undefined, with no
 * prompt: under a bare `deno run` in a terminal, a variable with a default is not worth a question.
 */
export function envIfGranted(name: string): string | undefined {
  const { state } = Deno.permissions.querySync({ name: "env", variable: name });
  return state === "granted" ? Deno.env.get(name) : undefined;
}

/**
 * In a terminal, asks once for the whole kind of each permission in `needs` that is not granted
 * yet: a bare `deno run` would otherwise prompt once for every port, host and path. Not in a
 * terminal, or once granted (`deno task`), it asks nothing; a refusal surfaces at first use.
 */
export async function askOncePerKind(needs: Deno.PermissionDescriptor[]): Promise<void> {
  if (!Deno.stdin.isTerminal()) return;
  for (const need of needs) {
    if ((await Deno.permissions.query(need)).state !== "prompt") continue;
    await Deno.permissions.request({ name: need.name } as Deno.PermissionDescriptor);
  }
}

/**
 * Makes sure net access to each of `hosts` (`host:port`) is granted: in a terminal it asks once
 * for the whole kind ({@link askOncePerKind}); from a pipe, or refused, it exits as
 * {@link exitForPermission} does, before anything is done half-way.
 */
export async function requireNet(hosts: string[]): Promise<void> {
  // A host Deno cannot name is left to the connection, which says what is wrong with it.
  const named = hosts.filter((host) => netState(host) !== undefined);
  await askOncePerKind(named.map((host) => ({ name: "net", host })));
  const missing = named.find((host) => netState(host) !== "granted");
  if (missing === undefined) return;
  exitForPermission(`Requires net access to "${missing}", run again with the --allow-net flag`);
}

// Net access to `host` as Deno has it, or undefined when it is not a host Deno can name.
function netState(host: string): Deno.PermissionState | undefined {
  try {
    return Deno.permissions.querySync({ name: "net", host }).state;
  } catch {
    return undefined;
  }
}

/** Runs `main` and exits with its code; a user mistake prints `error: <message>` and exits 1. */
export async function runMain(main: () => Promise<number | void>): Promise<never> {
  let code;
  try {
    code = await main() ?? 0;
  } catch (error) {
    // Run with too few permissions (a bare `deno run -P x.ts`, say): say which, no stack.
    if (error instanceof Deno.errors.NotCapable) exitForPermission(error.message);
    if (!isUserError(error)) throw error;
    console.error(`error: ${userMessage(error)}`);
    code = 1;
  }
  Deno.exit(code);
}

/**
 * `text` from the network made safe for a terminal: control characters (C0, DEL, C1), line and
 * paragraph separators and bidirectional overrides are shown as escapes (`\x1b`, `\u202e`), so
 * a message cannot move the cursor, recolour, retitle or rewrite what the terminal shows.
 * @example
 * ```ts
 * escapeControl("fragment_1.bin\x1b[2J"); // "fragment_1.bin\\x1b[2J", shown as fragment_1.bin\x1b[2J
 * ```
 */
export function escapeControl(text: string): string {
  let out = "";
  let from = 0;
  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i);
    const control = code < 0x20 || (code >= 0x7f && code <= 0x9f) || code === 0x2028 ||
      code === 0x2029 || (code >= 0x202a && code <= 0x202e) || (code >= 0x2066 && code <= 0x2069);
    if (!control) continue;
    const hex = code.toString(16).padStart(code < 0x100 ? 2 : 4, "0");
    out += text.slice(from, i) + (code < 0x100 ? `\\x${hex}` : `\\u${hex}`);
    from = i + 1;
  }
  return from === 0 ? text : out + text.slice(from);
}

/** `names` for one line of text: the first `shown`, then how many more. */
export function nameList(names: string[], shown = 5): string {
  const more = names.length - shown;
  return names.slice(0, shown).join(", ") + (more > 0 ? ` and ${more} more` : "");
}
