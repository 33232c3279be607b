"""The cispo engine: model loading, packing, chunked logprob head, losses, optimizer, states.

Speaks torch tensors and plain dataclasses; imports neither grpc nor protobuf.
"""

from cispo.worker.batch import Sample
from cispo.worker.config import EngineConfig
from cispo.worker.engine import Engine
from cispo.worker.errors import (
    ComputeFailed,
    FieldViolation,
    InvalidInput,
    LimitExceeded,
    PermissionDenied,
    RankUnavailable,
    RunConflict,
    RunNotFound,
    RunRestored,
    StateNotFound,
    StepRefused,
    VersionMismatch,
)
from cispo.worker.loss_stats import RATIO_BUCKET_EDGES, BatchStats
from cispo.worker.losses import LOSS_FUNCTIONS
from cispo.worker.model import EMBEDDED_MODEL_NAME, PolicyModel, load_policy_model
from cispo.worker.optimizer import AdamParams
from cispo.worker.results import BatchResult, EngineInfo, OptimResult

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "LOSS_FUNCTIONS",
    "RATIO_BUCKET_EDGES",
    "AdamParams",
    "BatchResult",
    "BatchStats",
    "ComputeFailed",
    "Engine",
    "EngineConfig",
    "EngineInfo",
    "FieldViolation",
    "InvalidInput",
    "LimitExceeded",
    "OptimResult",
    "PermissionDenied",
    "PolicyModel",
    "RankUnavailable",
    "RunConflict",
    "RunNotFound",
    "RunRestored",
    "Sample",
    "StateNotFound",
    "StepRefused",
    "VersionMismatch",
    "load_policy_model",
]
