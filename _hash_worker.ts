/**
 * A SHA-256 that runs on a worker thread, fed views of SharedArrayBuffers so no byte is copied.
 * The splitter hashes each fragment on the main thread and the whole file here, at once, which
 * is what lets two hashes per byte keep up with the disk on two cores.
 * @module
 */
/// <reference lib="deno.worker" />
import { createHash } from "node:crypto";

type Request =
  | { view: Uint8Array<SharedArrayBuffer> }
  | { digest: true };

/** A running SHA-256 on a worker thread; dispose it to stop the thread. */
export class WorkerHash implements Disposable {
  #worker = new Worker(import.meta.url, { type: "module" });
  #pending: ((value: string | null) => void)[] = [];

  constructor() {
    this.#worker.onmessage = (event: MessageEvent<string | null>) => {
      this.#pending.shift()?.(event.data);
    };
  }

  /** Hashes `view` next; resolves once the worker is done with it (so it may be reused). */
  update(view: Uint8Array<SharedArrayBuffer>): Promise<void> {
    return this.#call({ view }).then(() => {});
  }

  /** The hex digest of everything given to {@link update}. */
  async digest(): Promise<string> {
    return (await this.#call({ digest: true }))!;
  }

  #call(request: Request): Promise<string | null> {
    const reply = new Promise<string | null>((resolve) => this.#pending.push(resolve));
    this.#worker.postMessage(request);
    return reply;
  }

  [Symbol.dispose](): void {
    this.#worker.terminate();
  }
}

// Inside the worker: answer each request in order.
if (typeof WorkerGlobalScope !== "undefined" && self instanceof WorkerGlobalScope) {
  const hash = createHash("sha256");
  self.onmessage = ({ data }: MessageEvent<Request>) => {
    if ("view" in data) {
      hash.update(data.view);
      self.postMessage(null);
    } else {
      self.postMessage(hash.digest("hex"));
    }
  };
}
