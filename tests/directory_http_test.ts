/**
 * The directory's HTTP as RFC 9110, browsers and OpenAPI tools expect it, over real sockets with
 * curl as the client: HEAD answers as GET does, wrong methods get a 405 with `Allow`, overlong
 * request targets a 414, CORS lets pages of any origin read and the origins `--cors` names write,
 * and the OpenAPI document has what linters ask for.
 * @module
 */
import assert from "node:assert/strict";
import { type DirectoryServer, startDirectory } from "../directory.ts";
import { MAX_TARGET } from "../directory/schemas.ts";
import type { Manifest } from "../split.ts";
import type { CorsReport } from "./directory_cors_driver.ts";
import { ROOT, startTask } from "./_util.ts";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);

/** The file the directories of these tests list: one fragment, the whole file. */
const FILE_ID = "ab".repeat(32);
const MANIFEST: Manifest = {
  version: 1,
  file: "movie.webm",
  mime: "video/webm",
  size: 100,
  sha256: FILE_ID,
  fragments: [{ index: 0, name: "fragment_0.bin", offset: 0, size: 100, sha256: "cd".repeat(32) }],
};

/** What curl got: the status, the headers (names lower case, values joined) and the body. */
interface CurlAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Runs curl (a real client, not ours) with `args`, and reads its answer. */
async function curl(...args: string[]): Promise<CurlAnswer> {
  const bodyFile = await Deno.makeTempFile({ prefix: "curl-body-" });
  try {
    const { code, stdout, stderr } = await new Deno.Command("curl", {
      args: [
        "-sS",
        "--max-time",
        "10",
        "-o",
        bodyFile,
        "-w",
        "%{http_code}\n%{header_json}",
        ...args,
      ],
      stdout: "piped",
      stderr: "piped",
    }).output();
    const text = new TextDecoder().decode(stdout);
    assert.equal(code, 0, `curl ${args.join(" ")}: ${new TextDecoder().decode(stderr)}`);
    const newline = text.indexOf("\n");
    const headers: Record<string, string> = {};
    for (const [name, values] of Object.entries<string[]>(JSON.parse(text.slice(newline + 1)))) {
      headers[name.toLowerCase()] = values.join(", ");
    }
    return {
      status: Number(text.slice(0, newline)),
      headers,
      body: await Deno.readTextFile(bodyFile),
    };
  } finally {
    await Deno.remove(bodyFile);
  }
}

/** The headers of an answer, but those that change from one answer to the next. */
function stable(headers: Record<string, string>): Record<string, string> {
  const { date: _, ...rest } = headers;
  return rest;
}

/** Asserts an answer in the error shape, with that status and code. */
function assertError(answer: CurlAnswer, status: number, code: string): void {
  assert.equal(answer.status, status, answer.body);
  assert.equal(answer.headers["content-type"], "application/json");
  const body = JSON.parse(answer.body);
  assert.equal(body.error.code, code);
  assert.equal(typeof body.error.message, "string");
}

/** A directory on a free port that lists one file and one peer. */
async function directoryWithData(options: { cors?: string[] } = {}): Promise<DirectoryServer> {
  const directory = startDirectory({ port: 0, hostname: "127.0.0.1", ...options });
  const published = await fetch(`${directory.url}/files`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(MANIFEST),
  });
  assert.equal(published.status, 201, await published.text());
  const registered = await fetch(`${directory.url}/peers`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify({
      port: 6001,
      grpcPort: 0,
      httpPort: 0,
      fragments: ["fragment_0.bin"],
      fileId: FILE_ID,
      file: "movie.webm",
    }),
  });
  assert.equal(registered.status, 201, await registered.text());
  return directory;
}

/** The GET URLs worth a HEAD: every GET of the OpenAPI document, the documents, and errors. */
async function getUrls(directory: DirectoryServer): Promise<string[]> {
  const api = await (await fetch(`${directory.url}/openapi.json`)).json();
  const documented = Object.entries<Record<string, unknown>>(api.paths)
    .filter(([, operations]) => "get" in operations)
    .map(([path]) =>
      path.replace("{name}", "fragment_0.bin").replace("{file}", "movie.webm").replace(
        "{id}",
        "x",
      )
    );
  assert.equal(documented.length, 6, `the GET routes: ${documented}`);
  return [
    ...documented,
    "/fragments/nobody.bin", // a 404 of a route
    "/files?cursor=bad&limit=0",
    "/nowhere", // a 404 of no route
    "/peers/someone", // a 405: PUT and DELETE only
    "/openapi.json",
    "/apidocs",
    "/apidocs/swagger-ui-dist/swagger-ui.css",
    "/apidocs/swagger-ui-dist/nothing.js", // a 404 of a route that takes GET
  ].map((path) => directory.url + path);
}

Deno.test("HEAD on every GET route sends GET's status, headers and Content-Length, and no body", async () => {
  await using directory = await directoryWithData();
  for (const url of await getUrls(directory)) {
    const get = await curl(url);
    const head = await curl("--head", url);
    assert.equal(head.status, get.status, url);
    assert.deepEqual(stable(head.headers), stable(get.headers), url);
    assert.equal(
      Number(head.headers["content-length"]),
      new TextEncoder().encode(get.body).byteLength,
      url,
    );
    assert.ok(Number(head.headers["content-length"]) > 0, url);
  }
});

Deno.test("a HEAD answer carries no body: the next answer on the connection follows its headers", async () => {
  await using directory = await directoryWithData();
  const conn = await Deno.connect({ hostname: "127.0.0.1", port: directory.port });
  const request = (method: string, close = false) =>
    `${method} /files HTTP/1.1\r\nhost: x\r\n${close ? "connection: close\r\n" : ""}\r\n`;
  await conn.write(new TextEncoder().encode(request("HEAD") + request("GET", true)));
  const text = new TextDecoder().decode(await new Response(conn.readable).arrayBuffer());
  const [head, ...rest] = text.split("\r\n\r\n");
  assert.match(head, /^HTTP\/1\.1 200 /);
  assert.match(rest.join("\r\n\r\n"), /^HTTP\/1\.1 200 [^]*\r\n\r\n\{"files":\[/);
});

Deno.test("a method a route does not take is a 405 with Allow, in the error shape; an unknown path a 404", async () => {
  await using directory = await directoryWithData();
  const cases: [string, string, string][] = [
    ["DELETE", "/files", "GET, HEAD, POST"],
    ["PUT", "/files/movie.webm", "GET, HEAD"],
    ["PATCH", "/peers", "GET, HEAD, POST"],
    ["GET", "/peers/someone", "DELETE, PUT"],
    ["POST", "/health", "GET, HEAD"],
    ["DELETE", "/openapi.json", "GET, HEAD"],
    ["OPTIONS", "/fragments", "GET, HEAD"], // not a CORS preflight: no Origin
    ["POST", "/apidocs/swagger-ui-dist/nothing.js", "GET, HEAD"],
  ];
  for (const [method, path, allow] of cases) {
    const answer = await curl("-X", method, directory.url + path);
    assertError(answer, 405, "METHOD_NOT_ALLOWED");
    assert.equal(answer.headers.allow, allow, `${method} ${path}`);
    assert.match(JSON.parse(answer.body).error.message, new RegExp(`${allow}, not ${method}`));
  }
  for (const method of ["GET", "DELETE", "OPTIONS"]) {
    const answer = await curl("-X", method, `${directory.url}/nowhere/at/all`);
    assertError(answer, 404, "NOT_FOUND");
    assert.equal(answer.headers.allow, undefined);
  }
  // A route that takes the method, but has nothing there: a 404, not a 405.
  const missing = await curl(`${directory.url}/apidocs/swagger-ui-dist/nothing.js`);
  assertError(missing, 404, "NOT_FOUND");
});

Deno.test("a request target over 8 KiB is a 414 in the error shape, up to where Deno itself refuses", async () => {
  await using directory = await directoryWithData();
  const target = (bytes: number) => {
    const path = "/fragments/fragment_0.bin?file=";
    return directory.url + path + "a".repeat(bytes - path.length);
  };
  // At the limit it is the route's to answer (here: not a valid file name).
  assertError(await curl(target(MAX_TARGET)), 400, "BAD_REQUEST");
  for (const bytes of [MAX_TARGET + 1, 32 * 1024, 64 * 1024 - 100]) {
    for (const method of ["GET", "POST", "DELETE"]) {
      assertError(await curl("-X", method, target(bytes)), 414, "URI_TOO_LONG");
    }
    const head = await curl("--head", target(bytes));
    assert.equal(head.status, 414);
    assert.ok(Number(head.headers["content-length"]) > 0);
  }
  // Past 64 KiB Deno's HTTP server refuses the request itself, before the directory sees it
  // (a bare 400): still a refusal, at once, and the directory goes on serving.
  const answer = await curl(target(80 * 1024));
  assert.ok(answer.status === 400 || answer.status === 414, `${answer.status}`);
  assert.equal((await curl(`${directory.url}/health`)).status, 200);
});

Deno.test("CORS: pages of any origin read; writes only from origins --cors names", async (t) => {
  const page = "https://page.example";
  const preflight = (url: string, method: string, origin = page) =>
    curl(
      "-X",
      "OPTIONS",
      "-H",
      `origin: ${origin}`,
      "-H",
      `access-control-request-method: ${method}`,
      "-H",
      "access-control-request-headers: authorization, content-type",
      url,
    );

  await t.step("by default", async () => {
    await using directory = await directoryWithData();
    for (const url of await getUrls(directory)) {
      const read = await curl("-H", `origin: ${page}`, url);
      assert.equal(read.headers["access-control-allow-origin"], "*", url);
    }
    const files = `${directory.url}/files`;
    const allowed = await preflight(files, "GET");
    assert.equal(allowed.status, 204);
    assert.equal(allowed.headers["access-control-allow-origin"], "*");
    assert.equal(allowed.headers["access-control-allow-methods"], "GET, HEAD");
    // A write: the preflight does not let it through, and an answer is not shared.
    const refused = await preflight(files, "POST");
    assert.equal(refused.headers["access-control-allow-origin"], undefined);
    assert.doesNotMatch(refused.headers["access-control-allow-methods"] ?? "", /POST/);
    const write = await curl(
      "-X",
      "POST",
      "-H",
      `origin: ${page}`,
      "-H",
      "content-type: application/json",
      "-d",
      "{}",
      files,
    );
    assert.equal(write.status, 400);
    assert.equal(write.headers["access-control-allow-origin"], undefined);
    // A preflight for no route is no preflight: a 404, as any request there.
    assertError(await preflight(`${directory.url}/nowhere`, "GET"), 404, "NOT_FOUND");
  });

  await t.step("with --cors naming the page's origin", async () => {
    await using directory = await directoryWithData({ cors: [`${page},http://other.example`] });
    const peer = `${directory.url}/peers/someone`;
    const allowed = await preflight(peer, "PUT");
    assert.equal(allowed.status, 204);
    assert.equal(allowed.headers["access-control-allow-origin"], page);
    assert.equal(allowed.headers["access-control-allow-methods"], "DELETE, PUT");
    assert.match(allowed.headers["access-control-allow-headers"], /Authorization/i);
    assert.match(allowed.headers.vary, /Origin/);
    const stranger = await preflight(peer, "PUT", "https://stranger.example");
    assert.equal(stranger.headers["access-control-allow-origin"], undefined);
    const write = await curl("-X", "DELETE", "-H", `origin: ${page}`, peer);
    assertError(write, 401, "UNAUTHORIZED");
    assert.equal(write.headers["access-control-allow-origin"], page);
    assert.match(write.headers["access-control-expose-headers"], /WWW-Authenticate/i);
    const read = await curl("-H", "origin: https://stranger.example", `${directory.url}/files`);
    assert.equal(read.headers["access-control-allow-origin"], "*");
  });

  await t.step("with --cors '*'", async () => {
    await using directory = await directoryWithData({ cors: ["*"] });
    const allowed = await preflight(`${directory.url}/files`, "POST", "https://any.example");
    assert.equal(allowed.headers["access-control-allow-origin"], "*");
    assert.equal(allowed.headers["access-control-allow-methods"], "GET, HEAD, POST");
  });
});

Deno.test({
  name:
    "CORS in Chromium: a page of another origin reads the directory, and writes only with --cors",
  ignore: !hasChromium,
  async fn() {
    // The page's origin: another port of the same loopback, so that no private-network rule of
    // the browser gets in the way, only CORS.
    await using pages = Deno.serve(
      { port: 0, hostname: "127.0.0.1", onListen: () => {} },
      () =>
        new Response("<!doctype html><title>page</title>", {
          headers: { "content-type": "text/html" },
        }),
    );
    const pageUrl = `http://127.0.0.1:${pages.addr.port}/`;
    const drive = async (directory: DirectoryServer): Promise<CorsReport> => {
      const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
        args: [
          "run",
          "-A",
          "--config",
          `${ROOT}deno.json`,
          `${ROOT}tests/directory_cors_driver.ts`,
          pageUrl,
          directory.url,
          CHROMIUM,
        ],
        env: { NO_COLOR: "1" },
        stdin: "null",
        signal: AbortSignal.timeout(60_000),
      }).output();
      assert.equal(code, 0, new TextDecoder().decode(stderr));
      return JSON.parse(new TextDecoder().decode(stdout));
    };
    {
      await using directory = await directoryWithData();
      const report = await drive(directory);
      assert.deepEqual({ ...report, write: typeof report.write }, {
        read: 200,
        files: 1,
        head: 200,
        write: "string", // the browser's error: the preflight did not let the write through
        pageErrors: [],
      });
      assert.match(String(report.write), /TypeError: Failed to fetch/);
    }
    {
      await using directory = await directoryWithData({ cors: [new URL(pageUrl).origin] });
      assert.deepEqual(await drive(directory), {
        read: 200,
        files: 1,
        head: 200,
        write: 400, // through, and its answer readable: the manifest {} is not a valid one
        pageErrors: [],
      });
    }
  },
});

Deno.test("deno task directory --cors takes origins, and refuses what is not one in one line", async () => {
  {
    await using child = startTask("directory", [
      "--port",
      "0",
      "--cors",
      "https://a.example",
      "--cors",
      "https://b.example,http://localhost:8080",
    ]);
    const [, url] = await child.waitFor(/Listening on (http:\/\/\S+)/, { stream: "stdout" });
    for (const origin of ["https://b.example", "http://localhost:8080"]) {
      const answer = await curl(
        "-X",
        "OPTIONS",
        "-H",
        `origin: ${origin}`,
        "-H",
        "access-control-request-method: POST",
        `${url}/files`,
      );
      assert.equal(answer.headers["access-control-allow-origin"], origin);
    }
  }
  for (const bad of ["https://a.example/", "a.example", "https://A.example", "ftp://a.example"]) {
    await using child = startTask("directory", ["--port", "0", "--cors", bad]);
    const { code } = await child.status();
    assert.notEqual(code, 0);
    assert.equal(child.stdout, "");
    assert.match(child.stderr, /^error: Invalid --cors: "[^"]+" is not an origin[^\n]*\n$/);
  }
});

Deno.test("the OpenAPI document names its operations, servers and license, and every GET's 4XX", async () => {
  await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
  const api = await (await fetch(`${directory.url}/openapi.json`)).json();
  assert.deepEqual(api.servers.map((server: { url: string }) => server.url), ["/"]);
  assert.equal(typeof api.info.license.name, "string");
  assert.match(api.info.license.url, /^https:\/\//);
  const ids: string[] = [];
  for (const [path, operations] of Object.entries<Record<string, OpenApiOperation>>(api.paths)) {
    for (const [method, operation] of Object.entries(operations)) {
      const where = `${method.toUpperCase()} ${path}`;
      assert.match(operation.operationId ?? "", /^[a-z][A-Za-z]+$/, where);
      ids.push(operation.operationId!);
      assert.ok(Array.isArray(operation.security), `${where} says who may call it`);
      const statuses = Object.keys(operation.responses);
      assert.ok(statuses.some((status) => /^4\d\d$/.test(status)), `${where}: no 4XX`);
      assert.ok(statuses.includes("414"), `${where}: no 414`);
    }
  }
  assert.equal(ids.length, 10);
  assert.equal(new Set(ids).size, ids.length, "operationIds are unique");
  // The server the document names is the directory that served it: Swagger UI calls it there.
  const health = await fetch(
    new URL(`${api.servers[0].url.replace(/\/$/, "")}/health`, directory.url),
  );
  assert.equal((await health.json()).status, "ok");
});

interface OpenApiOperation {
  operationId?: string;
  security?: unknown[];
  responses: Record<string, unknown>;
}

if (!hasChromium) console.warn(`Skipping the CORS browser test: "${CHROMIUM}" is missing`);
