/**
 * The player's HTTP routes over real sockets: a viewer store whose PlayerSource fetches missing
 * fragments over TCP from a seeding store, the player in front of it, and fetch() as the browser.
 * @module
 */
import { assert, assertEquals, assertMatch } from "./_assert.ts";
import { join } from "node:path";
import { type FragmentEvent, parseRange } from "../peer/player.ts";
import type { Store } from "../peer/store.ts";
import type { Manifest } from "../split.ts";
import { get, range, startScene } from "./_player_source.ts";
import { randomBytes, tempDir } from "./_util.ts";

/** Sends a request line as given (fetch() would tidy `..` away) and returns the status. */
async function rawStatus(port: number, target: string): Promise<number> {
  using conn = await Deno.connect({ hostname: "127.0.0.1", port });
  const request = `GET ${target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n`;
  await conn.write(new TextEncoder().encode(request));
  let reply = "";
  for await (const chunk of conn.readable.pipeThrough(new TextDecoderStream())) reply += chunk;
  return Number(reply.match(/^HTTP\/1\.1 (\d{3})/)?.[1]);
}

/** Reads server-sent events from a response, one `{ event, data }` at a time. */
async function* serverEvents(body: ReadableStream<Uint8Array>) {
  let buffered = "";
  for await (const text of body.pipeThrough(new TextDecoderStream())) {
    buffered += text;
    for (let end; (end = buffered.indexOf("\n\n")) >= 0;) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      const event = block.match(/^event: (.*)$/m)?.[1];
      const data = block.match(/^data: (.*)$/m)?.[1];
      if (event && data) yield { event, data: JSON.parse(data) };
    }
  }
}

/** Takes events until one satisfies `wanted`; fails after `timeoutMs`. */
async function nextEvent(
  events: AsyncGenerator<{ event: string; data: unknown }>,
  wanted: (event: string, data: unknown) => boolean,
  timeoutMs = 10_000,
): Promise<{ event: string; data: unknown }> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error("No such event in time")), timeoutMs);
  });
  try {
    while (true) {
      const next = await Promise.race([events.next(), late]);
      if (next.done) throw new Error("The event stream ended");
      if (wanted(next.value.event, next.value.data)) return next.value;
    }
  } finally {
    clearTimeout(timer);
  }
}

/** Polls `condition` until it holds; fails after `timeoutMs`. */
async function until(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error("Timed out waiting for a condition");
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

Deno.test("parseRange() reads a-b, a- (to the end), -n, and ignores what it cannot parse", () => {
  const size = 10 * 1024 * 1024;
  assertEquals(parseRange(null, size), undefined);
  assertEquals(parseRange("bytes=0-99", size), { start: 0, end: 99 });
  assertEquals(parseRange("bytes=100-", size), { start: 100, end: size - 1 });
  assertEquals(parseRange(`bytes=${size - 10}-`, size), { start: size - 10, end: size - 1 });
  assertEquals(parseRange(`bytes=5-${size * 2}`, size), { start: 5, end: size - 1 });
  assertEquals(parseRange("bytes=-500", size), { start: size - 500, end: size - 1 });
  assertEquals(parseRange(`bytes=-${size * 2}`, size), { start: 0, end: size - 1 });
  assertEquals(parseRange("bytes=-0", size), "unsatisfiable");
  assertEquals(parseRange(`bytes=${size}-`, size), "unsatisfiable");
  for (const ignored of ["bytes=", "bytes=-", "bytes=9-3", "bytes=0-1,5-6", "items=0-1", "x"]) {
    assertEquals(parseRange(ignored, size), undefined, ignored);
  }
});

Deno.test("GET / serves the page: a video element, the map, and nothing from outside", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const response = await fetch(scene.url + "/");
  const html = await response.text();
  assertEquals(response.status, 200);
  assertMatch(response.headers.get("content-type")!, /^text\/html/);
  assertMatch(html, /<video\b/);
  assertMatch(html, /id="map"/);
  assertMatch(html, /new EventSource\("\/events"\)/);
  assert(!/https?:\/\//.test(html), "the page names an outside address");
  assertMatch(response.headers.get("content-security-policy")!, /default-src 'none'/);
});

Deno.test("GET /stream answers 200 with the whole file, its type and Accept-Ranges", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const { response, body } = await get(scene.stream);
  assertEquals(response.status, 200);
  assertEquals(response.headers.get("content-type"), "video/webm");
  assertEquals(response.headers.get("accept-ranges"), "bytes");
  assertEquals(response.headers.get("content-length"), String(scene.manifest.size));
  assertEquals(body, scene.video);
});

Deno.test("GET /stream answers 206 with exactly the bytes of a multi-fragment range", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const [f2, f5] = [scene.manifest.fragments[2]!, scene.manifest.fragments[5]!];
  const start = f2.offset + 17; // inside fragment 2 ...
  const end = f5.offset + 5; // ... to inside fragment 5
  const { response, body } = await get(scene.stream, range(`bytes=${start}-${end}`));
  assertEquals(response.status, 206);
  assertEquals(
    response.headers.get("content-range"),
    `bytes ${start}-${end}/${scene.manifest.size}`,
  );
  assertEquals(response.headers.get("content-length"), String(end - start + 1));
  assertEquals(response.headers.get("accept-ranges"), "bytes");
  assertEquals(body, scene.video.subarray(start, end + 1));
});

Deno.test("GET /stream answers a suffix range with the file's last bytes", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const { size } = scene.manifest;
  const last = await get(scene.stream, range("bytes=-1000"));
  assertEquals(last.response.status, 206);
  assertEquals(
    last.response.headers.get("content-range"),
    `bytes ${size - 1000}-${size - 1}/${size}`,
  );
  assertEquals(last.body, scene.video.subarray(size - 1000));
  const more = await get(scene.stream, range(`bytes=-${size + 50}`)); // more than there is
  assertEquals(more.response.headers.get("content-range"), `bytes 0-${size - 1}/${size}`);
  assertEquals(more.body, scene.video);
});

Deno.test("GET /stream answers an open-ended range with the rest of a file past 4 MiB", async () => {
  await using dir = await tempDir();
  const big = join(dir.path, "big.webm");
  const bytes = randomBytes(5 * 1024 * 1024 + 7);
  await Deno.writeFile(big, bytes);
  await using scene = await startScene(dir.path, { video: big, fragments: 7 });
  const { response, body } = await get(scene.stream, range("bytes=1000-"));
  assertEquals(response.status, 206);
  const end = bytes.length - 1;
  assertEquals(response.headers.get("content-range"), `bytes 1000-${end}/${bytes.length}`);
  assertEquals(response.headers.get("content-length"), String(bytes.length - 1000));
  assertEquals(body, bytes.subarray(1000));
});

Deno.test("GET /stream answers 416 with the file's size for a range past the end", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const { size } = scene.manifest;
  for (const value of [`bytes=${size}-`, `bytes=${size + 5}-${size + 10}`, "bytes=-0"]) {
    const { response } = await get(scene.stream, range(value));
    assertEquals(response.status, 416, value);
    assertEquals(response.headers.get("content-range"), `bytes */${size}`);
  }
});

Deno.test("HEAD /stream sends the same headers, no body, and fetches nothing", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [] });
  const whole = await get(scene.stream, { method: "HEAD" });
  assertEquals(whole.response.status, 200);
  assertEquals(whole.response.headers.get("content-length"), String(scene.manifest.size));
  assertEquals(whole.response.headers.get("accept-ranges"), "bytes");
  assertEquals(whole.response.headers.get("content-type"), "video/webm");
  assertEquals(whole.body.length, 0);
  const part = await get(scene.stream, { method: "HEAD", ...range("bytes=10-19") });
  assertEquals(part.response.status, 206);
  assertEquals(part.response.headers.get("content-range"), `bytes 10-19/${scene.manifest.size}`);
  assertEquals(part.response.headers.get("content-length"), "10");
  assertEquals(scene.source.needed, []);
  assertEquals(scene.viewer.list(), []);
});

Deno.test("GET /stream fetches missing fragments over TCP first, in playback order", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [0, 1, 3] });
  const [f1, f4] = [scene.manifest.fragments[1]!, scene.manifest.fragments[4]!];
  const start = f1.offset + 3;
  const end = f4.offset + f4.size + 9; // into fragment 5
  const { response, body } = await get(scene.stream, range(`bytes=${start}-${end}`));
  assertEquals(response.status, 206);
  assertEquals(body, scene.video.subarray(start, end + 1));
  assertEquals([...new Set(scene.source.needed)], [
    "fragment_2.bin",
    "fragment_4.bin",
    "fragment_5.bin",
  ]);
  assertEquals(
    scene.viewer.list().map((f) => f.name),
    [0, 1, 2, 3, 4, 5].map((i) => `fragment_${i}.bin`),
  );
});

Deno.test("GET /stream answers 503 at once when no one has the first fragment", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [], lost: [0] });
  const started = Date.now();
  const response = await fetch(scene.stream, range("bytes=0-99"));
  const { error } = await response.json();
  const message = error.message;
  assertEquals(response.status, 503);
  assertEquals(error.code, "SERVICE_UNAVAILABLE");
  assertMatch(message, /^Fragment 'fragment_0\.bin' is not available: Could not fetch/);
  assert(!/\n\s+at /.test(message), "the answer carries a stack trace");
  assert(Date.now() - started < 5_000, "it waited although the fetch had failed");
  assertEquals(scene.source.snapshot()[0]!.state, "failed");
});

Deno.test("GET /stream gives up on a fragment that never arrives after waitMs", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, {
    held: [],
    waitMs: 300,
    wrap: (source) => ({ ...source, need: () => new Promise<void>(() => {}) }), // never arrives
  });
  const started = Date.now();
  const response = await fetch(scene.stream, range("bytes=0-99"));
  assertEquals(response.status, 503);
  assertEquals(
    (await response.json()).error.message,
    "Fragment 'fragment_0.bin' did not arrive within 300 ms",
  );
  const waited = Date.now() - started;
  assert(waited >= 300 && waited < 5_000, `waited ${waited} ms`);
});

Deno.test("GET /stream breaks the response off when a later fragment cannot be had", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [0], lost: [1] });
  const f1 = scene.manifest.fragments[1]!;
  const response = await fetch(scene.stream, range(`bytes=0-${f1.offset + f1.size - 1}`));
  assertEquals(response.status, 206); // fragment 0 was there: the answer had begun
  let failed = false;
  await response.arrayBuffer().catch(() => failed = true);
  assert(failed, "the body was complete although fragment 1 is nowhere");
});

Deno.test("GET /stream answers 404 for an unknown file and for traversal attempts", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  for (
    const path of [
      "/stream/other.webm",
      "/stream/fragment_0.bin",
      "/stream/manifest.json",
      "/stream/sample.webm%00",
      "/stream/sample.webm/x",
      "/stream/..%2Fmanifest.json",
      "/stream/%2e%2e%2fseeder%2fsample.webm",
      "/stream/%ZZ",
      "/stream/",
    ]
  ) {
    const response = await fetch(scene.url + path);
    const message = await response.text();
    assertEquals(response.status, 404, path);
    assert(!/\n\s+at /.test(message), `${path} answered with a stack trace`);
  }
  for (const target of ["/stream/../viewer/manifest.json", "/stream/../../etc/passwd"]) {
    assertEquals(await rawStatus(scene.player.port, target), 404, target);
  }
});

Deno.test("GET /stream answers 404 until the store has a manifest; the page loads", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [], withManifest: false });
  assertEquals((await get(scene.stream)).response.status, 404);
  assertEquals((await get(scene.url + "/")).response.status, 200);
});

Deno.test("Other methods get 405 and unknown paths 404", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path);
  const post = await get(scene.stream, { method: "POST", body: "x" });
  assertEquals(post.response.status, 405);
  assertEquals(post.response.headers.get("allow"), "GET, HEAD");
  assertEquals((await get(scene.url + "/nothing")).response.status, 404);
});

Deno.test("GET /events sends the manifest, a snapshot, then each fragment event live", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [0, 1] });
  const response = await fetch(scene.url + "/events");
  assertEquals(response.headers.get("content-type"), "text/event-stream; charset=utf-8");
  const events = serverEvents(response.body!);
  try {
    const manifest = await nextEvent(events, (event) => event === "manifest");
    assertEquals((manifest.data as Manifest).file, "sample.webm");
    assertEquals((manifest.data as Manifest).fragments.length, 10);
    const snapshot = (await nextEvent(events, (e) => e === "snapshot")).data as FragmentEvent[];
    assertEquals(snapshot.map((e) => e.state), [
      ...["held", "held"],
      ...Array(8).fill("missing"),
    ]);

    const fetching = scene.source.need("fragment_5.bin");
    const from = scene.seeder;
    const inflight = await nextEvent(
      events,
      (e, d) => e === "fragment" && (d as FragmentEvent).state === "inflight",
    );
    assertEquals(inflight.data, { name: "fragment_5.bin", index: 5, state: "inflight", from });
    const held = await nextEvent(
      events,
      (e, d) => e === "fragment" && (d as FragmentEvent).state === "held",
    );
    assertEquals(held.data, { name: "fragment_5.bin", index: 5, state: "held", from });
    await fetching;
  } finally {
    await events.return(undefined);
  }
});

Deno.test("GET /events says where held fragments came from: held at start, or the holder", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, {
    held: [0, 1],
    // As the swarm's: a held fragment's snapshot no longer says who sent it.
    wrap: (source) => ({
      ...source,
      snapshot: () =>
        source.snapshot().map(({ from, ...event }) =>
          event.state === "held" ? event : { ...event, from }
        ),
    }),
  });
  await scene.source.need("fragment_5.bin"); // arrives before the page opens
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  try {
    const snapshot = (await nextEvent(events, (e) => e === "snapshot")).data as FragmentEvent[];
    assertEquals(snapshot[0], {
      name: "fragment_0.bin",
      index: 0,
      state: "held",
      heldAtStart: true,
    });
    assertEquals(snapshot[1]!.heldAtStart, true);
    assertEquals(snapshot[5], {
      name: "fragment_5.bin",
      index: 5,
      state: "held",
      from: scene.seeder,
    });
    assertEquals(snapshot[2], { name: "fragment_2.bin", index: 2, state: "missing" });
  } finally {
    await events.return(undefined);
  }
});

Deno.test("GET /events announces the manifest once an empty store gets one", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, { held: [], withManifest: false });
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  try {
    assertEquals((await nextEvent(events, (e) => e === "snapshot")).data, []);
    await scene.viewer.setManifest(scene.manifest);
    const manifest = await nextEvent(events, (e) => e === "manifest");
    assertEquals((manifest.data as Manifest).size, scene.manifest.size);
    const snapshot = (await nextEvent(events, (e) => e === "snapshot")).data as FragmentEvent[];
    assertEquals(snapshot.length, 10);
    assert(snapshot.every((e) => e.state === "missing"));
  } finally {
    await events.return(undefined);
  }
});

Deno.test("GET /events on an empty store asks the source to find a manifest", async () => {
  await using dir = await tempDir();
  let asked = 0;
  const viewer: { store?: Store; manifest?: Manifest } = {}; // known once the scene is up
  await using scene = await startScene(dir.path, {
    held: [],
    withManifest: false,
    wrap: (source) => ({
      ...source,
      findManifest: async () => {
        asked++;
        // As the swarm does with the directory's manifest.
        await viewer.store!.setManifest(viewer.manifest!);
      },
    }),
  });
  Object.assign(viewer, { store: scene.viewer, manifest: scene.manifest });
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  try {
    const manifest = await nextEvent(events, (e) => e === "manifest");
    assertEquals((manifest.data as Manifest).file, "sample.webm");
    assertEquals(asked, 1);
  } finally {
    await events.return(undefined);
  }
});

Deno.test("GET /events tells the page why no manifest can be found", async () => {
  await using dir = await tempDir();
  await using scene = await startScene(dir.path, {
    held: [],
    withManifest: false,
    wrap: (source) => ({
      ...source,
      findManifest: () => Promise.reject(new Error("The directory knows no file to fetch")),
    }),
  });
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  try {
    const problem = await nextEvent(events, (e) => e === "problem");
    assertEquals(problem.data, { message: "The directory knows no file to fetch" });
  } finally {
    await events.return(undefined);
  }
});

Deno.test("A page that leaves /events is unsubscribed from the source", async () => {
  await using dir = await tempDir();
  let listening = 0;
  await using scene = await startScene(dir.path, {
    wrap: (source) => ({
      ...source,
      onEvent(listener) {
        listening++;
        const stop = source.onEvent(listener);
        return () => {
          listening--;
          stop();
        };
      },
    }),
  });
  const before = listening; // the player's own, to remember where fragments came from
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  await nextEvent(events, (e) => e === "snapshot");
  assertEquals(listening, before + 1);
  await events.return(undefined); // cancels the body: the connection closes
  await until(() => listening === before);
});

Deno.test("close() ends open event streams and requests waiting for a fragment", async () => {
  await using dir = await tempDir();
  let asked = 0;
  await using scene = await startScene(dir.path, {
    held: [],
    waitMs: 60_000,
    wrap: (source) => ({
      ...source,
      need: () => {
        asked++;
        return new Promise<void>(() => {}); // never arrives
      },
    }),
  });
  const events = serverEvents((await fetch(scene.url + "/events")).body!);
  await nextEvent(events, (e) => e === "snapshot");
  const waiting = fetch(scene.stream, range("bytes=0-99"));
  await until(() => asked > 0);
  const started = Date.now();
  await scene.player.close();
  assert(Date.now() - started < 5_000, "close() waited for the open responses");
  const answer = await waiting;
  assertEquals(answer.status, 503);
  await answer.body?.cancel();
  assertEquals((await events.next()).done, true);
});
