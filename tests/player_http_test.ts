/**
 * The player as HTTP (RFC 9110) says and as tools nobody here wrote use it: validators and
 * conditional requests, HEAD, 405 and 414 over real sockets; then `curl -C -`, `wget -c` and
 * `ffprobe` as child processes against an empty viewing peer started as `deno task peer`, with a
 * directory and a seeder running, and no page opened first.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { MAX_TARGET } from "../peer/player.ts";
import { startDirectory } from "../directory.ts";
import { startPeer } from "../peer.ts";
import { type Manifest, SAMPLE_VIDEO, splitFile } from "../split.ts";
import { get, startScene } from "./_player_source.ts";
import { type Child, peerArgs, randomBytes, startTask, tempDir } from "./_util.ts";

Deno.test("GET /stream sends the file's SHA-256 as a strong ETag, and Last-Modified", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  for (const method of ["GET", "HEAD"]) {
    const { response } = await get(scene.stream, { method });
    assertEquals(response.headers.get("etag"), `"${scene.manifest.sha256}"`, method);
    const modified = Date.parse(response.headers.get("last-modified") ?? "");
    assert(Math.abs(modified - Date.now()) < 60_000, `Last-Modified is ${modified} (${method})`);
  }
});

Deno.test("GET /stream answers 304 to a matching If-None-Match or If-Modified-Since", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [] });
  const { response: first } = await get(scene.stream, { method: "HEAD" });
  const etag = first.headers.get("etag")!;
  const lastModified = first.headers.get("last-modified")!;
  const conditions: Record<string, string>[] = [
    { "if-none-match": etag },
    { "if-none-match": `"other", W/${etag}` },
    { "if-none-match": "*" },
    { "if-modified-since": lastModified },
  ];
  for (const headers of conditions) {
    const { response, body } = await get(scene.stream, { headers });
    assertEquals(response.status, 304, JSON.stringify(headers));
    assertEquals(response.headers.get("etag"), etag);
    assertEquals(body.length, 0);
  }
  // A 304 is answered from the manifest alone: no fragment was fetched for any of them.
  assertEquals(scene.source.needed, []);
  const other = await get(scene.stream, { headers: { "if-none-match": '"other"' } });
  assertEquals(other.response.status, 200);
  assertEquals(other.body, scene.video);
});

Deno.test("GET /stream honours Range only under a matching If-Range; else the whole file", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const { response: first } = await get(scene.stream, { method: "HEAD" });
  const etag = first.headers.get("etag")!;
  const lastModified = first.headers.get("last-modified")!;
  for (const ifRange of [etag, lastModified]) {
    const { response, body } = await get(scene.stream, {
      headers: { range: "bytes=100-199", "if-range": ifRange },
    });
    assertEquals(response.status, 206, ifRange);
    assertEquals(body, scene.video.subarray(100, 200));
  }
  const stale = ['"0000"', `W/${etag}`, "Thu, 01 Jan 1970 00:00:00 GMT"];
  for (const ifRange of stale) {
    const { response, body } = await get(scene.stream, {
      headers: { range: "bytes=100-199", "if-range": ifRange },
    });
    assertEquals(response.status, 200, ifRange);
    assertEquals(response.headers.get("content-length"), String(scene.manifest.size));
    assertEquals(body, scene.video);
  }
});

Deno.test("HEAD sends GET's headers and Content-Length on /, /stream and /events", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  for (const path of ["/", `/stream/${scene.manifest.file}`]) {
    const got = await get(scene.url + path);
    const head = await get(scene.url + path, { method: "HEAD" });
    assertEquals(head.response.status, got.response.status, path);
    assertEquals(head.body.length, 0, path);
    assertEquals(head.response.headers.get("content-length"), String(got.body.length), path);
    assertEquals(
      head.response.headers.get("content-type"),
      got.response.headers.get("content-type"),
    );
  }
  const events = await get(scene.url + "/events", { method: "HEAD" });
  assertEquals(events.response.status, 200);
  assertEquals(events.response.headers.get("content-type"), "text/event-stream; charset=utf-8");
  // An event stream has no length: none is said, rather than a wrong one.
  assertEquals(events.response.headers.get("content-length"), null);
});

Deno.test("Other methods get 405 with Allow and the JSON error shape on every route", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  for (const path of ["/", "/events", `/stream/${scene.manifest.file}`]) {
    for (const method of ["POST", "PUT", "DELETE", "OPTIONS", "PATCH"]) {
      const response = await fetch(scene.url + path, { method });
      assertEquals(response.status, 405, `${method} ${path}`);
      assertEquals(response.headers.get("allow"), "GET, HEAD");
      const { error } = await response.json();
      assertEquals(typeof error.code, "string");
      assertMatch(error.message, new RegExp(`not ${method}$`));
    }
  }
  const missing = await fetch(scene.url + "/nothing");
  assertEquals(missing.status, 404);
  assertEquals((await missing.json()).error.code, "NOT_FOUND");
});

Deno.test("An overlong request target gets 414 in the JSON error shape", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  for (const target of ["/stream/" + "a".repeat(MAX_TARGET), "/?" + "q".repeat(MAX_TARGET)]) {
    const response = await fetch(scene.url + target);
    assertEquals(response.status, 414);
    assertMatch(response.headers.get("content-type")!, /^application\/json/);
    const { error } = await response.json();
    assertEquals(error.message, `The request target is longer than ${MAX_TARGET} bytes`);
  }
  assertEquals((await get(scene.url + "/?" + "q".repeat(MAX_TARGET - 2))).response.status, 200);
});

Deno.test("GET /stream/<ref> takes the file's name, id or id prefix; others get 404", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [0] });
  const id = scene.manifest.sha256;
  for (const ref of [scene.manifest.file, id, id.slice(0, 8)]) {
    const { response, body } = await get(`${scene.url}/stream/${ref}`, {
      headers: { range: "bytes=0-99" },
    });
    assertEquals(response.status, 206, ref);
    assertEquals(body, scene.video.subarray(0, 100));
  }
  for (const ref of [id.slice(0, 3), "0".repeat(64), id.toUpperCase()]) {
    const response = await fetch(`${scene.url}/stream/${ref}`);
    assertEquals(response.status, 404, ref);
    assertEquals((await response.json()).error.code, "NOT_FOUND");
  }
});

Deno.test("/stream on an empty store asks the source for the file as the URL names it", async () => {
  await using dir = await tempDir();
  const asked: (string | undefined)[] = [];
  await using scene = await startScene(dir.path, {
    held: [],
    withManifest: false,
    waitMs: 200,
    wrap: (source) => ({
      ...source,
      findManifest: (ref) => {
        asked.push(ref);
        return Promise.reject(new Error("The directory does not list it"));
      },
    }),
  });
  const response = await fetch(`${scene.url}/stream/caf%C3%A9%201.webm`);
  assertEquals(response.status, 404);
  await response.body?.cancel();
  assertEquals(asked, ["café 1.webm"]);
});

/** A directory and a seeder in this process, and an empty viewer as `deno task peer`. */
interface Swarm extends AsyncDisposable {
  manifest: Manifest;
  /** The file's bytes. */
  video: Uint8Array;
  /** `http://127.0.0.1:<port>/stream/<file>` of the viewer's player. */
  stream: string;
  viewer: Child;
}

async function startSwarm(root: string, video: string): Promise<Swarm> {
  const manifest = await splitFile(video, { out: join(root, "seeder") });
  const directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const stack = new AsyncDisposableStack();
  try {
    stack.use(directory);
    stack.use(
      await startPeer({
        port: 0,
        hostname: "127.0.0.1",
        dir: join(root, "seeder"),
        directory: directory.url,
        broker: null,
        grpcPort: null,
        httpPort: null,
        log: () => {},
      }),
    );
    await published(directory.url);
    const viewer = stack.use(
      startTask("peer", [
        "0",
        "--hostname",
        "127.0.0.1",
        ...peerArgs(join(root, "viewer"), directory.url),
        "--no-console",
      ]),
    );
    const [, port] = await viewer.waitFor(/\[PLAYER\] Watch at http:\/\/\S+:(\d+)\//);
    const stream = `http://127.0.0.1:${port}/stream/${encodeURIComponent(manifest.file)}`;
    const moved = stack.move();
    return {
      manifest,
      video: await Deno.readFile(video),
      stream,
      viewer,
      [Symbol.asyncDispose]: () => moved.disposeAsync(),
    };
  } catch (error) {
    await stack.disposeAsync();
    throw error;
  }
}

/** Waits until the directory lists the seeder's file. */
async function published(directory: string): Promise<void> {
  for (let tries = 0; tries < 200; tries++) {
    const { files } = await (await fetch(`${directory}/files`)).json();
    if (files.length > 0) return;
    await new Promise((resolve) => setTimeout(resolve, 25));
  }
  throw new Error("The seeder never published its file in the directory");
}

/** Runs a tool to its end (at most 60 s) and returns its exit code and output. */
async function run(command: string, args: string[], cwd?: string) {
  const { code, stdout, stderr } = await new Deno.Command(command, {
    args,
    cwd,
    stdin: "null",
    signal: AbortSignal.timeout(60_000),
  }).output();
  const decoder = new TextDecoder();
  return { code, stdout: decoder.decode(stdout), stderr: decoder.decode(stderr) };
}

const hasTools = await Promise.all(
  ["/usr/bin/curl", "/usr/bin/wget", "/usr/bin/ffprobe"].map((path) =>
    Deno.stat(path).then(() => true, () => false)
  ),
).then((found) => found.every(Boolean));
if (!hasTools) console.warn("Skipping the curl, wget and ffprobe tests: one of them is missing");

Deno.test({
  name: "curl -C - and wget -c resume a file past 4 MiB from an empty peer to the very bytes",
  ignore: !hasTools,
  async fn() {
    await using dir = await tempDir();
    const big = join(dir.path, "big.webm");
    const bytes = randomBytes(6 * 1024 * 1024 + 123);
    await Deno.writeFile(big, bytes);
    await using swarm = await startSwarm(dir.path, big);
    const downloads = join(dir.path, "downloads");
    await Deno.mkdir(downloads);

    // What an interrupted download leaves: the first 1.5 MB.
    const partial = join(downloads, "curl.webm");
    await Deno.writeFile(partial, bytes.subarray(0, 1_500_000));
    const curl = await run("curl", ["-sS", "-f", "-C", "-", "-o", partial, swarm.stream]);
    assertEquals(curl.code, 0, curl.stderr);
    assertEquals(await Deno.readFile(partial), bytes);

    const wgetFile = join(downloads, "big.webm");
    await Deno.writeFile(wgetFile, bytes.subarray(0, 2_000_001));
    const wget = await run("wget", ["-q", "-c", swarm.stream], downloads);
    assertEquals(wget.code, 0, wget.stderr);
    assertEquals(await Deno.readFile(wgetFile), bytes);

    // A stale copy (another version of the file) resumed with If-Range gets the whole file.
    const stale = join(downloads, "stale.webm");
    const ifRange = ["-H", 'If-Range: "0000"', "-r", "100-", "-D", "-", "-o", stale];
    const head = await run("curl", ["-sS", "-f", ...ifRange, swarm.stream]);
    assertEquals(head.code, 0, head.stderr);
    assertMatch(head.stdout, /^HTTP\/1\.1 200 /);
    assertEquals(await Deno.readFile(stale), bytes);
  },
});

Deno.test({
  name: "ffprobe reads /stream of an empty peer that no page has opened",
  ignore: !hasTools,
  async fn() {
    await using dir = await tempDir();
    await using swarm = await startSwarm(dir.path, SAMPLE_VIDEO);
    const probe = await run("ffprobe", [
      "-v",
      "error",
      "-show_entries",
      "format=format_name,duration,size",
      "-of",
      "json",
      swarm.stream,
    ]);
    assertEquals(probe.code, 0, probe.stderr + swarm.viewer.stderr);
    const { format } = JSON.parse(probe.stdout);
    assertMatch(format.format_name, /webm/);
    assertEquals(Number(format.size), swarm.manifest.size);
    assert(Number(format.duration) > 20, `duration ${format.duration}`);
  },
});
