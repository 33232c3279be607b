// Training runs from a Node.js client (see client.mjs for the arguments and the environment).
//
//   node runs.mjs ADDRESS -I PROTO_DIR [-I PROTO_DIR ...] < input.json
//
// input.json: a batch as forward_backward.mjs reads it, the LoRA options of the run and the AdamW
// options of its step:
//   {"lora_config": {"rank": 4, "seed": 7, "train_mlp": true, "train_attn": true, "train_unembed": false},
//    "adam_params": {"learning_rate": 0.01, ...},
//    "data": [...], "loss_fn": "cispo", "loss_fn_config": {...}}
//
// It creates a LoRA run (CreateModel) and, on a session bound to it (every call sends its
// model_id), runs ForwardBackward, OptimStep, GetInfo and Forward (the logprobs after the step);
// then lists the runs, unloads this one, lists them again, and calls ForwardBackward (bound
// session) and GetInfo (the modelId option of one call) on the unloaded run, which must fail with
// NOT_FOUND (it exits 1 if either does not). It prints:
//   {"created": {"model_id": "run-...", "info": GetInfoResponse},
//    "forward_backward": {"metrics": {...}, "logprobs": [[...], ...]},
//    "optim_step": OptimStepResponse, "info": GetInfoResponse,
//    "forward": {"metrics": {...}, "logprobs": [[...], ...]},
//    "listed": [ModelInfo, ...], "unloaded": UnloadModelResponse, "listed_after": [ModelInfo, ...],
//    "after_unload": {"forward_backward": ERROR, "get_info": ERROR}}
// Messages are as @grpc/proto-loader gives them (int64 as strings); ERROR as callForError's.

import { call, callForError, createModel, forRun, forwardBackwardAnswer, forwardBackwardRequest, listModels, run,
  unloadModel } from "./client.mjs";

run(async (session, input) => {
  const created = await createModel(session, { lora: input.lora_config });
  const lora = forRun(session, created.model_id);
  const batch = forwardBackwardRequest(input);
  const forwardBackward = forwardBackwardAnswer(await call(lora, "ForwardBackward", batch));
  const optimStep = await call(lora, "OptimStep", { adam_params: input.adam_params });
  const info = await call(lora, "GetInfo", {});
  const forward = forwardBackwardAnswer(await call(lora, "Forward", batch));
  const listed = await listModels(session);
  const unloaded = await unloadModel(lora);
  const listedAfter = await listModels(session);
  const afterUnload = {
    forward_backward: await callForError(lora, "ForwardBackward", batch),
    get_info: await callForError(session, "GetInfo", {}, { modelId: created.model_id }),  // the per-call option
  };
  for (const [method, error] of Object.entries(afterUnload)) {
    if (error.code_name !== "NOT_FOUND") throw new Error(`${method} on unloaded run ${created.model_id}: ${JSON.stringify(error)}`);
  }
  return {
    created, forward_backward: forwardBackward, optim_step: optimStep, info, forward, listed, unloaded,
    listed_after: listedAfter, after_unload: afterUnload,
  };
});
