// A Node.js gRPC client of the peer, run with `node` (not Deno) by tests/grpc_interop_test.ts:
// it calls Echo and Download with @grpc/grpc-js, then the standard grpc.health.v1.Health (Check
// and Watch) and server reflection (v1 list_services and file_containing_symbol), and prints
// one JSON line of what it got.
// Usage: node client.mjs <host:port> <proto file> <fragment name> <health proto> <reflection proto>
// The packages are found through NODE_PATH, which the test points at Deno's npm cache; NODE_PATH
// only applies to require(), hence createRequire.
import { createHash } from "node:crypto";
import { createRequire } from "node:module";

const require = createRequire(import.meta.url);
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const [address, protoPath, name, healthProto, reflectionProto] = process.argv.slice(2);
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

// Health, as load balancers and `grpc_health_probe` call it.
const load = (path) =>
  grpc.loadPackageDefinition(protoLoader.loadSync(path, { keepCase: true, enums: String }));
const { Health } = load(healthProto).grpc.health.v1;
const health = new Health(address, grpc.credentials.createInsecure());
const check = (service) =>
  new Promise((resolve) => {
    health.Check({ service }, { deadline: deadline() }, (error, reply) => {
      resolve(error ? grpc.status[error.code] : reply.status);
    });
  });
const checks = {
  "": await check(""),
  "p2p.FileTransfer": await check("p2p.FileTransfer"),
  "no.Such": await check("no.Such"),
};
const watch = health.Watch({ service: "p2p.FileTransfer" });
const watched = await new Promise((resolve, reject) => {
  watch.once("data", (reply) => resolve(reply.status));
  watch.once("error", reject);
});
watch.cancel();
health.close();

// Reflection, as `grpcurl list` and `grpcurl describe` use it: no proto file of ours needed.
const { ServerReflection } = load(reflectionProto).grpc.reflection.v1;
const reflection = new ServerReflection(address, grpc.credentials.createInsecure());
const stream = reflection.ServerReflectionInfo({ deadline: deadline() });
const ask = (request) =>
  new Promise((resolve, reject) => {
    stream.once("data", resolve);
    stream.once("error", reject);
    stream.write(request);
  });
const listed = await ask({ list_services: "" });
const services = listed.list_services_response.service.map((service) => service.name).sort();
const described = await ask({ file_containing_symbol: "p2p.FileTransfer" });
const files = described.file_descriptor_response.file_descriptor_proto.length;
stream.end();
reflection.close();

console.log(JSON.stringify({
  node: process.version,
  echo,
  size,
  sha256,
  received: hash.digest("hex"),
  chunkSizes,
  traversal: missing,
  checks,
  watched,
  services,
  files,
}));
