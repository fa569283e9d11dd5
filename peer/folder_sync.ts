/**
 * Keeps a running peer's store true to its folder. Fragments removed or changed behind its back
 * (`deno task split --peers` dealing the folder anew, a user's `rm`) stop being offered, and the
 * directory hears so at once; fragments copied in are offered once they verify. Until then, a
 * peer went on listing what it no longer had, and answered NOT_FOUND to each peer it sent there.
 *
 * It polls instead of watching: a few stats every few seconds behave the same on every
 * filesystem, where inotify misses changes made from outside a container's bind mount.
 * @module
 */
import type { Store } from "./store.ts";

/** How often the folder is looked at. */
export const FOLDER_SYNC_MS = 2_000;

/** What changed in the folder since the last look, by fragment name. */
export interface FolderChange {
  lost: string[];
  found: string[];
  /** New in the folder but failing its hash: quarantined, never offered (see Store.adopt). */
  corrupt: string[];
}

/** Looks at `store`'s folder every `intervalMs` until disposed; `onChange` hears what changed. */
export function syncWithFolder(
  store: Store,
  onChange: (change: FolderChange) => void,
  { intervalMs = FOLDER_SYNC_MS } = {},
): Disposable {
  let timer: ReturnType<typeof setTimeout> | undefined;
  let stopped = false;
  const look = async () => {
    const lost = await store.prune();
    const held = new Set(store.list().map((f) => f.name));
    const names = store.manifest?.fragments.map((f) => f.name) ?? [];
    const quarantined = new Set(names.filter((name) => store.isQuarantined(name)));
    await store.adoptAll(); // verifies each new fragment against the manifest before holding it
    const found = store.list().map((f) => f.name).filter((name) => !held.has(name));
    const corrupt = names.filter((name) => store.isQuarantined(name) && !quarantined.has(name));
    if (lost.length + found.length + corrupt.length > 0) onChange({ lost, found, corrupt });
  };
  const next = () => {
    timer = setTimeout(async () => {
      // A folder that cannot be read this time (gone, or its permissions changed) is looked at
      // again next time; what is held stays as it was.
      await look().catch(() => {});
      if (!stopped) next();
    }, intervalMs);
  };
  next();
  return {
    [Symbol.dispose]() {
      stopped = true;
      clearTimeout(timer);
    },
  };
}
