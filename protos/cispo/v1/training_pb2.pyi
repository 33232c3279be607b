from google.rpc import status_pb2 as _status_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_INT64: _ClassVar[DType]
    DTYPE_INT32: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT64: _ClassVar[DType]

class StopReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STOP_REASON_UNSPECIFIED: _ClassVar[StopReason]
    STOP_REASON_LENGTH: _ClassVar[StopReason]
    STOP_REASON_STOP: _ClassVar[StopReason]

class CheckpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_KIND_UNSPECIFIED: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_STATE: _ClassVar[CheckpointKind]
    CHECKPOINT_KIND_SAMPLER_WEIGHTS: _ClassVar[CheckpointKind]
DTYPE_UNSPECIFIED: DType
DTYPE_INT64: DType
DTYPE_INT32: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT64: DType
STOP_REASON_UNSPECIFIED: StopReason
STOP_REASON_LENGTH: StopReason
STOP_REASON_STOP: StopReason
CHECKPOINT_KIND_UNSPECIFIED: CheckpointKind
CHECKPOINT_KIND_STATE: CheckpointKind
CHECKPOINT_KIND_SAMPLER_WEIGHTS: CheckpointKind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "raw_data", "int64_data", "float_data", "double_data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_DATA_FIELD_NUMBER: _ClassVar[int]
    INT64_DATA_FIELD_NUMBER: _ClassVar[int]
    FLOAT_DATA_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw_data: bytes
    int64_data: _containers.RepeatedScalarFieldContainer[int]
    float_data: _containers.RepeatedScalarFieldContainer[float]
    double_data: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., raw_data: _Optional[bytes] = ..., int64_data: _Optional[_Iterable[int]] = ..., float_data: _Optional[_Iterable[float]] = ..., double_data: _Optional[_Iterable[float]] = ...) -> None: ...

class LossFnInputs(_message.Message):
    __slots__ = ("target_tokens", "logprobs", "advantages", "weights", "sequence_ratio_mask")
    TARGET_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_RATIO_MASK_FIELD_NUMBER: _ClassVar[int]
    target_tokens: Tensor
    logprobs: Tensor
    advantages: Tensor
    weights: Tensor
    sequence_ratio_mask: Tensor
    def __init__(self, target_tokens: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., advantages: _Optional[_Union[Tensor, _Mapping]] = ..., weights: _Optional[_Union[Tensor, _Mapping]] = ..., sequence_ratio_mask: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Datum(_message.Message):
    __slots__ = ("model_input", "loss_fn_inputs")
    MODEL_INPUT_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_INPUTS_FIELD_NUMBER: _ClassVar[int]
    model_input: Tensor
    loss_fn_inputs: LossFnInputs
    def __init__(self, model_input: _Optional[_Union[Tensor, _Mapping]] = ..., loss_fn_inputs: _Optional[_Union[LossFnInputs, _Mapping]] = ...) -> None: ...

class ForwardBackwardInput(_message.Message):
    __slots__ = ("data", "loss_fn", "loss_fn_config", "idempotency_key", "typed_outputs", "model_id", "expected_version")
    class LossFnConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DATA_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_FIELD_NUMBER: _ClassVar[int]
    LOSS_FN_CONFIG_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    TYPED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    data: _containers.RepeatedCompositeFieldContainer[Datum]
    loss_fn: str
    loss_fn_config: _containers.ScalarMap[str, float]
    idempotency_key: str
    typed_outputs: bool
    model_id: str
    expected_version: RunVersion
    def __init__(self, data: _Optional[_Iterable[_Union[Datum, _Mapping]]] = ..., loss_fn: _Optional[str] = ..., loss_fn_config: _Optional[_Mapping[str, float]] = ..., idempotency_key: _Optional[str] = ..., typed_outputs: _Optional[bool] = ..., model_id: _Optional[str] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class LossFnOutput(_message.Message):
    __slots__ = ("logprobs",)
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    logprobs: Tensor
    def __init__(self, logprobs: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ForwardBackwardOutput(_message.Message):
    __slots__ = ("loss_fn_outputs", "metrics", "version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FN_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    loss_fn_outputs: _containers.RepeatedCompositeFieldContainer[LossFnOutput]
    metrics: _containers.ScalarMap[str, float]
    version: RunVersion
    def __init__(self, loss_fn_outputs: _Optional[_Iterable[_Union[LossFnOutput, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class AdamParams(_message.Message):
    __slots__ = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("adam_params", "idempotency_key", "model_id", "expected_version")
    ADAM_PARAMS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    adam_params: AdamParams
    idempotency_key: str
    model_id: str
    expected_version: RunVersion
    def __init__(self, adam_params: _Optional[_Union[AdamParams, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("grad_norm", "step", "metrics", "version")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    grad_norm: float
    step: int
    metrics: _containers.ScalarMap[str, float]
    version: RunVersion
    def __init__(self, grad_norm: _Optional[float] = ..., step: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class SaveStateRequest(_message.Message):
    __slots__ = ("name", "idempotency_key", "model_id", "expected_version", "user_metadata", "ttl_seconds")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    idempotency_key: str
    model_id: str
    expected_version: RunVersion
    user_metadata: _containers.ScalarMap[str, str]
    ttl_seconds: int
    def __init__(self, name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SaveStateResponse(_message.Message):
    __slots__ = ("name", "path", "step", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    step: int
    version: RunVersion
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., step: _Optional[int] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("name", "with_optimizer", "idempotency_key", "model_id", "expected_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WITH_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    with_optimizer: bool
    idempotency_key: str
    model_id: str
    expected_version: RunVersion
    def __init__(self, name: _Optional[str] = ..., with_optimizer: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ("name", "step", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    step: int
    version: RunVersion
    def __init__(self, name: _Optional[str] = ..., step: _Optional[int] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class LossFunctionInfo(_message.Message):
    __slots__ = ("name", "default_config", "required_inputs")
    class DefaultConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REQUIRED_INPUTS_FIELD_NUMBER: _ClassVar[int]
    name: str
    default_config: _containers.ScalarMap[str, float]
    required_inputs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, name: _Optional[str] = ..., default_config: _Optional[_Mapping[str, float]] = ..., required_inputs: _Optional[_Iterable[str]] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_message_bytes", "max_tokens_per_request", "max_sequence_length", "idempotency_keys_remembered", "max_data_per_request", "max_sample_tokens", "max_num_samples", "max_sample_request_tokens")
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEYS_REMEMBERED_FIELD_NUMBER: _ClassVar[int]
    MAX_DATA_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    MAX_SAMPLE_REQUEST_TOKENS_FIELD_NUMBER: _ClassVar[int]
    max_message_bytes: int
    max_tokens_per_request: int
    max_sequence_length: int
    idempotency_keys_remembered: int
    max_data_per_request: int
    max_sample_tokens: int
    max_num_samples: int
    max_sample_request_tokens: int
    def __init__(self, max_message_bytes: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., idempotency_keys_remembered: _Optional[int] = ..., max_data_per_request: _Optional[int] = ..., max_sample_tokens: _Optional[int] = ..., max_num_samples: _Optional[int] = ..., max_sample_request_tokens: _Optional[int] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_name", "vocab_size", "max_sequence_length", "loss_functions", "limits", "device", "dtype", "world_size", "step", "num_parameters", "has_tokenizer", "eos_token_ids", "model_id", "lora_config", "base_model", "num_runs", "max_runs", "sharding", "memory", "version")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FUNCTIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    HAS_TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_RUNS_FIELD_NUMBER: _ClassVar[int]
    SHARDING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    vocab_size: int
    max_sequence_length: int
    loss_functions: _containers.RepeatedCompositeFieldContainer[LossFunctionInfo]
    limits: Limits
    device: str
    dtype: str
    world_size: int
    step: int
    num_parameters: int
    has_tokenizer: bool
    eos_token_ids: _containers.RepeatedScalarFieldContainer[int]
    model_id: str
    lora_config: LoraConfig
    base_model: str
    num_runs: int
    max_runs: int
    sharding: str
    memory: MemoryUse
    version: RunVersion
    def __init__(self, model_name: _Optional[str] = ..., vocab_size: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., loss_functions: _Optional[_Iterable[_Union[LossFunctionInfo, _Mapping]]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., world_size: _Optional[int] = ..., step: _Optional[int] = ..., num_parameters: _Optional[int] = ..., has_tokenizer: _Optional[bool] = ..., eos_token_ids: _Optional[_Iterable[int]] = ..., model_id: _Optional[str] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., base_model: _Optional[str] = ..., num_runs: _Optional[int] = ..., max_runs: _Optional[int] = ..., sharding: _Optional[str] = ..., memory: _Optional[_Union[MemoryUse, _Mapping]] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class RunVersion(_message.Message):
    __slots__ = ("incarnation", "step", "accumulated")
    INCARNATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ACCUMULATED_FIELD_NUMBER: _ClassVar[int]
    incarnation: str
    step: int
    accumulated: int
    def __init__(self, incarnation: _Optional[str] = ..., step: _Optional[int] = ..., accumulated: _Optional[int] = ...) -> None: ...

class MemoryUse(_message.Message):
    __slots__ = ("parameter_bytes", "gradient_bytes", "optimizer_bytes")
    PARAMETER_BYTES_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_BYTES_FIELD_NUMBER: _ClassVar[int]
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    def __init__(self, parameter_bytes: _Optional[int] = ..., gradient_bytes: _Optional[int] = ..., optimizer_bytes: _Optional[int] = ...) -> None: ...

class StreamRequest(_message.Message):
    __slots__ = ("request_id", "forward", "forward_backward", "optim_step", "save_state", "load_state", "get_info", "save_weights_for_sampler", "sample")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    SAVE_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    GET_INFO_FIELD_NUMBER: _ClassVar[int]
    SAVE_WEIGHTS_FOR_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    forward: ForwardBackwardInput
    forward_backward: ForwardBackwardInput
    optim_step: OptimStepRequest
    save_state: SaveStateRequest
    load_state: LoadStateRequest
    get_info: GetInfoRequest
    save_weights_for_sampler: SaveWeightsForSamplerRequest
    sample: SampleRequest
    def __init__(self, request_id: _Optional[str] = ..., forward: _Optional[_Union[ForwardBackwardInput, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardInput, _Mapping]] = ..., optim_step: _Optional[_Union[OptimStepRequest, _Mapping]] = ..., save_state: _Optional[_Union[SaveStateRequest, _Mapping]] = ..., load_state: _Optional[_Union[LoadStateRequest, _Mapping]] = ..., get_info: _Optional[_Union[GetInfoRequest, _Mapping]] = ..., save_weights_for_sampler: _Optional[_Union[SaveWeightsForSamplerRequest, _Mapping]] = ..., sample: _Optional[_Union[SampleRequest, _Mapping]] = ...) -> None: ...

class StreamResponse(_message.Message):
    __slots__ = ("request_id", "forward", "forward_backward", "optim_step", "save_state", "load_state", "get_info", "save_weights_for_sampler", "sample", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    SAVE_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    GET_INFO_FIELD_NUMBER: _ClassVar[int]
    SAVE_WEIGHTS_FOR_SAMPLER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    forward: ForwardBackwardOutput
    forward_backward: ForwardBackwardOutput
    optim_step: OptimStepResponse
    save_state: SaveStateResponse
    load_state: LoadStateResponse
    get_info: GetInfoResponse
    save_weights_for_sampler: SaveWeightsForSamplerResponse
    sample: SampleResponse
    error: _status_pb2.Status
    def __init__(self, request_id: _Optional[str] = ..., forward: _Optional[_Union[ForwardBackwardOutput, _Mapping]] = ..., forward_backward: _Optional[_Union[ForwardBackwardOutput, _Mapping]] = ..., optim_step: _Optional[_Union[OptimStepResponse, _Mapping]] = ..., save_state: _Optional[_Union[SaveStateResponse, _Mapping]] = ..., load_state: _Optional[_Union[LoadStateResponse, _Mapping]] = ..., get_info: _Optional[_Union[GetInfoResponse, _Mapping]] = ..., save_weights_for_sampler: _Optional[_Union[SaveWeightsForSamplerResponse, _Mapping]] = ..., sample: _Optional[_Union[SampleResponse, _Mapping]] = ..., error: _Optional[_Union[_status_pb2.Status, _Mapping]] = ...) -> None: ...

class SaveWeightsForSamplerRequest(_message.Message):
    __slots__ = ("name", "idempotency_key", "model_id", "merged", "expected_version", "user_metadata", "ttl_seconds")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MERGED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    name: str
    idempotency_key: str
    model_id: str
    merged: bool
    expected_version: RunVersion
    user_metadata: _containers.ScalarMap[str, str]
    ttl_seconds: int
    def __init__(self, name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ..., merged: _Optional[bool] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class SaveWeightsForSamplerResponse(_message.Message):
    __slots__ = ("name", "path", "step", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    path: str
    step: int
    version: RunVersion
    def __init__(self, name: _Optional[str] = ..., path: _Optional[str] = ..., step: _Optional[int] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop_tokens", "stop_strings")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    stop_tokens: _containers.RepeatedScalarFieldContainer[int]
    stop_strings: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., stop_tokens: _Optional[_Iterable[int]] = ..., stop_strings: _Optional[_Iterable[str]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("prompt", "num_samples", "sampling_params", "include_prompt_logprobs", "model_path", "typed_outputs", "idempotency_key", "model_id", "expected_version")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_PARAMS_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    MODEL_PATH_FIELD_NUMBER: _ClassVar[int]
    TYPED_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    prompt: Tensor
    num_samples: int
    sampling_params: SamplingParams
    include_prompt_logprobs: bool
    model_path: str
    typed_outputs: bool
    idempotency_key: str
    model_id: str
    expected_version: RunVersion
    def __init__(self, prompt: _Optional[_Union[Tensor, _Mapping]] = ..., num_samples: _Optional[int] = ..., sampling_params: _Optional[_Union[SamplingParams, _Mapping]] = ..., include_prompt_logprobs: _Optional[bool] = ..., model_path: _Optional[str] = ..., typed_outputs: _Optional[bool] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ..., expected_version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class SampledSequence(_message.Message):
    __slots__ = ("tokens", "logprobs", "stop_reason")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    STOP_REASON_FIELD_NUMBER: _ClassVar[int]
    tokens: Tensor
    logprobs: Tensor
    stop_reason: StopReason
    def __init__(self, tokens: _Optional[_Union[Tensor, _Mapping]] = ..., logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., stop_reason: _Optional[_Union[StopReason, str]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("sequences", "prompt_logprobs", "version")
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[SampledSequence]
    prompt_logprobs: Tensor
    version: RunVersion
    def __init__(self, sequences: _Optional[_Iterable[_Union[SampledSequence, _Mapping]]] = ..., prompt_logprobs: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[_Union[RunVersion, _Mapping]] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("rank", "seed", "train_mlp", "train_attn", "train_unembed")
    RANK_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    TRAIN_MLP_FIELD_NUMBER: _ClassVar[int]
    TRAIN_ATTN_FIELD_NUMBER: _ClassVar[int]
    TRAIN_UNEMBED_FIELD_NUMBER: _ClassVar[int]
    rank: int
    seed: int
    train_mlp: bool
    train_attn: bool
    train_unembed: bool
    def __init__(self, rank: _Optional[int] = ..., seed: _Optional[int] = ..., train_mlp: _Optional[bool] = ..., train_attn: _Optional[bool] = ..., train_unembed: _Optional[bool] = ...) -> None: ...

class CreateModelRequest(_message.Message):
    __slots__ = ("base_model", "lora_config", "full_fine_tuning", "from_state", "idempotency_key")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    FULL_FINE_TUNING_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    lora_config: LoraConfig
    full_fine_tuning: bool
    from_state: StateRef
    idempotency_key: str
    def __init__(self, base_model: _Optional[str] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., full_fine_tuning: _Optional[bool] = ..., from_state: _Optional[_Union[StateRef, _Mapping]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class StateRef(_message.Message):
    __slots__ = ("path", "with_optimizer")
    PATH_FIELD_NUMBER: _ClassVar[int]
    WITH_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    path: str
    with_optimizer: bool
    def __init__(self, path: _Optional[str] = ..., with_optimizer: _Optional[bool] = ...) -> None: ...

class CreateModelResponse(_message.Message):
    __slots__ = ("model_id", "info")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    info: GetInfoResponse
    def __init__(self, model_id: _Optional[str] = ..., info: _Optional[_Union[GetInfoResponse, _Mapping]] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("model_id", "lora_config", "step", "trainable_parameters", "trainable_bytes", "created", "last_used")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    LAST_USED_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    lora_config: LoraConfig
    step: int
    trainable_parameters: int
    trainable_bytes: int
    created: float
    last_used: float
    def __init__(self, model_id: _Optional[str] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., step: _Optional[int] = ..., trainable_parameters: _Optional[int] = ..., trainable_bytes: _Optional[int] = ..., created: _Optional[float] = ..., last_used: _Optional[float] = ...) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models",)
    MODELS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ...) -> None: ...

class UnloadModelRequest(_message.Message):
    __slots__ = ("model_id", "idempotency_key")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    idempotency_key: str
    def __init__(self, model_id: _Optional[str] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class UnloadModelResponse(_message.Message):
    __slots__ = ("model_id",)
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    def __init__(self, model_id: _Optional[str] = ...) -> None: ...

class RemoveExportRequest(_message.Message):
    __slots__ = ("name", "idempotency_key", "model_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    idempotency_key: str
    model_id: str
    def __init__(self, name: _Optional[str] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class RemoveExportResponse(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("name", "kind", "path", "step", "created_time", "expires_time", "size_bytes", "user_metadata", "lora_config", "run_id")
    class UserMetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_TIME_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    USER_METADATA_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: CheckpointKind
    path: str
    step: int
    created_time: float
    expires_time: float
    size_bytes: int
    user_metadata: _containers.ScalarMap[str, str]
    lora_config: LoraConfig
    run_id: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ..., path: _Optional[str] = ..., step: _Optional[int] = ..., created_time: _Optional[float] = ..., expires_time: _Optional[float] = ..., size_bytes: _Optional[int] = ..., user_metadata: _Optional[_Mapping[str, str]] = ..., lora_config: _Optional[_Union[LoraConfig, _Mapping]] = ..., run_id: _Optional[str] = ...) -> None: ...

class ListCheckpointsRequest(_message.Message):
    __slots__ = ("kind", "run_id", "name_prefix")
    KIND_FIELD_NUMBER: _ClassVar[int]
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_PREFIX_FIELD_NUMBER: _ClassVar[int]
    kind: CheckpointKind
    run_id: str
    name_prefix: str
    def __init__(self, kind: _Optional[_Union[CheckpointKind, str]] = ..., run_id: _Optional[str] = ..., name_prefix: _Optional[str] = ...) -> None: ...

class ListCheckpointsResponse(_message.Message):
    __slots__ = ("checkpoints",)
    CHECKPOINTS_FIELD_NUMBER: _ClassVar[int]
    checkpoints: _containers.RepeatedCompositeFieldContainer[Checkpoint]
    def __init__(self, checkpoints: _Optional[_Iterable[_Union[Checkpoint, _Mapping]]] = ...) -> None: ...

class GetCheckpointRequest(_message.Message):
    __slots__ = ("name", "kind")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: CheckpointKind
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ...) -> None: ...

class GetCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...

class DeleteCheckpointRequest(_message.Message):
    __slots__ = ("name", "kind", "idempotency_key", "model_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    kind: CheckpointKind
    idempotency_key: str
    model_id: str
    def __init__(self, name: _Optional[str] = ..., kind: _Optional[_Union[CheckpointKind, str]] = ..., idempotency_key: _Optional[str] = ..., model_id: _Optional[str] = ...) -> None: ...

class DeleteCheckpointResponse(_message.Message):
    __slots__ = ("checkpoint",)
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    checkpoint: Checkpoint
    def __init__(self, checkpoint: _Optional[_Union[Checkpoint, _Mapping]] = ...) -> None: ...
