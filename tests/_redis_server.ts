/**
 * Test and bench helper: Debian's `redis-server` as a child process on loopback, with no
 * persistence (a restart starts empty, as a crash of a cache would). redis-server cannot pick a
 * free port itself (its `--port 0` means no TCP at all), so this tries random high ports until
 * one binds: the server binds it, never this helper. `.ci/run` installs redis-server; without it
 * the helper fails saying so.
 * @module
 */
import { Child } from "./_util.ts";

/** One running redis-server. */
export interface RedisServer extends AsyncDisposable {
  readonly port: number;
  /** `redis://127.0.0.1:<port>`. */
  readonly url: string;
  readonly child: Child;
  /** Kills it (SIGKILL, as a crash) and waits until it is gone. */
  kill(): Promise<void>;
  /** Starts it again on the same port, empty. */
  restart(): Promise<void>;
}

/** Where redis-server is: on the PATH, or where Debian puts it. */
export function redisServerPath(): string {
  const dirs = [...(Deno.env.get("PATH") ?? "").split(":"), "/usr/sbin", "/usr/bin"];
  for (const dir of dirs) {
    const path = `${dir}/redis-server`;
    try {
      if (Deno.statSync(path).isFile) return path;
    } catch {
      // Not there: try the next.
    }
  }
  throw new Error("redis-server is not installed: `apt-get install redis-server` (.ci/run does)");
}

const READY = /Ready to accept connections/;
const IN_USE = /Address already in use|Could not create server TCP listening socket/;
const ATTEMPTS = 20;

/** Starts redis-server on `port`; undefined when the port is taken. */
async function tryPort(port: number): Promise<Child | undefined> {
  const child = new Child([
    "--port",
    String(port),
    "--bind",
    "127.0.0.1",
    "--save",
    "",
    "--appendonly",
    "no",
    "--loglevel",
    "notice",
  ], { command: redisServerPath() });
  try {
    const [line] = await child.waitFor(new RegExp(`${READY.source}|${IN_USE.source}`));
    if (IN_USE.test(line)) {
      await child[Symbol.asyncDispose]();
      return undefined;
    }
    return child;
  } catch (error) {
    await child[Symbol.asyncDispose]();
    if (IN_USE.test(child.stdout + child.stderr)) return undefined;
    throw error;
  }
}

/** Starts redis-server on a free loopback port (see the module). */
export async function startRedisServer(): Promise<RedisServer> {
  for (let attempt = 0; attempt < ATTEMPTS; attempt++) {
    const port = 20_000 + Math.floor(Math.random() * 30_000);
    const first = await tryPort(port);
    if (first === undefined) continue;
    let child: Child = first;
    const kill = async () => {
      child.kill("SIGKILL");
      await child.status();
    };
    return {
      port,
      url: `redis://127.0.0.1:${port}`,
      get child() {
        return child;
      },
      kill,
      async restart() {
        await kill();
        const again = await tryPort(port);
        if (again === undefined) throw new Error(`Port ${port} was taken while Redis was down`);
        child = again;
      },
      [Symbol.asyncDispose]: kill,
    };
  }
  throw new Error(`No free port for redis-server after ${ATTEMPTS} tries`);
}
