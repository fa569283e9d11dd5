/**
 * The player's `GET /events` (see player.ts): the map's updates as server-sent events, and
 * {@link Origins}, which remembers where held fragments came from for a page that opens late.
 * @module
 */
import type { Manifest } from "../split.ts";
import type { FragmentEvent, PlayerSource } from "./player.ts";

const HEARTBEAT_MS = 15_000;
const MANIFEST_POLL_MS = 250;
/** Events queued for a page that stopped reading; past this it is cut off (it reconnects). */
const MAX_QUEUED_EVENTS = 1000;
const encoder = new TextEncoder();

/**
 * Where the held fragments came from, for a page that opens after they arrived: the holder of
 * each fragment fetched since the player started (the source's snapshot may have forgotten),
 * and which fragments the store held at the start. At most one entry per fragment name seen.
 */
export class Origins {
  readonly #from = new Map<string, string>();
  readonly #atStart: Set<string>;
  readonly #unsubscribe: () => void;

  constructor(source: PlayerSource) {
    this.#atStart = new Set(source.store.list().map((f) => f.name));
    this.#unsubscribe = source.onEvent(({ name, state, from }) => {
      if (state === "held" && from) this.#from.set(name, from);
      // It left the store (and may come back from someone else): no longer held since the start.
      if (state === "missing" || state === "failed") this.#atStart.delete(name);
    });
  }

  /** `event` with the holder it came from, or marked held at start, where the source says neither. */
  explain(event: FragmentEvent): FragmentEvent {
    if (event.state !== "held" || event.from) return event;
    const from = this.#from.get(event.name);
    if (from) return { ...event, from };
    return this.#atStart.has(event.name) ? { ...event, heldAtStart: true } : event;
  }

  stop(): void {
    this.#unsubscribe();
  }
}

/**
 * `GET /events`: the manifest (once the store has one), a snapshot of every fragment, then each
 * event as it happens; a comment every 15 s keeps proxies from closing an idle stream.
 */
export function serveEvents(
  source: PlayerSource,
  origins: Origins,
  request: Request,
  closing: AbortSignal,
): Response {
  const headers = {
    "content-type": "text/event-stream; charset=utf-8",
    // no-transform also keeps Deno from compressing, which would hold events back.
    "cache-control": "no-cache, no-transform",
  };
  if (request.method === "HEAD") {
    // An empty stream, not null: Deno would say `content-length: 0` of a stream with no end.
    return new Response(new ReadableStream({ start: (controller) => controller.close() }), {
      headers,
    });
  }
  const stops: (() => void)[] = [];
  const stop = () => stops.splice(0).forEach((fn) => fn());
  const body = new ReadableStream<Uint8Array>({
    start(controller) {
      const write = (chunk: string) => {
        if ((controller.desiredSize ?? 0) < -MAX_QUEUED_EVENTS) {
          stop(); // EventSource reconnects and starts again from a fresh snapshot
          controller.error(new Error("The page stopped reading events"));
          return;
        }
        controller.enqueue(encoder.encode(chunk));
      };
      const send = (event: string, data: unknown) =>
        write(`event: ${event}\ndata: ${JSON.stringify(data)}\n\n`);
      const introduce = (manifest: Manifest) => {
        const { file, mime, size, fragments } = manifest;
        send("manifest", {
          file,
          mime,
          size,
          fragments: fragments.map(({ index, name, offset, size }) => ({
            index,
            name,
            offset,
            size,
          })),
        });
        send("snapshot", source.snapshot().map((event) => origins.explain(event)));
      };

      stops.push(source.onEvent((event) => send("fragment", event)));
      const heartbeat = setInterval(() => write(": heartbeat\n\n"), HEARTBEAT_MS);
      stops.push(() => clearInterval(heartbeat));
      const onClosing = () => {
        stop();
        controller.close(); // what is queued still goes out
      };
      closing.addEventListener("abort", onClosing);
      stops.push(() => closing.removeEventListener("abort", onClosing));

      const manifest = source.store.manifest;
      if (manifest) return introduce(manifest);
      // An empty viewer learns the manifest later (from the directory); the store has no
      // event for that, so look now and then until it is there.
      send("snapshot", []);
      source.findManifest?.().catch((error) =>
        send("problem", { message: error instanceof Error ? error.message : String(error) })
      );
      const poll = setInterval(() => {
        const manifest = source.store.manifest;
        if (!manifest) return;
        clearInterval(poll);
        introduce(manifest);
      }, MANIFEST_POLL_MS);
      stops.push(() => clearInterval(poll));
    },
    cancel: stop, // the page went away
  }, new CountQueuingStrategy({ highWaterMark: 16 }));
  return new Response(body, { headers });
}
