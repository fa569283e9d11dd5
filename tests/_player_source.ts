/**
 * A swarm-less {@link PlayerSource} for the player's tests: it fetches from fixed holders, so a
 * test controls exactly what arrives when; and {@link startScene}, a seeder, a viewer store and
 * the player over it.
 * @module
 */
import { join } from "node:path";
import { Fetcher, type Holder, holderAddress } from "../peer/fetch.ts";
import {
  type FragmentEvent,
  type PlayerServer,
  type PlayerSource,
  startPlayer,
} from "../peer/player.ts";
import { Store } from "../peer/store.ts";
import { startTcpServer } from "../peer/tcp.ts";
import { type Manifest, MANIFEST_NAME, SAMPLE_VIDEO, splitFile } from "../split.ts";

/** A {@link PlayerSource} that also lists the `need()` calls made for missing fragments. */
export interface FetchingSource extends PlayerSource {
  readonly needed: string[];
}

/**
 * A PlayerSource without the swarm: `need()` fetches from fixed `holders` through `fetcher`,
 * `concurrency` at a time, first asked first served; a fragment already on its way is joined,
 * not fetched twice. It ignores the abort signal, as a swarm may (the fetch is still useful).
 */
export function fetchingSource(
  store: Store,
  fetcher: Fetcher,
  holders: Holder[],
  concurrency = 1,
): FetchingSource {
  const listeners = new Set<(event: FragmentEvent) => void>();
  const states = new Map<string, FragmentEvent>();
  const fetching = new Map<string, Promise<void>>();
  const needed: string[] = [];
  const turns: (() => void)[] = [];
  let free = concurrency;

  const emit = (event: FragmentEvent) => {
    states.set(event.name, event);
    for (const listener of listeners) listener(event);
  };

  async function fetchOne(name: string, index: number): Promise<void> {
    if (free > 0) free--;
    else await new Promise<void>((resolve) => turns.push(resolve));
    const first = holders[0];
    emit({ name, index, state: "inflight", from: first && holderAddress(first.host, first.port) });
    try {
      emit({ name, index, state: "held", from: await fetcher.fetch(name, holders) });
    } catch (error) {
      emit({ name, index, state: "failed" });
      throw error;
    } finally {
      const next = turns.shift();
      if (next) next();
      else free++;
    }
  }

  return {
    store,
    needed,
    need(name) {
      if (store.get(name)) return Promise.resolve();
      needed.push(name);
      const entry = store.manifest?.fragments.find((f) => f.name === name);
      if (!entry) return Promise.reject(new Error(`Unknown fragment '${name}'`));
      let fetch = fetching.get(name);
      if (!fetch) {
        fetch = fetchOne(name, entry.index).finally(() => fetching.delete(name));
        fetching.set(name, fetch);
      }
      return fetch;
    },
    onEvent(listener) {
      listeners.add(listener);
      return () => listeners.delete(listener);
    },
    snapshot() {
      return (store.manifest?.fragments ?? []).map((f) =>
        store.get(f.name)
          ? { ...states.get(f.name), name: f.name, index: f.index, state: "held" }
          : states.get(f.name) ?? { name: f.name, index: f.index, state: "missing" }
      );
    },
  };
}

/** The player over a viewer store, a seeder behind it; dispose it to stop them all. */
export interface Scene extends AsyncDisposable {
  manifest: Manifest;
  /** The original file's bytes. */
  video: Uint8Array;
  viewer: Store;
  source: FetchingSource;
  player: PlayerServer;
  /** `http://127.0.0.1:<port>` */
  url: string;
  /** `<url>/stream/<file>` */
  stream: string;
  /** `127.0.0.1:<port>` of the seeder's TCP server. */
  seeder: string;
}

/** What {@link startScene} sets up. */
export interface SceneOptions {
  /** The file to split. @default the sample video */
  video?: string;
  fragments?: number;
  /** Indexes of the fragments the viewer starts with. @default all */
  held?: number[];
  /** Whether the viewer starts with the manifest. @default true */
  withManifest?: boolean;
  /** Indexes of fragments the seeder lacks too, so nobody can provide them. */
  lost?: number[];
  waitMs?: number;
  /** Wraps the source, e.g. to make need() hang. */
  wrap?: (source: FetchingSource) => PlayerSource;
}

/** A seeder with the whole file on TCP, a viewer holding `held`, and the player over it. */
export async function startScene(root: string, options: SceneOptions = {}): Promise<Scene> {
  const { video = SAMPLE_VIDEO, fragments = 10, withManifest = true, lost = [] } = options;
  const seederDir = join(root, "seeder");
  const viewerDir = join(root, "viewer");
  const manifest = await splitFile(video, { out: seederDir, fragments });
  const held = options.held ?? manifest.fragments.map((f) => f.index);
  await Deno.mkdir(viewerDir);
  if (withManifest) {
    await Deno.copyFile(join(seederDir, MANIFEST_NAME), join(viewerDir, MANIFEST_NAME));
  }
  for (const index of held) {
    const { name } = manifest.fragments[index]!;
    await Deno.copyFile(join(seederDir, name), join(viewerDir, name));
  }
  for (const index of lost) await Deno.remove(join(seederDir, manifest.fragments[index]!.name));

  const seeder = startTcpServer(await Store.open(seederDir), { port: 0, hostname: "127.0.0.1" });
  const viewer = await Store.open(viewerDir);
  const fetcher = new Fetcher(viewer);
  const source = fetchingSource(viewer, fetcher, [
    { host: "127.0.0.1", port: seeder.port, grpcPort: 1 },
  ]);
  const player = startPlayer(options.wrap?.(source) ?? source, {
    port: 0,
    hostname: "127.0.0.1",
    waitMs: options.waitMs,
  });
  const url = `http://127.0.0.1:${player.port}`;
  return {
    manifest,
    video: await Deno.readFile(video),
    viewer,
    source,
    player,
    url,
    stream: `${url}/stream/${manifest.file}`,
    seeder: `127.0.0.1:${seeder.port}`,
    async [Symbol.asyncDispose]() {
      await player.close();
      fetcher[Symbol.dispose]();
      await seeder.close();
    },
  };
}

/** fetch() and the whole body. */
export async function get(url: string, init: RequestInit = {}) {
  const response = await fetch(url, init);
  return { response, body: new Uint8Array(await response.arrayBuffer()) };
}

/** Request options with a Range header. */
export const range = (value: string) => ({ headers: { range: value } });
