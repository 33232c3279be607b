// What the Node.js clients of cispo.v1.TrainingService here share, built on @grpc/grpc-js and
// @grpc/proto-loader. Each script runs as
//
//   node SCRIPT.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < input.json
//
// PROTO_DIRs: the folder holding cispo/v1/training.proto and the one holding google/rpc/*.proto
// (googleapis-common-protos). It reads one JSON object on stdin and prints one on stdout.
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
    const script = path.basename(process.argv[1]);
    throw new Error(`usage: node ${script} ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < input.json`);
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

// Which field of a Tensor carries its elements: raw_data, a typed field, or null when empty.
export function tensorField(tensor) {
  return ["raw_data", "int64_data", "float_data", "double_data"].find((f) => tensor[f] && tensor[f].length > 0) ?? null;
}

const RAW_READERS = {
  DTYPE_INT64: [8, (view, offset) => {
    const value = Number(view.getBigInt64(offset, true));
    if (!Number.isSafeInteger(value)) throw new Error(`int64 ${view.getBigInt64(offset, true)} is past 2**53`);
    return value;
  }],
  DTYPE_INT32: [4, (view, offset) => view.getInt32(offset, true)],
  DTYPE_FLOAT32: [4, (view, offset) => view.getFloat32(offset, true)],
  DTYPE_FLOAT64: [8, (view, offset) => view.getFloat64(offset, true)],
};

// Elements of a response Tensor, as numbers: raw_data read as little-endian `dtype`, or a typed field.
export function tensorToArray(tensor) {
  const field = tensorField(tensor);
  if (field === null) return [];
  if (field !== "raw_data") return tensor[field].map(Number);  // int64_data arrives as strings (longs: String)
  if (!(tensor.dtype in RAW_READERS)) throw new Error(`raw_data with dtype ${tensor.dtype}`);
  const [size, read] = RAW_READERS[tensor.dtype];
  const buf = tensor.raw_data;
  const bytes = new Uint8Array(buf.length);
  bytes.set(buf);  // a copy: the Buffer's offset in its pool need not be aligned
  const view = new DataView(bytes.buffer);
  return Array.from({ length: buf.length / size }, (_, i) => read(view, size * i));
}

// A ForwardBackwardInput (for Forward and ForwardBackward) of a JSON batch, in typed fields only:
//   {"data": [{"model_input": [ints], "target_tokens": [ints], "logprobs": [floats],
//              "advantages": [floats]}, ...], "loss_fn": "cispo", "loss_fn_config": {...}}
export function forwardBackwardRequest(batch) {
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

// A ForwardBackwardOutput as {metrics: {name: number}, logprobs: [[floats] per datum]}.
export function forwardBackwardAnswer(response) {
  return {
    metrics: Object.fromEntries(Object.entries(response.metrics).map(([k, v]) => [k, Number(v)])),
    logprobs: response.loss_fn_outputs.map((out) => tensorToArray(out.logprobs)),
  };
}

// A session bound to training run `modelId`: every call of it that names a run sends that one.
export function forRun(session, modelId) {
  return { ...session, modelId };
}

// The unary call `method`. When the request type has a model_id field (every training and sampling
// operation, and UnloadModel) and the request sets none, it sends options.modelId, else the
// session's run (forRun); neither: the default run.
export function call(session, method, request, options = {}) {
  const modelId = options.modelId ?? session.modelId;
  if (modelId && !request.model_id && session.runMethods.has(method)) request = { ...request, model_id: modelId };
  return new Promise((resolve, reject) => {
    session.client[method](request, session.metadata, { deadline: Date.now() + 60_000 }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// CreateModel: a LoRA run ({lora: {rank, seed, train_mlp, train_attn, train_unembed}}, unset
// options take the server's defaults), a full fine-tune ({fullFineTuning: true}) or a run from a
// saved state ({fromState: {path, with_optimizer}}), on `baseModel` ("": the served model).
// Answers {model_id, info}: the new run's id and its GetInfo.
export function createModel(session, { lora, fullFineTuning, fromState, baseModel = "" }) {
  const kinds = { lora_config: lora, full_fine_tuning: fullFineTuning || undefined, from_state: fromState };
  const given = Object.entries(kinds).filter(([, v]) => v !== undefined);
  if (given.length !== 1) throw new Error("createModel takes exactly one of lora, fullFineTuning, fromState");
  return call(session, "CreateModel", { base_model: baseModel, ...Object.fromEntries(given) });
}

// ListModels: the caller's runs, [{model_id, lora_config, step, trainable_parameters, ...}].
export async function listModels(session) {
  return (await call(session, "ListModels", {})).models;
}

// UnloadModel of run `modelId` (default: the session's run).
export function unloadModel(session, modelId = session.modelId) {
  if (!modelId) throw new Error("unloadModel needs a model id");
  return call(session, "UnloadModel", { model_id: modelId });
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

// A call expected to fail, as {code, code_name, message, status, field_violations} from its
// google.rpc.Status in the grpc-status-details-bin trailer; {code: 0, code_name: "OK"} if it succeeds.
export async function callForError(session, method, request, options = {}) {
  try {
    await call(session, method, request, options);
    return { code: 0, code_name: "OK" };
  } catch (err) {
    if (typeof err.code !== "number") throw err;
    const { status, field_violations } = decodeStatusDetails(err, session.richTypes);
    return { code: err.code, code_name: grpc.status[err.code], message: err.details, status, field_violations };
  }
}

// Runs `main(session, input)` with session = {client, metadata, richTypes, runMethods, modelId: ""}
// and input the JSON on stdin, prints what it returns as JSON; exits 1 with the error on stderr if it throws.
export function run(main) {
  const session = async () => {
    const { address, includeDirs } = parseArgs(process.argv.slice(2));
    const input = JSON.parse(fs.readFileSync(0, "utf8"));
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
    // The methods whose request names a run (model_id).
    const methods = Object.entries(packageDefinition["cispo.v1.TrainingService"]);
    const runMethods = new Set(methods.filter(([, m]) => m.requestType.type.field.some((f) => f.name === "model_id")).map(([name]) => name));
    const { credentials, metadata } = securityFromEnv(process.env);
    const client = new cispo.TrainingService(address, credentials);
    try {
      const result = await main({ client, metadata, richTypes: loadRichErrorTypes(includeDirs), runMethods, modelId: "" }, input);
      process.stdout.write(JSON.stringify(result) + "\n");
    } finally {
      client.close();
    }
  };
  session().catch((err) => {
    process.stderr.write(`${err.stack || err}\n`);
    process.exit(1);
  });
}
