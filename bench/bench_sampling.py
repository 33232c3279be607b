"""Sampling throughput: the built-in sampler (`Engine.sample`) against a plain transformers
`model.generate` loop, in the same process, on the same weights.

For each model and batch size, both sides generate from the same fixed-length prompts with the
same `max_new_tokens`, at temperature 1 with no truncation (generate: `do_sample=True`,
`top_k=0`, `top_p=1`, `eos_token_id` = the model's, which always stops cispo too):

- cispo, batch 1: one request with `num_samples=1` per call, `--sequences` calls in a row (the
  first prompts and seeds of the batched runs); batch B: B single-sequence requests (different
  prompts and seeds) passed to one `engine.sample` call, i.e. batched across requests, as the
  server does with queued Sample requests; `1x64`: one request with `num_samples=64` (one
  prompt, prefilled once), compared with generate's batch 64;
- generate, batch 1: one call per sequence, on the same prompts; batch B: one call on the (B, P)
  batch (all prompts have the same length, so the batch needs no padding).

Tokens are counted as generated (up to and including an EOS), and tokens/s is taken from the real
counts of each run, prefill included. One untimed warm-up round, then `--repeats` timed rounds;
each round runs every variant once, in an order that rotates every round. The table gives
medians. Models: `embedded` (the default policy) and `llama20m`, a ~20M-parameter Llama built
here, saved with `save_pretrained` and loaded with `load_policy_model(dir)`.

    .venv/bin/python bench/bench_sampling.py
    .venv/bin/python bench/bench_sampling.py --models embedded --max-tokens 64 --repeats 5 --profile
"""

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig
from transformers.utils import logging as hf_logging

from cispo.worker import Engine, load_policy_model
from cispo.worker.sampling import SampleRequest, SamplingParams

MODELS = ("embedded", "llama20m")


def llama20m_config() -> LlamaConfig:
    """About 19.5M parameters, half of them the untied 32000-token embedding and head."""
    return LlamaConfig(
        vocab_size=32000,
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def load_model(name: str, tmp: str):
    """The PolicyModel of `name`; llama20m goes through a real checkpoint directory in `tmp`."""
    if name == "embedded":
        return load_policy_model()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama20m_config(), dtype=torch.float32)
    path = os.path.join(tmp, name)
    model.save_pretrained(path)
    return load_policy_model(path)


def cispo_run(engine: Engine, requests: list[SampleRequest]) -> tuple[float, int]:
    """(seconds, generated tokens) of one engine.sample call over all `requests`."""
    start = time.perf_counter()
    results = engine.sample(requests)
    seconds = time.perf_counter() - start
    failed = [r for r in results if isinstance(r, Exception)]
    if failed:
        raise RuntimeError(f"engine.sample failed: {failed[0]}")
    return seconds, sum(len(s.tokens) for r in results for s in r.sequences)


def generate_run(model, prompts_BP: torch.Tensor, max_tokens: int, eos: list[int], seed: int) -> tuple[float, int]:
    """(seconds, generated tokens) of one model.generate call on the batch `prompts_BP`."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    out = model.generate(
        prompts_BP,
        attention_mask=torch.ones_like(prompts_BP),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=max_tokens,
        eos_token_id=eos,
        pad_token_id=eos[0],
    )
    seconds = time.perf_counter() - start
    new_BL = out[:, prompts_BP.shape[1] :]
    hit_BL = torch.isin(new_BL, torch.tensor(eos))
    lengths_B = torch.where(hit_BL.any(1), hit_BL.int().argmax(1) + 1, new_BL.shape[1])
    return seconds, int(lengths_B.sum())


def variants(engine: Engine, prompts_NP: torch.Tensor, batches: list[int], max_tokens: int, sequences: int, seed: int):
    """[(side, batch label, run function)]: cispo and generate for every batch, then cispo 1x64."""
    eos = list(engine.policy.eos_token_ids)
    model = engine.policy.model

    def request(i: int, num_samples: int = 1) -> SampleRequest:
        params = SamplingParams(max_tokens=max_tokens, temperature=1.0, top_k=-1, top_p=1.0, seed=seed + i)
        return engine.validate_sample(SampleRequest(prompts_NP[i], num_samples, params))

    out = []
    for b in batches:
        if b == 1:  # one sequence per call, `sequences` calls in a row
            singles = [[request(i)] for i in range(sequences)]
            out.append(("cispo", "1", lambda singles=singles: one_by_one(cispo_run(engine, r) for r in singles)))
            out.append(
                (
                    "generate",
                    "1",
                    lambda: one_by_one(
                        generate_run(model, prompts_NP[i : i + 1], max_tokens, eos, seed + i) for i in range(sequences)
                    ),
                )
            )
            continue
        requests = [request(i) for i in range(b)]
        out.append(("cispo", str(b), lambda r=requests: cispo_run(engine, r)))
        out.append(("generate", str(b), lambda b=b: generate_run(model, prompts_NP[:b], max_tokens, eos, seed)))
    if 64 in batches:
        one = [request(0, 64)]
        out.append(("cispo", "1x64", lambda: cispo_run(engine, one)))
    return out


def one_by_one(runs) -> tuple[float, int]:
    """Total (seconds, tokens) of runs made one after another."""
    seconds, tokens = zip(*runs)
    return sum(seconds), sum(tokens)


def measure(runs, warmup: int, repeats: int) -> dict:
    """{(side, label): [(seconds, tokens)]} over the timed rounds, order rotating every round."""
    timed = {(side, label): [] for side, label, _ in runs}
    for rnd in range(warmup + repeats):
        shift = rnd % len(runs)
        for side, label, fn in runs[shift:] + runs[:shift]:
            seconds, tokens = fn()
            if rnd >= warmup:
                timed[side, label].append((seconds, tokens))
    return timed


def profile(runs, top: int) -> None:
    """cProfile one run of every cispo variant; print the top functions by own time."""
    for side, label, fn in runs:
        if side != "cispo":
            continue
        profiler = cProfile.Profile()
        profiler.runcall(fn)
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        print(f"\n--- cProfile, cispo batch {label}, top {top} by tottime")
        print("\n".join(line for line in text.getvalue().splitlines() if line.strip()))


def machine(threads: int) -> str:
    cpu = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    return f"{cpu}, {os.cpu_count()} logical CPUs, {threads} torch threads; torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help="subset of " + ",".join(MODELS))
    parser.add_argument("--batches", default="1,8,64", help="comma-separated batch sizes")
    parser.add_argument("--max-tokens", type=int, default=128, help="max new tokens per sequence")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--sequences", type=int, default=8, help="sequences at batch 1, one call each")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--profile", action="store_true", help="then cProfile one run of each cispo variant")
    args = parser.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if set(models) - set(MODELS):
        raise SystemExit(f"--models: unknown {sorted(set(models) - set(MODELS))}")
    batches = [int(b) for b in args.batches.split(",")]
    if (
        min(batches) < 1
        or args.repeats < 1
        or args.warmup < 0
        or args.max_tokens < 1
        or args.prompt_tokens < 1
        or args.sequences < 1
    ):
        raise SystemExit(
            "--batches, --repeats, --max-tokens, --prompt-tokens and --sequences must be >= 1, --warmup >= 0"
        )
    torch.set_num_threads(args.threads)
    hf_logging.disable_progress_bar()
    print(f"machine: {machine(args.threads)}; load average %.2f %.2f %.2f" % os.getloadavg())
    print(
        f"prompt {args.prompt_tokens} tokens, max_tokens {args.max_tokens}, temperature 1, no top-k/top-p; "
        f"{args.warmup} warm-up + {args.repeats} timed rounds",
        flush=True,
    )

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_sampling_") as tmp:
        for name in models:
            policy = load_model(name, tmp)
            params = sum(p.numel() for p in policy.model.parameters())
            print(
                f"{name}: {params / 1e6:.2f}M parameters, vocab {policy.vocab_size}, eos {policy.eos_token_ids}",
                flush=True,
            )
            engine = Engine(policy)
            gen = torch.Generator().manual_seed(args.seed)
            # Ids from 3 up: no BOS/EOS/pad in the prompts.
            prompts_NP = torch.randint(
                3, policy.vocab_size, (max([*batches, args.sequences]), args.prompt_tokens), generator=gen
            )
            runs = variants(engine, prompts_NP, batches, args.max_tokens, args.sequences, args.seed)
            for (side, label), samples in measure(runs, args.warmup, args.repeats).items():
                rows.append(
                    dict(
                        model=name,
                        side=side,
                        batch=label,
                        seconds=statistics.median(s for s, _ in samples),
                        tokens=statistics.median(t for _, t in samples),
                        rate=statistics.median(t / s for s, t in samples),
                    )
                )
                print(
                    f"{name} {side:8s} batch {label:4s}: " + ", ".join(f"{t} tok / {s:.3f} s" for s, t in samples),
                    flush=True,
                )
            if args.profile:
                profile(runs, 15)
    print("load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))

    print()
    print(
        "| model | batch | cispo tokens | cispo s | cispo tok/s | generate tokens | generate s | generate tok/s | "
        "cispo / generate |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    by_key = {(r["model"], r["side"], r["batch"]): r for r in rows}
    missed = []
    for r in rows:
        if r["side"] != "cispo":
            continue
        batch = r["batch"]
        ref = by_key[r["model"], "generate", "64" if batch == "1x64" else batch]
        ratio = r["rate"] / ref["rate"]
        print(
            f"| {r['model']} | {batch} | {r['tokens']:.0f} | {r['seconds']:.3f} | {r['rate']:.0f} | "
            f"{ref['tokens']:.0f} | {ref['seconds']:.3f} | {ref['rate']:.0f} | {ratio:.2f}x |"
        )
        if (ratio < 1.0) if batch == "1" else (ratio <= 1.0):
            missed.append(f"{r['model']} batch {batch}: {ratio:.2f}x")
    print()
    print(
        "target: cispo/generate >= 1.0x at batch 1, > 1.0x batched; ratios of medians of tokens/s "
        "(1x64 against generate's batch 64)"
    )
    print("all targets met" if not missed else "missed: " + "; ".join(missed))


if __name__ == "__main__":
    main()
