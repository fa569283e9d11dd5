/**
 * Test and bench helper: Debian's `nats-server` as a child process on free ports (its `-1` picks
 * one and the log says which), alone or as a cluster on loopback. `.ci/run` installs it; without
 * it the helper fails saying so.
 * @module
 */
import { Child } from "./_util.ts";

/** One running nats-server. */
export interface NatsServer extends AsyncDisposable {
  /** Its client port. */
  readonly port: number;
  /** `nats://127.0.0.1:<port>`. */
  readonly url: string;
  /** Its route (cluster) port, when it is in a cluster. */
  readonly routePort: number | undefined;
  readonly child: Child;
  /** Kills it (SIGKILL, as a crash) and waits until it is gone. */
  kill(): Promise<void>;
}

/** Where nats-server is: on the PATH, or where Debian puts it. */
export function natsServerPath(): string {
  const dirs = [...(Deno.env.get("PATH") ?? "").split(":"), "/usr/sbin", "/usr/bin"];
  for (const dir of dirs) {
    const path = `${dir}/nats-server`;
    try {
      if (Deno.statSync(path).isFile) return path;
    } catch {
      // Not there: try the next.
    }
  }
  throw new Error("nats-server is not installed: `apt-get install nats-server` (.ci/run does)");
}

/**
 * Starts nats-server on loopback on a free port; with `cluster`, also on a free route port, and
 * joined to the nodes whose route ports `routes` lists.
 */
export async function startNatsServer(
  options: {
    cluster?: string;
    routes?: number[];
    port?: number;
    /** Its environment, on top of this process's (`GOMAXPROCS`, say). */
    env?: Record<string, string>;
  } = {},
): Promise<NatsServer> {
  const args = ["-a", "127.0.0.1", "-p", String(options.port ?? -1)];
  if (options.cluster !== undefined) {
    args.push("--cluster_name", options.cluster, "--cluster", "nats://127.0.0.1:-1");
    const routes = options.routes ?? [];
    if (routes.length > 0) {
      args.push("--routes", routes.map((port) => `nats://127.0.0.1:${port}`).join(","));
    }
  }
  const child = new Child(args, { command: natsServerPath(), env: options.env });
  try {
    const [, port] = await child.waitFor(/Listening for client connections on [\d.]+:(\d+)/);
    const routePort = options.cluster === undefined
      ? undefined
      : Number((await child.waitFor(/Listening for route connections on [\d.]+:(\d+)/))[1]);
    await child.waitFor(/Server is ready/);
    const kill = async () => {
      child.kill("SIGKILL");
      await child.status();
    };
    return {
      port: Number(port),
      url: `nats://127.0.0.1:${port}`,
      routePort,
      child,
      kill,
      [Symbol.asyncDispose]: kill,
    };
  } catch (error) {
    await child[Symbol.asyncDispose]();
    throw error;
  }
}

/** Counts the routes a node's log says it made. */
function routesOf(server: NatsServer): number {
  return server.child.stderr.match(/Route connection created/g)?.length ?? 0;
}

/**
 * Starts `size` nats-servers as one cluster on loopback and waits until each has a route to
 * every other (the later nodes name the first; gossip joins the rest).
 */
export async function startNatsCluster(size = 3): Promise<NatsServer[] & AsyncDisposable> {
  const nodes: NatsServer[] = [];
  const all = Object.assign(nodes, {
    [Symbol.asyncDispose]: async () => {
      await Promise.all(nodes.map((node) => node.kill()));
    },
  });
  try {
    nodes.push(await startNatsServer({ cluster: "fragmentos-test" }));
    for (let i = 1; i < size; i++) {
      nodes.push(
        await startNatsServer({ cluster: "fragmentos-test", routes: [nodes[0].routePort!] }),
      );
    }
    const deadline = Date.now() + 10_000;
    while (nodes.some((node) => routesOf(node) < size - 1)) {
      if (Date.now() > deadline) throw new Error("The NATS cluster did not form within 10 s");
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
  } catch (error) {
    await all[Symbol.asyncDispose]();
    throw error;
  }
  return all;
}
