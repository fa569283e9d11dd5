/**
 * The directory's Hono app: every route of `directory/schemas.ts` mounted as one handler over
 * the {@link Registry}, the error shape, `/openapi.json` and the Swagger UI at `/apidocs`.
 * @module
 */
import { OpenAPIHono, type RouteConfig, type z } from "@hono/zod-openapi";
import { swaggerUI } from "@hono/swagger-ui";
import { bodyLimit } from "hono/body-limit";
import type { Context } from "hono";
import { HTTPException } from "hono/http-exception";
import type { ContentfulStatusCode } from "hono/utils/http-status";
import { manifestProblem } from "../split.ts";
import {
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
  type PeerState,
  publishRoute,
  registerRoute,
  TOO_MANY_FILES,
  TOO_MANY_PEERS,
} from "./schemas.ts";
import { type KnownPeerState, Registry, type RegistryOptions, type Sent } from "./registry.ts";

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

/** Answers a request from its path parameters and body as sent, before parsing; or undefined. */
type Early<R extends RouteConfig> = (
  c: Context<Env>,
  param: RouteInput<R>["param"],
  text: string | undefined,
) => Response | undefined;

/** What c.json() answers with. */
const JSON_HEADERS = { "content-type": "application/json" };

/** The media types a JSON body may have: those @hono/zod-openapi's validator accepts. */
const JSON_TYPE = /^application\/([a-z-.]+\+)?json(;\s*[a-zA-Z0-9-]+=([^;]+))*$/i;

const tooLarge = () =>
  new HTTPException(413, { message: `Body is larger than ${MAX_BODY_BYTES} bytes` });
/** For a body without Content-Length: bodyLimit counts it as it reads it. */
const limitStreamedBody = bodyLimit({
  maxSize: MAX_BODY_BYTES,
  onError: () => {
    throw tooLarge();
  },
});

/**
 * Mounts a route declared with createRoute(): documented exactly as app.openapi() documents it,
 * and validated by the same schemas, but in ONE handler. app.openapi() chains an async middleware
 * per part of the request (body limit, path parameters, media type, body) and parses with zod's
 * slower async path: about a microsecond a step, most of what a heartbeat costs beyond a bare
 * route (bench/directory_bench.ts). A failure throws an HTTPException, which app.onError answers.
 * `early`, on a route with a body, may answer before the body is parsed.
 */
function mount<R extends RouteConfig & { getRoutingPath(): string }>(
  app: OpenAPIHono<Env>,
  route: R,
  handler: (c: Context<Env>, input: RouteInput<R>) => Response,
  early?: Early<R>,
): void {
  app.openAPIRegistry.registerPath(route);
  const params = route.request?.params as z.ZodType | undefined;
  const queries = route.request?.query as z.ZodType | undefined;
  const content = route.request?.body?.content["application/json"];
  const body = content && "schema" in content ? content.schema as z.ZodType : undefined;
  const method = route.method.toUpperCase();
  const path = route.getRoutingPath();
  const param = (c: Context<Env>) =>
    (params && valid(params, c.req.param(), "param")) as RouteInput<R>["param"];
  const query = (c: Context<Env>) =>
    (queries && c.req.url.includes("?")
      ? valid(queries, c.req.query(), "query")
      : undefined) as RouteInput<R>["query"];
  if (body === undefined) {
    app.on(method, path, (c) => handler(c, { param: param(c), query: query(c) } as RouteInput<R>));
    return;
  }
  app.on(method, path, async (c) => {
    // In the order app.openapi() checks them: size, path parameters, media type, body.
    const length = c.req.header("content-length");
    // The HTTP server holds a body to its Content-Length, so the header is enough to refuse it.
    if (length === undefined) await limitStreamedBody(c, async () => {});
    else if (Number(length) > MAX_BODY_BYTES) throw tooLarge();
    const input = { param: param(c), text: await readText(c) };
    const answer = early?.(c, input.param, input.text);
    if (answer !== undefined) return answer;
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
async function readText(c: Context<Env>): Promise<string | undefined> {
  const type = c.req.header("content-type");
  if (type && !JSON_TYPE.test(type)) throw unsupportedType();
  const text = await c.req.text();
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
// The app

/** The error body every failure has: `{"error": {"code", "message"}}`. */
function errorBody(code: string, message: string) {
  return { error: { code, message } };
}

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

/** What the Deno server passes as Hono's env: the connection's addresses. */
type Env = { Bindings: Partial<Deno.ServeHandlerInfo<Deno.NetAddr>> };

/** The address the request came from, without the IPv4-mapped IPv6 prefix. */
function remoteHost(env: Env["Bindings"] | undefined): string | undefined {
  return env?.remoteAddr?.hostname.replace(/^::ffff:(?=\d+\.)/, "");
}

/** Options of {@link createApp}. */
export interface AppOptions extends RegistryOptions {
  /** The state to serve; by default a new one with these options (`ttl`, `now`, bounds). */
  registry?: Registry;
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
  const app = new OpenAPIHono<Env>({
    // The directory mounts its own routes with mount(); a route someone adds with app.openapi()
    // still answers a validation failure the same way, with one 400 naming the field.
    defaultHook: (result, c) => {
      if (result.success) return undefined;
      const message = describeIssue(result.error.issues[0], result.target);
      return c.json(errorBody(ERROR_CODES[400], message), 400);
    },
  });

  app.onError((error, c) => {
    if (error instanceof HTTPException) {
      const status = error.status as ContentfulStatusCode;
      return c.json(errorBody(errorCode(status), error.message), status);
    }
    console.error(`[DIRECTORY] ${c.req.method} ${c.req.path} failed:`, error);
    return c.json(errorBody(ERROR_CODES[500], "Internal server error"), 500);
  });
  const notFound = (message: string) => errorBody(ERROR_CODES[404], message);
  app.notFound((c) => c.json(notFound(`No route for ${c.req.method} "${c.req.path}"`), 404));
  mount(app, healthRoute, (c) =>
    c.json({
      status: "ok" as const,
      peers: registry.peerCount,
      fragments: registry.fragmentCount,
      files: registry.fileCount,
    }, 200));

  /** The state with `host` filled in, or undefined when neither the body nor the socket says. */
  function withHost(state: PeerState, env: Env["Bindings"] | undefined) {
    const host = state.host ?? remoteHost(env);
    return host === undefined ? undefined : { ...state, host };
  }
  const noHost = errorBody(
    ERROR_CODES[400],
    'Field "host" is required: the remote address is unknown',
  );
  const tooManyPeers = () =>
    errorBody(
      TOO_MANY_PEERS,
      `The directory lists ${registry.maxPeers} live peers, its limit; a peer that stops ` +
        "heartbeating is dropped within a ttl",
    );

  /** What the registry keeps of a request, to know a heartbeat that repeats it. */
  const sent = (json: PeerState, state: KnownPeerState, body: string | undefined): Sent => ({
    body,
    from: json.host === undefined ? state.host : undefined,
  });

  mount(app, registerRoute, (c, { json, text }) => {
    const state = withHost(json, c.env);
    if (state === undefined) return c.json(noHost, 400);
    const id = crypto.randomUUID();
    if (registry.upsert(id, state, sent(json, state, text)) === "too many peers") {
      return c.json(tooManyPeers(), 429);
    }
    return c.json({ id, ttl: registry.ttl }, 201);
  });

  mount(
    app,
    heartbeatRoute,
    (c, { param: { id }, json, text }) => {
      const state = withHost(json, c.env);
      if (state === undefined) return c.json(noHost, 400);
      const outcome = registry.upsert(id, state, sent(json, state, text));
      if (outcome === "too many peers") return c.json(tooManyPeers(), 429);
      return c.json({ id, ttl: registry.ttl, recreated: outcome === "created" }, 200);
    },
    // The usual heartbeat repeats the last one byte for byte: it needs no parsing.
    (c, { id }, text) =>
      registry.refresh(id, text, () => remoteHost(c.env))
        ? c.json({ id, ttl: registry.ttl, recreated: false }, 200)
        : undefined,
  );

  mount(app, leaveRoute, (c, { param: { id } }) => {
    if (!registry.remove(id)) return c.json(notFound(`No peer "${id}"`), 404);
    return c.body(null, 204);
  });

  mount(app, listPeersRoute, (c) => c.json({ peers: registry.peers() }, 200));
  mount(
    app,
    listFragmentsRoute,
    (c, { query }) => c.json({ fragments: registry.fragments(query?.file) }, 200),
  );

  mount(app, locateRoute, (c, { param: { name }, query }) => {
    const file = query?.file;
    const holders = registry.locateJson(name, file);
    if (holders === undefined) {
      const of = file === undefined ? "" : ` of "${file}"`;
      return c.json(notFound(`No live peer holds "${name}"${of}`), 404);
    }
    // What c.json({ name, holders }) would send, with the holders serialized once, not per call.
    return c.body(`{"name":${JSON.stringify(name)},"holders":${holders}}`, 200, JSON_HEADERS);
  });

  mount(app, publishRoute, (c, { json: manifest }) => {
    // The schema checks each field; this checks that they agree (offsets, sizes, indexes), as
    // a peer will before it trusts the manifest.
    const problem = manifestProblem(manifest);
    if (problem) return c.json(errorBody(ERROR_CODES[400], `Invalid manifest: ${problem}`), 400);
    const outcome = registry.publish(manifest);
    if (outcome === "conflict") {
      const message = `File "${manifest.file}" is already published with other contents`;
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
    const body = { file: manifest.file, fragments: manifest.fragments.length };
    return outcome === "created" ? c.json(body, 201) : c.json(body, 200);
  });

  mount(app, listFilesRoute, (c) => c.json({ files: registry.files() }, 200));

  mount(app, getFileRoute, (c, { param: { file } }) => {
    const detail = registry.file(file);
    if (detail === undefined) return c.json(notFound(`No file "${file}"`), 404);
    return c.json(detail, 200);
  });

  // OpenAPI 3.0 rather than 3.1: validators check 3.0 schema objects strictly, 3.1 barely.
  app.doc("/openapi.json", {
    openapi: "3.0.3",
    info: {
      title: "P2P video directory",
      version: "1.0.0",
      description: "Which live peer holds which fragment, and the manifests of shared files",
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
