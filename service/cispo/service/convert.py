"""Conversions between the wire types (cispo.v1) and the engine's (cispo.worker): the torch side
of the wire's codec (cispo.v1.tensors) and of its request reader (cispo.v1.datum_reader).

Decoding never loops over elements in Python. Malformed tensors become field violations, so the
caller can reject the whole request before any compute. A ForwardBackwardInput is read in LAZY's
form by the vectorised reader, into a SampleBatch of columns; the datums it leaves (not in the
plain form) are decoded the exact way, with protobuf and `tensor_to_torch`.
"""

from typing import Any

import numpy as np
import torch
from google.protobuf.message import Message

from cispo.service.limits import RequestLimits
from cispo.v1 import training_pb2 as pb
from cispo.v1.datum_reader import LAZY, LAZY_FORWARD_BACKWARD, read_data
from cispo.v1.tensors import ADAM_DEFAULTS, TensorError, decode_tensor, encode_tensor, wire_length, writable_native
from cispo.worker import AdamParams, BatchResult, EngineInfo, FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.batch import Column, SampleBatch
from cispo.worker.lora import LoraSpec
from cispo.worker.runs import RunInfo
from cispo.worker.sampling import SampleRequest, SampleResult, SamplingParams

__all__ = [
    "LAZY",
    "LAZY_FORWARD_BACKWARD",
    "decode_adam_params",
    "decode_forward_backward",
    "decode_lora_config",
    "decode_sample_request",
    "encode_batch_result",
    "encode_info",
    "encode_lora_config",
    "encode_run_info",
    "encode_sample_result",
    "tensor_to_torch",
]


class Violations(list[FieldViolation]):
    """Collects FieldViolations; `raise_if_any` rejects the request with all of them."""

    def add(self, field: str, description: str) -> None:
        self.append(FieldViolation(field, description))

    def raise_if_any(self) -> None:
        if self:
            raise InvalidInput(list(self))


def tensor_to_torch(t: pb.Tensor, field: str, violations: Violations) -> torch.Tensor | None:
    """A 1-D CPU tensor from the wire form, or None (with a violation added) if malformed."""
    try:
        array = decode_tensor(t)
    except TensorError as error:
        violations.add(f"{field}{error.field}", error.violation)
        return None
    return torch.from_numpy(writable_native(array))  # one vectorised copy: torch needs a writable buffer


def decode_forward_backward(
    req: pb.ForwardBackwardInput | Message, max_data: int, max_tokens: int
) -> tuple[SampleBatch, str, dict[str, float]]:
    """(batch, loss_fn, loss_fn_config) of a request, a ForwardBackwardInput or LAZY's form of
    one; InvalidInput for malformed tensors. LimitExceeded for more than `max_data` datums or
    `max_tokens` tokens, found from the sizes on the wire before any tensor is copied. In LAZY's
    form, DecodeError if a datum does not parse."""
    # LAZY's form: its type is made at run time, so its fields are not known to the type checker.
    lazy: Any = (
        req if isinstance(req, LAZY_FORWARD_BACKWARD) else LAZY_FORWARD_BACKWARD.FromString(req.SerializeToString())
    )
    payloads = list(lazy.data)
    if len(payloads) > max_data:
        raise LimitExceeded(
            "max_data_per_request", f"request has {len(payloads)} data, over the limit max_data_per_request={max_data}"
        )
    buf, parts, plain_B = read_data(payloads)
    exact = np.flatnonzero(~plain_B).tolist()  # datums for protobuf
    data = pb.ForwardBackwardInput.FromString(lazy.SerializeToString()).data if exact else []
    tokens = sum(int(part.counts.sum()) for part in parts["model_input"])
    tokens += sum(wire_length(data[i].model_input) for i in exact)
    if tokens > max_tokens:
        raise LimitExceeded(
            "max_tokens_per_request", f"request has {tokens} tokens, over the limit max_tokens_per_request={max_tokens}"
        )
    violations = Violations()
    decoded: dict[str, list[tuple[int, torch.Tensor]]] = {name: [] for name in parts}
    for i in exact:
        datum, where = data[i], f"data[{i}]"
        if not datum.HasField("model_input"):
            violations.add(f"{where}.model_input", "required")
        fields = [("model_input", datum.model_input, f"{where}.model_input")]
        fields += [(d.name, t, f"{where}.loss_fn_inputs.{d.name}") for d, t in datum.loss_fn_inputs.ListFields()]
        for name, tensor, field in fields:
            value = tensor_to_torch(tensor, field, violations)
            if value is not None:  # else a violation, raised below
                decoded[name].append((i, value))
    violations.raise_if_any()
    columns = {
        name: Column.build(
            name,
            len(payloads),
            [(p.datums, p.counts, torch.from_numpy(p.elements(buf))) for p in parts[name]],
            decoded[name],
        )
        for name in parts
        if name == "model_input" or parts[name] or decoded[name]
    }
    return SampleBatch(columns), lazy.loss_fn or "cispo", dict(lazy.loss_fn_config)


def encode_batch_result(result: BatchResult, typed: bool = False) -> pb.ForwardBackwardOutput:
    """Per-datum logprobs as raw little-endian float32 (or, if `typed`, in float_data, which
    JSON clients show as numbers), plus the metrics."""
    return pb.ForwardBackwardOutput(
        loss_fn_outputs=[pb.LossFnOutput(logprobs=_tensor_to_pb(lp, typed)) for lp in result.logprobs],
        metrics=result.metrics,
    )


def decode_sample_request(req: pb.SampleRequest, owner: str | None) -> SampleRequest:
    """The engine's SampleRequest (defaults not yet resolved); InvalidInput for a malformed
    prompt or parameter."""
    violations = Violations()
    prompt = tensor_to_torch(req.prompt, "prompt", violations)
    if prompt is not None and prompt.is_floating_point():
        violations.add("prompt", "token ids must be integers")
    given = {f.name: value for f, value in req.sampling_params.ListFields()}
    for name in ("temperature", "top_p"):
        if name in given and not np.isfinite(np.float32(given[name])):
            violations.add(f"sampling_params.{name}", f"must be finite in float32, got {given[name]}")
    violations.raise_if_any()
    assert prompt is not None  # else a violation, raised above
    params = SamplingParams(
        max_tokens=given.get("max_tokens"),
        temperature=float(given.get("temperature", 1.0)),
        top_k=int(given.get("top_k", -1)),
        top_p=float(given.get("top_p", 1.0)),
        seed=given.get("seed"),
        stop_tokens=tuple(int(t) for t in req.sampling_params.stop_tokens),
        stop_strings=tuple(req.sampling_params.stop_strings),
    )
    return SampleRequest(
        prompt=prompt.to(torch.int64),
        num_samples=req.num_samples or 1,
        params=params,
        include_prompt_logprobs=req.include_prompt_logprobs,
        model_path=req.model_path,
        owner=owner,
    )


STOP_REASONS = {"length": pb.STOP_REASON_LENGTH, "stop": pb.STOP_REASON_STOP}


def encode_sample_result(result: SampleResult, typed: bool = False) -> pb.SampleResponse:
    """Sequences (int64 tokens, float32 logprobs) raw little-endian, or typed for JSON clients."""
    response = pb.SampleResponse(
        sequences=[
            pb.SampledSequence(
                tokens=_tensor_to_pb(s.tokens, typed),
                logprobs=_tensor_to_pb(s.logprobs, typed),
                stop_reason=STOP_REASONS[s.stop_reason],
            )
            for s in result.sequences
        ]
    )
    if result.prompt_logprobs is not None:
        response.prompt_logprobs.CopyFrom(_tensor_to_pb(result.prompt_logprobs, typed))
    return response


def _tensor_to_pb(t: torch.Tensor, typed: bool) -> pb.Tensor:
    """A 1-D CPU tensor as int64 (integers) or float32 elements, raw or in the typed field."""
    return encode_tensor(t.numpy().astype(np.float32 if t.is_floating_point() else np.int64, copy=False), typed=typed)


def decode_adam_params(req: pb.OptimStepRequest) -> AdamParams:
    """AdamParams with defaults for unset fields; InvalidInput for out-of-range values."""
    given = {f.name: value for f, value in req.adam_params.ListFields()}
    return AdamParams(**{**ADAM_DEFAULTS, **given})


def encode_info(
    info: EngineInfo,
    limits: RequestLimits,
    world_size: int,
    run: RunInfo | None = None,
    base_model: str = "",
    num_runs: int = 0,
    max_runs: int = 0,
) -> pb.GetInfoResponse:
    return pb.GetInfoResponse(
        model_name=info.model_name,
        vocab_size=info.vocab_size,
        max_sequence_length=info.max_sequence_length,
        loss_functions=[
            pb.LossFunctionInfo(name=f.name, default_config=dict(f.defaults), required_inputs=list(f.required_inputs))
            for f in info.loss_functions.values()
        ],
        limits=pb.Limits(**limits.as_dict()),
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
        memory=pb.MemoryUse(
            parameter_bytes=info.memory.parameters,
            gradient_bytes=info.memory.gradients,
            optimizer_bytes=info.memory.optimizer,
        ),
    )


def decode_lora_config(config: pb.LoraConfig) -> LoraSpec:
    """The LoRA options of a CreateModel request, defaults filled in; InvalidInput if bad."""
    given = {
        f: getattr(config, f)
        for f in ("rank", "seed", "train_mlp", "train_attn", "train_unembed")
        if config.HasField(f)
    }
    try:
        return LoraSpec(**given)
    except ValueError as exc:
        raise InvalidInput([FieldViolation("lora_config", str(exc))]) from None


def encode_lora_config(spec: LoraSpec) -> pb.LoraConfig:
    return pb.LoraConfig(**spec.to_dict())


def encode_run_info(run: RunInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        model_id=run.model_id,
        lora_config=encode_lora_config(run.lora) if run.lora else None,
        step=run.step,
        trainable_parameters=run.trainable_parameters,
        trainable_bytes=run.trainable_bytes,
        created=run.created,
        last_used=run.last_used,
    )
