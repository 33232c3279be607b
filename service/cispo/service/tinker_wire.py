"""The Tinker SDK's wire forms <-> cispo.v1 messages, for the HTTP front (service/cispo/service/tinker_http.py).

The SDK (tinker 0.38) sends JSON bodies, except `forward_backward`, whose body is its
`tinker_public.ForwardBackwardRequest` protobuf; it wants the results of forward/backward and of
sampling as protobuf too. The protobuf module is the pinned SDK's own (`tinker.proto`). Every
malformed input is an InvalidInput naming its field; nothing here touches a run.
"""

import json
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from google.protobuf.descriptor import FieldDescriptor
from tinker.proto import tinker_public_pb2 as tpb

from cispo.service.errors import clip
from cispo.service.limits import RequestLimits
from cispo.v1 import training_pb2 as pb
from cispo.v1.tensors import ADAM_DEFAULTS, DTYPE_CODES, LOSS_INPUT_KINDS, RAW_DTYPES, decode_tensor, encode_tensor
from cispo.worker import FieldViolation, InvalidInput, LimitExceeded
from cispo.worker.checkpoints import metadata_problem

# Tinker tensor dtypes -> the little-endian numpy dtype of their bytes (cispo's of that name).
_DTYPES: dict[int, np.dtype] = {
    code: RAW_DTYPES[DTYPE_CODES[name]]
    for code, name in ((tpb.DTYPE_FLOAT32, "float32"), (tpb.DTYPE_INT64, "int64"), (tpb.DTYPE_INT32, "int32"))
}
LOSS_INPUTS = tuple(LOSS_INPUT_KINDS)
UNSUPPORTED_SAMPLE_FIELDS = (
    "topk_prompt_logprobs",
    "topk_sample_logprobs",
    "target_prompt_logprobs",
    "prompt_alt_tokens_k",
    "prompt_logprobs_last_n",
    "record_stability_info",
)


def invalid(field: str, description: str) -> InvalidInput:
    return InvalidInput([FieldViolation(field, description)])


def _tensor(t: tpb.Tensor, field: str, length: int) -> pb.Tensor:
    """A Tinker Tensor (dense, or sparse CSR with 0 elsewhere) of `length` elements (its datum's
    token count) as a 1-D cispo raw tensor. The declared shape is checked before anything is
    allocated, so a sparse tensor never expands past 8 bytes per token of its datum."""
    if t.dtype not in _DTYPES:
        raise invalid(
            field,
            f"dtype {tpb.DType.Name(t.dtype) if t.dtype in tpb.DType.values() else t.dtype} "
            "is not supported (float32, int64, int32)",
        )
    np_dtype = _DTYPES[t.dtype]
    shape = list(t.shape)
    if len(shape) > 2 or (len(shape) == 2 and shape[0] != 1):
        raise invalid(field, f"must be 1-D (or 1 x N), got shape {clip(str(shape), 80)}")
    if shape and shape[-1] != length:
        raise invalid(field, f"length {shape[-1]} != model_input length {length}")
    try:
        if t.HasField("sparse_csr"):
            if not shape:
                raise ValueError("a sparse tensor needs its shape")
            values = np.frombuffer(t.sparse_csr.values, np_dtype)
            crow = np.frombuffer(t.sparse_csr.crow_indices, "<i8")
            col = np.frombuffer(t.sparse_csr.col_indices, "<i8")
            if (
                len(crow) != 2
                or crow[0] != 0
                or crow[1] != len(values)
                or len(col) != len(values)
                or (len(col) and (col.min() < 0 or col.max() >= length))
            ):
                raise ValueError("inconsistent CSR indices")
            data = np.zeros(length, np_dtype)
            data[col] = values
        else:
            data = np.frombuffer(t.dense, np_dtype)
    except ValueError as exc:
        raise invalid(field, f"cannot be read: {exc}") from None
    if data.size != length:
        raise invalid(field, f"length {data.size} != model_input length {length}")
    return encode_tensor(data)


def _tokens(chunks: Iterable[tpb.Chunk], field: str) -> pb.Tensor:
    """The token ids of protobuf model-input chunks (text chunks only), int32."""
    parts = []
    for j, chunk in enumerate(chunks):
        kind = chunk.WhichOneof("chunk")
        if kind != "encoded_text":
            raise invalid(f"{field}[{j}]", f"{kind or 'empty'} chunks are not supported (text tokens only)")
        if len(chunk.encoded_text.tokens) % 4:
            raise invalid(f"{field}[{j}].tokens", "must be int32 little-endian bytes")
        parts.append(np.frombuffer(chunk.encoded_text.tokens, "<i4"))
    return encode_tensor(np.concatenate(parts) if parts else np.zeros(0, "<i4"))


def check_limits(request: tpb.ForwardBackwardRequest, limits: RequestLimits) -> None:
    """LimitExceeded when the request has more datums or tokens than one request may."""
    if len(request.data) > limits.max_data_per_request:
        raise LimitExceeded(
            "max_data_per_request",
            f"{len(request.data)} datums is over max_data_per_request={limits.max_data_per_request}",
        )
    tokens = sum(len(chunk.encoded_text.tokens) // 4 for datum in request.data for chunk in datum.model_input)
    if tokens > limits.max_tokens_per_request:
        raise LimitExceeded(
            "max_tokens_per_request",
            f"{tokens} tokens is over max_tokens_per_request={limits.max_tokens_per_request}",
        )


def forward_backward_request(body: bytes) -> tpb.ForwardBackwardRequest:
    try:
        return tpb.ForwardBackwardRequest.FromString(body)
    except Exception as exc:
        raise invalid("body", f"is not a tinker_public.ForwardBackwardRequest ({len(body)} bytes: {exc})") from None


def forward_backward_input(
    request: tpb.ForwardBackwardRequest, model_id: str, idempotency_key: str
) -> pb.ForwardBackwardInput:
    """cispo's ForwardBackwardInput for a Tinker ForwardBackwardRequest on run `model_id`."""
    out = pb.ForwardBackwardInput(loss_fn=request.loss_fn, model_id=model_id, idempotency_key=idempotency_key)
    for key, value in request.loss_fn_config_v2.items():
        if value.WhichOneof("value") != "number":
            raise invalid(f"loss_fn_config.{key}", "must be a number")
        out.loss_fn_config[key] = value.number
    for key, number in request.loss_fn_config.items():  # the older map, for keys v2 lacks
        if key not in out.loss_fn_config:
            out.loss_fn_config[key] = number
    for i, datum in enumerate(request.data):
        where = f"data[{i}]"
        message = out.data.add()
        tokens = _tokens(datum.model_input, f"{where}.model_input")
        message.model_input.CopyFrom(tokens)
        message.loss_fn_inputs.SetInParent()
        for name, tensor in datum.loss_fn_inputs.items():
            if name not in LOSS_INPUTS:
                raise invalid(
                    f"{where}.loss_fn_inputs.{clip(name, 40)}", f"unknown loss input (known: {', '.join(LOSS_INPUTS)})"
                )
            getattr(message.loss_fn_inputs, name).CopyFrom(
                _tensor(tensor, f"{where}.loss_fn_inputs.{name}", tokens.shape[0])
            )
    return out


def _float32(t: pb.Tensor) -> np.ndarray:
    """The elements of one of the service's float32 tensors (raw or typed), little-endian."""
    return decode_tensor(t).astype("<f4", copy=False)


def forward_backward_output(output: pb.ForwardBackwardOutput) -> bytes:
    """The SDK's ForwardBackwardOutput: one ArrayRecord whose "logprobs" field holds every
    datum's logprobs (float32) with N+1 byte offsets."""
    arrays = [_float32(o.logprobs) for o in output.loss_fn_outputs]
    offsets = np.cumsum([0, *(a.nbytes for a in arrays)]).astype("<i8")
    record = tpb.ArrayRecord(type_tag="ArrayRecord", num_datums=len(arrays))
    record.fields["logprobs"].CopyFrom(
        tpb.BatchedTensor(
            data=b"".join(a.tobytes() for a in arrays), offsets=offsets.tobytes(), dtype=tpb.DTYPE_FLOAT32
        )
    )
    message = tpb.ForwardBackwardOutput(loss_fn_output_type="ArrayRecord", loss_fn_outputs=[record])
    message.metrics.update(output.metrics)
    return message.SerializeToString()


# --- JSON bodies --------------------------------------------------------------------------------


def field(
    body: Mapping[str, Any],
    name: str,
    kinds: tuple[type, ...],
    where: str = "",
    required: bool = True,
    default: Any = None,
) -> Any:
    """body[name] checked to be one of `kinds` (bool is never a number)."""
    value = body.get(name)
    if value is None:
        if required:
            raise invalid(f"{where}{name}", "is required")
        return default
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise invalid(f"{where}{name}", f"must be {' or '.join(k.__name__ for k in kinds)}, got {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and not -(2**63) <= value < 2**63:
        raise invalid(f"{where}{name}", f"{clip(str(value), 40)} is out of range (a 64-bit integer)")
    return value


def string_map(body: Mapping[str, Any], name: str, strict: bool = True) -> dict[str, str]:
    """body[name], a JSON object of strings (user metadata), or {} when absent; a value that is
    not a string is refused (`strict`) or written as JSON; the whole held to a checkpoint's
    metadata limits (worker.checkpoints.metadata_problem)."""
    value = field(body, name, (dict,), required=False, default={})
    out = {}
    for key, item in value.items():
        if not isinstance(item, str) and strict:
            raise invalid(f"{name}.{clip(key, 40)}", f"must be a string, got {type(item).__name__}")
        out[key] = item if isinstance(item, str) else json.dumps(item)
    if (problem := metadata_problem(out)) is not None:
        raise invalid(name, problem)
    return out


def lifetime(body: Mapping[str, Any], message: pb.SaveStateRequest | pb.SaveWeightsForSamplerRequest) -> None:
    """A save's `ttl_seconds` and `user_metadata` onto its cispo request (which checks them)."""
    if (ttl := field(body, "ttl_seconds", (int,), required=False)) is not None:
        message.ttl_seconds = ttl
    message.user_metadata.update(string_map(body, "user_metadata"))


def _assign(message, name: str, value: Any, where: str) -> None:
    """message.name = value (a float field takes an int as a float); InvalidInput naming the
    field when the value does not fit it (a rank of 10**30, a seed of 2**64, 10**400)."""
    try:
        is_float = message.DESCRIPTOR.fields_by_name[name].cpp_type in (
            FieldDescriptor.CPPTYPE_FLOAT,
            FieldDescriptor.CPPTYPE_DOUBLE,
        )
        setattr(message, name, float(value) if is_float else value)
    except (ValueError, TypeError, OverflowError):
        raise invalid(f"{where}{name}", f"{clip(str(value), 40)} is out of range") from None


def adam_params(body: Mapping[str, Any]) -> pb.AdamParams:
    params = body.get("adam_params", body.get("optim_params"))
    if not isinstance(params, Mapping):
        raise invalid("adam_params", "is required (an object)")
    if params.get("type", "adamw") != "adamw":
        raise invalid("adam_params.type", f"{params.get('type')!r} is not supported (AdamW only)")
    out = pb.AdamParams()
    for name in ADAM_DEFAULTS:
        value = field(params, name, (int, float), "adam_params.", required=False)
        if value is not None:
            _assign(out, name, value, "adam_params.")
    return out


def lora_config(body: Mapping[str, Any]) -> pb.LoraConfig:
    config = body.get("lora_config")
    if not isinstance(config, Mapping):
        raise invalid("lora_config", "is required: cispo's Tinker front makes LoRA runs")
    out = pb.LoraConfig()
    for name in ("rank", "seed"):
        if (value := field(config, name, (int,), "lora_config.", required=False)) is not None:
            _assign(out, name, value, "lora_config.")
    for name in ("train_mlp", "train_attn", "train_unembed"):
        setattr(out, name, field(config, name, (bool,), "lora_config.", required=False, default=True))
    return out


def sample_request(body: Mapping[str, Any], model_path: str, model_id: str) -> pb.SampleRequest:
    """cispo's SampleRequest for a Tinker `asample` body."""
    for name in UNSUPPORTED_SAMPLE_FIELDS:
        if body.get(name):
            raise invalid(name, "is not supported by cispo")
    prompt = field(body, "prompt", (dict,))
    chunks = field(prompt, "chunks", (list,), "prompt.")
    tokens = []
    for j, chunk in enumerate(chunks):
        if not isinstance(chunk, Mapping) or chunk.get("type", "encoded_text") != "encoded_text":
            raise invalid(f"prompt.chunks[{j}]", "only encoded_text chunks are supported")
        values = field(chunk, "tokens", (list,), f"prompt.chunks[{j}].")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in values):
            raise invalid(f"prompt.chunks[{j}].tokens", "must be integer token ids")
        tokens += values
    try:
        ids = np.asarray(tokens, "<i8")
    except OverflowError:
        raise invalid("prompt", "token ids must fit in int64") from None
    params = field(body, "sampling_params", (dict,), required=False, default={})
    sp = pb.SamplingParams()
    for name, kinds in (
        ("max_tokens", (int,)),
        ("seed", (int,)),
        ("temperature", (int, float)),
        ("top_k", (int,)),
        ("top_p", (int, float)),
    ):
        value = field(params, name, kinds, "sampling_params.", required=False)
        if value is not None:
            _assign(sp, name, value, "sampling_params.")
    stop = params.get("stop")
    for item in [stop] if isinstance(stop, str) else (stop or []):
        if isinstance(item, str):
            sp.stop_strings.append(item)
        elif isinstance(item, int) and not isinstance(item, bool) and -(2**63) <= item < 2**63:
            sp.stop_tokens.append(item)
        else:
            raise invalid("sampling_params.stop", "must be a string, strings or token ids")
    num_samples = field(body, "num_samples", (int,), required=False, default=1)
    if not 0 < num_samples < 2**63:
        raise invalid("num_samples", f"must be positive, got {num_samples}")
    return pb.SampleRequest(
        prompt=encode_tensor(ids),
        num_samples=num_samples,
        sampling_params=sp,
        model_path=model_path,
        model_id=model_id,
        include_prompt_logprobs=bool(body.get("prompt_logprobs")),
    )


def sample_response(response: pb.SampleResponse) -> bytes:
    """The SDK's SampleResponse: int32 tokens, float32 logprobs; prompt logprobs with NaN for
    the first token."""
    message = tpb.SampleResponse()
    for sequence in response.sequences:
        tokens = decode_tensor(sequence.tokens).astype("<i4")
        message.sequences.add(
            stop_reason=tpb.STOP_REASON_LENGTH
            if sequence.stop_reason == pb.STOP_REASON_LENGTH
            else tpb.STOP_REASON_STOP,
            tokens=tokens.tobytes(),
            logprobs=_float32(sequence.logprobs).tobytes(),
        )
    if response.HasField("prompt_logprobs"):
        message.prompt_logprobs = np.concatenate([[np.nan], _float32(response.prompt_logprobs)]).astype("<f4").tobytes()
    return message.SerializeToString()
