"""What the server says about itself and its runs: `GetInfoResponse` (the model, its limits, the
loss functions) and `ModelInfo` (one training run, as list_models lists it)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .results import RunVersion

__all__ = ["GetInfoResponse", "Limits", "LossFunctionInfo", "MemoryUse", "ModelInfo"]


@dataclass
class LossFunctionInfo:
    """A loss function the server offers."""

    name: str
    """Its name, the `loss_fn` argument, e.g. "cispo"."""
    default_config: dict[str, float]
    """`loss_fn_config` keys and their defaults, e.g. {"clip_low_threshold": 0.0, ...}."""
    required_inputs: list[str]
    """Loss inputs it requires besides "target_tokens", e.g. ["logprobs", "advantages"]."""


@dataclass
class Limits:
    """Server limits; a request over one fails with ResourceExhaustedError."""

    max_message_bytes: int
    """Largest request message, in bytes."""
    max_tokens_per_request: int
    """Most tokens (sum of datum lengths) in one forward/forward_backward."""
    max_sequence_length: int
    """Longest datum the model accepts."""
    idempotency_keys_remembered: int = 0
    """Completed operations whose idempotency keys the server remembers."""
    max_data_per_request: int = 0
    """Most datums in one forward/forward_backward."""
    max_sample_tokens: int = 0
    """Most tokens one sampled sequence may generate."""
    max_num_samples: int = 0
    """Most sequences one sample request may ask for."""
    max_sample_request_tokens: int = 0
    """Most tokens one sample request holds: num_samples * (prompt + max_tokens)."""


@dataclass
class GetInfoResponse:
    """The answer to `get_info`: the model, its limits and the loss functions."""

    model_name: str
    """A checkpoint path, or "embedded-tiny-llama"."""
    vocab_size: int
    """Token ids must lie in [0, vocab_size)."""
    max_sequence_length: int
    """Longest datum the model accepts."""
    loss_functions: list[LossFunctionInfo]
    """The loss functions offered, with their defaults."""
    limits: Limits
    """Request limits."""
    device: str
    """The device the model runs on: "cpu" or "cuda"."""
    dtype: str
    """Parameter dtype: "float32" or "bfloat16"."""
    world_size: int
    """Data-parallel ranks training this state."""
    step: int
    """Optimizer steps taken so far."""
    num_parameters: int
    """Number of trainable parameters."""
    has_tokenizer: bool = False
    """Whether the model directory has a tokenizer (stop strings work)."""
    eos_token_ids: list[int] = field(default_factory=list)
    """Token ids that end a sampled sequence by default."""
    model_id: str = ""
    """The training run reported on ("" when none was named and no default run is live)."""
    lora_rank: int | None = None
    """The run's LoRA rank; None for a full fine-tune."""
    base_model: str = ""
    """The name CreateModel's base_model may give the served model."""
    num_runs: int = 0
    """Training runs live on the server."""
    max_runs: int = 0
    """The most runs the server takes."""
    sharding: str = "replicated"
    """How the group holds the training state: "replicated" or "fsdp" (docs/scaling.md)."""
    memory: MemoryUse | None = None
    """Bytes one rank holds for the run's parameters, gradient and AdamW moments."""
    version: RunVersion | None = None
    """The run's version (None when no run is reported on)."""


@dataclass
class MemoryUse:
    """Bytes of training state on one rank (rank 0; sharded, its shards)."""

    parameter_bytes: int = 0
    gradient_bytes: int = 0
    """0 when no gradient is accumulated."""
    optimizer_bytes: int = 0
    """0 before the first optim_step."""


@dataclass
class ModelInfo:
    """One training run, as `ServiceClient.list_models` lists it."""

    model_id: str
    lora_rank: int | None
    """None for a full fine-tune."""
    step: int
    trainable_parameters: int
    trainable_bytes: int
    """Weights, gradient and optimizer moments of the run's own parameters."""
    created: float
    """Unix time."""
    last_used: float


@dataclass
class CheckpointInfo:
    """One saved state or sampler weights, as `ServiceClient.list_checkpoints` lists it."""

    name: str
    kind: str
    """"state" (save_state) or "sampler_weights" (save_weights_for_sampler)."""
    path: str
    """What its save answered."""
    step: int
    created: float
    """Unix time."""
    expires: float | None
    """Unix time when the server deletes it; None: kept until deleted."""
    size_bytes: int
    user_metadata: dict[str, str]
    lora_rank: int | None
    """A LoRA run's state or adapter: its rank; else None."""
    run_id: str
    """The run that saved it ("" when not recorded)."""
