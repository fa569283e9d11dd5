import assert from "node:assert/strict";
import { ConnectionCounts, defaultMaxPerAddress } from "../common/connection_counts.ts";

Deno.test("ConnectionCounts lets connections in up to each limit, and a released place is free again", () => {
  const counts = new ConnectionCounts(3, 2);
  assert.equal(counts.admit("10.0.0.1"), undefined);
  assert.equal(counts.admit("10.0.0.1"), undefined);
  // The address is full; another address is not, until the server is.
  assert.equal(counts.admit("10.0.0.1"), "address");
  assert.equal(counts.admit("10.0.0.2"), undefined);
  assert.equal(counts.admit("10.0.0.3"), "server");
  assert.equal(counts.open, 3);
  // A refusal counts nothing; a release frees its place, for that address too.
  counts.release("10.0.0.1");
  assert.equal(counts.open, 2);
  assert.equal(counts.admit("10.0.0.1"), undefined);
  assert.equal(counts.admit("10.0.0.3"), "server");
  for (const address of ["10.0.0.1", "10.0.0.1", "10.0.0.2"]) counts.release(address);
  assert.equal(counts.open, 0);
  assert.equal(counts.admit("10.0.0.3"), undefined);
});

Deno.test("defaultMaxPerAddress is a quarter of the connection limit, and at least 1", () => {
  assert.equal(defaultMaxPerAddress(1024), 256);
  assert.equal(defaultMaxPerAddress(3), 1);
});
