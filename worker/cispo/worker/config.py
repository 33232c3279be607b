"""The engine's configuration: limits, sizes and where files go, the model it loads and how runs
are held. Each default is written here once. A field whose metadata is `flag(...)` is also a
flag of `cispo-server` (its help text is the field's description); one whose metadata is
`group(...)` nests a dataclass, whose flags take a prefix and a --help section
(service/cispo/service/flags.py generates them)."""

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cispo.worker.sharding import SHARDING_MODES

FLAG = "cispo.flag"
GROUP = "cispo.group"


@dataclass(frozen=True)
class Flag:
    """A config field that is also a command-line flag and a CISPO_* environment variable."""

    help: str
    """What the field means, for --help; the generated text appends its variable and default."""
    name: str = ""
    """The flag's name without `--` when it is not the group's prefix + the field's name."""
    choices: tuple[str, ...] = ()
    """The values allowed; () allows any."""
    normalize: Callable[[str], str] | None = None
    """Applied to a value before it is checked against `choices` (str.lower: case-insensitive)."""
    section: str = ""
    """The --help section when it is not the group's."""


@dataclass(frozen=True)
class Group:
    """A config field holding a nested config dataclass, whose flags it sections and prefixes."""

    section: str
    prefix: str = ""


def flag(
    help: str,
    *,
    name: str = "",
    choices: Sequence[str] = (),
    normalize: Callable[[str], str] | None = None,
    section: str = "",
) -> dict[str, Flag]:
    """Metadata of a field that `cispo-server` sets by a flag: `field(default=..., metadata=flag(...))`."""
    return {FLAG: Flag(help, name, tuple(choices), normalize, section)}


def group(section: str, prefix: str = "") -> dict[str, Group]:
    """Metadata of a field holding a nested config, its flags under `section`, named `prefix` + field."""
    return {GROUP: Group(section, prefix)}


SERVING_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
GRADIENT_ACCUMULATION = ("exact", "in-place")


@dataclass(frozen=True)
class ModelConfig:
    """The served model and how it is loaded (cispo.worker.load_policy_model's arguments)."""

    path: str = field(
        default="",
        metadata=flag(
            "local Hugging Face checkpoint directory (config.json + safetensors); unset serves the embedded "
            "tiny Llama. Nothing is downloaded",
            name="model",
        ),
    )
    device: str = field(
        default="auto", metadata=flag("device of the model: cpu, cuda, cuda:N, or auto (cuda when available)")
    )
    dtype: str = field(
        default="auto",
        metadata=flag(
            "compute dtype: float32, bfloat16, float16, or auto (bfloat16 on cuda, float32 on cpu); "
            "parameters and optimizer state stay float32"
        ),
    )
    activation_checkpointing: bool = field(
        default=False,
        metadata=flag(
            "recompute each decoder layer's activations in backward instead of keeping them: less memory "
            "for long sequences, about a third more compute"
        ),
    )


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds of one Sample request (RESOURCE_EXHAUSTED above them)."""

    max_sample_tokens: int = field(default=4096, metadata=flag("most tokens one sampled sequence may generate"))
    max_num_samples: int = field(default=128, metadata=flag("most sequences one Sample request may ask for"))
    max_sample_request_tokens: int = field(
        default=1 << 18,
        metadata=flag(
            "most tokens one Sample request holds, num_samples * (prompt + max_tokens); also the budget of "
            "requests sampled together (it bounds the KV cache)"
        ),
    )

    def __post_init__(self):
        for name in ("max_sample_tokens", "max_num_samples", "max_sample_request_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class ExportConfig:
    """Where and how sampler weights are written (flags --sampler-*)."""

    sampler_dir: Path = field(
        default=Path("sampler_weights"),
        metadata=flag(
            "directory where SaveWeightsForSampler writes weights for samplers (HF directories that vLLM "
            "and transformers load as they are); share it with sampler pods",
            name="sampler-dir",
        ),
    )
    dtype: str = field(
        default="bfloat16",
        metadata=flag("dtype of the weights SaveWeightsForSampler writes", choices=tuple(SERVING_DTYPES)),
    )
    max_shard_bytes: int = field(
        default=5 * 10**9,
        metadata=flag("above this, exported weights are sharded into several safetensors files with an index"),
    )
    cache_size: int = field(
        default=2,
        metadata=flag("saved sampler weights kept loaded for Sample requests that name them (0: load each time)"),
    )

    def __post_init__(self):
        if self.dtype not in SERVING_DTYPES:
            raise ValueError(f"sampler dtype must be one of {', '.join(SERVING_DTYPES)}, got {self.dtype!r}")
        if self.max_shard_bytes < 1:
            raise ValueError(f"max_shard_bytes must be >= 1, got {self.max_shard_bytes}")
        if self.cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {self.cache_size}")


@dataclass(frozen=True)
class EngineConfig:
    """Limits and sizes of the engine."""

    checkpoint_dir: Path = field(
        default=Path("checkpoints"), metadata=flag("directory where SaveState writes and LoadState reads named states")
    )
    max_checkpoint_bytes: int = field(
        default=0,
        metadata=flag(
            "most bytes of saved states and sampler weights each identity may keep (0: no limit); a save over it "
            "answers RESOURCE_EXHAUSTED before writing anything"
        ),
    )
    micro_batch_tokens: int = field(
        default=8192, metadata=flag("token budget of one packed micro-batch: bounds activation memory")
    )
    max_tokens_per_request: int = field(
        default=1 << 20,
        metadata=flag(
            "most tokens (summed over a request's data) one forward/forward_backward request may carry; "
            "more gets RESOURCE_EXHAUSTED"
        ),
    )
    head_chunk_tokens: int | None = None
    """Tokens per chunk of the LM head; None sizes chunks like the hidden states."""
    sampling: SamplingLimits = field(default_factory=SamplingLimits, metadata=group("sampling"))
    """Bounds of Sample requests."""
    export: ExportConfig = field(default_factory=ExportConfig, metadata=group("sampler weights", prefix="sampler-"))
    """Where and how save_weights_for_sampler writes, and the cache of loaded exports."""
    gradient_accumulation: str = field(
        default="exact",
        metadata=flag(
            "exact: a forward_backward that fails (out of memory, a non-finite gradient) leaves the accumulated "
            "gradient exactly as it was, at the cost of a second gradient's memory while it runs; in-place: it "
            "adds into the accumulated gradient (one gradient in memory), and a failure discards what was "
            "accumulated since the last optim_step, as its error says",
            choices=GRADIENT_ACCUMULATION,
            normalize=str.lower,
        ),
    )

    def __post_init__(self):
        if self.max_checkpoint_bytes < 0:
            raise ValueError(f"max_checkpoint_bytes must be >= 0, got {self.max_checkpoint_bytes}")
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


@dataclass(frozen=True)
class RunsConfig:
    """How training runs are held: how many at once, and across the ranks of a data-parallel group."""

    max_runs: int = field(
        default=16,
        metadata=flag(
            "most training runs (LoRA adapters, or the one full fine-tune) live at once; CreateModel over it "
            "answers RESOURCE_EXHAUSTED"
        ),
    )
    sharding: str = field(
        default="replicated",
        metadata=flag(
            "in a data-parallel group: replicated (every rank holds the whole fp32 model, gradient and AdamW "
            "state, 16 bytes per parameter) or fsdp (FSDP2 shards them across the ranks; the ranks must share "
            "--checkpoint-dir). See docs/scaling.md",
            choices=SHARDING_MODES,
            normalize=str.lower,
        ),
    )
    rank_timeout_seconds: float = field(
        default=30.0, metadata=flag("with several ranks (torchrun): a rank silent this long is declared lost")
    )

    def __post_init__(self):
        if self.max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {self.max_runs}")
