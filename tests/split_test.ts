import { assert, assertEquals, assertMatch, assertRejects } from "./_assert.ts";
import { join } from "node:path";
import { createHash } from "node:crypto";
import { DirectoryClient, startDirectory } from "../directory.ts";
import {
  fragmentName,
  fragmentSizes,
  joinFragments,
  type Manifest,
  MAX_FRAGMENTS,
  readManifest,
  SAMPLE_VIDEO,
  SplitError,
  splitFile,
  verifyStore,
} from "../split.ts";
import { randomBytes, runTask, startTask, tempDir } from "./_util.ts";

async function randomFile(path: string, size: number): Promise<Uint8Array> {
  const bytes = randomBytes(size);
  await Deno.writeFile(path, bytes);
  return bytes;
}

function sha256(bytes: Uint8Array): string {
  return createHash("sha256").update(bytes).digest("hex");
}

async function exists(path: string): Promise<boolean> {
  return await Deno.stat(path).then(() => true, () => false);
}

async function listNames(dir: string): Promise<string[]> {
  return (await Array.fromAsync(Deno.readDir(dir))).map((e) => e.name).sort();
}

Deno.test("fragmentSizes() is as even as possible, larger fragments first", () => {
  assertEquals(fragmentSizes(10, 4), [3, 3, 2, 2]);
  assertEquals(fragmentSizes(7, 7), [1, 1, 1, 1, 1, 1, 1]);
  assertEquals(fragmentSizes(4194304, 10)[0], 419431); // the example in DESIGN.md
  assertEquals(fragmentSizes(4194304, 10).reduce((a, b) => a + b), 4194304);
});

for (
  const [size, count] of [
    [1, 1], // one byte
    [1_000_003, 10], // not divisible by N
    [7, 7], // N equal to the size
    [9 * 1024 * 1024 + 3, 3], // fragments spanning several 4 MiB buffers
  ]
) {
  Deno.test(`splitFile() and joinFragments() round-trip ${size} bytes in ${count} fragments`, async () => {
    await using dir = await tempDir();
    const input = join(dir.path, "video.webm");
    const bytes = await randomFile(input, size);
    const out = join(dir.path, "fragments");

    const manifest = await splitFile(input, { fragments: count, out });

    assertEquals(manifest.fragments.length, count);
    assertEquals(manifest.size, size);
    assertEquals(manifest.sha256, sha256(bytes));
    assertEquals(manifest.mime, "video/webm");
    assertEquals(manifest.file, "video.webm");
    for (const f of manifest.fragments) {
      const data = await Deno.readFile(join(out, f.name));
      assertEquals(data, bytes.subarray(f.offset, f.offset + f.size));
      assertEquals(f.sha256, sha256(data));
    }
    assertEquals(await readManifest(out), manifest);
    const output = join(dir.path, "joined.webm");
    await joinFragments(out, output);
    assertEquals(await Deno.readFile(output), bytes);
  });
}

Deno.test("splitFile() writes the manifest DESIGN.md describes", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out });
  const manifest = JSON.parse(await Deno.readTextFile(join(out, "manifest.json")));
  assertEquals(Object.keys(manifest).sort(), [
    "file",
    "fragments",
    "mime",
    "sha256",
    "size",
    "version",
  ]);
  assertEquals(manifest.file, "sample.webm");
  assertEquals(Object.keys(manifest.fragments[0]).sort(), [
    "index",
    "name",
    "offset",
    "sha256",
    "size",
  ]);
  assertEquals(await listNames(out), [
    ...Array.from({ length: 10 }, (_, i) => `fragment_${i}.bin`).sort(),
    "manifest.json",
  ]);
});

Deno.test("splitFile() deals fragments round-robin to peers, each with the manifest", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out, peers: ["6001", "6002", "6003"] });
  assertEquals(await listNames(join(out, "6001")), [
    "fragment_0.bin",
    "fragment_3.bin",
    "fragment_6.bin",
    "fragment_9.bin",
    "manifest.json",
  ]);
  assertEquals(await listNames(join(out, "6003")), [
    "fragment_2.bin",
    "fragment_5.bin",
    "fragment_8.bin",
    "manifest.json",
  ]);
  const report = await verifyStore(join(out, "6002"));
  assertEquals(report.filter((r) => r.status === "ok").map((r) => r.name), [
    "fragment_1.bin",
    "fragment_4.bin",
    "fragment_7.bin",
  ]);
  assertEquals(report.filter((r) => r.status === "missing").length, 7);
});

Deno.test("splitFile() over an earlier, larger split leaves no stale fragment", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out, fragments: 13, peers: ["a", "b"] });
  assert(await exists(join(out, "fragment_12.bin")));
  await Deno.writeTextFile(join(out, "notes.txt"), "mine"); // not ours: left alone

  await splitFile(SAMPLE_VIDEO, { out, fragments: 4, peers: ["a", "b"] });

  assertEquals(await listNames(out), [
    "a",
    "b",
    "fragment_0.bin",
    "fragment_1.bin",
    "fragment_2.bin",
    "fragment_3.bin",
    "manifest.json",
    "notes.txt",
  ]);
  assertEquals(await listNames(join(out, "a")), [
    "fragment_0.bin",
    "fragment_2.bin",
    "manifest.json",
  ]);
  assertEquals((await readManifest(join(out, "a"))).fragments.length, 4);
});

Deno.test("verifyStore() reports ok, missing and corrupt fragments", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out, fragments: 4 });
  await Deno.remove(join(out, "fragment_1.bin"));
  const data = await Deno.readFile(join(out, "fragment_2.bin"));
  data[100]! ^= 1;
  await Deno.writeFile(join(out, "fragment_2.bin"), data);
  await Deno.writeFile(join(out, "fragment_3.bin"), new Uint8Array(3)); // wrong size

  assertEquals(await verifyStore(out), [
    { name: "fragment_0.bin", status: "ok" },
    { name: "fragment_1.bin", status: "missing" },
    { name: "fragment_2.bin", status: "corrupt" },
    { name: "fragment_3.bin", status: "corrupt" },
  ]);
});

Deno.test("joinFragments() names a missing fragment and writes nothing", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out });
  await Deno.remove(join(out, "fragment_4.bin"));
  const before = await listNames(out);
  await assertRejects(() => joinFragments(out), SplitError, "missing fragment_4.bin");
  assertEquals(await listNames(out), before);
});

Deno.test("joinFragments() names a corrupt fragment and leaves no output, not even a temporary", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out });
  const data = await Deno.readFile(join(out, "fragment_7.bin"));
  data[0]! ^= 0xff;
  await Deno.writeFile(join(out, "fragment_7.bin"), data);
  const before = await listNames(out);
  await assertRejects(() => joinFragments(out), SplitError, "corrupt fragment_7.bin");
  assertEquals(await listNames(out), before);
});

Deno.test("joinFragments() of a file hashed on workers joins it whole, and names a corrupt fragment", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "big.bin");
  await randomFile(input, 40 * 1024 * 1024 + 5); // past the size hashed on the main thread
  const out = join(dir.path, "fragments");
  await splitFile(input, { out, fragments: 4 });
  const output = join(dir.path, "joined.bin");
  await joinFragments(out, output);
  assertEquals(await Deno.readFile(output), await Deno.readFile(input));
  await Deno.remove(output);

  // One flipped byte late in the third fragment: only the whole hash sees it in the pass.
  using file = await Deno.open(join(out, "fragment_2.bin"), { read: true, write: true });
  const byte = new Uint8Array(1);
  await file.seek(-7, Deno.SeekMode.End);
  await file.read(byte);
  byte[0]! ^= 0x01;
  await file.seek(-7, Deno.SeekMode.End);
  await file.write(byte);
  await assertRejects(() => joinFragments(out, output), SplitError, "corrupt fragment_2.bin");
  assertEquals(await listNames(dir.path), ["big.bin", "fragments"]);
});

Deno.test("joinFragments() names every fragment of the wrong size and leaves no output", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out });
  const shorter = await Deno.readFile(join(out, "fragment_0.bin"));
  await Deno.writeFile(join(out, "fragment_0.bin"), shorter.subarray(1));
  const longer = await Deno.readFile(join(out, "fragment_5.bin"));
  await Deno.writeFile(join(out, "fragment_5.bin"), new Uint8Array([...longer, 0]));
  const before = await listNames(out);
  const output = join(dir.path, "joined.webm");
  await assertRejects(
    () => joinFragments(out, output),
    SplitError,
    "corrupt fragment_0.bin, fragment_5.bin",
  );
  assertEquals(await listNames(out), before);
  assertEquals(await listNames(dir.path), ["fragments"]);
});

Deno.test("joinFragments() refuses a manifest that is not whole-file consistent", async () => {
  await using dir = await tempDir();
  const out = join(dir.path, "fragments");
  await splitFile(SAMPLE_VIDEO, { out, fragments: 2 });
  const manifest: Manifest = await readManifest(out);
  await Deno.writeTextFile(
    join(out, "manifest.json"),
    JSON.stringify({ ...manifest, sha256: "0".repeat(64) }),
  );
  await assertRejects(() => joinFragments(out), SplitError, "does not match the manifest");
  await Deno.writeTextFile(join(out, "manifest.json"), JSON.stringify({ ...manifest, size: 1 }));
  await assertRejects(() => readManifest(out), SplitError, "do not add up");
  await Deno.writeTextFile(join(out, "manifest.json"), "{not json");
  await assertRejects(() => readManifest(out), SplitError, "not valid JSON");
  const evil = { ...manifest, fragments: [{ ...manifest.fragments[0], name: "../x" }] };
  await Deno.writeTextFile(join(out, "manifest.json"), JSON.stringify(evil));
  await assertRejects(() => readManifest(out), SplitError, "fragment 0 is malformed");
});

// Bad input: one line on stderr, exit 1, and nothing created.
const BAD_INPUTS: [string, (dir: string) => string[] | Promise<string[]>, RegExp][] = [
  ["a missing file", () => ["nope.webm"], /^error: No such file "nope\.webm"\n$/],
  ["a folder given as the file", async (dir) => {
    await Deno.mkdir(join(dir, "clip.webm"));
    return ["clip.webm"];
  }, /it is a folder/],
  ["an empty file", async (dir) => {
    await Deno.writeFile(join(dir, "empty.webm"), new Uint8Array());
    return ["empty.webm"];
  }, /the file is empty/],
  ["zero fragments", async (dir) => {
    await randomFile(join(dir, "v.webm"), 100);
    return ["v.webm", "--fragments", "0"];
  }, /into 0 fragments: choose a whole number from 1 to 100/],
  ["more fragments than bytes", async (dir) => {
    await randomFile(join(dir, "v.webm"), 5);
    return ["v.webm", "--fragments", "6"];
  }, /from 1 to 5/],
  ["a fragment count that is not a number", async (dir) => {
    await randomFile(join(dir, "v.webm"), 5);
    return ["v.webm", "--fragments", "ten"];
  }, /--fragments takes a whole number, not "ten"/],
  ["a peer name with ../", async (dir) => {
    await randomFile(join(dir, "v.webm"), 50);
    return ["v.webm", "--peers", "6001,../etc"];
  }, /Invalid peer folder name "\.\.\/etc"/],
  ["a hidden peer name", async (dir) => {
    await randomFile(join(dir, "v.webm"), 50);
    return ["v.webm", "--peers", ".git"];
  }, /Invalid peer folder name "\.git"/],
  ["a peer named like a fragment", async (dir) => {
    await randomFile(join(dir, "v.webm"), 50);
    return ["v.webm", "--peers", "6001,fragment_1.bin"];
  }, /Invalid peer folder name "fragment_1\.bin": the store has a file of that name/],
  ["a peer named like the video", async (dir) => {
    await randomFile(join(dir, "v.webm"), 50);
    return ["v.webm", "--peers", "v.webm"];
  }, /Invalid peer folder name "v\.webm"/],
  ["an unknown flag", () => ["--fragmnets", "3"], /Unknown option '--fragmnets'/],
  [
    "a file named manifest.json",
    async (dir) => {
      await Deno.mkdir(join(dir, "somewhere"));
      await randomFile(join(dir, "somewhere", "manifest.json"), 50);
      return ["somewhere/manifest.json"];
    },
    /^error: Cannot split "somewhere\/manifest\.json": "manifest\.json" is the store's own file$/m,
  ],
  ["a file named like one of its fragments", async (dir) => {
    await randomFile(join(dir, "fragment_1.bin"), 50);
    return ["fragment_1.bin", "--fragments", "2"];
  }, /^error: Cannot split "fragment_1\.bin": a fragment would take its name$/m],
];

for (const [what, prepare, message] of BAD_INPUTS) {
  Deno.test(`split CLI refuses ${what}, creating nothing`, async () => {
    await using dir = await tempDir();
    const args = await prepare(dir.path);
    const before = await listNames(dir.path);
    const { code, stdout, stderr } = await runTask("split", args, { cwd: dir.path });
    assertEquals(code, 1);
    assertEquals(stdout, "");
    assertMatch(stderr, message);
    assertEquals(stderr.trim().split("\n").length, 1, stderr);
    assertEquals(await listNames(dir.path), before);
  });
}

Deno.test({
  name: "split CLI refuses an unreadable file",
  ignore: Deno.uid() === 0, // root reads anything, so this case cannot happen as root
  fn: async () => {
    await using dir = await tempDir();
    await randomFile(join(dir.path, "v.webm"), 50);
    await Deno.chmod(join(dir.path, "v.webm"), 0);
    const { code, stderr } = await runTask("split", ["v.webm"], { cwd: dir.path });
    assertEquals(code, 1);
    assertMatch(stderr, /^error: Cannot read "v\.webm": permission denied\n$/);
  },
});

Deno.test("split CLI: the README's commands split, verify and join the sample", async () => {
  await using dir = await tempDir();
  const split = await runTask("split", [], { cwd: dir.path });
  assertEquals(split.code, 0, split.stderr);
  assertMatch(split.stdout, /^Video split into 10 fragments\.\n/);
  assertEquals((await listNames(join(dir.path, "fragments"))).length, 11);

  const verify = await runTask("split", ["verify"], { cwd: dir.path });
  assertEquals(verify.code, 0, verify.stderr);
  assertMatch(verify.stdout, /^ok {6}fragment_0\.bin$/m);
  assertMatch(verify.stdout, /All 10 fragments ok\./);

  const joined = await runTask("split", ["join", "fragments", "out.webm"], { cwd: dir.path });
  assertEquals(joined.code, 0, joined.stderr);
  assertEquals(await Deno.readFile(join(dir.path, "out.webm")), await Deno.readFile(SAMPLE_VIDEO));

  const peers = await runTask("split", ["--peers", "6001,6002,6003"], { cwd: dir.path });
  assertEquals(peers.code, 0, peers.stderr);
  assertMatch(peers.stdout, /fragments\/6001: fragment_0\.bin, fragment_3\.bin/);

  const partial = await runTask("split", ["verify", "fragments/6001"], { cwd: dir.path });
  assertEquals(partial.code, 1);
  assertMatch(partial.stdout, /^missing fragment_1\.bin$/m);

  const help = await runTask("split", ["--help"], { cwd: dir.path });
  assertEquals(help.code, 0);
  assertMatch(help.stdout, /^Usage:/);
});

Deno.test("split CLI killed mid-run leaves no store that looks complete", async () => {
  await using dir = await tempDir();
  await randomFile(join(dir.path, "big.bin"), 192 * 1024 * 1024);
  const out = join(dir.path, "fragments");
  await using child = startTask("split", ["big.bin"], { cwd: dir.path });
  const deadline = Date.now() + 20_000;
  // Wait until it is writing fragments, then pull the plug.
  while (!(await exists(out) && (await listNames(out)).some((n) => n.startsWith(".split-")))) {
    assert(Date.now() < deadline, "split never started writing");
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
  child.kill("SIGKILL");
  await child.status();
  const left = await listNames(out);
  assert(!left.includes("manifest.json"), `a manifest was left: ${left}`);
  assert(!left.some((n) => n.startsWith("fragment_")), `fragments were left: ${left}`);

  const again = await runTask("split", ["big.bin", "--fragments", "2"], { cwd: dir.path });
  assertEquals(again.code, 0, again.stderr);
  assertEquals(await listNames(out), ["fragment_0.bin", "fragment_1.bin", "manifest.json"]);
});

Deno.test("the largest split's manifest is one the directory accepts", async () => {
  // Widest fields: a 200-character file name, 8 TiB split as finely as split.ts allows.
  const size = 8 * 1024 ** 4;
  const sizes = fragmentSizes(size, MAX_FRAGMENTS);
  let offset = 0;
  const manifest: Manifest = {
    version: 1,
    file: `${"v".repeat(195)}.webm`,
    mime: "video/webm",
    size,
    sha256: "f".repeat(64),
    fragments: sizes.map((fragmentSize, index) => {
      const entry = { index, name: fragmentName(index), offset, size: fragmentSize };
      offset += fragmentSize;
      return { ...entry, sha256: "f".repeat(64) };
    }),
  };
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const client = new DirectoryClient(directory.url);
  await client.publishFile(manifest);
  assertEquals((await client.getFile(manifest.file)).fragments.length, MAX_FRAGMENTS);
});

Deno.test("joinFragments() and verifyStore() never follow a symlink in a fragment's place", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "v.webm");
  const bytes = await randomFile(input, 1000);
  const store = join(dir.path, "store");
  await splitFile(input, { out: store, fragments: 2 });
  // A symlink to a file with exactly the right bytes: still not a fragment.
  const elsewhere = join(dir.path, "elsewhere.bin");
  await Deno.rename(join(store, "fragment_1.bin"), elsewhere);
  await Deno.symlink(elsewhere, join(store, "fragment_1.bin"));
  assertEquals((await verifyStore(store)).map((f) => f.status), ["ok", "missing"]);
  await assertRejects(
    () => joinFragments(store),
    SplitError,
    `Cannot join "${store}": missing fragment_1.bin`,
  );
  assertEquals(await exists(join(store, "v.webm")), false);
  assertEquals(bytes.length, 1000);
});

Deno.test("readManifest() refuses a manifest whose file or fragment takes a reserved name", async () => {
  await using dir = await tempDir();
  const input = join(dir.path, "v.webm");
  await randomFile(input, 100);
  const store = join(dir.path, "store");
  const manifest = await splitFile(input, { out: store, fragments: 2 });
  const cases: [string, Manifest][] = [
    ["bad file name", { ...manifest, file: "manifest.json" }],
    ["fragment 1 is malformed", {
      ...manifest,
      fragments: [manifest.fragments[0], { ...manifest.fragments[1], name: "v.webm" }],
    }],
    ["fragment 0 is malformed", {
      ...manifest,
      fragments: [{ ...manifest.fragments[0], name: ".part-x" }, manifest.fragments[1]],
    }],
  ];
  for (const [problem, bad] of cases) {
    await Deno.writeTextFile(join(store, "manifest.json"), JSON.stringify(bad));
    await assertRejects(() => readManifest(store), SplitError, problem);
    await assertRejects(() => joinFragments(store), SplitError, problem);
  }
});
