/**
 * The Swagger UI at /apidocs in headless Chromium (Debian's `chromium`, driven by npm
 * `playwright-core` in directory_browser_driver.ts): it renders the list of operations and asks
 * nothing of the internet.
 * @module
 */
import assert from "node:assert/strict";
import { startDirectory } from "../directory.ts";
import type { BrowserReport } from "./directory_browser_driver.ts";
import { ROOT } from "./_util.ts";

const CHROMIUM = "/usr/bin/chromium";
const hasChromium = await Deno.stat(CHROMIUM).then(() => true, () => false);

Deno.test({
  name: "GET /apidocs renders every operation in Chromium with no request outside the directory",
  ignore: !hasChromium,
  async fn() {
    await using directory = startDirectory({ port: 0, hostname: "127.0.0.1" });
    const driver = new Deno.Command(Deno.execPath(), {
      args: [
        "run",
        "-A",
        "--config",
        `${ROOT}deno.json`,
        `${ROOT}tests/directory_browser_driver.ts`,
        `${directory.url}/apidocs`,
        CHROMIUM,
      ],
      env: { NO_COLOR: "1" },
      stdin: "null",
      signal: AbortSignal.timeout(60_000),
    });
    const { code, stdout, stderr } = await driver.output();
    const decoder = new TextDecoder();
    assert.equal(code, 0, decoder.decode(stderr));
    const report: BrowserReport = JSON.parse(decoder.decode(stdout));
    assert.equal(report.status, 200);
    assert.deepEqual(report.outside, [], "the page asked for something outside the directory");
    assert.deepEqual(report.operations.sort(), [
      "DELETE /peers/{id}",
      "GET /files",
      "GET /files/{file}",
      "GET /fragments",
      "GET /fragments/{name}",
      "GET /health",
      "GET /peers",
      "POST /files",
      "POST /peers",
      "PUT /peers/{id}",
    ]);
    assert.deepEqual(report.errors, []);
  },
});

if (!hasChromium) console.warn(`Skipping the Swagger UI browser test: "${CHROMIUM}" is missing`);
