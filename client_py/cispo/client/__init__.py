"""cispo.client: the Python client of the cispo training service (numpy only; no torch needed).

Names and shapes follow the Tinker SDK, so a Tinker training loop ports by changing
`import tinker` to `import cispo.client as tinker` (docs/porting-from-tinker.md):

    import cispo.client as tinker

    service = tinker.ServiceClient("localhost:50051")
    training_client = service.create_lora_training_client(base_model="", rank=32)
    datum = tinker.Datum(
        model_input=tinker.ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "logprobs": sampler_logprobs,
                        "advantages": advantages},
    )
    fwd_bwd_future = training_client.forward_backward([datum], loss_fn="cispo")
    optim_future = training_client.optim_step(tinker.AdamParams(learning_rate=1e-4))
    fwd_bwd_result = fwd_bwd_future.result()        # or: await fwd_bwd_future
    fwd_bwd_result.loss_fn_outputs[0]["logprobs"].to_numpy()   # (N,) float32
    fwd_bwd_result.metrics["loss:sum"]
"""

from . import types
from .client import DEFAULT_MAX_MESSAGE_BYTES, CustomLossFn, TrainingClient
from .errors import (
    AbortedError,
    CispoError,
    FailedPreconditionError,
    FieldViolation,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from .futures import APIFuture
from .sampling_client import SamplingClient
from .service_client import ServiceClient
from .types import (
    AdamParams,
    CheckpointInfo,
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    Limits,
    LoadStateResponse,
    LoadWeightsResponse,
    LossFnOutput,
    LossFnType,
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
    SaveWeightsResponse,
    StopReason,
    TensorData,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "APIFuture",
    "AbortedError",
    "AdamParams",
    "CheckpointInfo",
    "CispoError",
    "CustomLossFn",
    "Datum",
    "EncodedTextChunk",
    "FailedPreconditionError",
    "FieldViolation",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "InvalidArgumentError",
    "Limits",
    "LoadStateResponse",
    "LoadWeightsResponse",
    "LossFnOutput",
    "LossFnType",
    "LossFunctionInfo",
    "MemoryUse",
    "ModelInfo",
    "ModelInput",
    "NotFoundError",
    "OptimStepResponse",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "RunVersion",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveStateResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TrainingClient",
    "UnauthenticatedError",
    "UnavailableError",
    "types",
]
