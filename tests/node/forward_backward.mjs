// ForwardBackward from a Node.js client (see client.mjs for the arguments and the environment).
//
//   node forward_backward.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < batch.json
//
// batch.json:
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

import { call, callForError, forwardBackwardAnswer, forwardBackwardRequest, run } from "./client.mjs";

run(async (session, batch) => {
  const response = await call(session, "ForwardBackward", forwardBackwardRequest(batch));
  // The same batch with datum 1's sampling logprobs one element short.
  const invalid = forwardBackwardRequest(batch);
  invalid.data[1].loss_fn_inputs.logprobs.float_data = batch.data[1].logprobs.slice(1);
  return {
    ...forwardBackwardAnswer(response),
    invalid: await callForError(session, "ForwardBackward", invalid),
  };
});
