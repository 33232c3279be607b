"""What an engine's operations answer (types only): BatchResult, OptimResult, EngineInfo."""

from dataclasses import dataclass, field

import torch

from cispo.worker.loss_stats import BatchStats
from cispo.worker.losses import LOSS_FUNCTIONS, LossFunction
from cispo.worker.sharding import MemoryUse

NO_MEMORY = MemoryUse(0, 0, 0)


@dataclass(frozen=True)
class BatchResult:
    """Per-datum target logprobs ((N_i,) fp32, CPU, request order) and the batch's stats."""

    logprobs: list[torch.Tensor]
    stats: BatchStats

    @property
    def metrics(self) -> dict[str, float]:
        return self.stats.metrics()


@dataclass(frozen=True)
class OptimResult:
    grad_norm: float  # pre-clip global L2 norm
    step: int  # steps taken so far, this one included
    learning_rate: float


@dataclass(frozen=True)
class EngineInfo:
    """A run's engine (or the served base model, with no run) as GetInfo describes it."""

    model_name: str  # the served model's name (its directory, or the embedded test model's)
    vocab_size: int
    max_sequence_length: int
    device: str  # the device type: "cpu", "cuda"
    dtype: str  # the compute dtype: "float32", "bfloat16"
    num_parameters: int  # the run's trainable parameters (the base: all of the model's)
    step: int  # optimizer steps taken (the base: 0)
    has_tokenizer: bool = False
    eos_token_ids: tuple[int, ...] = ()
    loss_functions: dict[str, LossFunction] = field(default_factory=lambda: dict(LOSS_FUNCTIONS))
    sharding: str = "replicated"
    memory: MemoryUse = NO_MEMORY
    """Bytes this rank holds for the run's trainable parameters, gradient and AdamW moments."""
    architecture: str = ""  # the HF config's model_type, e.g. "llama"
    device_name: str = ""  # the torch device with its index, e.g. "cuda:0"
