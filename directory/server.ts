/**
 * The directory's HTTP server. It accepts connections itself, and runs Deno's HTTP server on
 * each: Deno.serve's own accept loop ends the whole server on the first accept error, so running
 * out of file descriptors (EMFILE) killed the directory. Here an accept error costs a retry,
 * and an idle connection is closed to make room. Connections are capped, in all and per client
 * address; one that sends no request for `headerTimeout` seconds (after it opened, or after its
 * last answer) is closed, and when the server is full a new one takes the place of the
 * connection that has waited longest for a request. Only connections that are in the middle of
 * a request keep their place; a request's body has its own deadline (in the app).
 *
 * Deno 2.9.6 offers HTTP on one connection only as an internal, `serveHttpOnConnection` (what
 * Deno.serve runs per connection); {@link serveConnections} refuses to start without it, so a
 * Deno that lacks it fails loudly rather than serving without these limits.
 * @module
 */
import { describe } from "../common/cli.ts";
// Not schemas.ts: the peer's player runs on this accept loop, and must not load zod with it.
import {
  DEFAULT_HEADER_TIMEOUT,
  DEFAULT_MAX_CONNECTIONS,
  DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
} from "./limits.ts";
import { ERROR_CODES, errorBody } from "./protocol.ts";

/** What answers a request: `app.fetch` of a Hono app, say. */
export type Handler = (
  request: Request,
  info: Deno.ServeHandlerInfo<Deno.NetAddr>,
) => Response | Promise<Response>;

/** Deno's HTTP server on one connection (ext/http/00_serve.ts). */
type ServeOnConnection = (
  connection: Deno.Conn,
  signal: AbortSignal,
  handler: Handler,
  onError: (error: unknown) => Response,
  onListen: () => void,
) => { finished: Promise<void>; shutdown(): Promise<void> };

const serveOnConnection = (() => {
  const key = (Deno as unknown as { internal?: symbol }).internal;
  const internals = key === undefined
    ? undefined
    : (Deno as unknown as Record<symbol, unknown>)[key];
  const serve = (internals as { serveHttpOnConnection?: unknown } | undefined)
    ?.serveHttpOnConnection;
  return typeof serve === "function" ? serve as ServeOnConnection : undefined;
})();

/** Limits of {@link serveConnections}. */
export interface ConnectionLimits {
  /** Connections open at once at most. @default 1024 */
  maxConnections?: number;
  /** Connections open at once from one client address at most. @default 64 */
  maxConnectionsPerAddress?: number;
  /**
   * Seconds a connection may go without a request: to send a request's headers once it
   * opened, or once it had its last answer. @default 30
   */
  headerTimeout?: number;
}

/** Options of {@link serveConnections}. */
export interface ServeOptions extends ConnectionLimits {
  hostname: string;
  /** 0 picks any free port. */
  port: number;
  /** Where the few lines worth a log go (accepting failed, or started again). */
  warn?: (line: string) => void;
  /** Who the log lines and the 503 speak for: `[DIRECTORY] ...`, "The directory has ...". */
  name?: string;
  /**
   * A connection keeps its place until its answer's body is all sent, not only until the
   * handler returns: for answers that stream for long (server-sent events, video). @default false
   */
  busyUntilSent?: boolean;
}

/** A running server. */
export interface ConnectionServer {
  readonly addr: Deno.NetAddr;
  /** Connections open now. */
  readonly connections: number;
  /** Resolves once the server has stopped. */
  readonly finished: Promise<void>;
  /** Stops accepting, lets requests in flight finish (closing them after a few seconds) and stops. */
  shutdown(): Promise<void>;
}

/** When accepting fails, wait this long before trying again, doubling up to the max. */
const ACCEPT_BACKOFF_MS = 5;
const MAX_ACCEPT_BACKOFF_MS = 1_000;
/**
 * Accepting works again once it has not failed for this long: out of descriptors, accepts fail
 * and succeed by turns (each eviction lets one in), and that is one episode, said once.
 */
const ACCEPT_QUIET_MS = 1_000;
/** How long a shutdown lets requests in flight finish before it closes their connections. */
const SHUTDOWN_GRACE_MS = 3_000;

/** The 503 that refuses a connection there is no room for, in the words of `name`. */
function refusal(name: string): Uint8Array {
  const body = JSON.stringify(errorBody(
    ERROR_CODES[503],
    `The ${name} has as many connections as it may, all of them busy; try again in a second`,
  ));
  return new TextEncoder().encode(
    "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n" +
      `retry-after: 1\r\nconnection: close\r\ncontent-length: ${body.length}\r\n\r\n${body}`,
  );
}

/**
 * What the handler learns of a request besides itself: its connection's address, known once
 * per connection (Deno's own info asks the runtime each time).
 */
class RequestInfo implements Deno.ServeHandlerInfo<Deno.NetAddr> {
  readonly #info: Deno.ServeHandlerInfo;

  constructor(readonly remoteAddr: Deno.NetAddr, info: Deno.ServeHandlerInfo) {
    this.#info = info;
  }

  get completed(): Promise<void> {
    return this.#info.completed;
  }
}

/** One accepted connection. */
class Connection {
  /** Requests being answered: the handler has them and has not returned yet. */
  inFlight = 0;
  /** Since when it has waited for a request (meaningful while inFlight is 0). */
  waitingSince: number;
  readonly #abort = new AbortController();

  constructor(readonly address: string, now: number) {
    this.waitingSince = now;
  }

  get signal(): AbortSignal {
    return this.#abort.signal;
  }

  /** Closes it at once, whatever it was doing. */
  close(): void {
    this.#abort.abort();
  }
}

/**
 * The connections open, in all and per client address. Which of them wait for a request is
 * read off each connection when room is needed (a scan, only when the server or an address is
 * full) rather than kept in order on every request: a request costs two counter updates.
 */
class Slots {
  readonly open = new Set<Connection>();
  readonly #byAddress = new Map<string, Set<Connection>>();

  constructor(readonly max: number, readonly maxPerAddress: number) {}

  /**
   * Makes room for a connection from `address`, closing the one that has waited longest for a
   * request where the server or that address is full; false when every one there is busy.
   */
  admit(address: string): boolean {
    const mine = this.#byAddress.get(address);
    if (mine !== undefined && mine.size >= this.maxPerAddress && !this.#evict(mine)) return false;
    return this.open.size < this.max || this.#evict(this.open);
  }

  add(connection: Connection): void {
    this.open.add(connection);
    let mine = this.#byAddress.get(connection.address);
    if (mine === undefined) {
      mine = new Set();
      this.#byAddress.set(connection.address, mine);
    }
    mine.add(connection);
  }

  /** It closed: its place is free (once only). */
  remove(connection: Connection): void {
    if (!this.open.delete(connection)) return;
    const mine = this.#byAddress.get(connection.address)!;
    mine.delete(connection);
    if (mine.size === 0) this.#byAddress.delete(connection.address);
  }

  /** Closes the connection that has waited longest for a request; false when none waits. */
  evictIdlest(): boolean {
    return this.#evict(this.open);
  }

  /** Closes every connection that has waited for a request since before `before`. */
  closeWaitingSince(before: number): void {
    for (const connection of this.open) {
      if (connection.inFlight === 0 && connection.waitingSince < before) this.#close(connection);
    }
  }

  /**
   * Closes the connection of `among` that has waited longest for a request; false when none
   * waits.
   */
  #evict(among: Set<Connection>): boolean {
    let idlest: Connection | undefined;
    for (const connection of among) {
      if (connection.inFlight > 0) continue;
      if (idlest === undefined || connection.waitingSince < idlest.waitingSince) {
        idlest = connection;
      }
    }
    if (idlest === undefined) return false;
    this.#close(idlest);
    return true;
  }

  #close(connection: Connection): void {
    connection.close();
    this.remove(connection);
  }
}

/** The address a connection comes from, as the per-address limit counts it. */
function addressOf(conn: Deno.Conn): string {
  const { hostname } = conn.remoteAddr as Deno.NetAddr;
  return hostname.replace(/^::ffff:(?=\d+\.)/, "");
}

/** True for the accept errors that mean this process is out of file descriptors. */
function outOfFiles(error: unknown): boolean {
  return error instanceof Error && /os error 2[34]\)/.test(error.message); // ENFILE, EMFILE
}

/** A whole number of at least 1, or a RangeError naming `option`. */
function count(value: number, option: string): number {
  if (Number.isInteger(value) && value >= 1) return value;
  throw new RangeError(`${option} must be a whole number of at least 1, not ${value}`);
}

/**
 * Serves `handler` over HTTP on `hostname:port`, with the connection limits of
 * {@link ConnectionLimits}. Listening errors (the port is taken, ...) throw as Deno.listen's.
 */
export function serveConnections(options: ServeOptions, handler: Handler): ConnectionServer {
  const name = options.name ?? "directory";
  const tag = `[${name.toUpperCase()}]`;
  if (serveOnConnection === undefined) {
    throw new Error(
      `Deno ${Deno.version.deno} does not offer HTTP on a connection of its own ` +
        `(serveHttpOnConnection); the ${name} needs Deno 2.9.6`,
    );
  }
  const refused = refusal(name);
  const serve = serveOnConnection;
  const slots = new Slots(
    count(options.maxConnections ?? DEFAULT_MAX_CONNECTIONS, "maxConnections"),
    count(
      options.maxConnectionsPerAddress ?? DEFAULT_MAX_CONNECTIONS_PER_ADDRESS,
      "maxConnectionsPerAddress",
    ),
  );
  const timeoutMs = (options.headerTimeout ?? DEFAULT_HEADER_TIMEOUT) * 1000;
  if (!(timeoutMs > 0 && Number.isFinite(timeoutMs))) {
    throw new RangeError(`headerTimeout must be a number above 0, not ${options.headerTimeout}`);
  }
  const warn = options.warn ?? ((line: string) => console.error(line));
  const listener = Deno.listen({ hostname: options.hostname, port: options.port });
  const stop = new AbortController();
  const served = new Map<Connection, { finished: Promise<void>; shutdown(): Promise<void> }>();
  /** When accepting last failed, while it has not been quiet since. */
  let failedAt: number | undefined;
  const sweeper = setInterval(() => {
    const now = Date.now();
    slots.closeWaitingSince(now - timeoutMs);
    if (failedAt !== undefined && now - failedAt >= ACCEPT_QUIET_MS) {
      failedAt = undefined;
      warn(`${tag} Accepting connections again`);
    }
  }, Math.min(ACCEPT_QUIET_MS, timeoutMs / 2));
  const onError = (error: unknown) => {
    console.error(`${tag} A request failed:`, error);
    return Response.json(errorBody(ERROR_CODES[500], "Internal server error"), {
      status: 500,
    });
  };

  function accept(conn: Deno.Conn): void {
    const address = addressOf(conn);
    if (!slots.admit(address)) {
      refuse(conn, refused);
      return;
    }
    const connection = new Connection(address, Date.now());
    slots.add(connection);
    // A connection that has an answer waits for its next request. An error answer may leave a
    // body unread, which Deno then waits for: the header deadline covers that too. (A body
    // that was being read when the answer went, a 408, ends the connection: Deno closes it.)
    const done = () => {
      if (--connection.inFlight === 0) connection.waitingSince = Date.now();
    };
    // Not answer.finally(done): that takes three promises a request, these one.
    const answered = (answer: Response) => {
      done();
      return answer;
    };
    const failed = (error: unknown) => {
      done();
      throw error;
    };
    const remoteAddr = conn.remoteAddr as Deno.NetAddr;
    const onRequest: Handler = (request, info) => {
      connection.inFlight++;
      let answer: Response | Promise<Response>;
      try {
        answer = handler(request, new RequestInfo(remoteAddr, info));
      } catch (error) {
        done();
        throw error;
      }
      if (options.busyUntilSent) {
        // Once the body is all sent, or the connection is gone (then it settles too).
        Promise.resolve(answer).then(() => info.completed).catch(() => {}).finally(done);
        return answer;
      }
      if (answer instanceof Response) {
        done();
        return answer;
      }
      return answer.then(answered, failed);
    };
    const server = serve(conn, connection.signal, onRequest, onError, () => {});
    served.set(connection, server);
    server.finished.catch(() => {}).finally(() => {
      slots.remove(connection);
      served.delete(connection);
    });
  }

  const accepting = (async () => {
    let backoff = 0;
    while (!stop.signal.aborted) {
      let conn: Deno.Conn;
      try {
        conn = await listener.accept();
      } catch (error) {
        if (stop.signal.aborted) break; // the listener was closed
        if (failedAt === undefined) {
          warn(`${tag} Cannot accept connections: ${describe(error)}; retrying`);
        }
        failedAt = Date.now();
        // Out of descriptors: the connection that has waited longest for a request gives one
        // back, so that one waiting in the backlog can come in.
        if (outOfFiles(error)) slots.evictIdlest();
        backoff = Math.min(Math.max(backoff * 2, ACCEPT_BACKOFF_MS), MAX_ACCEPT_BACKOFF_MS);
        await sleep(backoff, stop.signal);
        continue;
      }
      backoff = 0;
      if (stop.signal.aborted) {
        conn.close();
        break;
      }
      accept(conn);
    }
  })();

  let closing: Promise<void> | undefined;
  const shutdown = () =>
    closing ??= (async () => {
      stop.abort();
      clearInterval(sweeper);
      try {
        listener.close();
      } catch {
        // closed already
      }
      await accepting;
      // Requests in flight finish; connections that wait for one close now (Deno's shutdown).
      const all = [...served.values()];
      const grace = setTimeout(() => {
        for (const connection of slots.open) connection.close();
      }, SHUTDOWN_GRACE_MS);
      await Promise.all(all.map((server) => server.shutdown().catch(() => {})));
      await Promise.all(all.map((server) => server.finished.catch(() => {})));
      clearTimeout(grace);
    })();
  const { promise: finished, resolve } = Promise.withResolvers<void>();
  const stopped = () => shutdown().then(resolve);

  return {
    addr: listener.addr as Deno.NetAddr,
    get connections() {
      return slots.open.size;
    },
    finished,
    shutdown: stopped,
  };
}

/** Answers a connection there is no room for with a 503, and closes it. */
function refuse(conn: Deno.Conn, answer: Uint8Array): void {
  // The answer fits in a fresh socket's buffer: the write does not wait for the client.
  conn.write(answer).catch(() => {}).finally(() => {
    try {
      conn.close();
    } catch {
      // closed already
    }
  });
}

/** Resolves after `ms`, or at once when `signal` aborts. */
function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    const timer = setTimeout(wake, ms);
    signal.addEventListener("abort", wake, { once: true });
    function wake() {
      clearTimeout(timer);
      signal.removeEventListener("abort", wake);
      resolve();
    }
  });
}
