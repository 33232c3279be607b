"""Conversions between the wire types (cispo.v1) and the engine's (cispo.worker).

Decoding never loops over elements in Python: raw bytes become `np.frombuffer` views and typed
fields go through numpy in one call. Malformed tensors become field violations, so the caller
can reject the whole request before any compute.
"""

from collections.abc import Mapping

import numpy as np
import torch

from cispo.v1 import training_pb2 as pb
from cispo.worker import AdamParams, BatchResult, EngineInfo, FieldViolation, InvalidInput, LimitExceeded, Sample
from cispo.worker.sampling import SampleRequest, SampleResult, SamplingParams
from cispo.worker.lora import LoraSpec
from cispo.worker.runs import RunInfo

RAW_DTYPES: dict[int, np.dtype] = {
    pb.DTYPE_INT64: np.dtype("<i8"),
    pb.DTYPE_INT32: np.dtype("<i4"),
    pb.DTYPE_FLOAT32: np.dtype("<f4"),
    pb.DTYPE_FLOAT64: np.dtype("<f8"),
}
TYPED_FIELDS: dict[str, tuple[int, np.dtype]] = {
    "int64_data": (pb.DTYPE_INT64, np.dtype(np.int64)),
    "float_data": (pb.DTYPE_FLOAT32, np.dtype(np.float32)),
    "double_data": (pb.DTYPE_FLOAT64, np.dtype(np.float64)),
}


class _Violations(list):
    """Collects FieldViolations; `raise_if_any` rejects the request with all of them."""

    def add(self, field: str, description: str) -> None:
        self.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self:
            raise InvalidInput(list(self))


def tensor_to_torch(t: pb.Tensor, field: str, violations: _Violations) -> torch.Tensor | None:
    """A 1-D CPU tensor from the wire form, or None (with a violation added) if malformed."""
    given = {f.name: value for f, value in t.ListFields()}  # the fields set, in one call
    present = [name for name in ("raw_data", *TYPED_FIELDS) if name in given]
    if len(present) > 1:
        violations.add(field, f"set exactly one of raw_data, int64_data, float_data, double_data; got {', '.join(present)}")
        return None
    code = given.get("dtype", pb.DTYPE_UNSPECIFIED)
    name = present[0] if present else ("raw_data" if code != pb.DTYPE_UNSPECIFIED else None)
    if name is None:
        array = np.zeros(0, dtype=np.int64)  # an empty tensor; length checks report it
    elif name == "raw_data":
        dtype = RAW_DTYPES.get(code)
        raw = given.get("raw_data", b"")
        if dtype is None:
            violations.add(f"{field}.dtype", f"raw_data needs dtype INT64, INT32, FLOAT32 or FLOAT64, got {_dtype_name(code)}")
            return None
        if len(raw) % dtype.itemsize:
            violations.add(f"{field}.raw_data", f"{len(raw)} bytes is not a multiple of the {_dtype_name(code)} size {dtype.itemsize}")
            return None
        array = np.frombuffer(raw, dtype=dtype)
    else:
        declared, dtype = TYPED_FIELDS[name]
        if code not in (pb.DTYPE_UNSPECIFIED, declared):
            violations.add(f"{field}.dtype", f"{_dtype_name(code)} disagrees with {name}")
            return None
        array = np.asarray(given[name], dtype=dtype)
    shape = given.get("shape")
    if shape is not None and list(shape) != [array.shape[0]]:
        violations.add(f"{field}.shape", f"shape {list(shape)} does not match {array.shape[0]} elements (tensors are 1-D)")
        return None
    # One vectorised copy into native byte order: torch needs a writable buffer.
    return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=not array.flags.writeable))


def _wire_length(t: pb.Tensor) -> int:
    """Elements of a tensor as sent (the longest of its forms; the decoder rejects several)."""
    itemsize = RAW_DTYPES[t.dtype].itemsize if t.dtype in RAW_DTYPES else 1
    return max(len(t.raw_data) // itemsize, len(t.int64_data), len(t.float_data), len(t.double_data))


def _dtype_name(code: int) -> str:
    """The enum name, or the bare number for a value outside the enum (e.g. 99)."""
    return pb.DType.Name(code) if code in pb.DType.values() else f"{code} (not a DType)"


def decode_forward_backward(req: pb.ForwardBackwardInput, max_data: int,
                            max_tokens: int) -> tuple[list[Sample], str, dict[str, float]]:
    """(samples, loss_fn, loss_fn_config) of a request; InvalidInput for malformed tensors.
    LimitExceeded for more than `max_data` datums or `max_tokens` tokens, found from the sizes
    on the wire before any tensor is copied."""
    if len(req.data) > max_data:
        raise LimitExceeded("max_data_per_request", f"request has {len(req.data)} data, over the limit "
                                                    f"max_data_per_request={max_data}")
    tokens = sum(_wire_length(datum.model_input) for datum in req.data)
    if tokens > max_tokens:
        raise LimitExceeded("max_tokens_per_request",
                            f"request has {tokens} tokens, over the limit max_tokens_per_request={max_tokens}")
    violations = _Violations()
    samples = []
    for i, datum in enumerate(req.data):
        where = f"data[{i}]"
        if not datum.HasField("model_input"):
            violations.add(f"{where}.model_input", "required")
        tokens = tensor_to_torch(datum.model_input, f"{where}.model_input", violations)
        inputs = {}
        for descriptor, tensor in datum.loss_fn_inputs.ListFields():
            value = tensor_to_torch(tensor, f"{where}.loss_fn_inputs.{descriptor.name}", violations)
            if value is not None:
                inputs[descriptor.name] = value
        if tokens is not None:
            samples.append(Sample(tokens, inputs))
    violations.raise_if_any()
    return samples, req.loss_fn or "cispo", dict(req.loss_fn_config)


def encode_batch_result(result: BatchResult, typed: bool = False) -> pb.ForwardBackwardOutput:
    """Per-datum logprobs as raw little-endian float32 (or, if `typed`, in float_data, which
    JSON clients show as numbers), plus the metrics."""
    return pb.ForwardBackwardOutput(loss_fn_outputs=[pb.LossFnOutput(logprobs=_tensor_to_pb(lp, typed))
                                                     for lp in result.logprobs], metrics=result.metrics)


def decode_sample_request(req: pb.SampleRequest, owner: str | None) -> SampleRequest:
    """The engine's SampleRequest (defaults not yet resolved); InvalidInput for a malformed
    prompt or parameter."""
    violations = _Violations()
    prompt = tensor_to_torch(req.prompt, "prompt", violations)
    if prompt is not None and prompt.is_floating_point():
        violations.add("prompt", "token ids must be integers")
    given = {f.name: value for f, value in req.sampling_params.ListFields()}
    for name in ("temperature", "top_p"):
        if name in given and not np.isfinite(np.float32(given[name])):
            violations.add(f"sampling_params.{name}", f"must be finite in float32, got {given[name]}")
    violations.raise_if_any()
    params = SamplingParams(
        max_tokens=given.get("max_tokens"), temperature=float(given.get("temperature", 1.0)),
        top_k=int(given.get("top_k", -1)), top_p=float(given.get("top_p", 1.0)), seed=given.get("seed"),
        stop_tokens=tuple(int(t) for t in req.sampling_params.stop_tokens),
        stop_strings=tuple(req.sampling_params.stop_strings))
    return SampleRequest(prompt=prompt.to(torch.int64), num_samples=req.num_samples or 1, params=params,
                         include_prompt_logprobs=req.include_prompt_logprobs, model_path=req.model_path, owner=owner)


STOP_REASONS = {"length": pb.STOP_REASON_LENGTH, "stop": pb.STOP_REASON_STOP}


def encode_sample_result(result: SampleResult, typed: bool = False) -> pb.SampleResponse:
    """Sequences (int64 tokens, float32 logprobs) raw little-endian, or typed for JSON clients."""
    response = pb.SampleResponse(sequences=[
        pb.SampledSequence(tokens=_tensor_to_pb(s.tokens, typed), logprobs=_tensor_to_pb(s.logprobs, typed),
                           stop_reason=STOP_REASONS[s.stop_reason]) for s in result.sequences])
    if result.prompt_logprobs is not None:
        response.prompt_logprobs.CopyFrom(_tensor_to_pb(result.prompt_logprobs, typed))
    return response


def _tensor_to_pb(t: torch.Tensor, typed: bool) -> pb.Tensor:
    """A 1-D int64 or float32 CPU tensor in raw little-endian bytes, or in its typed field."""
    integer = not t.is_floating_point()
    dtype = pb.DTYPE_INT64 if integer else pb.DTYPE_FLOAT32
    array = t.numpy().astype("<i8" if integer else "<f4", copy=False)
    if typed:
        return pb.Tensor(dtype=dtype, shape=[t.numel()], **{"int64_data" if integer else "float_data": array})
    return pb.Tensor(dtype=dtype, shape=[t.numel()], raw_data=array.tobytes())


def decode_adam_params(req: pb.OptimStepRequest) -> AdamParams:
    """AdamParams with defaults for unset fields; InvalidInput for out-of-range values."""
    given = {f.name: value for f, value in req.adam_params.ListFields()}
    return AdamParams(**given)


def encode_info(info: EngineInfo, limits: Mapping[str, int], world_size: int, run: RunInfo | None = None,
                base_model: str = "", num_runs: int = 0, max_runs: int = 0) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_sequence_length=info.max_sequence_length,
        loss_functions=[
            pb.LossFunctionInfo(name=f.name, default_config=dict(f.defaults), required_inputs=list(f.required_inputs))
            for f in info.loss_functions.values()
        ],
        limits=pb.Limits(**limits),
        device=info.device,
        dtype=info.dtype,
        world_size=world_size,
        step=info.step,
        num_parameters=info.num_parameters,
        has_tokenizer=info.has_tokenizer,
        eos_token_ids=list(info.eos_token_ids),
        model_id=run.model_id if run is not None else "",
        lora_config=encode_lora_config(run.lora) if run is not None and run.lora is not None else None,
        base_model=base_model,
        num_runs=num_runs,
        max_runs=max_runs,
        sharding=info.sharding,
        memory=pb.MemoryUse(parameter_bytes=info.memory.parameters, gradient_bytes=info.memory.gradients,
                            optimizer_bytes=info.memory.optimizer),
    )


def decode_lora_config(config: pb.LoraConfig) -> LoraSpec:
    """The LoRA options of a CreateModel request, defaults filled in; InvalidInput if bad."""
    given = {f: getattr(config, f) for f in ("rank", "seed", "train_mlp", "train_attn", "train_unembed")
             if config.HasField(f)}
    try:
        return LoraSpec(**given)
    except ValueError as exc:
        raise InvalidInput([FieldViolation("lora_config", str(exc))]) from None


def encode_lora_config(spec: LoraSpec) -> pb.LoraConfig:
    return pb.LoraConfig(**spec.to_dict())


def encode_run_info(run: RunInfo) -> pb.ModelInfo:
    return pb.ModelInfo(model_id=run.model_id, lora_config=encode_lora_config(run.lora) if run.lora else None,
                        step=run.step, trainable_parameters=run.trainable_parameters,
                        trainable_bytes=run.trainable_bytes, created=run.created, last_used=run.last_used)
