/**
 * A swarm-less {@link PlayerSource} for the player's unit tests: it fetches from fixed holders,
 * so a test controls exactly what arrives when.
 * @module
 */
import { type Fetcher, type Holder, holderAddress } from "../peer/fetch.ts";
import type { FragmentEvent, PlayerSource } from "../peer/player.ts";
import type { Store } from "../peer/store.ts";

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
