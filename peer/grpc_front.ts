/**
 * The peer's gRPC port, held by the peer's own process: a plain TCP listener that starts the
 * gRPC server (a supervised child, grpc_supervisor.ts, on a loopback port of its own) only when
 * a client first sends bytes, and then pipes each connection's bytes both ways. A peer that
 * nobody talks gRPC to is one process: no child, no grpc-js. The front also gives gRPC the
 * peer's connection caps (256 in all, 64 per address) and survives running out of descriptors,
 * as the TCP server does (peer/tcp.ts).
 * @module
 */
import { acceptLoop, isConnectionError, within } from "../broker/wire.ts";
import { addressKey, ConnectionCounts, defaultMaxPerAddress } from "../common/connection_counts.ts";
import { describe } from "../common/cli.ts";
import { DEFAULT_PORT } from "./grpc_constants.ts";
import {
  type GrpcSupervisor,
  superviseGrpcServer,
  type SupervisorOptions,
} from "./grpc_supervisor.ts";
import { DEFAULT_MAX_CONNECTIONS } from "./tcp.ts";

/** A connection that sends nothing for this long after it was accepted is closed. */
const DEFAULT_FIRST_BYTE_TIMEOUT_MS = 10_000;
/** How long a connection waits for the server to start or restart before it is closed. */
const DEFAULT_START_TIMEOUT_MS = 20_000;
// After a failed start, connections are closed at once for this long rather than each spawning.
const START_RETRY_MS = 1_000;
const PIPE_BUFFER = 64 * 1024;
const LOOPBACK = "127.0.0.1";

/** What {@link startGrpcFront} listens on, caps, and runs behind it. */
export interface GrpcFrontOptions
  extends Omit<SupervisorOptions, "port" | "hostname" | "samePort"> {
  /** 0 picks a free port. @default 50051 */
  port?: number;
  /** @default "0.0.0.0" */
  hostname?: string;
  /** More connections than this at once are closed as they come. @default 256 */
  maxConnections?: number;
  /** More than this at once from one address (an IPv6 /64 counting as one) are closed. @default 64 */
  maxConnectionsPerAddress?: number;
  /** @default 10_000 */
  firstByteTimeoutMs?: number;
  /** @default 20_000 */
  startTimeoutMs?: number;
}

/** The peer's gRPC port; the server behind it starts on first use. */
export interface GrpcFront extends AsyncDisposable {
  readonly port: number;
  /** How many client connections are open now. */
  readonly connections: number;
  /** The server's supervisor, once a client started it. */
  readonly server: GrpcSupervisor | undefined;
  /** Stops listening, closes the connections, and stops the server if it started. */
  close(): Promise<void>;
}

/**
 * Listens on the gRPC port at once (throwing `Deno.errors.AddrInUse` as `Deno.listen` does) and
 * starts the gRPC server behind it only when a client first sends bytes.
 * @example
 * ```ts
 * await using front = startGrpcFront({ dir: "fragments/6001", port: 50051 });
 * ```
 */
export function startGrpcFront(options: GrpcFrontOptions): GrpcFront {
  const {
    maxConnections = DEFAULT_MAX_CONNECTIONS,
    firstByteTimeoutMs = DEFAULT_FIRST_BYTE_TIMEOUT_MS,
    startTimeoutMs = DEFAULT_START_TIMEOUT_MS,
  } = options;
  const counts = new ConnectionCounts(
    maxConnections,
    options.maxConnectionsPerAddress ?? defaultMaxPerAddress(maxConnections),
  );
  const log = options.onLog ?? ((line: string) => console.error(line));
  const listener = Deno.listen({
    port: options.port ?? DEFAULT_PORT,
    hostname: options.hostname ?? "0.0.0.0",
  });
  /** Client connections and their connections to the server, to close on close(). */
  const open = new Set<Deno.Conn>();
  const handlers = new Set<Promise<void>>();
  const stop = new AbortController();
  let starting: Promise<GrpcSupervisor> | undefined;
  let server: GrpcSupervisor | undefined;
  let failedAt = -Infinity;
  // One line when the server cannot be reached, and none again until it could be.
  let unreachable = false;

  /** The running server, started on first call; a failed start is tried again later. */
  function serverStarted(): Promise<GrpcSupervisor> {
    if (starting) return starting;
    if (Date.now() - failedAt < START_RETRY_MS) return Promise.reject(new NotStarted());
    starting = superviseGrpcServer({
      ...options,
      // Only the front reaches it; a fresh free port at each restart cannot be taken meanwhile.
      port: 0,
      hostname: LOOPBACK,
      samePort: false,
    }).then((started) => server = started, (error) => {
      starting = undefined;
      failedAt = Date.now();
      log(`[gRPC] Cannot start the server: ${describe(error)}`);
      throw new NotStarted();
    });
    return starting;
  }

  /** A connection to the server, waiting while it starts or restarts. */
  async function reachServer(deadline: number): Promise<Deno.TcpConn> {
    const supervisor = await serverStarted();
    for (;;) {
      await within(supervisor.ready(), Math.max(0, deadline - Date.now()));
      if (stop.signal.aborted) throw new Deno.errors.Interrupted("closing");
      try {
        const upstream = await Deno.connect({ hostname: LOOPBACK, port: supervisor.port });
        unreachable = false;
        return upstream;
      } catch (error) {
        // A child that just died still looks ready until its pipes close: try again shortly.
        if (!(error instanceof Deno.errors.ConnectionRefused) || Date.now() > deadline) throw error;
        await new Promise((resolve) => setTimeout(resolve, 50));
      }
    }
  }

  async function serve(conn: Deno.TcpConn): Promise<void> {
    const first = new Uint8Array(PIPE_BUFFER);
    const n = await readWithin(conn, first, firstByteTimeoutMs);
    if (n === null || stop.signal.aborted) return;
    // Read on while the server starts: a client that leaves meanwhile frees its slot at once.
    const buffer = new Uint8Array(PIPE_BUFFER);
    const next = conn.read(buffer).catch(() => null);
    const reaching = reachServer(Date.now() + startTimeoutMs);
    let upstream;
    try {
      upstream = await Promise.race([
        reaching,
        next.then((read) => read === null ? undefined : reaching),
      ]);
    } catch (error) {
      // A start that failed said so already.
      if (!stop.signal.aborted && !unreachable && !(error instanceof NotStarted)) {
        unreachable = true;
        log(`[gRPC] Cannot reach the server: ${describe(error)}; closing connections meanwhile`);
      }
      return;
    }
    if (upstream === undefined) {
      reaching.then(closeQuietly, () => {}); // the client left first
      return;
    }
    open.add(upstream);
    try {
      await writeAll(upstream, first.subarray(0, n));
      const pipes = [pipe(conn, upstream, buffer, next), pipe(upstream, conn, first)];
      // Either side ending ends both: HTTP/2 has no use for a half-closed connection.
      await Promise.race(pipes);
      closeQuietly(upstream);
      closeQuietly(conn);
      await Promise.allSettled(pipes);
    } finally {
      open.delete(upstream);
      closeQuietly(upstream);
    }
  }

  const accepting = acceptLoop(
    listener,
    { tag: "[gRPC]", warn: log, stop: stop.signal },
    (conn) => {
      const address = addressKey(conn.remoteAddr.hostname);
      if (counts.admit(address) !== undefined) {
        // Closed at once: a gRPC client fails UNAVAILABLE. (An HTTP/2 GOAWAY before the close
        // would say why, but sends grpc-js in Deno into a busy loop that ignores its deadline.)
        closeQuietly(conn);
        return;
      }
      open.add(conn);
      const handler: Promise<void> = serve(conn)
        .catch((error) => {
          if (!stop.signal.aborted && !isConnectionError(error)) {
            log(`[gRPC] Dropped a connection: ${describe(error)}`);
          }
        })
        .finally(() => {
          open.delete(conn);
          counts.release(address);
          handlers.delete(handler);
          closeQuietly(conn);
        });
      handlers.add(handler);
    },
  );

  let closing: Promise<void> | undefined;
  function close(): Promise<void> {
    closing ??= (async () => {
      stop.abort();
      closeQuietly(listener);
      for (const conn of open) closeQuietly(conn);
      await Promise.allSettled([accepting, ...handlers]);
      const started = await starting?.catch(() => undefined);
      await started?.close();
    })();
    return closing;
  }

  return {
    port: (listener.addr as Deno.NetAddr).port,
    get connections() {
      return counts.open;
    },
    get server() {
      return server;
    },
    close,
    [Symbol.asyncDispose]: close,
  };
}

/** The server failed to start (and said why), or did a moment ago: the connection is closed. */
class NotStarted extends Error {}

/** Reads once into `buffer`, waiting at most `ms`; null when the client closed or was too slow. */
async function readWithin(
  conn: Deno.Conn,
  buffer: Uint8Array,
  ms: number,
): Promise<number | null> {
  const timer = setTimeout(() => closeQuietly(conn), ms);
  try {
    return await conn.read(buffer);
  } catch (error) {
    if (isConnectionError(error)) return null;
    throw error;
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Copies `from` to `to` until `from` ends; one writer per direction. `pending` is a read into
 * `buffer` already under way, taken first.
 */
async function pipe(
  from: Deno.Conn,
  to: Deno.Conn,
  buffer: Uint8Array,
  pending?: Promise<number | null>,
): Promise<void> {
  for (let n; (n = await (pending ?? from.read(buffer))) !== null; pending = undefined) {
    await writeAll(to, buffer.subarray(0, n));
  }
}

async function writeAll(conn: Deno.Conn, bytes: Uint8Array): Promise<void> {
  for (let written = 0; written < bytes.length;) {
    written += await conn.write(bytes.subarray(written));
  }
}

function closeQuietly(closer: { close(): void }): void {
  try {
    closer.close();
  } catch { /* already closed */ }
}
