/**
 * The directory's HTTP as RFC 9110 and browsers expect it, around its routes: `HEAD` answers
 * with the headers and `Content-Length` of `GET`, a method a path does not take is a 405 with
 * `Allow`, a request target longer than {@link MAX_TARGET} a 414, and CORS lets a page on
 * another origin read (every origin) and write (only the origins `--cors` names).
 * @module
 */
import type { Context } from "hono";
import type { RouterRoute } from "hono/types";
import { ERROR_CODES, MAX_TARGET } from "./schemas.ts";
import { errorBody } from "./protocol.ts";

/** Methods that only read: open to every origin, as the tracker data they answer is public. */
const READS = new Set(["GET", "HEAD"]);
/** How long a browser may keep a preflight's answer, in seconds (Chromium keeps 2 hours at most). */
const PREFLIGHT_MAX_AGE = "600";
/** The request headers a write carries: a preflight allows them. */
const ALLOWED_HEADERS = "Authorization, Content-Type";
/** The answer headers a page may read besides the safelisted ones. */
const EXPOSED_HEADERS = "Allow, WWW-Authenticate";

/**
 * The origins of `--cors` values, each one origin, a comma-separated list of them or `*`; a
 * RangeError for anything else. An origin must be written as a browser sends it
 * (`https://example.com`, `http://localhost:8080`: no path, no default port, lower case), since
 * it is compared with the request's `Origin` as it is.
 */
export function corsOrigins(values: readonly string[]): string[] {
  const origins = values.flatMap((value) => value.split(",")).map((origin) => origin.trim());
  for (const origin of origins) {
    if (origin === "*") continue;
    let canonical: string | undefined;
    try {
      canonical = new URL(origin).origin;
    } catch {
      // not a URL at all
    }
    if (canonical !== origin || !/^https?:/.test(origin)) {
      const hint = canonical && canonical !== "null" ? ` (did you mean "${canonical}"?)` : "";
      throw new RangeError(
        `"${origin}" is not an origin: expected scheme://host[:port] as a browser sends it, ` +
          `e.g. https://example.com, or *${hint}`,
      );
    }
  }
  return [...new Set(origins)];
}

/** An app, as far as its routes go (a Hono app). */
export interface Routed {
  readonly routes: RouterRoute[];
}

/** Options of {@link httpRules}. */
export interface HttpRulesOptions {
  /**
   * Origins whose pages may also write (register, heartbeat, leave, publish); `*` for any.
   * Pages of every origin may read. @default []
   */
  cors?: readonly string[];
}

/** What answers a request: a Hono app's `fetch`. */
export type Fetch<E = unknown, X = unknown> = (
  request: Request,
  env?: E,
  executionCtx?: X,
) => Response | Promise<Response>;

/**
 * `fetch` with the rules every request meets, around the routes: the 414, CORS preflights and
 * headers (see {@link CorsPolicy}), and `HEAD`'s `Content-Length`; answer unknown routes with
 * {@link methodNotAllowed}.
 *
 * Around the app, not a Hono middleware: with a middleware Hono runs every route through its
 * compose chain, about 3 µs a request; a lone handler it calls directly. CORS headers go on the
 * answer once the route has made it, in place. (hono/cors sets them before the route runs, and
 * Hono then copies the route's whole answer to merge them: about 10 µs a request, more than the
 * rest of a heartbeat.)
 */
export function httpRules<E, X>(
  app: Routed,
  fetch: Fetch<E, X>,
  cors: CorsPolicy,
): Fetch<E, X> {
  const methodsOf = methodTable(app);
  return (request, env, executionCtx) => {
    const method = request.method;
    if (tooLong(request.url)) {
      const message = `The request target is longer than ${MAX_TARGET} bytes`;
      const answer = Response.json(errorBody(ERROR_CODES[414], message), { status: 414 });
      return cors.apply(answer, request);
    }
    if (method === "OPTIONS") {
      const origin = request.headers.get("origin");
      const asked = request.headers.get("access-control-request-method");
      // A CORS preflight. Only one for a route is answered here: another OPTIONS goes on, to a
      // 405 (or a 404).
      const methods = origin !== null && asked !== null
        ? methodsOf(new URL(request.url).pathname)
        : undefined;
      if (methods !== undefined) return cors.preflight(asked!, origin!, methods);
    }
    if (method === "HEAD") {
      return head(fetch, request, env, executionCtx).then((answer) => cors.apply(answer, request));
    }
    const answer = fetch(request, env, executionCtx);
    return answer instanceof Promise
      ? answer.then((made) => cors.apply(made, request))
      : cors.apply(answer, request);
  };
}

/** Which origins' pages may read and write, and the headers that say so. */
export class CorsPolicy {
  readonly #anyWriter: boolean;
  readonly #writers: Set<string>;
  /** With origins named, whether a write's answer lets a page read it depends on its Origin. */
  readonly #varies: boolean;

  /** `origins`: as {@link HttpRulesOptions.cors}; a RangeError for one that is not an origin. */
  constructor(origins: readonly string[] = []) {
    const parsed = corsOrigins(origins);
    this.#anyWriter = parsed.includes("*");
    this.#writers = new Set(parsed);
    this.#varies = this.#writers.size > 0 && !this.#anyWriter;
  }

  /**
   * `answer` to `request`, with its CORS headers when `request` has an Origin: only a page's
   * request has one, and a header set on an answer already made costs a request a tenth of its
   * CPU.
   */
  apply(answer: Response, request: Request): Response {
    const origin = request.headers.get("origin");
    if (origin === null) return answer;
    const method = request.method === "HEAD" ? "GET" : request.method;
    const { headers } = answer;
    const allowed = this.#allowOrigin(method, origin);
    if (allowed !== undefined) headers.set("access-control-allow-origin", allowed);
    headers.set("access-control-expose-headers", EXPOSED_HEADERS);
    if (this.#varies && !READS.has(method)) headers.append("vary", "Origin");
    return answer;
  }

  /** The answer to a preflight from `origin` asking for `asked`, to a route that takes `methods`. */
  preflight(asked: string, origin: string, methods: string[]): Response {
    const mayWrite = this.#anyWriter || this.#writers.has(origin);
    const headers = new Headers({
      "access-control-allow-methods": methods
        .filter((method) => READS.has(method) || mayWrite).join(", "),
      "access-control-allow-headers": ALLOWED_HEADERS,
      "access-control-max-age": PREFLIGHT_MAX_AGE,
      vary: "Origin",
    });
    // None for a method this origin may not use: the browser then never sends the request.
    const allowed = this.#allowOrigin(asked.toUpperCase(), origin);
    if (allowed !== undefined) headers.set("access-control-allow-origin", allowed);
    return new Response(null, { status: 204, headers });
  }

  /** The Access-Control-Allow-Origin of a request of `method` from `origin`, if any. */
  #allowOrigin(method: string, origin: string | null): string | undefined {
    if (READS.has(method) || this.#anyWriter) return "*";
    return origin !== null && this.#writers.has(origin) ? origin : undefined;
  }
}

/**
 * The answer to a `HEAD`: its GET's headers and status, with the `Content-Length` of its body
 * (RFC 9110 9.3.2), and no body. (Hono answers a HEAD with its GET's answer, and drops the body
 * after, and Deno would then send a length of 0.)
 */
async function head<E, X>(
  fetch: Fetch<E, X>,
  request: Request,
  env?: E,
  executionCtx?: X,
): Promise<Response> {
  const get = new Request(request.url, { method: "GET", headers: request.headers });
  const answer = await fetch(get, env, executionCtx);
  const headers = new Headers(answer.headers);
  if (answer.body !== null && !headers.has("content-length")) {
    headers.set("content-length", String((await answer.arrayBuffer()).byteLength));
  } else await answer.body?.cancel();
  return new Response(null, { status: answer.status, statusText: answer.statusText, headers });
}

/**
 * The 405 of a method that `c`'s path does not take, with `Allow` listing the ones it does; or
 * undefined when no route has that path, or the route that has it answered a 404.
 */
export function methodNotAllowed(c: Context, app: Routed): Response | undefined {
  const methods = methodTable(app)(c.req.path);
  // No route has the path; or one has it and the method, and found nothing there (a 404 too).
  if (methods === undefined || methods.includes(c.req.method)) return undefined;
  const allow = methods.join(", ");
  const message = `"${c.req.path}" answers ${allow}, not ${answeredMethod(c)}`;
  return c.json(errorBody(ERROR_CODES[405], message), 405, { allow });
}

/**
 * The method an answer names: GET for a HEAD, whose answer is GET's without the body (RFC 9110
 * 9.3.2), to the byte, so that its Content-Length is GET's.
 */
export function answeredMethod(c: Context): string {
  return c.req.method === "HEAD" ? "GET" : c.req.method;
}

/** Whether the request target (path and query) of `url` is longer than {@link MAX_TARGET}. */
function tooLong(url: string): boolean {
  if (url.length <= MAX_TARGET) return false; // the usual: no need to find where the path starts
  return url.length - url.indexOf("/", url.indexOf("//") + 2) > MAX_TARGET;
}

/** The methods each path takes, from the app's routes: looked up by path. */
type MethodTable = (path: string) => string[] | undefined;

/** One table per app. */
const methodTables = new WeakMap<Routed, MethodTable>();

/**
 * The methods `path` takes (`GET` brings `HEAD`), sorted, or undefined when no route has it.
 * Built from the routes as they are when first asked, and again whenever routes were added.
 */
function methodTable(app: Routed): MethodTable {
  const known = methodTables.get(app);
  if (known) return known;
  let built: { count: number; table: { pattern: RegExp; methods: string[] }[] } | undefined;
  const lookup: MethodTable = (path) => {
    const all = app.routes;
    if (built?.count !== all.length) built = { count: all.length, table: tableOf(all) };
    return built.table.find(({ pattern }) => pattern.test(path))?.methods;
  };
  methodTables.set(app, lookup);
  return lookup;
}

function tableOf(routes: RouterRoute[]): { pattern: RegExp; methods: string[] }[] {
  const byPath = new Map<string, Set<string>>();
  for (const { method, path } of routes) {
    if (method === "ALL") continue; // middleware, not a route
    let methods = byPath.get(path);
    if (methods === undefined) byPath.set(path, methods = new Set());
    methods.add(method);
    if (method === "GET") methods.add("HEAD");
  }
  return [...byPath].map(([path, methods]) => ({
    pattern: new RegExp(
      "^" +
        path.split("/").map((part) =>
          part.startsWith(":") ? "[^/]+" : part.replace(/[.*+?^${}()|[\]\\]/g, "\\$&")
        ).join("/") + "$",
    ),
    methods: [...methods].sort(),
  }));
}
