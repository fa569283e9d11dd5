/**
 * The supervisor of peer_grpc.ts: runs `deno task grpc` for a store as a child process with
 * narrow permissions, and restarts it, with back-off, whenever it dies. Why a child: Deno 2.9.6's
 * `node:http2` can abort the whole process inside nghttp2 when a client closes its connection
 * (denoland/deno#36788), so a remote client must only ever be able to cost a restart of the
 * child, never the peer. The child tells its news on stdout, one line each (see
 * {@link listeningLine} and {@link storedLine}).
 * @module
 */
import { fileURLToPath } from "node:url";
import { GRPC_ENV } from "./grpc_env.ts";
import { describe, UserError } from "../common/cli.ts";
import { portTakenMessage } from "../common/ports.ts";
import { LineBuffer } from "../common/lines.ts";
import { DEFAULT_PORT, PROTO_PATH, standardProtoDirs } from "./grpc_constants.ts";

// The child runs peer_grpc.ts's command line, with this project's deno.json (its import map).
const SCRIPT_PATH = fileURLToPath(new URL("../peer_grpc.ts", import.meta.url));
const CONFIG_PATH = fileURLToPath(new URL("../deno.json", import.meta.url));

/** The line the child prints once it listens on `port`. */
export function listeningLine(port: number): string {
  return `[gRPC] Listening on port ${port}`;
}
const LISTENING = /^\[gRPC\] Listening on port (\d+)$/;

// What the child says, as its one `error:` line, when its port is taken (portInUseMessage).
const PORT_IN_USE = /^Port (\d+) is already in use$/;

/** The line the child prints for each fragment an Upload stored. */
export function storedLine(name: string): string {
  return `STORED ${name}`;
}
const STORED = /^STORED (\S+)$/;

/** What {@link superviseGrpcServer} runs, and whom it tells. */
export interface SupervisorOptions {
  /** The store's folder: the child may read and write there only. */
  dir: string;
  /** 0 picks a free port once; restarts reuse the port it got (see `samePort`). @default 50051 */
  port?: number;
  /**
   * Restarts reuse the port the first child got. The front (grpc_front.ts) says false: its
   * child's port is private, and a fresh free one cannot be taken by then. @default true
   */
  samePort?: boolean;
  hostname?: string;
  /** The directory's URL, so Locate can name other holders. */
  directory?: string;
  /** Download bytes per second (the peer's `--max-upload`). */
  maxUpload?: number;
  /** Called with the name of each fragment an Upload stored (then `store.adopt(name)` it). */
  onStored?: (name: string) => void;
  /** Called with the child's stderr lines and the supervisor's own news (a restart...). */
  onLog?: (line: string) => void;
}

/** A gRPC server running in a child process that is restarted whenever it dies. */
export interface GrpcSupervisor extends AsyncDisposable {
  /** The port the server listens on (the same across restarts, unless `samePort` is false). */
  readonly port: number;
  /** The child's process id, while one runs. */
  readonly pid: number | undefined;
  /** How many times the child was restarted. */
  readonly restarts: number;
  /** Resolves when the server is listening again (at once when it is). */
  ready(): Promise<void>;
  /** Stops the child for good. */
  close(): Promise<void>;
}

const MIN_BACKOFF_MS = 100;
const MAX_BACKOFF_MS = 5_000;
// A child that ran this long was healthy: the next restart starts from the shortest back-off.
const HEALTHY_MS = 10_000;
const STOP_GRACE_MS = 2_000;

/**
 * Runs `deno task grpc` for `dir` as a child process with narrow permissions, and restarts it
 * with back-off when it dies. Resolves once it listens; rejects if the first start fails (a
 * port in use...).
 * @example
 * ```ts
 * await using grpc = await superviseGrpcServer({ dir, port: 50051, onStored: (n) => store.adopt(n) });
 * ```
 */
export async function superviseGrpcServer(options: SupervisorOptions): Promise<GrpcSupervisor> {
  const supervisor = new Supervisor(options);
  await supervisor.started;
  return supervisor;
}

class Supervisor implements GrpcSupervisor {
  readonly started: Promise<void>;
  #options: SupervisorOptions;
  #port: number;
  #child: Deno.ChildProcess | undefined;
  #listening = false;
  #waiters: (() => void)[] = [];
  #restarts = 0;
  #closed = false;
  #wake = () => {};
  #loop: Promise<void>;

  constructor(options: SupervisorOptions) {
    this.#options = options;
    this.#port = options.port ?? DEFAULT_PORT;
    let started!: () => void, failed!: (error: Error) => void;
    this.started = new Promise((resolve, reject) => [started, failed] = [resolve, reject]);
    this.#loop = this.#run(started, failed);
  }

  get port(): number {
    return this.#port;
  }

  get pid(): number | undefined {
    return this.#child?.pid;
  }

  get restarts(): number {
    return this.#restarts;
  }

  ready(): Promise<void> {
    if (this.#listening || this.#closed) return Promise.resolve();
    return new Promise((resolve) => this.#waiters.push(resolve));
  }

  async #run(started: () => void, failed: (error: Error) => void) {
    let backoff = MIN_BACKOFF_MS;
    let everListened = false;
    while (!this.#closed) {
      const since = Date.now();
      let ended;
      try {
        ended = await this.#runChild(everListened, () => {
          if (!everListened) started();
          everListened = true;
        });
      } catch (error) {
        // Spawning failed (out of processes or descriptors, say). The first time, starting
        // fails; later, the loop keeps trying: only close() ends it.
        ended = { error };
      }
      this.#listening = false;
      if (this.#closed) break;
      if (!everListened) {
        failed(startError(ended));
        this.#closed = true;
        break;
      }
      if (Date.now() - since > HEALTHY_MS) backoff = MIN_BACKOFF_MS;
      const delay = backoff / 2 + Math.random() * backoff / 2; // jitter
      const why = "error" in ended
        ? `Cannot start the server (${describe(ended.error)})`
        : `Server exited (${ended.status.signal ?? `code ${ended.status.code}`})`;
      // Ctrl-C in a terminal reaches the whole process group, and the child stops cleanly (code
      // 0) or by the signal: the peer is stopping too, quietly.
      const interrupted = "status" in ended &&
        (ended.status.signal === "SIGINT" || ended.status.code === 0);
      if (!interrupted) {
        this.#options.onLog?.(`[gRPC] ${why}; restarting in ${Math.round(delay)} ms`);
      }
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, delay);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
      backoff = Math.min(backoff * 2, MAX_BACKOFF_MS);
      if (!this.#closed) this.#restarts++;
    }
    for (const wake of this.#waiters.splice(0)) wake();
  }

  /**
   * Runs the child once, to its end; calls `onListening` when it prints its port. Until the
   * first child listens, its stderr is kept rather than logged: why it failed is then said once,
   * by {@link superviseGrpcServer}'s rejection.
   */
  async #runChild(everListened: boolean, onListening: () => void) {
    const { dir, hostname, directory, maxUpload } = this.#options;
    const child = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-q",
        "--config",
        CONFIG_PATH,
        "--allow-net",
        `--allow-env=${GRPC_ENV.join(",")}`,
        // grpc-health-check finds its proto with fs.existsSync, which Deno checks the uid for.
        "--allow-sys=uid",
        `--allow-read=${[dir, PROTO_PATH, ...standardProtoDirs()].join(",")}`,
        `--allow-write=${dir}`,
        SCRIPT_PATH,
        dir,
        "--port",
        String(this.#options.samePort === false ? this.#options.port ?? DEFAULT_PORT : this.#port),
        "--supervised",
        ...hostname ? ["--hostname", hostname] : [],
        ...directory ? ["--directory", directory] : [],
        ...maxUpload ? ["--max-upload", String(maxUpload)] : [],
      ],
      stdin: "piped", // the child exits when this closes, so a killed peer leaves no orphan
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    this.#child = child;
    let stderr = "";
    let holding = !everListened;
    const out = readLines(child.stdout, (line) => {
      const listening = line.match(LISTENING);
      const stored = line.match(STORED);
      if (listening) {
        this.#port = Number(listening[1]);
        this.#listening = true;
        holding = false;
        onListening();
        for (const wake of this.#waiters.splice(0)) wake();
      } else if (stored) this.#options.onStored?.(stored[1]);
      else this.#options.onLog?.(line);
    });
    const err = readLines(child.stderr, (line) => {
      stderr = (stderr + line + "\n").slice(-4096);
      if (!holding) this.#options.onLog?.(line);
    });
    const [status] = await Promise.all([child.status, out, err]);
    await child.stdin.close().catch(() => {});
    this.#child = undefined;
    // What a child that never listened said is news after all when it ends in no clear error.
    if (holding && clearError(stderr) === undefined) {
      for (const line of stderr.trimEnd().split("\n")) this.#options.onLog?.(line);
    }
    return { status, stderr };
  }

  async close(): Promise<void> {
    this.#closed = true;
    this.#wake();
    const child = this.#child;
    if (child) {
      try {
        child.kill("SIGTERM");
      } catch { /* already gone */ }
      const timer = setTimeout(() => {
        try {
          child.kill("SIGKILL");
        } catch { /* already gone */ }
      }, STOP_GRACE_MS);
      await this.#loop;
      clearTimeout(timer);
    }
    await this.#loop;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Why the first child did not start, as the error {@link superviseGrpcServer} rejects with. */
function startError(
  ended: { error: unknown } | { status: Deno.CommandStatus; stderr: string },
): Error {
  if ("error" in ended) {
    // Run without --allow-run, say: runMain names the permission.
    if (ended.error instanceof Deno.errors.NotCapable) return ended.error;
    return new UserError(`gRPC server did not start: ${describe(ended.error)}`, {
      cause: ended.error,
    });
  }
  const { status, stderr } = ended;
  const reason = clearError(stderr);
  const inUse = reason?.match(PORT_IN_USE);
  if (inUse) {
    return new UserError(portTakenMessage(Number(inUse[1]), "the peer's gRPC"));
  }
  return new UserError(
    `gRPC server did not start: ${reason ?? `exited with code ${status.code}`}`,
  );
}

/** The child's last line when it is a user mistake's `error: <message>`: the message. */
function clearError(stderr: string): string | undefined {
  return stderr.trimEnd().split("\n").at(-1)?.match(/^error: (.+)$/)?.[1];
}

/** Calls `onLine` for each line of `stream`. */
async function readLines(stream: ReadableStream<Uint8Array>, onLine: (line: string) => void) {
  const lines = new LineBuffer(64 * 1024);
  for await (const chunk of stream) {
    lines.push(chunk);
    for (let line; (line = lines.shift()) !== undefined;) onLine(line);
  }
}
