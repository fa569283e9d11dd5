/**
 * Upload pacing for `--max-upload RATE`: a token bucket shared by every connection of a peer, so
 * the limit holds for the peer as a whole, as in real clients.
 * @module
 */

const UNITS: Record<string, number> = {
  "": 1,
  K: 1e3,
  KI: 1024,
  M: 1e6,
  MI: 1024 ** 2,
  G: 1e9,
  GI: 1024 ** 3,
};

/** Parses `20MB/s`, `512KiB/s`, `1.5GB/s` or a bare number of bytes per second. */
export function parseRate(text: string): number {
  const match = text.trim().match(/^(\d+(?:\.\d+)?)\s*(?:([kmg]i?)b?|b)?(?:\/s)?$/i);
  const rate = match ? Number(match[1]) * UNITS[(match[2] ?? "").toUpperCase()]! : NaN;
  if (!(rate >= 1)) {
    throw new TypeError(`Invalid rate "${text}": expected e.g. 20MB/s, 512KiB/s or 1000000`);
  }
  return rate;
}

/**
 * A pacer that lets `bytesPerSecond` through on average, with bursts of at most a tenth of a
 * second's worth: `await throttle(n)` before sending n bytes. A wait ends early, rejecting, when
 * `signal` aborts (the connection closed), so nothing sits out a long wait for nobody.
 */
export function createThrottle(
  bytesPerSecond: number,
): (bytes: number, signal?: AbortSignal) => Promise<void> {
  const burst = Math.max(bytesPerSecond / 10, 64 * 1024);
  let tokens = burst;
  let last = performance.now();
  let queue: Promise<void> = Promise.resolve();
  return (bytes, signal) => {
    // Senders take turns, so each waits for the tokens the ones before it used.
    const turn = queue.then(() => {
      signal?.throwIfAborted();
      const now = performance.now();
      tokens = Math.min(burst, tokens + (now - last) / 1000 * bytesPerSecond);
      last = now;
      tokens -= bytes;
      if (tokens >= 0) return;
      return new Promise<void>((resolve, reject) => {
        const timer = setTimeout(done, -tokens / bytesPerSecond * 1000);
        signal?.addEventListener("abort", done, { once: true });
        function done() {
          clearTimeout(timer);
          signal?.removeEventListener("abort", done);
          if (signal?.aborted) reject(signal.reason);
          else resolve();
        }
      });
    });
    queue = turn.catch(() => {});
    return turn;
  };
}
