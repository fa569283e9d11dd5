/**
 * A push-based line parser with a byte limit, shared by the line protocols (the broker, the peer's
 * TCP protocol). Bytes go in with {@link LineBuffer.push}, complete lines come out with
 * {@link LineBuffer.shift}; it does no I/O itself, so it gives the same lines however the input
 * is cut into packets.
 *
 * ```ts
 * const lines = new LineBuffer(64 * 1024);
 * lines.push(chunk);
 * for (let line; (line = lines.shift()) !== undefined;) handle(line);
 * if (lines.overflow) closeWith("ERR:line too long");
 * ```
 * @module
 */

const NEWLINE = 0x0a;
const CARRIAGE_RETURN = 0x0d;
const INITIAL_CAPACITY = 4096;

/**
 * Splits bytes into UTF-8 lines ending in `\n` (a `\r` before it is dropped), refusing any line
 * longer than `maxLine` bytes: once one is seen, {@link overflow} turns true for good and the
 * buffer lets go of its bytes. Used as above (every line shifted after each push), it never holds
 * more than `maxLine` bytes of an incomplete line between pushes, so a peer streaming without
 * newlines cannot grow it.
 */
export class LineBuffer {
  /** The most bytes a line may hold, not counting its `\n`. */
  readonly maxLine: number;
  #bytes = new Uint8Array(INITIAL_CAPACITY);
  #start = 0;
  #end = 0;
  // Where the newline search resumes, so a long line arriving in small packets is scanned once.
  #scanned = 0;
  // Where the last, still incomplete line starts (just after the last newline pushed).
  #tailStart = 0;
  #overflow = false;
  readonly #decoder = new TextDecoder();

  constructor(maxLine: number) {
    if (!Number.isInteger(maxLine) || maxLine < 1) {
      throw new RangeError(`maxLine must be a positive integer, got ${maxLine}`);
    }
    this.maxLine = maxLine;
  }

  /** True once a line passed the limit; the stream cannot be trusted after that. */
  get overflow(): boolean {
    return this.#overflow;
  }

  /** How many bytes are held and not yet taken. */
  get buffered(): number {
    return this.#end - this.#start;
  }

  /**
   * Appends a copy of `chunk` (the caller may reuse its buffer). When the chunk only lengthens an
   * incomplete line past the limit, it overflows at once instead of keeping the bytes.
   */
  push(chunk: Uint8Array): void {
    if (this.#overflow || chunk.length === 0) return;
    const lastNewline = chunk.lastIndexOf(NEWLINE);
    const onlyTail = lastNewline === -1 && this.#tailStart <= this.#start;
    if (onlyTail && this.#end - this.#start + chunk.length > this.maxLine) return this.#fail();
    this.#reserve(chunk.length);
    this.#bytes.set(chunk, this.#end);
    if (lastNewline !== -1) this.#tailStart = this.#end + lastNewline + 1;
    this.#end += chunk.length;
  }

  /**
   * The next complete line without its `\n` or `\r\n`, or `undefined` when no complete line is
   * buffered yet (or the limit was passed: check {@link overflow}).
   */
  shift(): string | undefined {
    if (this.#overflow) return undefined;
    const limit = Math.min(this.#end, this.#start + this.maxLine + 1);
    const newline = this.#bytes.subarray(0, limit).indexOf(NEWLINE, this.#scanned);
    if (newline === -1) {
      this.#scanned = limit;
      if (this.#end - this.#start > this.maxLine) this.#fail();
      return undefined;
    }
    let stop = newline;
    if (stop > this.#start && this.#bytes[stop - 1] === CARRIAGE_RETURN) stop--;
    const line = this.#decoder.decode(this.#bytes.subarray(this.#start, stop));
    this.#start = this.#scanned = newline + 1;
    return line;
  }

  /** Takes up to `max` raw bytes that follow the lines already shifted (a body after a header). */
  take(max = Infinity): Uint8Array {
    const end = Math.min(this.#end, this.#start + max);
    const bytes = this.#bytes.slice(this.#start, end);
    this.#start = end;
    this.#scanned = Math.max(this.#scanned, end);
    this.#tailStart = Math.max(this.#tailStart, end);
    return bytes;
  }

  #fail() {
    this.#overflow = true;
    this.#bytes = new Uint8Array(0); // let the oversized line's memory go at once
    this.#start =
      this.#end =
      this.#scanned =
      this.#tailStart =
        0;
  }

  // Makes room for `extra` more bytes: first by moving the unread bytes to the front, and only
  // then by growing (to at most what the unread bytes plus this chunk need).
  #reserve(extra: number) {
    if (this.#end + extra <= this.#bytes.length) return;
    const unread = this.#end - this.#start;
    let target = this.#bytes;
    if (unread + extra > target.length) {
      target = new Uint8Array(Math.max(unread + extra, target.length * 2));
    }
    target.set(this.#bytes.subarray(this.#start, this.#end), 0);
    this.#bytes = target;
    this.#scanned -= this.#start;
    this.#tailStart -= this.#start;
    this.#start = 0;
    this.#end = unread;
  }
}
