import assert from "node:assert/strict";
import { LineBuffer } from "../common/lines.ts";

const encoder = new TextEncoder();

/** Feeds `pieces` one after another, shifting every line after each push, as a reader does. */
function parse(maxLine: number, pieces: Uint8Array[]): { lines: string[]; overflow: boolean } {
  const buffer = new LineBuffer(maxLine);
  const lines: string[] = [];
  for (const piece of pieces) {
    buffer.push(piece);
    for (let line; (line = buffer.shift()) !== undefined;) lines.push(line);
  }
  return { lines, overflow: buffer.overflow };
}

/** Every way of cutting `bytes` in two, plus one byte at a time. */
function cuts(bytes: Uint8Array): Uint8Array[][] {
  const ways = [];
  for (let at = 0; at <= bytes.length; at++) ways.push([bytes.subarray(0, at), bytes.subarray(at)]);
  ways.push([...bytes].map((byte) => Uint8Array.of(byte)));
  return ways;
}

const MAX = 24;
const CASES: { name: string; input: string; lines: string[]; overflow: boolean }[] = [
  {
    name: "plain, CRLF, empty and multi-byte lines",
    input: "SUB:a\r\nPUB:a:héllo ✓ 🎞\n\n\r\nPING\npartial",
    lines: ["SUB:a", "PUB:a:héllo ✓ 🎞", "", "", "PING"],
    overflow: false,
  },
  {
    name: "a line of exactly the limit",
    input: `${"x".repeat(MAX)}\n${"y".repeat(MAX - 1)}\r\n`,
    lines: ["x".repeat(MAX), "y".repeat(MAX - 1)],
    overflow: false,
  },
  {
    name: "a line one byte over the limit, after good ones",
    input: `ok\n${"x".repeat(MAX + 1)}\nnever\n`,
    lines: ["ok"],
    overflow: true,
  },
  {
    name: "a stream with no newline at all",
    input: "z".repeat(MAX * 5),
    lines: [],
    overflow: true,
  },
  {
    name: "NUL bytes and a lone CR inside a line",
    input: "a\0b\rc\n\0\n",
    lines: ["a\0b\rc", "\0"],
    overflow: false,
  },
];

for (const { name, input, lines, overflow } of CASES) {
  Deno.test(`LineBuffer gives the same result however the input is cut: ${name}`, () => {
    const bytes = encoder.encode(input);
    assert.deepEqual(parse(MAX, [bytes]), { lines, overflow }, "whole input");
    for (const pieces of cuts(bytes)) {
      assert.deepEqual(
        parse(MAX, pieces),
        { lines, overflow },
        `cut ${pieces.map((p) => p.length)}`,
      );
    }
  });
}

Deno.test("LineBuffer never holds more than the limit of a line that has no newline", () => {
  const buffer = new LineBuffer(1024);
  const chunk = new Uint8Array(100).fill(0x61);
  let most = 0;
  for (let i = 0; i < 10_000 && !buffer.overflow; i++) {
    buffer.push(chunk);
    assert.deepEqual(buffer.shift(), undefined);
    most = Math.max(most, buffer.buffered);
  }
  assert(buffer.overflow);
  assert(most <= 1024, `held ${most} bytes`);
  buffer.push(chunk);
  assert.deepEqual(buffer.buffered, 0, "takes nothing after an overflow");
});

Deno.test("LineBuffer hands over the raw bytes after a header line", () => {
  const buffer = new LineBuffer(8);
  const body = new Uint8Array(1000).map((_, i) => i % 251);
  buffer.push(new Uint8Array([...encoder.encode("OK 1000\n"), ...body.subarray(0, 600)]));
  assert.deepEqual(buffer.shift(), "OK 1000");
  assert.deepEqual(buffer.take(), body.subarray(0, 600));
  buffer.push(body.subarray(600));
  assert.deepEqual(buffer.take(300), body.subarray(600, 900));
  assert.deepEqual(buffer.take(), body.subarray(900));
  assert.deepEqual(buffer.buffered, 0);
});

Deno.test("LineBuffer refuses a limit that is not a positive integer", () => {
  assert.throws(() => new LineBuffer(0), RangeError);
  assert.throws(() => new LineBuffer(1.5), RangeError);
});
