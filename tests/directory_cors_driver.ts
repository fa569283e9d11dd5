/**
 * Drives headless Chromium through npm `playwright-core` for directory_http_test.ts: opens a
 * page on one origin, has it call the directory on another (a read, a HEAD, a write that needs a
 * preflight), and prints one JSON line with what the page could see. A separate process, as in
 * directory_browser_driver.ts: playwright-core's import needs `-A`.
 *
 * Usage: `deno run -A tests/directory_cors_driver.ts PAGE_URL DIRECTORY_URL /usr/bin/chromium`
 * @module
 */

/** What the page could read of each call: a status, or the error the browser gave instead. */
export interface CorsReport {
  read: number | string;
  /** The `files` of the read's body, as the page parsed it. */
  files: number | string;
  head: number | string;
  /** A publication with a JSON body: Chromium sends a preflight first. */
  write: number | string;
  pageErrors: string[];
}

async function drive(pageUrl: string, directory: string, executablePath: string) {
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath,
    args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
  });
  try {
    const page = await browser.newPage();
    const pageErrors: string[] = [];
    page.on("pageerror", (error) => pageErrors.push(String(error)));
    await page.goto(pageUrl);
    const seen = await page.evaluate(async (directory) => {
      const attempt = async (call: () => Promise<number | string>) => {
        try {
          return await call();
        } catch (error) {
          return String(error);
        }
      };
      return {
        read: await attempt(async () => (await fetch(`${directory}/files`)).status),
        files: await attempt(async () =>
          (await (await fetch(`${directory}/files`)).json()).files.length
        ),
        head: await attempt(async () =>
          (await fetch(`${directory}/health`, { method: "HEAD" })).status
        ),
        write: await attempt(async () =>
          (await fetch(`${directory}/files`, {
            method: "POST",
            headers: { "content-type": "application/json" },
            body: "{}",
          })).status
        ),
      };
    }, directory);
    return { ...seen, pageErrors } satisfies CorsReport;
  } finally {
    await browser.close();
  }
}

if (import.meta.main) {
  console.log(JSON.stringify(await drive(Deno.args[0], Deno.args[1], Deno.args[2])));
}
