/**
 * A lean HTTP/1.1 load generator for benches that measure a server's rate: keep-alive
 * connections over bare sockets, requests encoded beforehand and pipelined (sent back to back,
 * the answers read in order), as wrk does with its pipelining script. `fetch` costs the bench
 * about 55 µs of CPU a request, more than the servers it measures, and on 2 cores the load
 * generator's CPU comes out of theirs; this one costs about 10.
 * @module
 */

/** One request: method, path (with its query), headers and body. */
export interface HttpCall {
  method?: string;
  path: string;
  headers?: Record<string, string>;
  body?: string;
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();
const HEADER_END = encoder.encode("\r\n\r\n");
/** An answer's head larger than this is not a server we measure. */
const MAX_HEAD = 16 * 1024;

/** Requests ({@link HttpConnection.encode}d) as one write, for {@link HttpConnection.sendAll}. */
export function pipeline(requests: Uint8Array[]): Uint8Array {
  const bytes = new Uint8Array(requests.reduce((sum, request) => sum + request.length, 0));
  let offset = 0;
  for (const request of requests) bytes.set(request, (offset += request.length) - request.length);
  return bytes;
}

/** A keep-alive connection to one server that sends a request and reads its whole answer. */
export class HttpConnection implements Disposable {
  readonly #conn: Deno.TcpConn;
  readonly #host: string;
  /** Bytes read and not yet consumed: the buffer, and where they start and end in it. */
  #buffer = new Uint8Array(64 * 1024);
  #start = 0;
  #end = 0;

  private constructor(conn: Deno.TcpConn, host: string) {
    this.#conn = conn;
    this.#host = host;
  }

  /** Connects to `http://host:port` (the URL's path is ignored). */
  static async open(url: string): Promise<HttpConnection> {
    const { hostname, port, host } = new URL(url);
    const conn = await Deno.connect({ hostname, port: Number(port) });
    conn.setNoDelay(true);
    return new HttpConnection(conn, host);
  }

  /** The call as bytes on the wire, to build before a timed run ({@link pipeline}). */
  encode({ method = "GET", path, headers = {}, body }: HttpCall): Uint8Array {
    let head = `${method} ${path} HTTP/1.1\r\nhost: ${this.#host}\r\n`;
    for (const [name, value] of Object.entries(headers)) head += `${name}: ${value}\r\n`;
    const payload = body === undefined ? "" : body;
    if (body !== undefined) head += `content-length: ${encoder.encode(payload).length}\r\n`;
    return encoder.encode(`${head}\r\n${payload}`);
  }

  /**
   * Sends `count` requests back to back (HTTP/1.1 pipelining: one write of their bytes, see
   * {@link pipeline}; the answers come in order) and reads every answer: their statuses.
   */
  async sendAll(bytes: Uint8Array, count: number): Promise<number[]> {
    for (let at = 0; at < bytes.length;) at += await this.#conn.write(bytes.subarray(at));
    // Answers already held are parsed without an await: at 8 or more to a read, most are.
    const statuses: number[] = [];
    while (statuses.length < count) {
      const status = this.#takeAnswer();
      if (status < 0) await this.#fill();
      else statuses.push(status);
    }
    return statuses;
  }

  /** Takes one whole answer off the buffer: its status, or -1 while it is not all here. */
  #takeAnswer(): number {
    const buffer = this.#buffer;
    let headEnd = -1;
    // indexOf runs natively: jump from one CR to the next.
    for (let i = buffer.indexOf(13, this.#start); i >= 0 && i + 3 < this.#end;) {
      if (buffer[i + 1] === 10 && buffer[i + 2] === 13 && buffer[i + 3] === 10) {
        headEnd = i;
        break;
      }
      i = buffer.indexOf(13, i + 1);
    }
    if (headEnd < 0) {
      if (this.#end - this.#start > MAX_HEAD) throw new Error("An answer's head is too large");
      return -1;
    }
    const head = decoder.decode(buffer.subarray(this.#start, headEnd));
    const length = head.match(/\r\ncontent-length:\s*(\d+)/i);
    if (!length) throw new Error(`An answer without content-length: ${head.split("\r\n")[0]}`);
    const bodyEnd = headEnd + HEADER_END.length + Number(length[1]);
    if (bodyEnd > this.#end) return -1;
    this.#start = bodyEnd;
    return Number(head.slice(9, 12));
  }

  /** Reads more bytes after those held, moving them to the buffer's start first. */
  async #fill(): Promise<void> {
    if (this.#start > 0) {
      this.#buffer.copyWithin(0, this.#start, this.#end);
      this.#end -= this.#start;
      this.#start = 0;
    }
    if (this.#end === this.#buffer.length) {
      const larger = new Uint8Array(this.#buffer.length * 2);
      larger.set(this.#buffer);
      this.#buffer = larger;
    }
    const read = await this.#conn.read(this.#buffer.subarray(this.#end));
    if (read === null) throw new Error("The server closed the connection");
    this.#end += read;
  }

  [Symbol.dispose](): void {
    try {
      this.#conn.close();
    } catch { /* closed already */ }
  }
}
