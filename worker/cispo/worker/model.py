"""The policy model: a local Hugging Face causal-LM checkpoint, or the embedded tiny default.

Nothing is downloaded: a checkpoint is a directory with config.json and safetensors weights.
The engine uses the model as a trunk (`decoder`, hidden states (1, T, D)) plus the LM head's
weight (V, D), so that the head can run chunked.

Attention is worker.attention's packed implementation wherever the architecture allows it
(each datum of a packed micro-batch attends to itself only, with no (T x T) mask), else sdpa.

Parameters, gradients and optimizer state stay fp32 ("master weights"); `compute_dtype` (bf16 on
GPU) is applied with autocast, so small learning-rate updates are not lost to bf16 rounding.
The model is kept in eval mode: dropout would make the trainer's logprobs disagree with the
sampler's even on-policy.
"""

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import accelerate
import torch
import torch.utils.checkpoint
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig, PreTrainedModel

from cispo.worker import sharding
from cispo.worker.attention import PACKED_ATTENTION, packed_attention_kwargs, use_packed_attention

if TYPE_CHECKING:
    from peft import PeftModel

EMBEDDED_MODEL_NAME = "embedded-tiny-llama"
EMBEDDED_SEED = 0
# Files that mark a model directory as having a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def embedded_config() -> LlamaConfig:
    """A tiny Llama: every operation runs on a laptop CPU in milliseconds."""
    return LlamaConfig(
        vocab_size=1024,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )


def build_embedded_model() -> PreTrainedModel:
    """The embedded default, deterministically initialised (seeded) on the CPU in fp32."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(EMBEDDED_SEED)
        return AutoModelForCausalLM.from_config(embedded_config(), attn_implementation="sdpa", dtype=torch.float32)


@dataclass
class PolicyModel:
    """A loaded causal LM and what the engine needs to know about it."""

    name: str
    model: PreTrainedModel
    device: torch.device
    compute_dtype: torch.dtype
    tokenizer: Any | None = None
    """The model directory's tokenizer (transformers), or None when it has none."""
    peft: "PeftModel | None" = None
    """The peft.PeftModel around `model` while LoRA runs are live (worker.lora), else None."""
    sharded: sharding.ShardedTrunk | None = None
    """The FSDP2 root (worker.sharding.Trunk) when `model`'s parameters are sharded, else None."""

    @property
    def sharding(self) -> str:
        """The --sharding mode the parameters are held in (worker.sharding.SHARDING_MODES)."""
        return "fsdp" if self.sharded is not None else "replicated"

    @property
    def vocab_size(self) -> int:
        return self.model.get_output_embeddings().weight.shape[0]

    @property
    def max_sequence_length(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 0) or 1 << 20)

    @property
    def head_weight_VD(self) -> torch.Tensor:
        """The LM head's (V, D) weight, with the active LoRA adapter's W + (alpha/r) B A when
        the head is adapted (sharding.output_weight)."""
        return sharding.output_weight(self.model.get_output_embeddings())

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """End-of-sequence token ids: the generation config's, else the model config's."""
        for config in (self.model.generation_config, self.model.config):
            eos = getattr(config, "eos_token_id", None)
            if eos is not None:
                ids = [eos] if isinstance(eos, int) else list(eos)
                return tuple(sorted({int(i) for i in ids if 0 <= int(i) < self.vocab_size}))
        return ()

    def autocast(self) -> torch.autocast:
        """Run the compute in `compute_dtype` (a no-op for fp32/fp64)."""
        enabled = self.compute_dtype in (torch.bfloat16, torch.float16)
        return torch.autocast(self.device.type, dtype=self.compute_dtype, enabled=enabled)

    def trunk(
        self, input_ids_1T: torch.Tensor, position_ids_1T: torch.Tensor, lengths: list[int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """((T, D) final hidden states of a packed sequence, (V, D) LM head weight) for the
        chunked head; position resets separate datums. Sharded, the weight is the all-gathered
        one this pass computes with.

        `lengths` (MicroBatch.lengths) names the datums to the packed attention, which then
        needs no host sync to find them and builds no (T x T) mask (worker.attention)."""
        kwargs = {}
        if lengths and self.model.config._attn_implementation == PACKED_ATTENTION:
            kwargs = packed_attention_kwargs(lengths, input_ids_1T.device)
        if self.sharded is not None:
            return self.sharded(input_ids_1T, position_ids_1T, **kwargs)
        out = self.model.get_decoder()(input_ids=input_ids_1T, position_ids=position_ids_1T, use_cache=False, **kwargs)
        return out.last_hidden_state[0], self.head_weight_VD


def resolve_device(device: str | None) -> torch.device:
    """ "auto"/None: cuda when available, else cpu."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """ "auto"/None: bfloat16 on cuda, float32 on cpu; else a torch dtype name."""
    if dtype in (None, "", "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    resolved = getattr(torch, dtype, None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"unknown dtype '{dtype}' (use float32, bfloat16 or float16)")
    return resolved


def load_policy_model(
    path: str | None = None,
    device: str | None = None,
    dtype: str | None = None,
    activation_checkpointing: bool = False,
    shard: bool = False,
) -> PolicyModel:
    """Load `path` (a local HF checkpoint dir) or, when None/"", the embedded model.

    `dtype` is the compute dtype; parameters are held in fp32 whatever the checkpoint's dtype
    (until a LoRA run freezes the base in the compute dtype: worker.lora).
    `activation_checkpointing`: see `checkpoint_activations`. `shard`: shard the parameters
    over the default process group (worker.sharding, `--sharding fsdp`); a checkpoint's model
    is then built without weights and each rank reads its shards one tensor at a time, so no
    rank ever holds the whole model.
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    tokenizer, checkpoint = None, None
    if path in (None, "", EMBEDDED_MODEL_NAME):
        name, model = EMBEDDED_MODEL_NAME, build_embedded_model()
    else:
        checkpoint = Path(path)
        if not (checkpoint / "config.json").is_file():
            raise FileNotFoundError(f"{path}: not a Hugging Face checkpoint directory (no config.json)")
        config = AutoConfig.from_pretrained(checkpoint, local_files_only=True)
        check_supported(config)
        name = str(path)
        if shard:
            with accelerate.init_empty_weights(include_buffers=False):  # parameters on the meta device
                model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
            model.tie_weights()  # not done on the meta device; a tied head is the embedding, read once
            if (checkpoint / "generation_config.json").is_file():
                model.generation_config = GenerationConfig.from_pretrained(checkpoint, local_files_only=True)
        else:
            model = AutoModelForCausalLM.from_pretrained(
                checkpoint, local_files_only=True, attn_implementation="sdpa", dtype=torch.float32
            )
        tokenizer = load_tokenizer(checkpoint)
    if model.get_output_embeddings().bias is not None:
        raise ValueError(f"{name}: LM heads with a bias are not supported")
    model.eval()
    use_packed_attention(model)  # packed micro-batches at sum(len^2) attention cost
    if activation_checkpointing:
        checkpoint_activations(model)
    sharded = None
    if not shard:
        model.to(device=dev, dtype=torch.float32)  # type: ignore[call-arg]  # transformers' @wraps(nn.Module.to) hides the bound method from mypy
    elif checkpoint is None:
        sharded = sharding.shard_model(model.to(dev), dt)  # type: ignore[arg-type]  # as above: mypy misreads the @wraps'd method
    else:
        sharded = sharding.shard_model(model, dt, weights=checkpoint, device=dev)
    return PolicyModel(name=name, model=model, device=dev, compute_dtype=dt, tokenizer=tokenizer, sharded=sharded)


def checkpoint_activations(model: PreTrainedModel) -> None:
    """Keep only each decoder layer's input for backward and recompute the rest there
    (torch.utils.checkpoint, non-reentrant): activation memory of about one layer plus one
    (T, D) tensor per layer, for about a third more compute. Parameter names are unchanged,
    and HF's own switch is not used, since it acts only in training mode and the model stays
    in eval mode (no dropout)."""
    for layer in model.get_decoder().layers:
        layer.forward = functools.partial(torch.utils.checkpoint.checkpoint, layer.forward, use_reentrant=False)


def load_tokenizer(directory: Path):
    """The directory's tokenizer, or None when it has no tokenizer files."""
    if not any((directory / f).is_file() for f in TOKENIZER_FILES):
        return None
    return AutoTokenizer.from_pretrained(directory, local_files_only=True)


def check_supported(config) -> None:
    """Reject models whose logits are not plain `hidden @ head.T` (the chunked head assumes it)."""
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale"):
        if getattr(config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"model type '{config.model_type}' transforms its logits ({attr}); not supported")
