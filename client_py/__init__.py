"""cispo.client: the Python client of the cispo training service (numpy only; no torch needed).

Names and shapes follow the Tinker API, so a Tinker training loop ports by changing imports:

    from cispo.client import AdamParams, Datum, ModelInput, TrainingClient

    client = TrainingClient("localhost:50051")
    datum = Datum(
        model_input=ModelInput.from_ints(tokens),
        loss_fn_inputs={"target_tokens": targets, "logprobs": sampler_logprobs,
                        "advantages": advantages},
    )
    fwd_bwd_future = await client.forward_backward_async(data=[datum], loss_fn="cispo")
    optim_future = await client.optim_step_async(AdamParams(learning_rate=1e-5))
    fwd_bwd_result = await fwd_bwd_future.result_async()
    fwd_bwd_result.loss_fn_outputs[0]["logprobs"].to_numpy()   # (N,) float32
    fwd_bwd_result.metrics["loss:sum"]
"""

from . import types
from .client import DEFAULT_MAX_MESSAGE_BYTES, TrainingClient
from .errors import (
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
    Datum,
    EncodedTextChunk,
    ForwardBackwardOutput,
    GetInfoResponse,
    Limits,
    LoadStateResponse,
    LossFnOutput,
    LossFnType,
    LossFunctionInfo,
    ModelInfo,
    ModelInput,
    OptimStepResponse,
    SampledSequence,
    SampleResponse,
    SamplingParams,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
    StopReason,
    TensorData,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "APIFuture",
    "AdamParams",
    "CispoError",
    "Datum",
    "EncodedTextChunk",
    "FailedPreconditionError",
    "FieldViolation",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "InvalidArgumentError",
    "Limits",
    "LoadStateResponse",
    "LossFnOutput",
    "LossFnType",
    "LossFunctionInfo",
    "ModelInfo",
    "ModelInput",
    "NotFoundError",
    "OptimStepResponse",
    "PermissionDeniedError",
    "ResourceExhaustedError",
    "SampleResponse",
    "SampledSequence",
    "SamplingClient",
    "SamplingParams",
    "SaveStateResponse",
    "SaveWeightsForSamplerResponse",
    "ServiceClient",
    "StopReason",
    "TensorData",
    "TrainingClient",
    "UnauthenticatedError",
    "UnavailableError",
    "types",
]
