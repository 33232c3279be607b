"""The engine's configuration: limits, sizes and where files go. Each default is written here once;
`cispo-server`'s flags, environment variables and `--help` are generated from these fields."""

from dataclasses import dataclass, field
from pathlib import Path

import torch

SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds of one Sample request (RESOURCE_EXHAUSTED above them)."""

    max_sample_tokens: int = 4096
    """Most tokens one sequence may generate."""
    max_num_samples: int = 128
    """Most sequences one request may ask for."""
    max_sample_request_tokens: int = 1 << 18
    """Most tokens one request holds, num_samples * (prompt + max_tokens); also the budget of a
    batch of requests generated together (it bounds the KV cache)."""

    def __post_init__(self):
        for name in ("max_sample_tokens", "max_num_samples", "max_sample_request_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ExportConfig:
    """Where and how sampler weights are written."""

    sampler_dir: Path = Path("sampler_weights")
    dtype: str = "bfloat16"
    """Serving dtype of the safetensors: bfloat16, float16 or float32."""
    max_shard_bytes: int = 5 * 10**9
    """Above this, the weights are sharded into several files with an index."""
    cache_size: int = 2
    """Exports kept loaded for Sample requests that name one (0: load each time)."""

    def __post_init__(self):
        if self.dtype not in SERVING_DTYPES:
            raise ValueError(f"sampler dtype must be one of {', '.join(SERVING_DTYPES)}, got {self.dtype!r}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")


GRADIENT_ACCUMULATION = ("exact", "in-place")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of the engine."""

    checkpoint_dir: Path = Path("checkpoints")
    """Where save_state writes and load_state reads named states."""
    micro_batch_tokens: int = 8192
    """Token budget of one packed micro-batch (bounds activation memory)."""
    max_tokens_per_request: int = 1 << 20
    """Most tokens in one forward/forward_backward request."""
    head_chunk_tokens: int | None = None
    """Tokens per chunk of the LM head; None sizes chunks like the hidden states."""
    sampling: SamplingLimits = field(default_factory=SamplingLimits)
    """Bounds of Sample requests."""
    export: ExportConfig = field(default_factory=ExportConfig)
    """Where and how save_weights_for_sampler writes, and the cache of loaded exports."""
    gradient_accumulation: str = "exact"
    """How forward_backward adds to an accumulated gradient (GRADIENT_ACCUMULATION): "exact"
    holds the new gradient apart until it is known good, so a failure leaves the old one as it
    was (two gradients at the peak); "in-place" adds into the old one (one gradient), and a
    failure discards the gradient accumulated since the last optim_step."""

    def __post_init__(self):
        if self.micro_batch_tokens < 1:
            raise ValueError(f"micro_batch_tokens must be >= 1, got {self.micro_batch_tokens}")
        if self.max_tokens_per_request < 1:
            raise ValueError(f"max_tokens_per_request must be >= 1, got {self.max_tokens_per_request}")
        if self.head_chunk_tokens is not None and self.head_chunk_tokens < 1:
            raise ValueError(f"head_chunk_tokens must be >= 1 or None, got {self.head_chunk_tokens}")
        if self.gradient_accumulation not in GRADIENT_ACCUMULATION:
            raise ValueError(
                f"gradient_accumulation must be one of {', '.join(GRADIENT_ACCUMULATION)}, "
                f"got {self.gradient_accumulation!r}"
            )
