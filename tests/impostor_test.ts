/**
 * Content-addressed files against an impostor, with real peer processes: an impostor publishes
 * its own `sample.webm` first, and a viewer still gets the real bytes (named by id), never asks
 * the impostor, and is told, not guessed for, when it names the shared name.
 * @module
 */
import { join } from "node:path";
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { Child, peerArgs, runTask, startTask, tempDir } from "./_util.ts";
import { DirectoryClient, startDirectory } from "../directory.ts";
import { type Manifest, SAMPLE_VIDEO, splitFile } from "../split.ts";

async function eventually(what: string, check: () => Promise<boolean>): Promise<void> {
  const deadline = Date.now() + 15_000;
  while (!(await check())) {
    if (Date.now() > deadline) throw new Error(`Timed out waiting until ${what}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A seeding peer of store `dir` (its console off), once it listens. */
async function seed(dir: string, directory: string): Promise<{ child: Child; port: number }> {
  const child = startTask("peer", ["0", ...peerArgs(dir, directory), "--no-console"]);
  const port = Number((await child.waitFor(/Node listening on port (\d+)/))[1]);
  return { child, port };
}

Deno.test("an impostor's same-named file never reaches a viewer that names the real one by id", async () => {
  await using dir = await tempDir();
  // The impostor's sample.webm: other bytes under the same name, split the same way.
  const fakeVideo = join(dir.path, "fake", "sample.webm");
  await Deno.mkdir(join(dir.path, "fake"));
  const real = await Deno.readFile(SAMPLE_VIDEO);
  await Deno.writeFile(fakeVideo, real.map((byte) => byte ^ 0x5a));
  const fake: Manifest = await splitFile(fakeVideo, {
    out: join(dir.path, "fake", "fragments"),
    peers: ["seed"],
  });
  const genuine: Manifest = await splitFile(SAMPLE_VIDEO, {
    out: join(dir.path, "real"),
    peers: ["seed"],
  });
  assert(fake.sha256 !== genuine.sha256);
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);

  // The impostor publishes first, as it did when it owned the name.
  const impostor = await seed(join(dir.path, "fake", "fragments", "seed"), directory.url);
  await using _impostor = impostor.child;
  await eventually("the impostor published", async () => (await client.listFiles()).length === 1);
  const honest = await seed(join(dir.path, "real", "seed"), directory.url);
  await using _honest = honest.child;
  await eventually("both files are listed, each with its seeder", async () => {
    const files = await client.listFiles();
    return files.length === 2 && files.every((file) => file.seeders === 1);
  });
  const ids = (await client.listFiles()).map((file) => file.id).sort();
  assertEquals(ids, [fake.sha256, genuine.sha256].sort());

  // The shared name, or no name at all, is refused, listing both files with their seeders.
  for (const named of [["--file", "sample.webm"], []]) {
    const refused = await runTask("peer", [
      "0",
      ...peerArgs(join(dir.path, `refused${named.length}`), directory.url),
      "--no-console",
      "--fetch-all",
      "--exit-when-done",
      ...named,
    ]);
    assert(refused.code !== 0, refused.stderr);
    for (const id of ids) assertMatch(refused.stderr, new RegExp(`${id.slice(0, 12)}.*1 seeder`));
  }

  // Named by a prefix of its id, the real file arrives whole, and the impostor is never asked.
  const viewerDir = join(dir.path, "viewer");
  const viewer = await runTask("peer", [
    "0",
    ...peerArgs(viewerDir, directory.url),
    "--no-console",
    "--fetch-all",
    "--exit-when-done",
    "--file",
    genuine.sha256.slice(0, 8),
  ]);
  assertEquals(viewer.code, 0, viewer.stderr);
  assertMatch(viewer.stdout, /'sample\.webm' complete: \d+\/\d+ fragments, sha256 verified/);
  assertEquals(await Deno.readFile(join(viewerDir, "sample.webm")), real);
  assert(!/Connected from/.test(impostor.child.stdout), impostor.child.stdout);
  // The directory lists each holder under its own file only.
  const holders = await client.locate("fragment_0.bin", { file: genuine.sha256 });
  assert(holders.every((holder) => holder.fileId === genuine.sha256), JSON.stringify(holders));
  assert(!holders.some((holder) => holder.port === impostor.port), JSON.stringify(holders));
});
