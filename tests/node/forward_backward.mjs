// A Node.js client of cispo.v1.TrainingService, built on @grpc/grpc-js and @grpc/proto-loader.
//
//   node forward_backward.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < batch.json
//
// PROTO_DIRs: the folder holding cispo/v1/training.proto and the one holding google/rpc/*.proto
// (googleapis-common-protos). batch.json:
//   {"data": [{"model_input": [ints], "target_tokens": [ints], "logprobs": [floats],
//              "advantages": [floats]}, ...],
//    "loss_fn": "cispo", "loss_fn_config": {"clip_low_threshold": 0.0, ...}}
//
// It sends one ForwardBackward built only from typed fields (int64_data, float_data), then the same
// batch with datum 1's logprobs one element short, and prints one JSON object on stdout:
//   {"metrics": {...}, "logprobs": [[...], ...],
//    "invalid": {"code": 3, "code_name": "INVALID_ARGUMENT", "message": "...",
//                "field_violations": [{"field": "...", "description": "..."}]}}
// The per-datum logprobs are decoded from the response's raw_data (float32, little-endian); the
// field violations from the google.rpc.Status in the grpc-status-details-bin trailer.
//
// Security, from the environment (as the Python client):
//   CISPO_TOKEN             sent as `authorization: Bearer <token>` on every call
//   CISPO_TLS_CA_FILE       PEM CA certificates of the server: the channel is TLS
//   CISPO_CLIENT_CERT_FILE, CISPO_CLIENT_KEY_FILE   this client's certificate and key (mTLS)
// Without CISPO_TLS_CA_FILE (or a client certificate) the channel is plaintext.

import fs from "node:fs";
import path from "node:path";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";
import protobuf from "protobufjs";

function parseArgs(argv) {
  let address = null;
  const includeDirs = [];
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "-I" || argv[i] === "--include") includeDirs.push(argv[++i]);
    else if (argv[i].startsWith("-I")) includeDirs.push(argv[i].slice(2));
    else if (address === null) address = argv[i];
    else throw new Error(`unexpected argument ${argv[i]}`);
  }
  if (address === null || includeDirs.length === 0) {
    throw new Error("usage: node forward_backward.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < batch.json");
  }
  return { address, includeDirs };
}

// google.rpc.Status and google.rpc.BadRequest, found on the same include path as the service.
function loadRichErrorTypes(includeDirs) {
  const root = new protobuf.Root();
  root.resolvePath = (origin, target) => {
    for (const dir of includeDirs) {
      const candidate = path.join(dir, target);
      if (fs.existsSync(candidate)) return candidate;
    }
    return protobuf.util.path.resolve(origin, target);
  };
  root.loadSync(["google/rpc/status.proto", "google/rpc/error_details.proto"], { keepCase: true });
  return root;
}

// Elements of a response Tensor: raw_data as little-endian float32, or a typed field.
function tensorToArray(tensor) {
  if (tensor.raw_data && tensor.raw_data.length > 0) {
    if (tensor.dtype !== "DTYPE_FLOAT32") throw new Error(`expected float32 logprobs, got ${tensor.dtype}`);
    const buf = tensor.raw_data;
    const bytes = new Uint8Array(buf.length);
    bytes.set(buf);  // a copy: the Buffer's offset in its pool need not be 4-aligned
    const view = new DataView(bytes.buffer);
    return Array.from({ length: buf.length / 4 }, (_, i) => view.getFloat32(4 * i, true));
  }
  if (tensor.float_data && tensor.float_data.length > 0) return tensor.float_data.map(Number);
  if (tensor.double_data && tensor.double_data.length > 0) return tensor.double_data.map(Number);
  return [];
}

function toRequest(batch) {
  return {
    data: batch.data.map((d) => ({
      model_input: { int64_data: d.model_input },
      loss_fn_inputs: {
        target_tokens: { int64_data: d.target_tokens },
        logprobs: { float_data: d.logprobs },
        advantages: { float_data: d.advantages },
      },
    })),
    loss_fn: batch.loss_fn,
    loss_fn_config: batch.loss_fn_config,
  };
}

// Channel credentials and per-call metadata from the CISPO_* environment.
function securityFromEnv(env) {
  const read = (name) => (env[name] ? fs.readFileSync(env[name]) : null);
  const rootCerts = read("CISPO_TLS_CA_FILE");
  const certChain = read("CISPO_CLIENT_CERT_FILE");
  const privateKey = read("CISPO_CLIENT_KEY_FILE");
  if ((certChain === null) !== (privateKey === null)) {
    throw new Error("CISPO_CLIENT_CERT_FILE and CISPO_CLIENT_KEY_FILE go together");
  }
  const tls = rootCerts !== null || certChain !== null;
  const credentials = tls ? grpc.credentials.createSsl(rootCerts, privateKey, certChain) : grpc.credentials.createInsecure();
  const metadata = new grpc.Metadata();
  const token = (env.CISPO_TOKEN || "").trim();
  if (token) metadata.set("authorization", `Bearer ${token}`);
  return { credentials, metadata };
}

function call(client, method, request, metadata) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline: Date.now() + 60_000 }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

function decodeStatusDetails(err, richTypes) {
  const [details] = err.metadata ? err.metadata.get("grpc-status-details-bin") : [];
  if (!details) return { status: null, field_violations: [] };
  const Status = richTypes.lookupType("google.rpc.Status");
  const status = Status.decode(details);
  const fieldViolations = [];
  for (const any of status.details) {
    const typeName = any.type_url.slice(any.type_url.lastIndexOf("/") + 1);
    if (typeName !== "google.rpc.BadRequest") continue;
    const badRequest = richTypes.lookupType(typeName).decode(any.value);
    for (const v of badRequest.field_violations) fieldViolations.push({ field: v.field, description: v.description });
  }
  return { status: { code: status.code, message: status.message }, field_violations: fieldViolations };
}

async function main() {
  const { address, includeDirs } = parseArgs(process.argv.slice(2));
  const batch = JSON.parse(fs.readFileSync(0, "utf8"));

  const packageDefinition = protoLoader.loadSync("cispo/v1/training.proto", {
    keepCase: true,
    longs: String,
    enums: String,
    bytes: Buffer,
    defaults: true,
    oneofs: true,
    includeDirs,
  });
  const cispo = grpc.loadPackageDefinition(packageDefinition).cispo.v1;
  const { credentials, metadata } = securityFromEnv(process.env);
  const client = new cispo.TrainingService(address, credentials);
  const richTypes = loadRichErrorTypes(includeDirs);

  try {
    const response = await call(client, "ForwardBackward", toRequest(batch), metadata);
    const result = {
      metrics: Object.fromEntries(Object.entries(response.metrics).map(([k, v]) => [k, Number(v)])),
      logprobs: response.loss_fn_outputs.map((out) => tensorToArray(out.logprobs)),
    };

    // The same batch with datum 1's sampling logprobs one element short.
    const invalid = toRequest(batch);
    invalid.data[1].loss_fn_inputs.logprobs.float_data = batch.data[1].logprobs.slice(1);
    try {
      await call(client, "ForwardBackward", invalid, metadata);
      result.invalid = { code: 0, code_name: "OK" };
    } catch (err) {
      if (typeof err.code !== "number") throw err;
      const { status, field_violations } = decodeStatusDetails(err, richTypes);
      result.invalid = { code: err.code, code_name: grpc.status[err.code], message: err.details, status, field_violations };
    }
    process.stdout.write(JSON.stringify(result) + "\n");
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
