// A Node.js gRPC client of the peer, run with `node` (not Deno) by tests/grpc_interop_test.ts:
// it calls Echo and Download with @grpc/grpc-js and prints one JSON line of what it got.
// Usage: node client.mjs <host:port> <proto file> <fragment name>
// The packages are found through NODE_PATH, which the test points at Deno's npm cache; NODE_PATH
// only applies to require(), hence createRequire.
import { createHash } from "node:crypto";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoPath, name] = process.argv.slice(2);
const definition = protoLoader.loadSync(protoPath, {
  keepCase: true,
  longs: Number,
  defaults: true,
});
const { FileTransfer } = grpc.loadPackageDefinition(definition).p2p;
const client = new FileTransfer(address, grpc.credentials.createInsecure());
const deadline = () => Date.now() + 10_000;

const echo = await new Promise((resolve, reject) => {
  client.Echo({ message: "hello from node" }, { deadline: deadline() }, (error, reply) => {
    if (error) reject(error);
    else resolve(reply.message);
  });
});

const hash = createHash("sha256");
const chunkSizes = [];
let size, sha256;
for await (const chunk of client.Download({ name }, { deadline: deadline() })) {
  if (chunkSizes.length === 0) ({ size, sha256 } = chunk);
  chunkSizes.push(chunk.data.length);
  hash.update(chunk.data);
}

let missing;
try {
  for await (const _ of client.Download({ name: "../etc/passwd" }, { deadline: deadline() })) {
    // nothing should arrive
  }
} catch (error) {
  missing = grpc.status[error.code];
}

client.close();
console.log(JSON.stringify({
  node: process.version,
  echo,
  size,
  sha256,
  received: hash.digest("hex"),
  chunkSizes,
  traversal: missing,
}));
