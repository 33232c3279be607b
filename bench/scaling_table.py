"""Which model sizes fit which GPU counts: the table of docs/scaling.md, from the accounting the
engine reports (`cispo.worker.sharding.state_bytes`, the figures of GetInfo.memory).

    .venv/bin/python bench/scaling_table.py [--gpu-gib 80] [--micro-batch-tokens 8192]

Parameter counts are exact: each architecture is built on the meta device from its public
config shape. Per rank, in GiB, for a bf16 compute dtype:
  state        sharding.state_bytes: fp32 weights, gradient, AdamW moments (16 bytes per parameter;
               1/W of that under fsdp)
  working set  replicated: autocast's bf16 copy of every weight (2 bytes per parameter, kept for
               backward); fsdp: the root's gathered bf16 weights (embeddings, head) and their
               unsharded fp32 gradients (alive from the head's backward to the root's
               reduce-scatter), plus two gathered decoder layers and one layer's unsharded bf16
               gradient
  accumulation --gradient-accumulation exact (the default): a forward_backward onto an
               accumulated gradient holds a second gradient (4 bytes per parameter, 1/W under
               fsdp); in-place: only the embedding's dense (V x D) fp32 gradient, which its
               backward makes before adding it in (replicated; fsdp's root term covers it)
  activations  one micro-batch of `--micro-batch-tokens` tokens in bf16, saved for backward:
               per layer T x (6 D + 2 D_kv + 4 I) with a varlen attention kernel (no T x T), or
               T x D per layer plus one layer's full set with --activation-checkpointing; plus
               the chunked head's (chunk x V) buffers: fp32 logits, softmax and gradient in
               place in one, and its bf16 matmul output and copy, two fp32 buffers' worth
  overhead     3 GiB: CUDA context, allocator fragmentation, NCCL buffers
A configuration fits when the sum is at most the GPU's memory. LoRA (rank 32, every linear
layer): the frozen base is held in the compute dtype (2 bytes per parameter), whole by one
process or a replicated group, in FSDP2's bf16 shards (1/W of them) under fsdp, plus the
root's and two decoder layers' gathered bf16 weights; the adapter costs 16 bytes per
adapter parameter on every rank (20 with exact accumulation's second gradient).
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from cispo.worker.logprob_head import default_chunk_tokens
from cispo.worker.sharding import state_bytes

GIB = 1 << 30
OVERHEAD = 3 * GIB
LORA_RANK = 32
MODELS = {  # public config shapes
    "Qwen2.5-1.5B": Qwen2Config(
        hidden_size=1536,
        num_hidden_layers=28,
        intermediate_size=8960,
        vocab_size=151936,
        num_attention_heads=12,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "Llama-3.1-8B": LlamaConfig(
        hidden_size=4096,
        num_hidden_layers=32,
        intermediate_size=14336,
        vocab_size=128256,
        num_attention_heads=32,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "Qwen2.5-32B": Qwen2Config(
        hidden_size=5120,
        num_hidden_layers=64,
        intermediate_size=27648,
        vocab_size=152064,
        num_attention_heads=40,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
    "Llama-3.1-70B": LlamaConfig(
        hidden_size=8192,
        num_hidden_layers=80,
        intermediate_size=28672,
        vocab_size=128256,
        num_attention_heads=64,
        num_key_value_heads=8,
        tie_word_embeddings=False,
    ),
}


def shape(config) -> dict:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    layer = model.get_decoder().layers[0]
    lora = (
        sum(LORA_RANK * (m.in_features + m.out_features) for m in layer.modules() if isinstance(m, torch.nn.Linear))
        * config.num_hidden_layers
    )
    root = sum(p.numel() for n, p in model.named_parameters() if ".layers." not in n)
    return {
        "n": sum(p.numel() for p in model.parameters()),
        "layer": sum(p.numel() for p in layer.parameters()),
        "root": root,
        "lora": lora,
        "D": config.hidden_size,
        "L": config.num_hidden_layers,
        "I": config.intermediate_size,
        "V": config.vocab_size,
        "D_kv": config.hidden_size // config.num_attention_heads * config.num_key_value_heads,
    }


def activation_bytes(s: dict, tokens: int, checkpointing: bool) -> int:
    per_layer = tokens * (6 * s["D"] + 2 * s["D_kv"] + 4 * s["I"]) * 2
    layers = tokens * s["D"] * 2 * s["L"] + per_layer if checkpointing else per_layer * s["L"]
    return layers + 2 * default_chunk_tokens(tokens, s["D"], s["V"]) * s["V"] * 4


def full_bytes(s: dict, world_size: int, sharding: str, tokens: int, checkpointing: bool, accumulation: str) -> int:
    state = state_bytes(s["n"], world_size, sharding).total
    replicated = sharding == "replicated"
    working = 2 * s["n"] if replicated else (2 + 4) * s["root"] + 3 * 2 * s["layer"]
    if accumulation == "exact":
        second = 4 * s["n"] // (1 if replicated else world_size)
    else:
        second = 4 * s["V"] * s["D"] if replicated else 0
    return state + working + second + activation_bytes(s, tokens, checkpointing) + OVERHEAD


def lora_bytes(s: dict, world_size: int, sharding: str, tokens: int, checkpointing: bool, accumulation: str) -> int:
    if sharding == "replicated":
        base = 2 * s["n"]
    else:
        base = 2 * -(-s["n"] // world_size) + 2 * s["root"] + 2 * 2 * s["layer"]
    second = 4 * s["lora"] if accumulation == "exact" else 0
    return base + state_bytes(s["lora"]).total + second + activation_bytes(s, tokens, checkpointing) + OVERHEAD


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-gib", type=float, default=80)
    p.add_argument("--micro-batch-tokens", type=int, default=8192)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[2, 4, 8, 16, 32])
    p.add_argument("--gradient-accumulation", choices=("exact", "in-place"), default="exact")
    args = p.parse_args()
    mode = args.gradient_accumulation
    limit, tokens = args.gpu_gib * GIB, args.micro_batch_tokens

    def cell(size: int) -> str:
        return f"{size / GIB:.0f} {'fits' if size <= limit else 'no'}"

    print(
        f"GiB per rank on {args.gpu_gib:g} GiB GPUs, {tokens}-token micro-batches, bf16 compute, "
        f"--gradient-accumulation {mode}; "
        "'fits' when it is at most the GPU's memory. Each cell: without / with --activation-checkpointing.\n"
    )

    def table(kind: str, size) -> None:
        print(
            f"| model | parameters | {kind}, replicated (any W) | "
            + " | ".join(f"{kind}, fsdp W={w}" for w in args.world_sizes)
            + " |"
        )
        print("|---|---|---|" + "---|" * len(args.world_sizes))
        for name, config in MODELS.items():
            s = shape(config)
            cells = [
                " / ".join(cell(size(s, w, sharding, tokens, c, mode)) for c in (False, True))
                for w, sharding in [(1, "replicated")] + [(w, "fsdp") for w in args.world_sizes]
            ]
            print(f"| {name} | {s['n'] / 1e9:.2f}B | " + " | ".join(cells) + " |")

    table("full", full_bytes)
    print()
    table(f"LoRA r={LORA_RANK}", lora_bytes)


if __name__ == "__main__":
    main()
