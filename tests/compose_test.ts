/**
 * compose.yaml, the Dockerfile and .dockerignore, checked against the scripts they run, with no
 * Docker engine: every command is a task of this project with flags its script accepts, ports,
 * addresses, volumes and dependencies line up, every healthcheck runs docker/health.ts with no
 * argument holding a space, and the image pins the Deno that CI installs.
 * What a script accepts comes from running it (`--help`), not from a copy kept here. When
 * `docker compose` (or `docker-compose`) is installed, its `config -q` reads the file too.
 * @module
 */
import { posix } from "node:path";
import { fileURLToPath } from "node:url";
import { parse } from "yaml";
import { assert, assertEquals } from "./_assert.ts";
import { Child, ROOT, taskArgv } from "./_util.ts";

interface Service {
  build?: string | { context?: string };
  image?: string;
  command?: unknown;
  ports?: (string | number)[];
  expose?: (string | number)[];
  volumes?: (string | { type?: string; source?: string; target?: string })[];
  environment?: Record<string, string> | string[];
  depends_on?: string[] | Record<string, { condition?: string }>;
  healthcheck?: { test?: unknown };
  restart?: string;
  networks?: string[] | Record<string, unknown>;
  profiles?: string[];
}

interface Compose {
  services: Record<string, Service>;
  volumes?: Record<string, unknown>;
  networks?: Record<string, unknown>;
}

function read(path: string): string {
  return Deno.readTextFileSync(ROOT + path);
}

// `merge`: compose.yaml shares settings through YAML merge keys (`<<: *service`).
const compose = parse(read("compose.yaml"), { merge: true }) as Compose;
const allServices = Object.keys(compose.services);
/** The services built from this project's image, each running one of its deno tasks. */
const services = allServices.filter((name) => compose.services[name].build !== undefined);
/** The others: an engine's own pinned image (NATS in the `scale` profile). */
const engines = allServices.filter((name) => compose.services[name].build === undefined);
/** NATS's client port, as the official image's configuration has it. */
const NATS_PORT = 4222;
const config = JSON.parse(read("deno.json"));
const dockerfile = instructions(read("Dockerfile"));
const ignored = ignoreMatcher(read(".dockerignore"));
/** The variables docs/DESIGN.md gives the containers ("env in containers"). */
const CONTAINER_ENV = ["DIRECTORY_URL", "BROKER_ADDR"];
/** `  -n, --fragments N   text` in a usage: a metavar (capitals) after a flag means a value. */
const OPTION_LINE = /^\s*(?:-(\w), )?--([a-z][a-z-]*)( [A-Z][A-Z:_]*)?(?=\s|$)/gm;
/** Where the image runs the commands from, so relative paths in them resolve as they will. */
const WORKDIR = dockerfile.findLast(([op]) => op === "WORKDIR")?.[1] ?? "/";

/** A script's usage, from its own `--help`: the text, and each flag with whether it takes a value. */
interface Usage {
  text: string;
  flags: Map<string, boolean>;
  shorts: Map<string, string>;
}

/** A service's command, read with the flags its script declares. */
interface Command {
  task: string;
  script: string;
  args: string[];
  positionals: string[];
  options: Map<string, string | true>;
  usage: Usage;
}

const usages = new Map<string, Promise<Usage>>();
const commands = new Map<string, Promise<Command>>();

/**
 * Runs a task's script with `args` and `--help`, writes and network denied, so a script that
 * ignored `--help` could touch nothing. Its own parseArgs still reads every flag in `args`.
 */
async function runHelp(task: string, args: string[] = []) {
  const [run, ...rest] = taskArgv(task);
  await using child = new Child([run, "--deny-write", "--deny-net", ...rest, ...args, "--help"]);
  const { code } = await child.status();
  return { code, stdout: child.stdout, stderr: child.stderr };
}

function usageOf(task: string): Promise<Usage> {
  let usage = usages.get(task);
  if (!usage) {
    usage = runHelp(task).then(({ code, stdout, stderr }) => {
      assertEquals(code, 0, `deno task ${task} --help failed:\n${stderr}`);
      const flags = new Map<string, boolean>();
      const shorts = new Map<string, string>();
      for (const [, short, long, value] of stdout.matchAll(OPTION_LINE)) {
        flags.set(long, value !== undefined);
        if (short) shorts.set(short, long);
      }
      return { text: stdout, flags, shorts };
    });
    usages.set(task, usage);
  }
  return usage;
}

function commandOf(name: string): Promise<Command> {
  let command = commands.get(name);
  if (!command) {
    command = readCommand(name);
    commands.set(name, command);
  }
  return command;
}

async function readCommand(name: string): Promise<Command> {
  const argv = compose.services[name].command;
  assert(
    Array.isArray(argv) && argv.every((word) => typeof word === "string"),
    `${name}: write the command as a list of strings, so no shell splits it`,
  );
  const [deno, sub, task, ...args] = argv as string[];
  assert(
    deno === "deno" && sub === "task",
    `${name}: the command should be "deno task <name> ..."`,
  );
  const line: string | undefined = config.tasks[task];
  assert(line, `${name}: deno.json has no task "${task}"`);
  const script = line.split(/\s+/).find((word) => word.endsWith(".ts"));
  assert(script, `${name}: task "${task}" runs no script`);
  const usage = await usageOf(task);
  const positionals: string[] = [];
  const options = new Map<string, string | true>();
  for (let i = 0; i < args.length; i++) {
    const arg = args[i];
    if (!arg.startsWith("-")) {
      positionals.push(arg);
      continue;
    }
    let [flag, value] = arg.replace(/^--?/, "").split(/=(.*)/s);
    flag = arg.startsWith("--") ? flag : usage.shorts.get(flag) ?? `-${flag}`;
    assert(usage.flags.has(flag), `${name}: ${script} --help lists no ${arg}`);
    if (usage.flags.get(flag)) value ??= args[++i];
    assert(value !== undefined || !usage.flags.get(flag), `${name}: ${arg} needs a value`);
    options.set(flag, value ?? true);
  }
  return { task, script, args, positionals, options, usage };
}

/** The default a usage gives a flag: `--port PORT  ... (default 5000)`. */
function defaultOf(usage: Usage, flag: string): string | undefined {
  return usage.text.match(new RegExp(`--${flag} .*\\(default ([^)]+)\\)`))?.[1];
}

/** The ports a service listens on: a peer's TCP, gRPC and HTTP ports, or a server's --port. */
async function listenPorts(name: string): Promise<number[]> {
  const { task, options, positionals, usage } = await commandOf(name);
  const port = (flag: string, base?: number) => {
    const given = options.get(flag);
    if (typeof given === "string") return Number(given);
    // A peer's defaults are offsets from its TCP port: "(default PORT + 44050)".
    const fallback = defaultOf(usage, flag);
    const offset = fallback?.match(/^PORT \+ (\d+)$/)?.[1];
    return offset !== undefined && base !== undefined ? base + Number(offset) : Number(fallback);
  };
  if (task === "peer") {
    const tcp = Number(positionals[0]);
    return [tcp, port("grpc-port", tcp), port("http-port", tcp)];
  }
  return usage.flags.has("port") ? [port("port")] : [];
}

function envOf(service: Service): Record<string, string> {
  const env = service.environment ?? {};
  if (!Array.isArray(env)) return env;
  return Object.fromEntries(env.map((entry) => entry.split(/=(.*)/s, 2)));
}

/** Named volumes a service mounts, with where. */
function mounts(service: Service): { volume: string; target: string }[] {
  return (service.volumes ?? []).flatMap((entry) => {
    const [source, target] = typeof entry === "string"
      ? entry.split(":")
      : [entry.type === "volume" ? entry.source : undefined, entry.target];
    return source && target && !/^[./~]/.test(source) ? [{ volume: source, target }] : [];
  });
}

function isUnder(path: string, folder: string): boolean {
  return path === folder || path.startsWith(folder.replace(/\/?$/, "/"));
}

/** Which volume, and which folder in it, holds `path` in the service's container. */
function locate(service: Service, path: string): string | undefined {
  const mount = mounts(service).filter(({ target }) => isUnder(path, target))
    .sort((a, b) => b.target.length - a.target.length)[0];
  return mount && `${mount.volume}:/${posix.relative(mount.target, path)}`;
}

function dependsOn(service: Service): Record<string, string> {
  const deps = service.depends_on ?? {};
  if (Array.isArray(deps)) return Object.fromEntries(deps.map((dep) => [dep, "service_started"]));
  return Object.fromEntries(
    Object.entries(deps).map(([dep, { condition }]) => [dep, condition ?? "service_started"]),
  );
}

/** A Dockerfile as [instruction, arguments] pairs: continuations joined, comments dropped. */
function instructions(text: string): [string, string][] {
  return text.replace(/\\\n/g, " ").split("\n").map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const [op, rest] = line.split(/\s+(.*)/s);
      return [op.toUpperCase(), rest ?? ""];
    });
}

/** `.dockerignore` as a predicate on paths relative to the context; the last match wins. */
function ignoreMatcher(text: string): (path: string) => boolean {
  const rules = text.split("\n").map((line) => line.trim())
    .filter((line) => line !== "" && !line.startsWith("#"))
    .map((line) => {
      const keep = line.startsWith("!");
      const glob = line.replace(/^!/, "").replace(/^\/+|\/+$/g, "");
      const source = glob.replace(/[.+^${}()|[\]\\]/g, "\\$&").replace(
        /\*\*|\*|\?/g,
        (wild) => wild === "**" ? ".*" : wild === "*" ? "[^/]*" : "[^/]",
      );
      return { keep, pattern: new RegExp(`^${source}$`) };
    });
  return (path) => {
    // A pattern that names a folder leaves out everything in it.
    const parts = path.split("/");
    const prefixes = parts.map((_, i) => parts.slice(0, i + 1).join("/"));
    let out = false;
    for (const { keep, pattern } of rules) {
      if (prefixes.some((prefix) => pattern.test(prefix))) out = !keep;
    }
    return out;
  };
}

/** The folders the Dockerfile creates (`mkdir`) and the ones it gives to deno (`chown -R deno`). */
function preparedFolders(): { made: string[]; owned: string[] } {
  const made: string[] = [];
  const owned: string[] = [];
  for (const [op, args] of dockerfile) {
    if (op !== "RUN") continue;
    for (const step of args.split(/&&|;/)) {
      const [program, ...words] = step.trim().split(/\s+/);
      const paths = words.filter((word) => word.startsWith("/"));
      if (program === "mkdir") made.push(...paths);
      if (program === "chown" && words.includes("-R") && words.some((w) => /^deno(:|$)/.test(w))) {
        owned.push(...paths);
      }
    }
  }
  return { made, owned };
}

/**
 * The port the README sends a browser to, published on the same port of the host: the
 * directory's (Swagger UI) and a viewer's HTTP port (the player).
 */
function browsedPort(
  task: string,
  options: Map<string, string | true>,
  listening: number[],
): number | undefined {
  if (task === "directory") return listening[0];
  if (task === "peer" && options.has("fetch-all")) return listening[2];
  return undefined;
}

async function servicesRunning(task: string): Promise<string[]> {
  const tasks = await Promise.all(services.map(async (name) => (await commandOf(name)).task));
  return services.filter((_, i) => tasks[i] === task);
}

Deno.test("compose.yaml runs every service as a deno task, with flags its script accepts", async () => {
  assert(services.length > 0, "compose.yaml has no services");
  await Promise.all(services.map(async (name) => {
    const { task, args } = await commandOf(name);
    // The script's own parser, with the exact arguments compose gives it.
    const { code, stdout, stderr } = await runHelp(task, args);
    assert(
      code === 0 && /Usage/.test(stdout),
      `${name}: ${task} refuses its arguments:\n${stderr}`,
    );
  }));
});

Deno.test("every port a service listens on is the one compose publishes, exposes and checks", async () => {
  const published = new Map<string, string>();
  for (const name of services) {
    const service = compose.services[name];
    const { task, options } = await commandOf(name);
    const listening = await listenPorts(name);
    const hostname = options.get("hostname");
    assert(
      hostname === undefined || hostname === "0.0.0.0",
      `${name}: --hostname ${hostname} is unreachable from other containers; use 0.0.0.0`,
    );
    const onHost = new Map<number, number>(); // container port -> host port
    for (const entry of service.ports ?? []) {
      const [container, host] = String(entry).replace(/\/tcp$/, "").split(":").reverse();
      onHost.set(Number(container), Number(host));
      if (host === undefined) continue; // any free host port
      assert(!published.has(host), `${name} and ${published.get(host)} both publish ${host}`);
      published.set(host, name);
    }
    const inside = [...onHost.keys()];
    const browsed = browsedPort(task, options, listening);
    if (browsed !== undefined) {
      assertEquals(onHost.get(browsed), browsed, `${name}: publish port ${browsed} as itself`);
    }
    // A player prints the address a browser on the host opens, not the container's own name.
    const playerUrl = options.get("player-url");
    if (playerUrl !== undefined) {
      assert(typeof playerUrl === "string", `${name}: --player-url wants a URL`);
      const url = new URL(playerUrl);
      assertEquals(url.hostname, "localhost", `${name}: --player-url ${playerUrl}`);
      assertEquals(
        Number(url.port),
        onHost.get(browsed ?? -1),
        `${name}: --player-url names port ${url.port}, which compose does not publish`,
      );
    }
    const exposed = (service.expose ?? []).map(Number);
    for (const port of [...inside, ...exposed]) {
      assert(listening.includes(port), `${name} listens on ${listening}, not on ${port}`);
    }
    // Whatever a service listens on is declared, so the file says who can reach what.
    for (const port of listening) {
      assert(
        inside.includes(port) || exposed.includes(port),
        `${name}: port ${port} is neither in ports nor in expose`,
      );
    }
    if (!service.healthcheck) continue;
    const { port } = healthProbe(name);
    assert(listening.includes(port), `${name}: the healthcheck probes ${port}, not ${listening}`);
  }
});

/** The script every healthcheck of this project's image runs, by file name (see below). */
const HEALTH_SCRIPT = "docker/health.ts";
/** The probe each task's server answers without logging a line: PING on a line protocol, or HTTP. */
const PROBE_OF_TASK: Record<string, string[]> = {
  peer: ["ping"],
  broker: ["ping"],
  directory: ["http", "/health"],
};

/**
 * A healthcheck of a service built from the image, read: `[CMD, deno, run, <flags>,
 * /app/docker/health.ts, <kind>, <port>, ...]`, with the script's path inside the project.
 */
function healthProbe(
  name: string,
): { script: string; flags: string[]; probe: string[]; port: number } {
  const test = compose.services[name].healthcheck?.test;
  assert(Array.isArray(test), `${name}: write the healthcheck test as a list`);
  const [kind, deno, sub, ...rest] = test as string[];
  // The image has deno but no curl or nc, and a one-liner (`deno eval "..."`) has spaces.
  assertEquals([kind, deno, sub], ["CMD", "deno", "run"], `${name}: healthcheck`);
  const at = rest.findIndex((word) => !word.startsWith("-"));
  const [script, probeKind, port, ...more] = rest.slice(at);
  const inProject = posix.relative(WORKDIR, posix.resolve(WORKDIR, script ?? ""));
  assertEquals(inProject, HEALTH_SCRIPT, `${name}: the healthcheck runs ${script}`);
  return {
    script: inProject,
    flags: rest.slice(0, at),
    probe: [probeKind!, ...more],
    port: Number(port),
  };
}

Deno.test("every healthcheck runs a script by file name, with no argument that holds a space", async () => {
  const checked = allServices.filter((name) => compose.services[name].healthcheck);
  assert(checked.length > 0, "compose.yaml has no healthchecks");
  for (const name of checked) {
    const test = compose.services[name].healthcheck!.test;
    assert(Array.isArray(test), `${name}: write the healthcheck test as a list, exec form`);
    // Podman 4 splits an exec-form argument that holds spaces (containers/podman#26519), and
    // CMD-SHELL needs a shell in the image: plain CMD, one word per argument, works on both.
    assertEquals(test[0], "CMD", `${name}: healthcheck`);
    for (const word of test as unknown[]) {
      assert(
        typeof word === "string" && !/\s/.test(word),
        `${name}: healthcheck argument "${word}"`,
      );
    }
  }
  assert(
    !ignored(HEALTH_SCRIPT),
    `${HEALTH_SCRIPT} is needed in the image, but .dockerignore leaves it out`,
  );
  for (const name of services.filter((name) => compose.services[name].healthcheck)) {
    const { flags, probe } = healthProbe(name);
    // Only what a probe needs: the loopback, no -A.
    assertEquals(flags, ["--allow-net=127.0.0.1"], `${name}: the healthcheck's flags`);
    const { task } = await commandOf(name);
    const wanted = PROBE_OF_TASK[task];
    assert(wanted, `${name}: no probe is known to leave ${task}'s log alone`);
    assertEquals(probe, wanted, `${name}: the healthcheck's probe`);
  }
  // The script accepts each probe as written (tests/health_test.ts runs them against real servers).
  const { code, stdout } = await new Deno.Command(Deno.execPath(), {
    args: ["run", "--allow-net=127.0.0.1", ROOT + HEALTH_SCRIPT, "--help"],
    stdout: "piped",
  }).output();
  assertEquals(code, 0, `${HEALTH_SCRIPT} --help`);
  for (const [kind] of Object.values(PROBE_OF_TASK)) {
    assert(new TextDecoder().decode(stdout).includes(`health.ts ${kind} PORT`), kind);
  }
});

Deno.test("every service is given addresses of the directory and broker services", async () => {
  const [directory] = await servicesRunning("directory");
  const [broker] = await servicesRunning("broker");
  assert(directory && broker, "compose.yaml runs no directory or no broker");
  const reaches = async (address: string, target: string, what: string) => {
    const { hostname, port } = new URL(address.includes("//") ? address : `tcp://${address}`);
    assertEquals(hostname, target, `${what} is "${address}", not the ${target} service`);
    const ports = await listenPorts(target);
    assert(ports.includes(Number(port)), `${what} is "${address}"; ${target} listens on ${ports}`);
  };
  for (const name of services) {
    const { script, options, positionals, usage, task } = await commandOf(name);
    const env = envOf(compose.services[name]);
    for (const variable of CONTAINER_ENV.filter((variable) => variable in env)) {
      // A script reads a variable when its usage says so: "(default $BROKER_ADDR or ...)".
      assert(usage.text.includes(`$${variable}`), `${name}: ${script} does not read ${variable}`);
      const set = config.tasks[task].match(/-P=(\S+)/)?.[1];
      const allowed = config.permissions[set]?.env;
      assert(
        allowed === true || allowed?.includes(variable),
        `${name}: permission set "${set}" does not let ${script} read ${variable}`,
      );
    }
    const servers = [["directory", "DIRECTORY_URL", directory], ["broker", "BROKER_ADDR", broker]];
    for (const [flag, variable, target] of servers) {
      if (!usage.flags.has(flag)) continue; // this script never talks to it
      const fromEnv = usage.text.includes(`$${variable}`) ? env[variable] : undefined;
      const address = options.get(flag) ?? fromEnv;
      // Left to its default (localhost) it would look inside its own container.
      assert(typeof address === "string", `${name}: give it --${flag} or ${variable}`);
      if (flag === "broker" && address.startsWith("nats://")) {
        reachesNats(address, `${name}'s broker`);
      } else await reaches(address, target, `${name}'s ${flag}`);
    }
    if (task !== "peer") continue;
    const advertise = options.get("advertise");
    assertEquals(advertise, name, `${name}: --advertise must be the name others reach it at`);
    for (const neighbour of positionals.slice(1)) {
      const host = neighbour.split(":")[0];
      assert(services.includes(host), `${name}: neighbour "${neighbour}" is no service`);
      await reaches(neighbour, host, `${name}'s neighbour`);
    }
  }
});

Deno.test("every seeder's volume holds the store the splitter deals to it", async () => {
  for (const name of services) {
    for (const { volume } of mounts(compose.services[name])) {
      assert(volume in (compose.volumes ?? {}), `${name}: volume "${volume}" is not declared`);
    }
  }
  const used = services.flatMap((name) => mounts(compose.services[name]).map((m) => m.volume));
  for (const volume of Object.keys(compose.volumes ?? {})) {
    assert(used.includes(volume), `volume "${volume}" is declared but mounted nowhere`);
  }

  const [splitter, ...others] = await servicesRunning("split");
  assert(splitter && others.length === 0, "compose.yaml should run exactly one splitter");
  const split = await commandOf(splitter);
  const out = posix.resolve(
    WORKDIR,
    String(split.options.get("out") ?? defaultOf(split.usage, "out") ?? "fragments"),
  );
  const peers = String(split.options.get("peers") ?? "").split(",").filter((peer) => peer);
  assert(peers.length > 0, `${splitter}: --peers deals the fragments to no one`);
  const dealt = new Map(peers.map((peer) => [
    locate(compose.services[splitter], posix.join(out, peer)),
    peer,
  ]));
  const seeders = [];
  for (const name of await servicesRunning("peer")) {
    const { options, positionals } = await commandOf(name);
    if (options.has("fetch-all")) continue; // it starts empty and fetches
    seeders.push(name);
    const store = posix.resolve(
      WORKDIR,
      String(options.get("dir") ?? `fragments/${positionals[0]}`),
    );
    const where = locate(compose.services[name], store);
    assert(where, `${name}: its store ${store} is on no volume, so no subset reaches it`);
    assert(dealt.has(where), `${name}: ${splitter} deals nothing into ${where}`);
    dealt.delete(where);
    assertEquals(
      dependsOn(compose.services[name])[splitter],
      "service_completed_successfully",
      `${name} must start once ${splitter} has dealt its fragments`,
    );
  }
  assertEquals([...dealt.values()], [], `${splitter} deals fragments that no seeder holds`);
  assert(seeders.length > 0, "no peer seeds the video");
});

/** Checks that every server of a `nats://` address is a NATS service, on NATS's client port. */
function reachesNats(address: string, what: string) {
  for (const server of address.split(",")) {
    const { hostname, port } = new URL(server);
    const image = compose.services[hostname]?.image ?? "";
    assert(/^nats:/.test(image), `${what} is "${address}"; "${hostname}" is no NATS service`);
    assertEquals(Number(port || NATS_PORT), NATS_PORT, `${what}: NATS listens on ${NATS_PORT}`);
    const exposed = (compose.services[hostname].expose ?? []).map(Number);
    assert(exposed.includes(NATS_PORT), `${hostname}: expose ${NATS_PORT}`);
  }
}

Deno.test("the scale profile runs NATS and a broker bridged to it, and leaves the default set alone", async () => {
  const inScale = allServices.filter((name) => compose.services[name].profiles?.includes("scale"));
  const nats = engines.filter((name) => /^nats:/.test(compose.services[name].image ?? ""));
  assert(nats.length > 0, "compose.yaml runs no NATS");
  for (const name of nats) {
    assert(inScale.includes(name), `${name}: NATS belongs to the scale profile`);
    const image = compose.services[name].image!;
    assert(/^nats:\d+\.\d+/.test(image), `${name}: pin NATS's version, not "${image}"`);
    assert(compose.services[name].healthcheck, `${name}: others wait until it is healthy`);
  }
  const bridged = [];
  for (const name of await servicesRunning("broker")) {
    const nats = (await commandOf(name)).options.get("nats");
    if (nats === undefined) continue;
    bridged.push(name);
    assert(typeof nats === "string", `${name}: --nats needs an address`);
    reachesNats(nats, `${name}'s --nats`);
    assert(inScale.includes(name), `${name}: a bridged broker belongs to the scale profile`);
    for (const server of nats.split(",")) {
      const host = new URL(server).hostname;
      assertEquals(
        dependsOn(compose.services[name])[host],
        "service_healthy",
        `${name} -> ${host}`,
      );
    }
  }
  assert(bridged.length > 0, "the scale profile runs no broker with --nats");
  // `docker compose up` without the profile starts exactly what it started before.
  for (const name of allServices.filter((name) => !inScale.includes(name))) {
    for (const dep of Object.keys(dependsOn(compose.services[name]))) {
      assert(!inScale.includes(dep), `${name} needs ${dep}, which only the scale profile runs`);
    }
  }
});

/** Redis's port, as the official image listens. */
const REDIS_PORT = 6379;

Deno.test("the scale profile runs Redis and directory replicas on it, apart from the default set", async () => {
  const inScale = allServices.filter((name) => compose.services[name].profiles?.includes("scale"));
  const replicas = [];
  for (const name of await servicesRunning("directory")) {
    const store = (await commandOf(name)).options.get("store");
    if (store === undefined || store === "memory") continue;
    replicas.push(name);
    assert(typeof store === "string", `${name}: --store needs a value`);
    assert(inScale.includes(name), `${name}: a directory on Redis belongs to the scale profile`);
    const { hostname, port } = new URL(store);
    const redis = compose.services[hostname];
    assert(/^redis:\d+\.\d+/.test(redis?.image ?? ""), `${name}: "${hostname}" is no pinned Redis`);
    assert(inScale.includes(hostname), `${hostname}: Redis belongs to the scale profile`);
    assertEquals(Number(port || REDIS_PORT), REDIS_PORT, `${name}: Redis listens on ${REDIS_PORT}`);
    assert((redis!.expose ?? []).map(Number).includes(REDIS_PORT), `${hostname}: expose it`);
    assert(redis!.healthcheck, `${hostname}: the replicas wait until it is healthy`);
    assertEquals(dependsOn(compose.services[name])[hostname], "service_healthy", name);
  }
  assert(replicas.length >= 2, "the scale profile runs fewer than two directory replicas on Redis");
});

Deno.test("depends_on names services that exist, with conditions they can meet", () => {
  for (const name of allServices) {
    const service = compose.services[name];
    for (const [dep, condition] of Object.entries(dependsOn(service))) {
      const target = compose.services[dep];
      assert(target, `${name} depends on "${dep}", which is no service`);
      if (condition === "service_healthy") {
        assert(target.healthcheck, `${name} waits for ${dep} to be healthy; it has no healthcheck`);
      } else if (condition === "service_completed_successfully") {
        assert(
          !["always", "unless-stopped"].includes(target.restart ?? "no"),
          `${name} waits for ${dep} to complete, but ${dep} restarts (${target.restart})`,
        );
      } else {
        assertEquals(condition, "service_started", `${name}: depends_on ${dep}`);
      }
    }
    const networks = Array.isArray(service.networks)
      ? service.networks
      : Object.keys(service.networks ?? {});
    assertEquals(networks, ["p2p_network"], `${name}: networks`);
  }
  assert(compose.networks && "p2p_network" in compose.networks, "p2p_network is not declared");
});

Deno.test("the Dockerfile builds one image for all, as deno, on the Deno that CI installs", async () => {
  const from = dockerfile.filter(([op]) => op === "FROM").map(([, image]) => image);
  const ci = read(".ci/run").match(/deno@(\d+\.\d+\.\d+)/)?.[1];
  assert(ci, ".ci/run pins no Deno version");
  assertEquals(from, [`denoland/deno:${ci}`], "the image's Deno");
  assertEquals(dockerfile.findLast(([op]) => op === "USER")?.[1], "deno", "the user it runs as");

  for (const [op, args] of dockerfile.filter(([op]) => op === "COPY")) {
    const sources = args.split(/\s+/).filter((word) => !word.startsWith("--")).slice(0, -1);
    for (const source of sources) {
      await Deno.stat(ROOT + source).catch(() => assert(false, `${op} ${source}: no such file`));
      assert(source === "." || !ignored(source), `${op} ${source}: .dockerignore leaves it out`);
    }
  }

  const installs = dockerfile.filter(([op, args]) =>
    op === "RUN" && /deno (install|cache)/.test(args)
  );
  for (const [, args] of installs) assert(args.includes("--frozen"), `"${args}" ignores the lock`);
  const cached = installs.flatMap(([, args]) => args.split(/\s+/));
  const { made, owned } = preparedFolders();
  const image = compose.services[services[0]].image;
  assert(typeof image === "string", `${services[0]}: name the image, so it is built once`);
  for (const name of services) {
    const service = compose.services[name];
    const build = typeof service.build === "string" ? service.build : service.build?.context;
    assertEquals(build, ".", `${name}: build`);
    assertEquals(service.image, image, `${name}: one image for all`);
    const { script, task, options, positionals } = await commandOf(name);
    assert(cached.includes(script), `${name}: the Dockerfile never caches ${script}'s imports`);
    // A named volume takes its owner from the image's folder: it must exist and be deno's.
    const targets = mounts(service).map(({ target }) => target);
    for (const target of targets) assert(made.includes(target), `${name}: no mkdir ${target}`);
    const store = task === "peer" ? options.get("dir") ?? `fragments/${positionals[0]}` : undefined;
    const out = task === "split" ? options.get("out") ?? "fragments" : undefined;
    for (const written of [...targets, store, out].filter((path) => typeof path === "string")) {
      const path = posix.resolve(WORKDIR, written);
      assert(owned.some((folder) => isUnder(path, folder)), `${name} writes ${path}, not deno's`);
    }
  }
});

Deno.test(".dockerignore leaves in every file the services load", async () => {
  const files = new Set<string>();
  for (const name of services) {
    const { script, task, positionals } = await commandOf(name);
    if (task === "split" && positionals[0]) files.add(posix.normalize(positionals[0]));
    const info = await new Deno.Command(Deno.execPath(), {
      args: ["info", "--json", script],
      cwd: ROOT,
      stdout: "piped",
      stderr: "piped",
    }).output();
    assert(info.success, new TextDecoder().decode(info.stderr));
    const graph = JSON.parse(new TextDecoder().decode(info.stdout));
    for (const { specifier } of graph.modules as { specifier: string }[]) {
      if (!specifier.startsWith("file:")) continue;
      const path = fileURLToPath(specifier);
      files.add(posix.relative(ROOT, path));
      // Files a module loads beside itself: `new URL("./player.html", import.meta.url)`.
      const text = await Deno.readTextFile(path);
      for (const [, asset] of text.matchAll(/new URL\(\s*"(\.\.?\/[^"]+)",\s*import\.meta\.url/g)) {
        files.add(posix.relative(ROOT, fileURLToPath(new URL(asset, specifier))));
      }
    }
  }
  assert(files.has("peer.ts") && files.has("peer/player.html"), [...files].join(", "));
  for (const file of files) {
    await Deno.stat(ROOT + file).catch(() => assert(false, `${file}: no such file`));
    assert(!ignored(file), `${file} is needed in the image, but .dockerignore leaves it out`);
  }
  // The matcher itself, or the checks above prove nothing.
  const sample = ignoreMatcher("bench\n*.tmp\n!keep.tmp\n");
  assert(sample("bench/main.ts") && sample("a.tmp") && !sample("keep.tmp"), "matcher ignores");
  assert(!sample("benchmark.ts") && !sample("sub/a.tmp"), "matcher keeps");
});

// The viewer advertises `viewer` (the name the other containers reach it at), so the URL it
// prints by default, http://viewer:8004/, opens nowhere on the host. peer.ts prints the address
// given by --player-url instead, when it has that flag.
const playerUrlFlag = (await usageOf("peer")).flags.has("player-url");
Deno.test({
  name: playerUrlFlag
    ? "a peer whose player is published prints the URL that opens it on the host"
    : "a peer whose player is published prints the URL that opens it on the host " +
      "(skipped: peer.ts has no --player-url yet)",
  ignore: !playerUrlFlag,
  async fn() {
    let published = 0;
    for (const name of await servicesRunning("peer")) {
      const { options } = await commandOf(name);
      const [, , http] = await listenPorts(name);
      const onHost = (compose.services[name].ports ?? [])
        .map((entry) => String(entry).replace(/\/tcp$/, "").split(":").reverse())
        .find(([container]) => Number(container) === http)?.[1];
      if (onHost === undefined) continue;
      published++;
      const url = options.get("player-url");
      assertEquals(url, `http://localhost:${onHost}/`, `${name}: --player-url`);
    }
    assert(published > 0, "no peer publishes its player");
  },
});

/** `docker compose` or `docker-compose`, whichever is installed and works. */
async function composeCli(): Promise<string[] | undefined> {
  for (const cli of [["docker", "compose"], ["docker-compose"]]) {
    try {
      const { success } = await new Deno.Command(cli[0], {
        args: [...cli.slice(1), "version"],
        stdout: "null",
        stderr: "null",
      }).output();
      if (success) return cli;
    } catch (error) {
      if (!(error instanceof Deno.errors.NotFound)) throw error;
    }
  }
  return undefined;
}

const cli = await composeCli();
Deno.test({
  name: cli
    ? `${cli.join(" ")} config -q accepts compose.yaml`
    : "docker compose config -q accepts compose.yaml (skipped: no docker compose installed)",
  ignore: cli === undefined,
  async fn() {
    const [program, ...args] = cli!;
    const { success, stderr } = await new Deno.Command(program, {
      args: [...args, "-f", "compose.yaml", "config", "-q"],
      cwd: ROOT,
      stdout: "null",
      stderr: "piped",
    }).output();
    assert(success, new TextDecoder().decode(stderr));
  },
});
