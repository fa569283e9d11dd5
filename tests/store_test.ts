import { assert, assertEquals, assertRejects } from "./_assert.ts";
import { createHash } from "node:crypto";
import { join } from "node:path";
import { BadNameError, Store } from "../peer/store.ts";
import { splitFile } from "../split.ts";
import { tempDir } from "./_util.ts";

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

async function* once(bytes: Uint8Array): AsyncGenerator<Uint8Array> {
  yield bytes;
}

async function names(dir: string): Promise<string[]> {
  const found = [];
  for await (const entry of Deno.readDir(dir)) found.push(entry.name);
  return found.sort();
}

/** A store split from a 1,000-byte file in 2 fragments. */
async function splitStore(root: string) {
  const input = join(root, "v.webm");
  const bytes = crypto.getRandomValues(new Uint8Array(1000));
  await Deno.writeFile(input, bytes);
  const dir = join(root, "store");
  const manifest = await splitFile(input, { out: dir, fragments: 2 });
  return { dir, manifest, bytes };
}

Deno.test("Store never holds, adopts or opens a symlink, even without a manifest", async () => {
  await using tmp = await tempDir();
  const dir = join(tmp.path, "store");
  await Deno.mkdir(dir);
  const secret = join(tmp.path, "secret");
  await Deno.writeTextFile(secret, "do not serve me");
  await Deno.symlink(secret, join(dir, "passwd"));
  await Deno.mkdir(join(dir, "folder.bin"));
  const store = await Store.open(dir);
  assertEquals(store.list(), []);
  for (const name of ["passwd", "folder.bin"]) {
    assertEquals(await store.adopt(name), undefined, name);
    assertEquals(await store.open(name), undefined, name);
  }
});

Deno.test("Store stops serving a held fragment once it is swapped for a symlink", async () => {
  await using tmp = await tempDir();
  const dir = join(tmp.path, "store");
  const store = await Store.open(dir);
  const bytes = new TextEncoder().encode("fragment bytes");
  await store.write("a.bin", { size: bytes.length, sha256: sha256(bytes) }, once(bytes));
  const elsewhere = join(tmp.path, "elsewhere");
  await Deno.rename(join(dir, "a.bin"), elsewhere);
  await Deno.symlink(elsewhere, join(dir, "a.bin"));
  assertEquals(await store.open("a.bin"), undefined);
  assertEquals(store.get("a.bin"), undefined);
  assertEquals(await store.prune(), []);
});

Deno.test("Store refuses reserved names: the manifest, hidden names and the joined file", async () => {
  await using tmp = await tempDir();
  const { dir, manifest } = await splitStore(tmp.path);
  const store = await Store.open(dir);
  const bytes = new TextEncoder().encode("x");
  for (const name of ["manifest.json", ".part-x", ".hidden", manifest.file]) {
    await assertRejects(
      () => store.write(name, { size: 1, sha256: sha256(bytes) }, once(bytes)),
      BadNameError,
    );
    assertEquals(await store.adopt(name), undefined, name);
  }
  assertEquals(JSON.parse(await Deno.readTextFile(join(dir, "manifest.json"))), manifest);
});

Deno.test("Store.open() removes what interrupted writes and joins left, and nothing else", async () => {
  await using tmp = await tempDir();
  const { dir } = await splitStore(tmp.path);
  await Deno.writeTextFile(join(dir, ".part-fragment_0.bin-1234"), "partial");
  await Deno.writeTextFile(join(dir, ".v.webm.a1b2c3"), "partial join");
  await Deno.writeTextFile(join(dir, ".keep"), "not ours");
  const store = await Store.open(dir);
  assertEquals(await names(dir), [".keep", "fragment_0.bin", "fragment_1.bin", "manifest.json"]);
  assertEquals(store.list().length, 2);
});

Deno.test("A corrupt fragment is quarantined: never served, not hashed again until it changes", async () => {
  await using tmp = await tempDir();
  const { dir } = await splitStore(tmp.path);
  const path = join(dir, "fragment_1.bin");
  const good = await Deno.readFile(path);
  const bad = good.slice();
  bad[7] ^= 1;
  await Deno.writeFile(path, bad);
  const corrupt: string[] = [];
  const store = await Store.open(dir, (name) => corrupt.push(name));
  assertEquals(corrupt, ["fragment_1.bin"]);
  assert(store.isQuarantined("fragment_1.bin"));
  assertEquals(await store.adopt("fragment_1.bin"), undefined);
  assertEquals(await store.open("fragment_1.bin"), undefined);
  // The good bytes put back with the same size and times: a store that hashed again would adopt
  // them; a quarantined one does not look.
  const { mtime, atime } = await Deno.stat(path);
  await Deno.writeFile(path, good);
  await Deno.utime(path, atime!, mtime!);
  assertEquals(await store.adopt("fragment_1.bin"), undefined);
  // Once the file changes (a new copy), it is checked again.
  await Deno.utime(path, atime!, new Date(mtime!.getTime() + 5000));
  assertEquals((await store.adopt("fragment_1.bin"))?.size, good.length);
  assert(!store.isQuarantined("fragment_1.bin"));
});

Deno.test("Store.relay() passes on a fragment from its first byte: never while its temporary is not made yet", async () => {
  await using dir = await tempDir();
  const { manifest, bytes } = await splitStore(dir.path);
  const [fragment] = manifest.fragments;
  const body = bytes.slice(0, fragment!.size);
  // The relay wakes as the write starts, and may race the temporary's creation: lost only now and
  // then, so it runs many times. The write's last bytes wait for the relay, so it cannot end first.
  for (let round = 0; round < 100; round++) {
    const store = await Store.open(join(dir.path, `relay-${round}`));
    await store.setManifest(manifest);
    using _expecting = store.expect(fragment!.name);
    const relaying = store.relay(fragment!.name);
    await new Promise((resolve) => setTimeout(resolve, 0));
    const relayed = Promise.withResolvers<void>();
    const writing = store.write(
      fragment!.name,
      fragment!,
      (async function* () {
        yield body.subarray(0, 100);
        await relayed.promise;
        yield body.subarray(100);
      })(),
    );
    const relay = await relaying;
    relayed.resolve();
    await writing;
    assert(relay, `round ${round}: the relay found nothing while the fragment was being written`);
    using _relay = relay;
    const passed = [];
    for await (const chunk of relay.chunks) passed.push(...chunk);
    assertEquals(new Uint8Array(passed), body);
  }
});
