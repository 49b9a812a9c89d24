// A Flux-KV client on Node.js's gRPC stack (@grpc/grpc-js), speaking Flux-KV's
// proto (proto/compat_kv.proto, service.KVService). One call per run:
//
//   node client.js ADDRESS [--ca FILE [--cert FILE --key FILE]] [--token TOKEN] set KEY VALUE | get KEY | del KEY
//
// prints one JSON line: {"ok": true, "answer": {...}} or
// {"ok": false, "code": "PERMISSION_DENIED", "details": "..."}.
"use strict";

const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTO = path.join(__dirname, "..", "..", "proto", "compat_kv.proto");

function main(argv) {
  const [address, ...rest] = argv;
  const options = {};
  while (rest.length && rest[0].startsWith("--")) {
    options[rest.shift().slice(2)] = rest.shift();
  }
  const [method, key, value] = rest;
  const service = grpc.loadPackageDefinition(protoLoader.loadSync(PROTO, { defaults: true })).service.KVService;
  const read = (name) => (options[name] ? fs.readFileSync(options[name]) : null);
  const credentials = options.ca
    ? grpc.credentials.createSsl(read("ca"), read("key"), read("cert"))
    : grpc.credentials.createInsecure();
  const client = new service(address, credentials);
  const metadata = new grpc.Metadata();
  if (options.token) {
    metadata.set("authorization", `Bearer ${options.token}`);
  }
  const request = { set: { key, value }, get: { key }, del: { key } }[method];
  const rpc = { set: "Set", get: "Get", del: "Del" }[method];
  if (!request) {
    throw new Error(`unknown method ${method}: expected set, get or del`);
  }
  const deadline = new Date(Date.now() + 10000);
  client[rpc](request, metadata, { deadline }, (error, answer) => {
    const code = error ? Object.keys(grpc.status).find((name) => grpc.status[name] === error.code) : null;
    const line = error ? { ok: false, code, details: error.details } : { ok: true, answer };
    process.stdout.write(JSON.stringify(line) + "\n");
    client.close();
  });
}

main(process.argv.slice(2));
