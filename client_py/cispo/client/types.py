"""The client's data types, named and shaped like the Tinker API's: the public types module.

A training loop builds `Datum`s from token ids and per-token loss inputs, and reads
`ForwardBackwardOutput.loss_fn_outputs[i]["logprobs"]` and `.metrics["loss:sum"]` back.
Everything here is plain Python and numpy; the wire form lives in `cispo.client.wire`.

The types live in rooms of their own, all re-exported here:
    tensor_data  TensorData, to_array (lists, arrays, torch tensors -> wire dtypes)
    data         ModelInput, EncodedTextChunk, Datum: what a training step reads
    params       AdamParams, SamplingParams, LossFnType: how an operation runs
    results      ForwardBackwardOutput, OptimStepResponse, SampleResponse, ...: the answers
    info         GetInfoResponse, Limits, LossFunctionInfo, MemoryUse, ModelInfo, CheckpointInfo
    conversion   convert: the tinker SDK's objects as these
"""

from __future__ import annotations

from cispo.v1.tensors import LOSS_INPUT_KINDS

from .conversion import convert
from .data import Datum, EncodedTextChunk, LossFnInputs, ModelInput
from .info import CheckpointInfo, GetInfoResponse, Limits, LossFunctionInfo, MemoryUse, ModelInfo
from .params import AdamParams, LossFnType, SamplingParams
from .results import (
    ForwardBackwardOutput,
    LoadStateResponse,
    LoadWeightsResponse,
    LossFnOutput,
    OptimStepResponse,
    RunVersion,
    SampledSequence,
    SampleResponse,
    SaveStateResponse,
    SaveWeightsForSamplerResponse,
    SaveWeightsResponse,
    StopReason,
)
from .tensor_data import TensorData, TensorDtype, to_array

__all__ = [
    "LOSS_INPUT_KINDS",
    "AdamParams",
    "CheckpointInfo",
    "Datum",
    "EncodedTextChunk",
    "ForwardBackwardOutput",
    "GetInfoResponse",
    "Limits",
    "LoadStateResponse",
    "LoadWeightsResponse",
    "LossFnInputs",
    "LossFnOutput",
    "LossFnType",
    "LossFunctionInfo",
    "MemoryUse",
    "ModelInfo",
    "ModelInput",
    "OptimStepResponse",
    "RunVersion",
    "SampleResponse",
    "SampledSequence",
    "SamplingParams",
    "SaveStateResponse",
    "SaveWeightsForSamplerResponse",
    "SaveWeightsResponse",
    "StopReason",
    "TensorData",
    "TensorDtype",
    "convert",
    "to_array",
]
