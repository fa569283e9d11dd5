/**
 * A SHA-256 that runs on a worker thread, fed views of SharedArrayBuffers so no byte is copied.
 * The splitter runs two at once, one for each fragment and one for the whole file, so that two
 * hashes per byte keep up with the disk on two cores while its main thread only moves buffers.
 * @module
 */
/// <reference lib="deno.worker" />
import { createHash } from "node:crypto";

type Request =
  | { view: Uint8Array<SharedArrayBuffer> }
  | { digest: "restart" | "peek" };

interface Pending {
  resolve: (value: string | null) => void;
  reject: (error: unknown) => void;
}

/** A running SHA-256 on a worker thread; dispose it to stop the thread. */
export class WorkerHash implements Disposable {
  #worker = new Worker(import.meta.url, { type: "module" });
  #pending: Pending[] = [];

  constructor() {
    this.#worker.onmessage = (event: MessageEvent<string | null>) => {
      this.#pending.shift()?.resolve(event.data);
    };
    // A crashed worker would never answer: fail every call instead of hanging.
    this.#worker.onerror = (event: ErrorEvent) => {
      event.preventDefault();
      const error = new Error(`Hash worker failed: ${event.message}`);
      for (const call of this.#pending.splice(0)) call.reject(error);
    };
  }

  /** Hashes `view` next; resolves once the worker is done with it (so it may be reused). */
  update(view: Uint8Array<SharedArrayBuffer>): Promise<unknown> {
    return this.#call({ view });
  }

  /** The hex digest of everything given since the last digest; the hash then starts again. */
  async digest(): Promise<string> {
    return (await this.#call({ digest: "restart" }))!;
  }

  /** The hex digest of everything given since the last digest, and the hash goes on. */
  async peek(): Promise<string> {
    return (await this.#call({ digest: "peek" }))!;
  }

  #call(request: Request): Promise<string | null> {
    const reply = new Promise<string | null>((resolve, reject) => {
      this.#pending.push({ resolve, reject });
    });
    this.#worker.postMessage(request);
    return reply;
  }

  [Symbol.dispose](): void {
    this.#worker.terminate();
  }
}

/**
 * The same SHA-256 on this thread, for small inputs: starting a worker costs more than hashing a
 * few megabytes, and a crowd of viewers joining at once would all pay it on the same two cores.
 */
export class LocalHash implements Disposable {
  #hash = createHash("sha256");

  update(view: Uint8Array): Promise<unknown> {
    this.#hash.update(view);
    return Promise.resolve();
  }

  digest(): Promise<string> {
    const digest = this.#hash.digest("hex");
    this.#hash = createHash("sha256");
    return Promise.resolve(digest);
  }

  peek(): Promise<string> {
    return Promise.resolve(this.#hash.copy().digest("hex"));
  }

  [Symbol.dispose](): void {}
}

// Inside the worker: answer each request in order.
if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) {
  let hash = createHash("sha256");
  self.onmessage = ({ data }: MessageEvent<Request>) => {
    if ("view" in data) {
      hash.update(data.view);
      self.postMessage(null);
    } else if (data.digest === "peek") {
      self.postMessage(hash.copy().digest("hex"));
    } else {
      self.postMessage(hash.digest("hex"));
      hash = createHash("sha256");
    }
  };
}
