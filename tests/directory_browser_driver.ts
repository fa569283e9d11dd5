/**
 * Drives headless Chromium through npm `playwright-core` for directory_browser_test.ts: opens
 * the Swagger UI at the URL given, waits for the operations, and prints one JSON line with what
 * it saw. A separate process because playwright-core reads /proc/sys at import time, which Deno
 * allows only with `-A`, and the tests themselves run with the narrower `-P`.
 *
 * Usage: `deno run -A tests/directory_browser_driver.ts http://127.0.0.1:PORT/apidocs /usr/bin/chromium`
 * @module
 */

/** What the page did, printed as JSON for the test to judge. */
export interface BrowserReport {
  status: number | undefined;
  operations: string[];
  outside: string[];
  errors: string[];
}

async function drive(url: string, executablePath: string): Promise<BrowserReport> {
  // Imported here, not at the top: a glob such as `deno test tests/directory_*.ts` loads this
  // file too, and playwright-core's import alone needs `-A`.
  const { chromium } = await import("playwright-core");
  const browser = await chromium.launch({
    executablePath,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
  try {
    const page = await browser.newPage();
    const origin = new URL(url).origin;
    const report: BrowserReport = { status: undefined, operations: [], outside: [], errors: [] };
    // Every request the page makes passes here; anything outside the directory is refused.
    await page.route("**/*", (route) => {
      const requested = route.request().url();
      if (new URL(requested).origin === origin) return route.continue();
      report.outside.push(requested);
      return route.abort("blockedbyclient");
    });
    page.on("pageerror", (error) => report.errors.push(String(error)));
    report.status = (await page.goto(url))?.status();
    try {
      await page.locator(".opblock").first().waitFor({ timeout: 15_000 });
    } catch (error) {
      // A page that never renders still reports, so the test can say what it asked for instead.
      report.errors.push(String(error));
      return report;
    }
    report.operations = await page.locator(".opblock-summary").evaluateAll((elements) =>
      elements.map((element) => {
        const method = element.querySelector(".opblock-summary-method")?.textContent;
        const path = element.querySelector(".opblock-summary-path")?.getAttribute("data-path");
        return `${method} ${path}`;
      })
    );
    return report;
  } finally {
    await browser.close();
  }
}

if (import.meta.main) console.log(JSON.stringify(await drive(Deno.args[0], Deno.args[1])));
