/**
 * Test helpers: run a deno.json task as a real child process with the task's own flags, read its
 * output line by line, and make temporary folders that clean themselves up.
 * @module
 */
import { fileURLToPath } from "node:url";

/** The repository root (the folder holding deno.json). */
export const ROOT = fileURLToPath(new URL("../", import.meta.url));
const CONFIG = `${ROOT}deno.json`;

/**
 * The argv of `deno task <name>` as a direct `deno run` (no task runner in between, so signals
 * reach the script itself), with `--config` and the script made absolute so any cwd works.
 */
export function taskArgv(name: string): string[] {
  const config = JSON.parse(Deno.readTextFileSync(CONFIG));
  const task: string | undefined = config.tasks?.[name];
  if (!task) throw new Error(`No task "${name}" in deno.json`);
  const [deno, sub, ...rest] = task.split(/\s+/);
  if (deno !== "deno" || sub !== "run") throw new Error(`Task "${name}" is not a "deno run"`);
  const script = rest.findIndex((word) => !word.startsWith("-"));
  rest[script] = ROOT + rest[script];
  return ["run", "--config", CONFIG, ...rest];
}

export interface ChildOptions {
  cwd?: string;
  env?: Record<string, string>;
  /** Pipe stdin so the test can type into it; otherwise stdin is closed. */
  stdin?: boolean;
  /** The program to run, when it is not deno itself (e.g. `ip netns exec ... deno`). */
  command?: string;
}

/** A running task whose stdout and stderr are collected as they arrive. */
export class Child implements AsyncDisposable {
  readonly process: Deno.ChildProcess;
  stdout = "";
  stderr = "";
  readonly #done: Promise<Deno.CommandStatus>;
  readonly #writer?: WritableStreamDefaultWriter<Uint8Array>;
  #waiters = new Set<() => void>();

  constructor(argv: string[], options: ChildOptions = {}) {
    this.process = new Deno.Command(options.command ?? Deno.execPath(), {
      args: argv,
      cwd: options.cwd ?? ROOT,
      env: { NO_COLOR: "1", ...options.env },
      stdin: options.stdin ? "piped" : "null",
      stdout: "piped",
      stderr: "piped",
    }).spawn();
    if (options.stdin) this.#writer = this.process.stdin.getWriter();
    const pumps = [
      this.#pump(this.process.stdout, (text) => this.stdout += text),
      this.#pump(this.process.stderr, (text) => this.stderr += text),
    ];
    this.#done = Promise.all(pumps).then(() => this.process.status);
  }

  async #pump(stream: ReadableStream<Uint8Array>, append: (text: string) => void) {
    for await (const text of stream.pipeThrough(new TextDecoderStream())) {
      append(text);
      for (const wake of this.#waiters) wake();
    }
  }

  /** Waits until stdout or stderr (both, by default) matches, or fails after `timeoutMs`. */
  async waitFor(
    pattern: RegExp,
    { stream = "both", timeoutMs = 15_000 }: {
      stream?: "stdout" | "stderr" | "both";
      timeoutMs?: number;
    } = {},
  ): Promise<RegExpMatchArray> {
    const text = () =>
      stream === "stdout" ? this.stdout : stream === "stderr" ? this.stderr : this.stdout + "\n" +
        this.stderr;
    const deadline = Date.now() + timeoutMs;
    let exited = false;
    this.#done.then(() => exited = true, () => exited = true);
    while (true) {
      const match = text().match(pattern);
      if (match) return match;
      const left = deadline - Date.now();
      if (left <= 0 || exited) {
        throw new Error(
          `${exited ? "Process exited" : "Timed out"} waiting for ${pattern}\n` +
            `--- stdout ---\n${this.stdout}\n--- stderr ---\n${this.stderr}`,
        );
      }
      await new Promise<void>((resolve) => {
        const wake = () => {
          clearTimeout(timer);
          this.#waiters.delete(wake);
          resolve();
        };
        const timer = setTimeout(wake, Math.min(left, 100));
        this.#waiters.add(wake);
      });
    }
  }

  /** Types text into the child's stdin. */
  async write(text: string): Promise<void> {
    if (!this.#writer) throw new Error("Child was started without stdin");
    await this.#writer.write(new TextEncoder().encode(text));
  }

  /** Closes the child's stdin (end of input). */
  async closeStdin(): Promise<void> {
    await this.#writer?.close();
  }

  /** Sends a signal, ignoring a child that has already gone. */
  kill(signal: Deno.Signal = "SIGTERM"): void {
    try {
      this.process.kill(signal);
    } catch (error) {
      if (!(error instanceof TypeError)) throw error;
    }
  }

  /** Resolves with the exit status once the child has exited and its output is read. */
  status(): Promise<Deno.CommandStatus> {
    return this.#done;
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.kill("SIGKILL");
    await this.#writer?.close().catch(() => {});
    await this.#done;
  }
}

/** Starts `deno task <name> ...args` as a child process (see {@link taskArgv}). */
export function startTask(name: string, args: string[] = [], options?: ChildOptions): Child {
  return new Child([...taskArgv(name), ...args], options);
}

/**
 * The flags every test peer shares: store `dir`, directory `directory`, a broker that is never
 * there, and free gRPC and HTTP ports. A seeder or viewer adds its own after them.
 */
export function peerArgs(dir: string, directory: string): string[] {
  const ports = ["--grpc-port", "0", "--http-port", "0"];
  return ["--dir", dir, "--directory", directory, "--broker", "127.0.0.1:1", ...ports];
}

/** Runs a task to its end and returns its exit code and output. */
export async function runTask(
  name: string,
  args: string[] = [],
  options?: ChildOptions & { input?: string },
): Promise<{ code: number; stdout: string; stderr: string }> {
  await using child = startTask(name, args, { ...options, stdin: options?.input !== undefined });
  if (options?.input !== undefined) {
    await child.write(options.input);
    await child.closeStdin();
  }
  const { code } = await child.status();
  return { code, stdout: child.stdout, stderr: child.stderr };
}

/** `size` random bytes (getRandomValues fills at most 64 KiB at a time). */
export function randomBytes(size: number): Uint8Array<ArrayBuffer> {
  const bytes = new Uint8Array(size);
  for (let at = 0; at < size; at += 65_536) {
    crypto.getRandomValues(bytes.subarray(at, Math.min(at + 65_536, size)));
  }
  return bytes;
}

/** A temporary folder removed on dispose: `await using dir = await tempDir()`. */
export async function tempDir(): Promise<AsyncDisposable & { path: string }> {
  const path = await Deno.makeTempDir({ prefix: "p2p-test-" });
  return {
    path,
    [Symbol.asyncDispose]: () => Deno.remove(path, { recursive: true }),
  };
}
