/**
 * The directory's Hono app: every route of `directory/schemas.ts` mounted as one handler over
 * the {@link Registry}, the error shape, `/openapi.json` and the Swagger UI at `/apidocs`.
 * Request bodies are read against a deadline, a minimum rate and a budget of memory for all of
 * them; a peer's entry is changed or removed only with its secret.
 * @module
 */
import { OpenAPIHono, type RouteConfig, type z } from "@hono/zod-openapi";
import { swaggerUI } from "@hono/swagger-ui";
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { manifestProblem, NAME_PATTERN } from "../split.ts";
import {
  AMBIGUOUS_FILE,
  DEFAULT_BODY_TIMEOUT,
  DEFAULT_MAX_BODY_MEMORY,
  DEFAULT_MIN_BODY_RATE,
  ERROR_CODES,
  errorCode,
  getFileRoute,
  healthRoute,
  heartbeatRoute,
  leaveRoute,
  listFilesRoute,
  listFragmentsRoute,
  listPeersRoute,
  locateRoute,
  MAX_BODY_BYTES,
  MIN_ID_PREFIX,
  newSecret,
  type PageQuery,
  PEER_SECRET,
  PEER_SECRET_SCHEME,
  type PeerState,
  publishRoute,
  registerRoute,
  SECRET_PATTERN,
  TOO_MANY_FILES,
  TOO_MANY_FRAGMENTS,
  TOO_MANY_PEERS,
  TOO_MANY_PEERS_FROM_ADDRESS,
} from "./schemas.ts";
import { errorBody } from "./protocol.ts";
import {
  type Awaitable,
  type DirectoryStore,
  Registry,
  type RegistryOptions,
  StoreUnavailableError,
  type UpsertOutcome,
} from "./registry.ts";
import {
  answeredMethod,
  CorsPolicy,
  httpRules,
  type HttpRulesOptions,
  methodNotAllowed,
} from "./http.ts";

// ---------------------------------------------------------------------------------------------
// Mounting: each route as one handler

/**
 * What a route's handler is given: its path parameters, query and JSON body, as its schemas
 * parse them.
 */
interface RouteInput<R extends RouteConfig> {
  param: R["request"] extends { params: infer P extends z.ZodType } ? z.output<P> : undefined;
  /** The query; with none at all, undefined (not parsed: the hot paths take none). */
  query: R["request"] extends { query: infer Q extends z.ZodType } ? z.output<Q> | undefined
    : undefined;
  json: R["request"] extends
    { body: { content: { "application/json": { schema: infer B extends z.ZodType } } } }
    ? z.output<B>
    : undefined;
  /** The body as sent, before parsing. */
  text: string | undefined;
}

/** How a route is mounted beside its handler. */
interface MountOptions<R extends RouteConfig> {
  /**
   * Checks the request once its path parameters are valid, before its body is read (who may
   * make it, say): throws an HTTPException to refuse it.
   */
  before?: (c: Context<Env>, param: RouteInput<R>["param"]) => void;
}

/**
 * `use(value)`, at once when `value` is at hand (the in-memory store), or once it resolves (a
 * store in Redis): the hot paths of the in-memory directory take no extra turn of the loop.
 */
function then<T, R>(value: Awaitable<T>, use: (value: T) => Awaitable<R>): Awaitable<R> {
  return value instanceof Promise ? value.then(use) : use(value);
}

/** What c.json() answers with. */
const JSON_HEADERS = { "content-type": "application/json" };

/** The media types a JSON body may have: those @hono/zod-openapi's validator accepts. */
const JSON_TYPE = /^application\/([a-z-.]+\+)?json(;\s*[a-zA-Z0-9-]+=([^;]+))*$/i;

const tooLarge = () =>
  new HTTPException(413, { message: `Body is larger than ${MAX_BODY_BYTES} bytes` });

/**
 * Mounts a route declared with createRoute(): documented exactly as app.openapi() documents it,
 * and validated by the same schemas, but in ONE handler. app.openapi() chains an async middleware
 * per part of the request (body limit, path parameters, media type, body) and parses with zod's
 * slower async path: about a microsecond a step, most of what a heartbeat costs beyond a bare
 * route (bench/directory_bench.ts). A failure throws an HTTPException, which app.onError answers.
 */
function mount<R extends RouteConfig & { getRoutingPath(): string }>(
  app: OpenAPIHono<Env>,
  route: R,
  handler: (c: Context<Env>, input: RouteInput<R>) => Awaitable<Response>,
  options: MountOptions<R> & { bodies?: Bodies } = {},
): void {
  app.openAPIRegistry.registerPath(route);
  const params = route.request?.params as z.ZodType | undefined;
  const queries = route.request?.query as z.ZodType | undefined;
  const content = route.request?.body?.content["application/json"];
  const body = content && "schema" in content ? content.schema as z.ZodType : undefined;
  const method = route.method.toUpperCase();
  const path = route.getRoutingPath();
  const { before, bodies } = options;
  const param = (c: Context<Env>) =>
    (params && valid(params, c.req.param(), "param")) as RouteInput<R>["param"];
  const query = (c: Context<Env>) =>
    (queries && c.req.url.includes("?")
      ? valid(queries, c.req.query(), "query")
      : undefined) as RouteInput<R>["query"];
  if (body === undefined) {
    app.on(method, path, (c) => {
      const input = { param: param(c), query: query(c) } as RouteInput<R>;
      before?.(c, input.param);
      return handler(c, input);
    });
    return;
  }
  if (bodies === undefined) throw new TypeError(`${method} ${path} takes a body: pass bodies`);
  app.on(method, path, async (c) => {
    // In the order app.openapi() checks them (size, path parameters, media type, body), with
    // who may make the request before its body is read.
    const length = c.req.header("content-length");
    // The HTTP server holds a body to its Content-Length, so the header is enough to refuse it.
    if (length !== undefined && Number(length) > MAX_BODY_BYTES) throw tooLarge();
    const input = { param: param(c), text: undefined as string | undefined };
    before?.(c, input.param);
    input.text = await readText(c, bodies, length);
    const json = valid(body, parseJson(input.text), "json");
    return handler(c, { ...input, json } as RouteInput<R>);
  });
}

/** `value` as `schema` parses it, or a 400 naming the first field that broke it. */
function valid(schema: z.ZodType, value: unknown, target: "param" | "query" | "json"): unknown {
  // Synchronous: no schema here refines asynchronously, and zod compiles sync object parsers.
  const result = schema.safeParse(value);
  if (result.success) return result.data;
  throw new HTTPException(400, { message: describeIssue(result.error.issues[0], target) });
}

/** The body as sent, or undefined when it has neither a body nor a media type; 415 for another. */
async function readText(
  c: Context<Env>,
  bodies: Bodies,
  length: string | undefined,
): Promise<string | undefined> {
  const type = c.req.header("content-type");
  if (type && !JSON_TYPE.test(type)) throw unsupportedType();
  const text = await bodies.read(c.req.raw, length, remoteHost(c.env));
  if (type) return text;
  if (text === "") return undefined;
  throw unsupportedType();
}

const unsupportedType = () =>
  new HTTPException(415, { message: 'Content-Type must be "application/json"' });

/** `text` as JSON, or a 400. No text at all is an empty object, as app.openapi() has it. */
function parseJson(text: string | undefined): unknown {
  if (text === undefined) return {};
  try {
    return JSON.parse(text);
  } catch {
    throw new HTTPException(400, { message: "Malformed JSON in request body" });
  }
}

// ---------------------------------------------------------------------------------------------
// The repeated heartbeat, answered before routing

/** What the app's fetch takes. */
type Fetch = OpenAPIHono<Env>["fetch"];

/**
 * `routed` (the app's own fetch), with the usual heartbeat answered ahead of it: one that repeats
 * its peer's last registration or heartbeat byte for byte, with the peer's secret, which only
 * moves the peer's expiry. It takes the same checks as its route (size, id, secret, media type,
 * the body's deadline and budget) but not the route's machinery: routing, a context, zod, which
 * cost a heartbeat 4 µs of CPU in 30 (bench/directory_bench.ts). Any request that fails a check
 * goes to its route untouched, which answers it as it always has; a heartbeat that changes the
 * peer goes there with the body already read.
 */
function answerRepeatedHeartbeats(routed: Fetch, registry: DirectoryStore, bodies: Bodies): Fetch {
  return (request, env, executionCtx) => {
    const heartbeat = request.method === "PUT" ? repeatedHeartbeat(request) : undefined;
    if (heartbeat === undefined) return routed(request, env, executionCtx);
    const { id, secret, length } = heartbeat;
    const source = remoteHost(env) ?? "";
    return bodies.read(request, length, source)
      .then((text) =>
        then(registry.refresh(id, secret, text, () => source), (refreshed) => {
          if (refreshed) {
            const answer = { id, ttl: registry.ttl, recreated: false };
            return new Response(JSON.stringify(answer), { headers: JSON_HEADERS });
          }
          // It changes the peer: its route parses and checks the body it sent.
          const { url, headers } = request;
          return routed(
            new Request(url, { method: "PUT", headers, body: text }),
            env,
            executionCtx,
          );
        })
      )
      .catch((error) => answerFailure(error, request));
  };
}

/**
 * The peer id, secret and Content-Length of a heartbeat (`PUT /peers/{id}`) that passes every
 * check its route makes before reading the body; undefined for any other request.
 */
function repeatedHeartbeat(
  request: Request,
): { id: string; secret: string; length: string } | undefined {
  const url = request.url;
  const path = url.indexOf("/", url.indexOf("//") + 2);
  // A query, a percent-encoded id or another path: the route's to answer.
  if (!url.startsWith(PEER_PATH, path) || url.includes("?", path)) return undefined;
  const id = url.slice(path + PEER_PATH.length);
  if (!NAME_PATTERN.test(id)) return undefined;
  const headers = request.headers;
  const length = headers.get("content-length");
  if (length === null || !(Number(length) <= MAX_BODY_BYTES)) return undefined;
  const secret = headers.get("authorization")?.match(BEARER)?.[1];
  if (secret === undefined || !SECRET_PATTERN.test(secret)) return undefined;
  const type = headers.get("content-type");
  if (type === null || !JSON_TYPE.test(type)) return undefined;
  // A page's, which gets CORS headers from httpRules. (Its target is short: no 414.)
  if (headers.has("origin")) return undefined;
  return { id, secret, length };
}

const PEER_PATH = "/peers/";

/**
 * The answer to `request` that failed with `error`: a refusal (an HTTPException, a store that is
 * down), or a 500, logged.
 */
function answerFailure(error: unknown, request: Request): Response {
  const answer = refusalOf(error);
  if (answer !== undefined) return answer;
  console.error(`[DIRECTORY] ${request.method} ${new URL(request.url).pathname} failed:`, error);
  return Response.json(errorBody(ERROR_CODES[500], "Internal server error"), { status: 500 });
}

/** The answer to a request refused by an HTTPException, or by a store that is down. */
function refusalOf(error: unknown): Response | undefined {
  if (error instanceof HTTPException) {
    const status = error.status as ContentfulStatusCode;
    const headers = new Headers(error.res?.headers);
    headers.set("content-type", "application/json");
    return new Response(JSON.stringify(errorBody(errorCode(status), error.message)), {
      status,
      headers,
    });
  }
  if (error instanceof StoreUnavailableError) {
    return Response.json(errorBody(ERROR_CODES[503], error.message), {
      status: 503,
      headers: { "retry-after": "1" },
    });
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// Request bodies: a deadline, a minimum rate, and a budget for all of them

/** How request bodies are read; see {@link AppOptions}. */
interface BodyLimits {
  bodyTimeout?: number;
  minBodyRate?: number;
  maxBodyMemory?: number;
}

/** How often the deadlines of the bodies being read are checked: how late a 408 may come. */
const BODY_SWEEP_MS = 100;

/** A body being read: its deadline, and what happens when it comes. */
interface Read {
  due: number;
  late: () => void;
}

/** What the deadline of a body of known size rejects with. */
const LATE = Symbol("late");

/**
 * The share of the memory for request bodies that the requests of one client address may hold
 * (and at least one body of the largest size, within the whole).
 */
const BODY_MEMORY_SHARE = 1 / 4;

/**
 * Reads request bodies whole, each within its deadline (`bodyTimeout` seconds, and one more
 * for each `minBodyRate` bytes of it: slower than that, it is a 408), and all of them within
 * one budget of memory, of which one client address may hold a quarter (past it, a 503): a
 * client that stalls mid-body, or many of them, hold neither a connection nor memory for long.
 */
class Bodies {
  readonly #timeoutMs: number;
  readonly #minRate: number;
  readonly #budget: number;
  readonly #share: number;
  /** Bytes of the bodies being read, or that their Content-Length promises. */
  #held = 0;
  /** The same, per client address. */
  readonly #byAddress = new Map<string, number>();
  /** The reads in progress, each with its deadline. */
  readonly #reads = new Set<Read>();
  /** One timer checks every deadline, rather than one timer each. */
  #sweeper: ReturnType<typeof setInterval> | undefined;

  constructor(limits: BodyLimits) {
    this.#timeoutMs = positiveNumber(limits.bodyTimeout ?? DEFAULT_BODY_TIMEOUT, "bodyTimeout") *
      1000;
    this.#minRate = positiveNumber(limits.minBodyRate ?? DEFAULT_MIN_BODY_RATE, "minBodyRate");
    this.#budget = positiveNumber(limits.maxBodyMemory ?? DEFAULT_MAX_BODY_MEMORY, "maxBodyMemory");
    this.#share = Math.min(
      this.#budget,
      Math.max(this.#budget * BODY_MEMORY_SHARE, MAX_BODY_BYTES),
    );
  }

  /**
   * `request`'s body as text, of Content-Length `length` (when it has one), from client
   * `address`; an HTTPException (408, 413, 503) when it breaks a limit.
   */
  read(request: Request, length: string | undefined, address = ""): Promise<string> {
    if (length !== undefined) return this.#readSized(request, Number(length), address);
    if (request.body === null) return Promise.resolve("");
    return this.#readStreamed(request.body, address);
  }

  /**
   * A body of known size, the usual: it takes its share of the budget at once, and has its
   * deadline from the start. Read in one piece by Deno (the fast path, unlike a stream). At the
   * deadline it is a 408, and the server closes the connection; the body's memory counts until
   * that read ends.
   */
  async #readSized(request: Request, length: number, address: string): Promise<string> {
    if (!this.#take(address, length)) throw busy();
    const text = request.text();
    const read: Read = {
      due: Date.now() + this.#timeoutMs + (length / this.#minRate) * 1000,
      late: () => {},
    };
    this.#watch(read);
    try {
      // The text, or LATE at the deadline: one promise, where Promise.race would take three.
      const body = await new Promise<string>((resolve, reject) => {
        read.late = () => reject(LATE);
        text.then(resolve, reject);
      });
      this.#take(address, -length);
      return body;
    } catch (error) {
      if (error !== LATE) {
        this.#take(address, -length);
        throw error;
      }
      // The body's memory counts until its read ends (Deno closes the connection).
      const release = () => void this.#take(address, -length);
      text.then(release, release);
      throw slow(length, this.#timeoutMs, this.#minRate, true);
    } finally {
      this.#reads.delete(read);
    }
  }

  /**
   * A body of unknown size (chunked): it takes its share of the budget as it arrives, and each
   * `minRate` bytes received move its deadline a second on.
   */
  async #readStreamed(stream: ReadableStream<Uint8Array>, address: string): Promise<string> {
    const reader = stream.getReader();
    const chunks: Uint8Array[] = [];
    let received = 0;
    let late = false;
    const start = Date.now();
    const read = {
      due: start + this.#timeoutMs,
      late: () => {
        // Each minRate bytes received move the deadline a second on.
        read.due = start + this.#timeoutMs + (received / this.#minRate) * 1000;
        if (read.due > Date.now()) return this.#watch(read);
        late = true;
        reader.cancel().catch(() => {}); // ends the read in progress
      },
    };
    this.#watch(read);
    try {
      while (true) {
        const { done, value } = await reader.read();
        if (late) throw slow(received, this.#timeoutMs, this.#minRate);
        if (done) break;
        if (received + value.byteLength > MAX_BODY_BYTES) throw tooLarge();
        if (!this.#take(address, value.byteLength)) throw busy();
        received += value.byteLength;
        chunks.push(value);
      }
    } catch (error) {
      await reader.cancel().catch(() => {});
      throw error;
    } finally {
      this.#reads.delete(read);
      this.#take(address, -received);
    }
    return DECODER.decode(chunks.length === 1 ? chunks[0] : concat(chunks, received));
  }

  /**
   * Watches `read`'s deadline until it is deleted from #reads: one timer checks them all, and
   * stops once there are none.
   */
  #watch(read: Read): void {
    this.#reads.add(read);
    if (this.#sweeper !== undefined) return;
    this.#sweeper = setInterval(() => {
      if (this.#reads.size === 0) {
        clearInterval(this.#sweeper);
        this.#sweeper = undefined;
        return;
      }
      const now = Date.now();
      for (const read of this.#reads) {
        if (read.due > now) continue;
        this.#reads.delete(read);
        read.late();
      }
    }, BODY_SWEEP_MS);
    // It keeps no process alive: reads in progress have their connections for that.
    this.#sweeper.unref();
  }

  /** Takes `bytes` of the budget for `address` (gives them back when negative); false when full. */
  #take(address: string, bytes: number): boolean {
    if (bytes === 0) return true;
    const mine = (this.#byAddress.get(address) ?? 0) + bytes;
    if (bytes > 0 && (this.#held + bytes > this.#budget || mine > this.#share)) {
      return false;
    }
    this.#held += bytes;
    if (mine > 0) this.#byAddress.set(address, mine);
    else this.#byAddress.delete(address);
    return true;
  }
}

const DECODER = new TextDecoder();

function concat(chunks: Uint8Array[], length: number): Uint8Array {
  const whole = new Uint8Array(length);
  let at = 0;
  for (const chunk of chunks) {
    whole.set(chunk, at);
    at += chunk.byteLength;
  }
  return whole;
}

const busy = () =>
  new HTTPException(503, {
    message: "The directory is reading as many request bodies as it may hold; try again in a " +
      "second",
  });

/** The 408 of a body that missed its deadline: `bytes` of it had come, or it said it had. */
function slow(bytes: number, timeoutMs: number, minRate: number, said = false): HTTPException {
  const what = said ? `a body of ${bytes} bytes` : `${bytes} bytes`;
  return new HTTPException(408, {
    message: `The body did not arrive in time: ${what} in ${timeoutMs / 1000} s, and one more ` +
      `for each ${minRate} bytes`,
  });
}

/** `value` when it is a number above 0; a RangeError naming `option` otherwise. */
function positiveNumber(value: number, option: string): number {
  if (value > 0 && Number.isFinite(value)) return value;
  throw new RangeError(`${option} must be a number above 0, not ${value}`);
}

// ---------------------------------------------------------------------------------------------
// The app

/** The error body every failure has: `{"error": {"code", "message"}}`. */
const TARGET_NAMES: Record<string, string> = {
  json: "Field",
  param: "Path parameter",
  query: "Query parameter",
};

/** One sentence naming the first field that broke the schema. */
function describeIssue(issue: z.core.$ZodIssue, target: string): string {
  const what = TARGET_NAMES[target] ?? "Parameter";
  const field = issue.path.length > 0 ? issue.path.join(".") : "(body)";
  if (issue.code === "invalid_type" && issue.message.endsWith("received undefined")) {
    return `${what} "${field}" is required`;
  }
  const reason = issue.message.replace(/^Invalid input: /, "");
  return `${what} "${field}" is invalid: ${reason[0].toLowerCase()}${reason.slice(1)}`;
}

/**
 * What the Deno server passes as Hono's env (the connection's addresses), and what a request's
 * handlers share: the secret it carries.
 */
type Env = {
  Bindings: Partial<Deno.ServeHandlerInfo<Deno.NetAddr>>;
  Variables: { secret: string };
};

/** The address the request came from, without the IPv4-mapped IPv6 prefix. */
function remoteHost(env: Env["Bindings"] | undefined): string | undefined {
  const hostname = env?.remoteAddr?.hostname;
  return hostname?.startsWith("::ffff:") ? hostname.replace(/^::ffff:(?=\d+\.)/, "") : hostname;
}

const BEARER = /^Bearer +(\S+)\s*$/i;

/**
 * The secret of the request's `Authorization: Bearer <secret>`; undefined without the header;
 * a 401 for a malformed one.
 */
function bearer(c: Context<Env>): string | undefined {
  const header = c.req.header("authorization");
  if (header === undefined) return undefined;
  const secret = header.match(BEARER)?.[1];
  if (secret === undefined || !SECRET_PATTERN.test(secret)) {
    throw unauthorized(
      'Header "Authorization" must be "Bearer <secret>", the secret of 32 to 128 letters, ' +
        "digits, '-' or '_' that POST /peers gave",
    );
  }
  return secret;
}

function unauthorized(message: string): HTTPException {
  return new HTTPException(401, {
    message,
    res: new Response(null, { headers: { "www-authenticate": "Bearer" } }),
  });
}

/** The request's secret; a 401 without one. */
function requireSecret(c: Context<Env>): string {
  const secret = bearer(c);
  if (secret === undefined) {
    throw unauthorized(
      'This needs the peer\'s secret: send "Authorization: Bearer <secret>", with the secret ' +
        "POST /peers gave",
    );
  }
  return secret;
}

const forbidden = (id: string) =>
  new HTTPException(403, {
    message: `Peer "${id}" is another owner's: the secret is not the one it registered with`,
  });

/** Options of {@link createApp}. */
export interface AppOptions extends RegistryOptions, BodyLimits, HttpRulesOptions {
  /**
   * The state to serve: a {@link Registry}, or the state replicas share in Redis; by default a
   * new Registry with these options (`ttl`, `now`, bounds).
   */
  registry?: DirectoryStore;
  /**
   * List a peer at the `host` its state names, as trackers do only when told: otherwise the
   * directory lists it at the address its request came from, so nobody can aim downloaders at a
   * third party. For containers and networks whose peers advertise names. @default false
   */
  trustAdvertise?: boolean;
  /** Seconds a request body may take at first. @default 10 */
  bodyTimeout?: number;
  /** Bytes per second a longer body must keep: each of them buys a second more. @default 16384 */
  minBodyRate?: number;
  /** Bytes of request bodies held at once, across all requests; past that, a 503. @default 64 MiB */
  maxBodyMemory?: number;
}

/**
 * Builds the directory's Hono app without listening, so tests can use `app.request()`.
 * @example
 * ```ts
 * const app = createApp({ ttl: 30 });
 * const response = await app.request("/fragments/fragment_0.bin");
 * ```
 */
export function createApp(options: AppOptions = {}): OpenAPIHono<Env> {
  const registry = options.registry ?? new Registry(options);
  const bodies = new Bodies(options);
  const trustAdvertise = options.trustAdvertise ?? false;
  const app = new OpenAPIHono<Env>({
    // The directory mounts its own routes with mount(); a route someone adds with app.openapi()
    // still answers a validation failure the same way, with one 400 naming the field.
    defaultHook: (result, c) => {
      if (result.success) return undefined;
      const message = describeIssue(result.error.issues[0], result.target);
      return c.json(errorBody(ERROR_CODES[400], message), 400);
    },
  });

  app.onError((error, c) => answerFailure(error, c.req.raw));
  const notFound = (message: string) => errorBody(ERROR_CODES[404], message);
  // A path some route has answers another method with a 405 that lists the ones it takes.
  app.notFound((c) =>
    methodNotAllowed(c, app) ??
      c.json(notFound(`No route for ${answeredMethod(c)} "${c.req.path}"`), 404)
  );
  app.openAPIRegistry.registerComponent("securitySchemes", PEER_SECRET_SCHEME, PEER_SECRET);
  mount(
    app,
    healthRoute,
    async (c) => c.json({ status: "ok" as const, ...await registry.counts() }, 200),
  );

  /**
   * Where the directory lists a peer: the address its request came from, or, trusting
   * advertised hosts, the host its state names. Undefined when neither says.
   */
  function listedHost(state: PeerState, env: Env["Bindings"] | undefined): string | undefined {
    return (trustAdvertise ? state.host : undefined) ?? remoteHost(env);
  }
  const noHost = () =>
    new HTTPException(400, {
      message: trustAdvertise
        ? 'Field "host" is required: the remote address is unknown'
        : "The request's remote address is unknown, and the directory lists a peer at the " +
          'address it registers from (a "host" field counts only with --trust-advertise)',
    });

  /** The answer to a refused upsert, or undefined for one that went through. */
  function refusal(c: Context<Env>, id: string, address: string, outcome: UpsertOutcome) {
    switch (outcome) {
      case "created":
      case "refreshed":
        return undefined;
      case "forbidden":
        throw forbidden(id);
      case "address taken":
        return c.json(
          errorBody(
            ERROR_CODES[409],
            `A live peer of another owner is listed at "${address}"; it goes within a ttl ` +
              "once it stops heartbeating",
          ),
          409,
        );
      case "too many peers":
        return c.json(
          errorBody(
            TOO_MANY_PEERS,
            `The directory lists ${registry.maxPeers} live peers, its limit; a peer that stops ` +
              "heartbeating is dropped within a ttl",
          ),
          429,
        );
      case "too many from address":
        return c.json(
          errorBody(
            TOO_MANY_PEERS_FROM_ADDRESS,
            `The directory lists ${registry.maxPeersPerAddress} live peers registered from ` +
              `"${remoteHost(c.env) ?? "this address"}", its limit per address; one that stops ` +
              "heartbeating is dropped within a ttl",
          ),
          429,
        );
      case "too many fragments":
        return c.json(
          errorBody(
            TOO_MANY_FRAGMENTS,
            `The directory's index would hold more than ${registry.maxIndexedFragments} ` +
              "fragments across all peers, its limit; a peer it lists keeps its last state, " +
              "and one that stops heartbeating is dropped within a ttl",
          ),
          429,
        );
    }
  }

  mount(app, registerRoute, async (c, { json, text }) => {
    const host = listedHost(json, c.env);
    if (host === undefined) throw noHost();
    const secret = bearer(c) ?? newSecret();
    const id = crypto.randomUUID();
    const claim = { secret, source: remoteHost(c.env), body: text };
    const outcome = await registry.upsert(id, { ...json, host }, claim);
    return refusal(c, id, `${host}:${json.port}`, outcome) ??
      c.json({ id, ttl: registry.ttl, secret, host }, 201);
  }, {
    bodies,
    before: (c) => void bearer(c), // a malformed secret is refused before the body is read
  });

  mount(app, heartbeatRoute, async (c, { param: { id }, json, text }) => {
    const host = listedHost(json, c.env);
    if (host === undefined) throw noHost();
    const claim = { secret: c.get("secret"), source: remoteHost(c.env), body: text };
    const outcome = await registry.upsert(id, { ...json, host }, claim);
    return refusal(c, id, `${host}:${json.port}`, outcome) ??
      c.json({ id, ttl: registry.ttl, recreated: outcome === "created" }, 200);
  }, {
    bodies,
    // Whether the secret is the peer's is the registry's to say: a peer it does not know is
    // the peer's that comes back after a restart, which it adopts.
    before: (c) => void c.set("secret", requireSecret(c)),
  });

  mount(app, leaveRoute, async (c, { param: { id } }) => {
    const owns = await registry.owns(id, requireSecret(c));
    if (owns === undefined) return c.json(notFound(`No peer "${id}"`), 404);
    if (!owns) throw forbidden(id);
    await registry.remove(id);
    return c.body(null, 204);
  });

  /** The page a list's query asks for. */
  const page = (query: PageQuery | undefined) => ({
    cursor: query?.cursor === undefined ? undefined : Number(query.cursor),
    limit: query?.limit,
  });
  const next = (cursor: number | undefined) => cursor === undefined ? {} : { next: String(cursor) };

  mount(app, listPeersRoute, async (c, { query }) => {
    const { entries, next: after } = await registry.peers(page(query));
    return c.json({ peers: entries, ...next(after) }, 200);
  });
  /**
   * The id of the file `ref` names (an id, an id prefix or a name), or the answer to send: 404
   * when no file has it, 409 listing the files when several share it.
   */
  const fileId = (ref: string): Awaitable<string | { status: 404 | 409; body: object }> =>
    then(registry.resolve(ref), (resolution): string | { status: 404 | 409; body: object } => {
      if (resolution === undefined) return { status: 404, body: notFound(`No file "${ref}"`) };
      if ("id" in resolution) return resolution.id;
      const files = resolution.ambiguous;
      const listed = files.map((file) =>
        `${file.id} (${file.file}, ${file.seeders} seeder${file.seeders === 1 ? "" : "s"})`
      )
        .join(", ");
      const message = `"${ref}" names ${files.length} files: ${listed}; name one by its id ` +
        `(${MIN_ID_PREFIX} or more of its first hex digits)`;
      return { status: 409, body: { error: { code: AMBIGUOUS_FILE, message, files } } };
    });

  mount(app, listFragmentsRoute, async (c, { query }) => {
    const id = query?.file === undefined ? undefined : await fileId(query.file);
    if (typeof id === "object") return c.json(id.body, id.status);
    const { entries, next: after } = await registry.fragments(id, page(query));
    return c.json({ fragments: entries, ...next(after) }, 200);
  });

  mount(app, locateRoute, (c, { param: { name }, query }) => {
    const file = query?.file;
    const located = (id: string | undefined) =>
      then(registry.locateJson(name, id), (holders) => {
        if (holders === undefined) {
          const of = file === undefined ? "" : ` of "${file}"`;
          return c.json(notFound(`No live peer holds "${name}"${of}`), 404);
        }
        // What c.json({ name, holders }) would send, with the holders serialized once.
        return c.body(`{"name":${JSON.stringify(name)},"holders":${holders}}`, 200, JSON_HEADERS);
      });
    if (file === undefined) return located(undefined);
    return then(
      fileId(file),
      (id) => typeof id === "object" ? c.json(id.body, id.status) : located(id),
    );
  });

  mount(app, publishRoute, async (c, { json: manifest }) => {
    // The schema checks each field; this checks that they agree (offsets, sizes, indexes), as
    // a peer will before it trusts the manifest.
    const problem = manifestProblem(manifest);
    if (problem) return c.json(errorBody(ERROR_CODES[400], `Invalid manifest: ${problem}`), 400);
    const outcome = await registry.publish(manifest);
    if (outcome === "conflict") {
      const message = `File ${manifest.sha256} ("${manifest.file}") is already published ` +
        "split another way";
      return c.json(errorBody(ERROR_CODES[409], message), 409);
    }
    if (outcome === "too many files" || outcome === "too many fragments") {
      const full = outcome === "too many files"
        ? `the directory already lists ${registry.maxFiles} files, its limit`
        : `the directory's files would list more than ${registry.maxFileFragments} ` +
          "fragments, its limit";
      const message = `Cannot publish "${manifest.file}": ${full}; a file no live peer ` +
        "holds is dropped within a ttl";
      return c.json(errorBody(TOO_MANY_FILES, message), 429);
    }
    const body = { id: manifest.sha256, file: manifest.file, fragments: manifest.fragments.length };
    return outcome === "created" ? c.json(body, 201) : c.json(body, 200);
  }, { bodies });

  mount(app, listFilesRoute, async (c) => c.json({ files: await registry.files() }, 200));

  mount(app, getFileRoute, async (c, { param: { file } }) => {
    const id = await fileId(file);
    if (typeof id === "object") return c.json(id.body, id.status);
    const detail = await registry.file(id);
    if (detail === undefined) return c.json(notFound(`No file "${file}"`), 404);
    return c.json(detail, 200);
  });

  // OpenAPI 3.0 rather than 3.1: validators check 3.0 schema objects strictly, 3.1 barely.
  app.doc("/openapi.json", {
    openapi: "3.0.3",
    // Relative: the directory that served the document, at whatever address the client used
    // (behind a port mapping or a proxy too).
    servers: [{ url: "/", description: "The directory that served this document" }],
    info: {
      title: "P2P video directory",
      version: "1.0.0",
      description: "Which live peer holds which fragment, and the manifests of shared files. " +
        "A peer's entry is its owner's: registering answers a secret, which heartbeats and " +
        "leaves carry as `Authorization: Bearer <secret>`. The directory caps its connections " +
        "(in all and per client address), closes those that send no request for a while, and " +
        "answers a connection it has no room for with a 503 in the error shape. Every route " +
        "answers HEAD as GET, another method with a 405 that lists the ones it takes, and a " +
        "request target over 8 KiB with a 414. Pages of any origin may read (CORS); only the " +
        "origins the directory's --cors names may write.",
      license: { name: "MIT", url: "https://opensource.org/license/mit" },
    },
  });
  app.get(
    "/apidocs",
    // baseUrl points the page's <script> and <link> at the route below instead of a CDN.
    swaggerUI({ url: "/openapi.json", baseUrl: "/apidocs", title: "P2P directory API" }),
  );
  app.get("/apidocs/swagger-ui-dist/:asset", async (c) => {
    const asset = SWAGGER_ASSETS.get(c.req.param("asset"));
    if (asset === undefined) return c.notFound();
    return c.body(await asset.load(), 200, {
      "content-type": asset.type,
      "cache-control": "public, max-age=86400",
    });
  });
  // Around every route: the 414, CORS (reads from any origin) and HEAD's Content-Length. A
  // repeated heartbeat needs none of them (see repeatedHeartbeat).
  const routed = httpRules(app, app.fetch, new CorsPolicy(options.cors));
  app.fetch = answerRepeatedHeartbeats(routed, registry, bodies);
  return app;
}

/**
 * Swagger UI's own files, from npm `swagger-ui-dist`, so /apidocs works with no internet. Loaded
 * as text modules on first use: no file-system path and no read permission needed.
 */
const SWAGGER_ASSETS = new Map([
  ["swagger-ui.css", {
    type: "text/css; charset=utf-8",
    load: loadOnce(() => import("swagger-ui-dist/swagger-ui.css", { with: { type: "text" } })),
  }],
  ["swagger-ui-bundle.js", {
    type: "text/javascript; charset=utf-8",
    load: loadOnce(() =>
      import("swagger-ui-dist/swagger-ui-bundle.js", { with: { type: "text" } })
    ),
  }],
]);

/**
 * `load` made to run once: its text is kept once it loaded, and a load that failed is tried
 * again on the next call (a failed import would otherwise be an asset's answer for good).
 */
export function loadOnce(load: () => Promise<{ default: string }>): () => Promise<string> {
  let text: Promise<string> | undefined;
  return () =>
    text ??= load().then((module) => module.default, (error) => {
      text = undefined;
      throw error;
    });
}
