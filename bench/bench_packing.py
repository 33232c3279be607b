"""Packing at linear cost: a packed micro-batch against the same datums one by one, and against
the old dense-mask path, in one run on the same model and data.

Model: a small Llama built with `from_config` (seeded, nothing downloaded), saved with
`save_pretrained` and loaded with `load_policy_model(dir)`. Default 4 layers, d=512, 8 heads,
V=32k. Batches of 8192 tokens: 32 x 256 and 4 x 2048 datums. For each batch,
`Engine.forward_backward` (cispo) in three ways:

- packed: `micro_batch_tokens=8192`, the engine's packed attention (worker.attention:
  per-datum SDPA on the CPU);
- unpacked: `micro_batch_tokens=1`, every datum its own micro-batch;
- dense mask: packed as above on transformers' stock "sdpa" attention (the model switched with
  `set_attn_implementation("sdpa")`), which builds the (T x T) block-diagonal mask: the old path.

One untimed call, then `--repeats` rounds, each running the three ways in an order that
rotates every round; the table gives medians and the median of the per-round ratios.

`--layer`: one attention layer alone at T=8192 (8 heads x 64, fp32), forward + backward:
the dense block mask, per-datum SDPA (worker.attention), and flex_attention (compiled, forward
only: torch has no flex backward on the CPU; `--flex`, it compiles for a minute).

    .venv/bin/python bench/bench_packing.py
    .venv/bin/python bench/bench_packing.py --batches "4 x 2048" --repeats 5
    .venv/bin/python bench/bench_packing.py --no-engine --layer --flex
"""

import argparse
import os
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from cispo.worker import Engine, EngineConfig, Sample, load_policy_model
from cispo.worker.attention import packed_attention_forward, packed_attention_kwargs

TOKENS = 8192
BATCHES = {"32 x 256": (32, 256), "4 x 2048": (4, 2048)}
WAYS = ("packed", "unpacked", "dense mask")


def llama_config(layers: int, hidden: int, vocab: int) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=TOKENS,
        tie_word_embeddings=False,
    )


def batch(vocab: int, data: int, length: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(
            torch.randint(0, vocab, (length,), generator=g),
            {
                "target_tokens": torch.randint(0, vocab, (length,), generator=g),
                "logprobs": -torch.rand(length, generator=g) * 5 - 1,
                "advantages": torch.randn(length, generator=g),
            },
        )
        for _ in range(data)
    ]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def bench_engine(args, tmp: str) -> list[str]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(args.layers, args.hidden, args.vocab), dtype=torch.float32)
    path = os.path.join(tmp, "llama")
    model.save_pretrained(path)
    policy = load_policy_model(path)
    print(
        f"model: {sum(p.numel() for p in policy.model.parameters()) / 1e6:.1f}M parameters, "
        f"{args.layers} layers, d={args.hidden}, V={args.vocab}, attention {policy.model.config._attn_implementation}"
    )
    packed = Engine(policy, EngineConfig(checkpoint_dir=tmp, micro_batch_tokens=TOKENS))
    unpacked = Engine(policy, EngineConfig(checkpoint_dir=tmp, micro_batch_tokens=1))
    packed_attention = policy.model.config._attn_implementation

    def run(way: str, samples: list[Sample]) -> float:
        """Seconds of one forward_backward from no gradient (the first call's work)."""
        for p in policy.model.parameters():
            p.grad = None
        policy.model.set_attn_implementation("sdpa" if way == "dense mask" else packed_attention)
        engine = unpacked if way == "unpacked" else packed
        return timed(lambda: engine.forward_backward(samples, "cispo"))

    rows = [
        "| batch | packed | unpacked | dense mask (old) | packed / unpacked | dense / packed |",
        "|---|---|---|---|---|---|",
    ]
    for name in args.batches:
        data, length = BATCHES[name]
        samples = batch(args.vocab, data, length)
        run("packed", samples)  # warm-up (allocator, first-call work), untimed
        times = {way: [] for way in WAYS}
        for r in range(args.repeats):
            for way in WAYS[r % 3 :] + WAYS[: r % 3]:
                times[way].append(run(way, samples))
                print(f"  {name} {way}: {times[way][-1]:.2f} s", flush=True)
        med = {way: statistics.median(t) for way, t in times.items()}
        pu = statistics.median(p / u for p, u in zip(times["packed"], times["unpacked"]))
        dp = statistics.median(d / p for d, p in zip(times["dense mask"], times["packed"]))
        rows.append(
            f"| {name} | {med['packed']:.2f} s | {med['unpacked']:.2f} s | {med['dense mask']:.2f} s | "
            f"{pu:.2f}x | {dp:.2f}x |"
        )
    return rows


def bench_layer(args) -> list[str]:
    """One attention layer at T=8192, datums of 2048 and 256 tokens."""
    rows = [
        "| datums | dense block mask, fwd+bwd | per-datum SDPA, fwd+bwd | dense / per-datum | "
        "per-datum SDPA, fwd | flex (compiled), fwd |",
        "|---|---|---|---|---|---|",
    ]
    return rows + [layer_row(args, length) for length in (2048, 256)]


def layer_row(args, length: int) -> str:
    """The table row of bench_layer for datums of `length` tokens."""
    H, Dh = 8, 64
    module = torch.nn.Module()
    lengths = [length] * (TOKENS // length)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, TOKENS, H, Dh, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    datum_T = torch.arange(TOKENS) // length
    i_T = torch.arange(TOKENS)
    mask_TT = (datum_T[:, None] == datum_T[None, :]) & (i_T[:, None] >= i_T[None, :])
    kwargs = packed_attention_kwargs(lengths, q.device)

    def dense():
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_TT[None, None])

    def per_datum():
        return packed_attention_forward(module, q, k, v, None, **kwargs)[0]

    def fwd_bwd(fn):
        return lambda: fn().sum().backward()

    times = {"dense": [], "per-datum": [], "per-datum fwd": []}
    for _ in range(args.repeats):
        times["dense"].append(timed(fwd_bwd(dense)))
        times["per-datum"].append(timed(fwd_bwd(per_datum)))
        with torch.no_grad():
            times["per-datum fwd"].append(timed(per_datum))
    flex = "-"
    if args.flex:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        block_mask = create_block_mask(
            lambda b, h, qi, ki: (datum_T[qi] == datum_T[ki]) & (qi >= ki), None, None, TOKENS, TOKENS, device="cpu"
        )
        compiled = torch.compile(flex_attention)
        qd, kd, vd = q.detach(), k.detach(), v.detach()  # torch refuses inputs that need a gradient
        compiled(qd, kd, vd, block_mask=block_mask)  # compiles
        flex = f"{min(timed(lambda: compiled(qd, kd, vd, block_mask=block_mask)) for _ in range(args.repeats)):.3f} s"
    best = {name: min(t) for name, t in times.items()}
    return (
        f"| {len(lengths)} x {length} | {best['dense']:.3f} s | {best['per-datum']:.3f} s | "
        f"{best['dense'] / best['per-datum']:.1f}x | {best['per-datum fwd']:.3f} s | {flex} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batches", nargs="+", default=list(BATCHES), choices=list(BATCHES))
    parser.add_argument("--layer", action="store_true", help="also time one attention layer alone")
    parser.add_argument("--flex", action="store_true", help="with --layer: also flex_attention (compiles)")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine benchmark")
    args = parser.parse_args()
    hf_logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus")
    if not args.no_engine:
        with tempfile.TemporaryDirectory() as tmp:
            print("\n".join(bench_engine(args, tmp)))
    if args.layer:
        print("\n".join(bench_layer(args)))


if __name__ == "__main__":
    main()
