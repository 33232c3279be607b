// Sample from a Node.js client (see client.mjs for the arguments and the environment).
//
//   node sample.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < request.json
//
// request.json, a SampleRequest less its tensors' encoding:
//   {"prompt": [ints], "num_samples": 3, "include_prompt_logprobs": true,
//    "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 7, ...}}
//
// It sends the request with the prompt in int64_data, once with typed_outputs false (the answer's
// tensors in raw_data: int64 tokens, float32 logprobs, little-endian) and once with typed_outputs
// true (int64_data, float_data), then once with sampling_params.top_p 2, and prints one JSON object:
//   {"raw": ANSWER, "typed": ANSWER,
//    "invalid": {"code": 3, "code_name": "INVALID_ARGUMENT", "message": "...",
//                "field_violations": [{"field": "...", "description": "..."}]}}
// ANSWER: {"sequences": [{"tokens": [ints], "logprobs": [floats], "stop_reason": "STOP_REASON_..."}],
//          "prompt_logprobs": [floats] or null, "fields": [the Tensor fields that carried them]}

import { call, callForError, run, tensorField, tensorToArray } from "./client.mjs";

function toRequest(input, typedOutputs) {
  return { ...input, prompt: { int64_data: input.prompt }, typed_outputs: typedOutputs };
}

function toAnswer(response) {
  const promptLogprobs = response.prompt_logprobs;  // null without include_prompt_logprobs
  const tensors = response.sequences.flatMap((s) => [s.tokens, s.logprobs]).concat(promptLogprobs ? [promptLogprobs] : []);
  return {
    sequences: response.sequences.map((s) => ({
      tokens: tensorToArray(s.tokens),
      logprobs: tensorToArray(s.logprobs),
      stop_reason: s.stop_reason,
    })),
    prompt_logprobs: promptLogprobs && tensorToArray(promptLogprobs),
    fields: [...new Set(tensors.map(tensorField))].sort(),
  };
}

run(async (session, input) => {
  const sample = async (typedOutputs) => toAnswer(await call(session, "Sample", toRequest(input, typedOutputs)));
  const invalid = toRequest(input, false);
  invalid.sampling_params = { ...input.sampling_params, top_p: 2 };
  return {
    raw: await sample(false),
    typed: await sample(true),
    invalid: await callForError(session, "Sample", invalid),
  };
});
