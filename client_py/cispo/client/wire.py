"""Conversions between the client's types and the `cispo.v1` protobuf messages.

Tensors travel on the fast path: `Tensor(dtype, shape=[N], raw_data=<little-endian bytes>)`,
one `tobytes()` per tensor and one `np.frombuffer` per decoded tensor, no per-element Python.
The typed fields (`int64_data`, `float_data`, `double_data`), which other languages and grpcurl
send, are decoded too.

Encoders take an optional `out` message to fill in place, so a request can be built directly
inside a `StreamRequest` without copying its bytes.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

from cispo.v1 import training_pb2 as pb
from cispo.v1.tensors import ADAM_DEFAULTS, TensorError, decode_tensor, encode_tensor, writable_native

from .types import (
    AdamParams,
    CheckpointInfo,
    Datum,
    ForwardBackwardOutput,
    GetInfoResponse,
    Limits,
    LoadStateResponse,
    LossFunctionInfo,
    MemoryUse,
    ModelInfo,
    ModelInput,
    OptimStepResponse,
    RunVersion,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
    StopReason,
    TensorData,
    convert,
)

__all__ = [
    "adam_params_to_pb",
    "as_data_list",
    "datum_from_pb",
    "datum_to_pb",
    "forward_backward_input_to_pb",
    "forward_backward_output_from_pb",
    "get_info_response_from_pb",
    "load_state_response_from_pb",
    "optim_step_response_from_pb",
    "sample_request_to_pb",
    "sample_response_from_pb",
    "save_state_response_from_pb",
    "save_weights_for_sampler_response_from_pb",
    "tensor_from_pb",
    "tensor_to_pb",
]

# --- tensors ------------------------------------------------------------------------------


def tensor_to_pb(tensor: TensorData | Any, out: pb.Tensor | None = None) -> pb.Tensor:
    """A `Tensor` message on the raw-bytes fast path.

    tensor: TensorData, or anything TensorData.from_numpy/from_torch/lists accept, shape (N,).
    Raises ValueError for non-1-D or non-numeric data.
    """
    if not isinstance(tensor, TensorData):
        tensor = TensorData(tensor)
    return encode_tensor(tensor.to_numpy(), out)


def tensor_from_pb(message: pb.Tensor, what: str = "tensor") -> TensorData:
    """TensorData from a `Tensor` message in either form (raw bytes or a typed field).

    Raw bytes are read with one `np.frombuffer` and one copy into a writable native array.
    Raises ValueError for a malformed tensor (no dtype with raw_data, a byte length that is not
    a multiple of the element size, several forms set, a dtype that disagrees with the typed
    field, a shape that is not [N]).
    """
    try:
        array = decode_tensor(message)
    except TensorError as error:
        raise ValueError(f"{what}: {error}") from None
    return TensorData._wrap(writable_native(array))


# --- requests -----------------------------------------------------------------------------


def datum_to_pb(datum: Datum, out: pb.Datum | None = None) -> pb.Datum:
    """A `Datum` message: model_input and each loss input as raw-bytes tensors."""
    datum = Datum(datum.model_input, dict(datum.loss_fn_inputs))  # re-checks inputs set after construction
    out = pb.Datum() if out is None else out
    encode_tensor(datum.model_input.to_numpy(), out.model_input)
    out.loss_fn_inputs.SetInParent()
    for name, tensor in datum.loss_fn_inputs.items():
        encode_tensor(tensor.to_numpy(), getattr(out.loss_fn_inputs, name))
    return out


def datum_from_pb(message: pb.Datum, what: str = "datum") -> Datum:
    """A Datum from a `Datum` message (either tensor form)."""
    inputs = {
        descriptor.name: tensor_from_pb(value, f"{what}.loss_fn_inputs.{descriptor.name}")
        for descriptor, value in message.loss_fn_inputs.ListFields()
    }
    tokens = tensor_from_pb(message.model_input, f"{what}.model_input").to_numpy()
    return Datum(model_input=ModelInput.from_ints(tokens), loss_fn_inputs=inputs)


def as_data_list(data: Iterable[Datum]) -> list[Datum]:
    """`data` as a list of Datum (the tinker SDK's are converted); TypeError naming the first
    bad entry."""
    if isinstance(data, (str, bytes, Mapping)) or type(data).__name__ == "Datum":
        raise TypeError(f"data: expected a list of Datum, got {type(data).__name__}")
    return [convert(datum, Datum, f"data[{index}]") for index, datum in enumerate(data)]


def forward_backward_input_to_pb(
    data: Iterable[Datum],
    loss_fn: str = "cispo",
    loss_fn_config: Mapping[str, float] | None = None,
    out: pb.ForwardBackwardInput | None = None,
) -> pb.ForwardBackwardInput:
    """A `ForwardBackwardInput`: the batch, the loss name and its config (floats).

    Only types are checked here; values (lengths, vocabulary, thresholds) are the server's to
    judge, so its field violations reach the caller unchanged.
    """
    out = pb.ForwardBackwardInput() if out is None else out
    out.SetInParent()
    if not isinstance(loss_fn, str):
        raise TypeError(f"loss_fn: expected a str, got {type(loss_fn).__name__}")
    for datum in as_data_list(data):
        datum_to_pb(datum, out.data.add())
    out.loss_fn = loss_fn
    for key, value in (loss_fn_config or {}).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise TypeError(f"loss_fn_config[{key!r}]: expected a number, got {type(value).__name__}")
        out.loss_fn_config[key] = float(value)
    return out


def adam_params_to_pb(params: AdamParams | None, out: pb.AdamParams | None = None) -> pb.AdamParams:
    """An `AdamParams` message with every field set (None means the defaults)."""
    params = AdamParams() if params is None else convert(params, AdamParams, "adam_params")
    out = pb.AdamParams() if out is None else out
    for name in ADAM_DEFAULTS:
        setattr(out, name, getattr(params, name))
    return out


def sample_request_to_pb(
    prompt: ModelInput,
    num_samples: int,
    sampling_params: SamplingParams,
    include_prompt_logprobs: bool = False,
    model_path: str = "",
    out: pb.SampleRequest | None = None,
) -> pb.SampleRequest:
    """A `SampleRequest`; types are checked here, values by the server."""
    out = pb.SampleRequest() if out is None else out
    out.SetInParent()
    prompt = convert(prompt, ModelInput, "prompt")
    sampling_params = convert(sampling_params, SamplingParams, "sampling_params")
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples: expected an int, got {type(num_samples).__name__}")
    encode_tensor(prompt.to_numpy(), out.prompt)
    out.num_samples = int(num_samples)
    out.include_prompt_logprobs = bool(include_prompt_logprobs)
    out.model_path = model_path or ""
    params, sp = sampling_params, out.sampling_params
    sp.SetInParent()
    if params.max_tokens is not None:
        sp.max_tokens = int(params.max_tokens)
    if params.seed is not None:
        sp.seed = int(params.seed)
    sp.temperature = float(params.temperature)
    sp.top_k = int(params.top_k)
    sp.top_p = float(params.top_p)
    stop = params.stop
    if isinstance(stop, str):
        stop = [stop]
    for item in stop or ():
        if isinstance(item, str):
            sp.stop_strings.append(item)
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            sp.stop_tokens.append(int(item))
        else:
            raise TypeError(f"sampling_params.stop: expected strings or token ids, got {type(item).__name__}")
    return out


# --- responses ----------------------------------------------------------------------------


def run_version_from_pb(answer: Any) -> RunVersion | None:
    """The run version an answer carries (None when it carries none)."""
    if not answer.HasField("version"):
        return None
    version = answer.version
    return RunVersion(incarnation=version.incarnation, step=version.step, accumulated=version.accumulated)


def forward_backward_output_from_pb(message: pb.ForwardBackwardOutput) -> ForwardBackwardOutput:
    """ForwardBackwardOutput: loss_fn_outputs[i]["logprobs"] (N_i,) and metrics."""
    outputs = [
        {"logprobs": tensor_from_pb(output.logprobs, f"loss_fn_outputs[{index}].logprobs")}
        for index, output in enumerate(message.loss_fn_outputs)
    ]
    return ForwardBackwardOutput(
        loss_fn_outputs=outputs, metrics=dict(message.metrics), version=run_version_from_pb(message)
    )


def optim_step_response_from_pb(message: pb.OptimStepResponse) -> OptimStepResponse:
    return OptimStepResponse(
        grad_norm=message.grad_norm,
        step=message.step,
        metrics=dict(message.metrics),
        version=run_version_from_pb(message),
    )


def save_state_response_from_pb(message: pb.SaveStateResponse) -> SaveStateResponse:
    return SaveStateResponse(
        name=message.name, path=message.path, step=message.step, version=run_version_from_pb(message)
    )


def save_weights_for_sampler_response_from_pb(
    message: pb.SaveWeightsForSamplerResponse,
) -> SaveWeightsForSamplerResponse:
    return SaveWeightsForSamplerResponse(
        name=message.name, path=message.path, step=message.step, version=run_version_from_pb(message)
    )


_STOP_REASONS: dict[int, StopReason] = {pb.STOP_REASON_LENGTH: "length", pb.STOP_REASON_STOP: "stop"}


def sample_response_from_pb(message: pb.SampleResponse) -> SampleResponse:
    """SampleResponse with token and logprob lists (one `tolist()` per tensor)."""
    sequences = [
        SampledSequence(
            stop_reason=_STOP_REASONS.get(seq.stop_reason, "stop"),
            tokens=tensor_from_pb(seq.tokens, f"sequences[{i}].tokens").to_numpy().tolist(),
            logprobs=tensor_from_pb(seq.logprobs, f"sequences[{i}].logprobs").to_numpy().tolist(),
        )
        for i, seq in enumerate(message.sequences)
    ]
    prompt_logprobs = None
    if message.HasField("prompt_logprobs"):
        prompt_logprobs = [None, *tensor_from_pb(message.prompt_logprobs, "prompt_logprobs").to_numpy().tolist()]
    return SampleResponse(sequences=sequences, prompt_logprobs=prompt_logprobs, version=run_version_from_pb(message))


def load_state_response_from_pb(message: pb.LoadStateResponse) -> LoadStateResponse:
    return LoadStateResponse(name=message.name, step=message.step, version=run_version_from_pb(message))


def get_info_response_from_pb(message: pb.GetInfoResponse) -> GetInfoResponse:
    return GetInfoResponse(
        model_name=message.model_name,
        vocab_size=message.vocab_size,
        max_sequence_length=message.max_sequence_length,
        loss_functions=[
            LossFunctionInfo(
                name=info.name,
                default_config=dict(info.default_config),
                required_inputs=list(info.required_inputs),
            )
            for info in message.loss_functions
        ],
        limits=Limits(
            max_message_bytes=message.limits.max_message_bytes,
            max_tokens_per_request=message.limits.max_tokens_per_request,
            max_sequence_length=message.limits.max_sequence_length,
            idempotency_keys_remembered=message.limits.idempotency_keys_remembered,
            max_data_per_request=message.limits.max_data_per_request,
            max_sample_tokens=message.limits.max_sample_tokens,
            max_num_samples=message.limits.max_num_samples,
            max_sample_request_tokens=message.limits.max_sample_request_tokens,
        ),
        device=message.device,
        dtype=message.dtype,
        world_size=message.world_size,
        step=message.step,
        num_parameters=message.num_parameters,
        has_tokenizer=message.has_tokenizer,
        eos_token_ids=list(message.eos_token_ids),
        model_id=message.model_id,
        lora_rank=message.lora_config.rank if message.HasField("lora_config") else None,
        base_model=message.base_model,
        num_runs=message.num_runs,
        max_runs=message.max_runs,
        sharding=message.sharding or "replicated",
        memory=MemoryUse(
            parameter_bytes=message.memory.parameter_bytes,
            gradient_bytes=message.memory.gradient_bytes,
            optimizer_bytes=message.memory.optimizer_bytes,
        ),
        version=run_version_from_pb(message),
    )


def model_info_from_pb(message: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        model_id=message.model_id,
        lora_rank=message.lora_config.rank if message.HasField("lora_config") else None,
        step=message.step,
        trainable_parameters=message.trainable_parameters,
        trainable_bytes=message.trainable_bytes,
        created=message.created,
        last_used=message.last_used,
    )


CHECKPOINT_KINDS = {"state": pb.CHECKPOINT_KIND_STATE, "sampler_weights": pb.CHECKPOINT_KIND_SAMPLER_WEIGHTS}


def checkpoint_kind_to_pb(kind: str | None) -> pb.CheckpointKind:
    """ "state", "sampler_weights" or None (either) as cispo.v1's CheckpointKind."""
    if kind is None:
        return pb.CHECKPOINT_KIND_UNSPECIFIED
    if kind not in CHECKPOINT_KINDS:
        raise ValueError(f"kind: expected one of {', '.join(CHECKPOINT_KINDS)} or None, got {kind!r}")
    return CHECKPOINT_KINDS[kind]


def checkpoint_from_pb(message: pb.Checkpoint) -> CheckpointInfo:
    return CheckpointInfo(
        name=message.name,
        kind="state" if message.kind == pb.CHECKPOINT_KIND_STATE else "sampler_weights",
        path=message.path,
        step=message.step,
        created=message.created_time,
        expires=message.expires_time if message.HasField("expires_time") else None,
        size_bytes=message.size_bytes,
        user_metadata=dict(message.user_metadata),
        lora_rank=message.lora_config.rank if message.HasField("lora_config") else None,
        run_id=message.run_id,
    )
