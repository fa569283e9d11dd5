/**
 * The directory's HTTP as RFC 9110 and browsers expect it, around its routes: `HEAD` answers
 * with the headers and `Content-Length` of `GET`, a method a path does not take is a 405 with
 * `Allow`, a request target longer than {@link MAX_TARGET} a 414, and CORS lets a page on
 * another origin read (every origin) and write (only the origins `--cors` names).
 * @module
 */
import type { Context, MiddlewareHandler } from "hono";
import type { RouterRoute } from "hono/types";
import { ERROR_CODES, MAX_TARGET } from "./schemas.ts";

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

/**
 * One middleware for every request, ahead of the routes (one step, as the hot paths count
 * them): the 414, CORS preflights and headers, and `HEAD`'s `Content-Length`. Register it with
 * `app.use()` before the routes, and answer unknown routes with {@link methodNotAllowed}.
 *
 * CORS headers go on the answer once the route has made it, in place. (hono/cors sets them
 * before the route runs, and Hono then copies the route's whole answer to merge them: about
 * 10 µs a request, more than the rest of a heartbeat.)
 */
export function httpRules(app: Routed, options: HttpRulesOptions = {}): MiddlewareHandler {
  const origins = corsOrigins(options.cors ?? []);
  const anyWriter = origins.includes("*");
  const writers = new Set(origins);
  // With origins named, whether a write's answer lets a page read it depends on its Origin.
  const varies = writers.size > 0 && !anyWriter;
  const methodsOf = methodTable(app);
  /** The Access-Control-Allow-Origin of a request of `method` from `origin`, if any. */
  const allowOrigin = (method: string, origin: string | undefined) => {
    if (READS.has(method) || anyWriter) return "*";
    return origin !== undefined && writers.has(origin) ? origin : undefined;
  };

  /** The answer to a preflight from `origin` for a route that takes `methods`. */
  function preflight(c: Context, origin: string, methods: string[]): Response {
    const asked = c.req.header("access-control-request-method")!.toUpperCase();
    const mayWrite = anyWriter || writers.has(origin);
    const headers = new Headers({
      "access-control-allow-methods": methods
        .filter((method) => READS.has(method) || mayWrite).join(", "),
      "access-control-allow-headers": ALLOWED_HEADERS,
      "access-control-max-age": PREFLIGHT_MAX_AGE,
      vary: "Origin",
    });
    // None for a method this origin may not use: the browser then never sends the request.
    const allowed = allowOrigin(asked, origin);
    if (allowed !== undefined) headers.set("access-control-allow-origin", allowed);
    return new Response(null, { status: 204, headers });
  }

  return async (c, next) => {
    const method = c.req.method;
    const origin = c.req.header("origin");
    if (tooLong(c.req.url)) {
      const message = `The request target is longer than ${MAX_TARGET} bytes`;
      c.res = c.json({ error: { code: ERROR_CODES[414], message } }, 414);
    } else if (
      method === "OPTIONS" && origin !== undefined &&
      c.req.header("access-control-request-method") !== undefined
    ) {
      // A CORS preflight. Only one for a route is answered here: another OPTIONS goes on, to a
      // 405 (or a 404).
      const methods = methodsOf(c.req.path);
      if (methods !== undefined) {
        c.res = preflight(c, origin, methods);
        return;
      }
      await next();
    } else {
      await next();
    }
    const answer = c.res;
    if (method === "HEAD") await setLength(answer);
    const allowed = allowOrigin(method, origin);
    if (allowed !== undefined) answer.headers.set("access-control-allow-origin", allowed);
    if (origin !== undefined) answer.headers.set("access-control-expose-headers", EXPOSED_HEADERS);
    if (varies && !READS.has(method)) answer.headers.append("vary", "Origin");
  };
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
  return c.json({ error: { code: ERROR_CODES[405], message } }, 405, { allow });
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

/**
 * Gives the answer to a `HEAD` the `Content-Length` of its body: Hono answers a HEAD with its
 * GET's answer, and drops the body after, and Deno would then send a length of 0.
 */
async function setLength(answer: Response): Promise<void> {
  if (answer.body === null || answer.headers.has("content-length")) return;
  const length = (await answer.arrayBuffer()).byteLength;
  answer.headers.set("content-length", String(length));
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
