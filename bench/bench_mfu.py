"""Model FLOPs utilisation of `Engine.forward_backward`: the matmul FLOPs a step must do, over
its time, over the card's dense peak.

Model: a Qwen2.5-0.5B shape (24 layers, d=896, 14 heads / 2 KV heads, I=4864, V=151936, tied
head) with random weights, saved with `save_pretrained` and loaded with `load_policy_model` in
the compute dtype (`--dtype`, bf16 by default: fp32 weights, bf16 compute). A step is one
forward_backward of `--tokens` tokens in datums of `--datum-tokens` (packed micro-batches of the
default 8192 tokens, varlen attention on CUDA) from no gradient, then an untimed optim_step.

FLOPs per step, the usual accounting (3x the forward: backward takes two matmuls per forward
one): 2 per weight per token for every Linear of the decoder and for the head, plus causal
attention's QK^T and PV, 2 x heads x head_dim x n^2 per layer for a datum of n tokens. Norms,
rotary, softmax and the loss are not counted. MFU is that over the median step time over
`--peak-tflops` (default: the card's dense bf16 peak from its name, e.g. 989 for H100 and
H200 SXM; on the CPU, only TFLOP/s is printed). Target (issue 11): at least 40% on a GPU at
16k tokens per step.

    .venv/bin/python bench/bench_mfu.py                                  # GPU
    .venv/bin/python bench/bench_mfu.py --layers 2 --tokens 2048 --datum-tokens 512 --dtype float32   # CPU
"""

import argparse
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from cispo.worker import AdamParams, Engine, EngineConfig, Sample, load_policy_model

QWEN_05B = dict(
    hidden_size=896,
    num_hidden_layers=24,
    intermediate_size=4864,
    vocab_size=151936,
    num_attention_heads=14,
    num_key_value_heads=2,
    tie_word_embeddings=True,
    max_position_embeddings=32768,
    rope_theta=1e6,
)
DENSE_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "GH200": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0}


def step_flops(config: Qwen2Config, lengths: list[int]) -> float:
    """Matmul FLOPs of one forward + backward over datums of `lengths` tokens (see the module)."""
    d, layers, heads = config.hidden_size, config.num_hidden_layers, config.num_attention_heads
    head_dim = d // heads
    q, kv = heads * head_dim, config.num_key_value_heads * head_dim
    linear_per_token = layers * 2 * (d * q + 2 * d * kv + q * d + 3 * d * config.intermediate_size)
    head_per_token = 2 * d * config.vocab_size
    attention = layers * 2 * q * sum(n * n for n in lengths)
    return 3 * (sum(lengths) * (linear_per_token + head_per_token) + attention)


def peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next(
        (peak for card, peak in sorted(DENSE_BF16_TFLOPS.items(), key=lambda kv: -len(kv[0])) if card in name), None
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--datum-tokens", type=int, default=2048)
    p.add_argument("--layers", type=int, default=QWEN_05B["num_hidden_layers"])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--device", default="auto")
    p.add_argument("--steps", type=int, default=5, help="timed steps, after one warm-up")
    p.add_argument("--peak-tflops", type=float, help="the card's dense peak in the compute dtype")
    args = p.parse_args()
    config = Qwen2Config(**{**QWEN_05B, "num_hidden_layers": args.layers})
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).save_pretrained(tmp)
        policy = load_policy_model(tmp, args.device, args.dtype)
    engine = Engine(policy, EngineConfig(gradient_accumulation="in-place"))
    g = torch.Generator().manual_seed(0)
    lengths = [args.datum_tokens] * (args.tokens // args.datum_tokens)
    samples = [
        Sample(
            torch.randint(0, config.vocab_size, (n,), generator=g),
            {
                "target_tokens": torch.randint(0, config.vocab_size, (n,), generator=g),
                "logprobs": -torch.rand(n, generator=g) * 5 - 8,
                "advantages": torch.randn(n, generator=g),
            },
        )
        for n in lengths
    ]
    times = []
    for step in range(args.steps + 1):
        started = time.perf_counter()
        engine.forward_backward(samples)  # its result is read on the host: the step is done
        if step:
            times.append(time.perf_counter() - started)
        engine.optim_step(AdamParams(learning_rate=1e-6))
    seconds = statistics.median(times)
    flops = step_flops(config, lengths)
    peak = args.peak_tflops or peak_tflops(policy.device)
    device = torch.cuda.get_device_name(policy.device) if policy.device.type == "cuda" else "CPU"
    print(
        f"{device}; Qwen2.5-0.5B shape, {args.layers} layers; {policy.compute_dtype}; {len(lengths)} x "
        f"{args.datum_tokens} tokens; median of {args.steps} steps"
    )
    print(
        f"step {seconds * 1e3:.1f} ms (min {min(times) * 1e3:.1f}), {sum(lengths) / seconds:,.0f} tokens/s, "
        f"{flops / 1e12:.2f} TFLOP per step, {flops / seconds / 1e12:.1f} TFLOP/s"
        + (f", MFU {flops / seconds / (peak * 1e12):.1%} of {peak:g} TFLOP/s" if peak else "")
    )


if __name__ == "__main__":
    main()
