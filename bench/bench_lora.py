"""LoRA runs against a full fine-tune: memory per run, step time, and the cost of switching runs.

Same process, same model, same data. For each model:

- memory: the bytes a run holds of its own after one forward_backward + optim_step (weights,
  gradient and AdamW moments of its trainable parameters, read from the tensors themselves),
  for a full fine-tune and for LoRA runs of rank 8 and 32; plus the shared base;
- step time: forward_backward + optim_step on the same batch (4 x 256 tokens), full, then
  LoRA rank 32 (a full run and LoRA runs cannot live together, so not interleaved); medians
  after one untimed step each;
- switching: two LoRA runs, forward on A then B in turn, against forward on A only, per
  forward; and `lora.activate` alone.

    .venv/bin/python bench/bench_lora.py
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from cispo.worker import AdamParams, EngineConfig, lora
from cispo.worker.runs import TrainingRuns

sys.path.insert(0, os.path.dirname(__file__))
from bench_sampling import load_model, machine

MODELS = ("embedded", "llama20m")


def batch(vocab: int, seed: int = 0, data: int = 4, length: int = 256):
    from cispo.worker import Sample

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


def step(engine, samples) -> float:
    started = time.perf_counter()
    engine.forward_backward(samples, "cispo")
    engine.optim_step(AdamParams(learning_rate=1e-4))
    return time.perf_counter() - started


def mib(n: int) -> str:
    return f"{n / 2**20:.2f}"


def bench_model(name: str, tmp: str, repeats: int) -> list[str]:
    rows = []
    reload = lambda: load_model(name, tmp)  # noqa: E731
    runs = TrainingRuns(reload(), EngineConfig(checkpoint_dir=tmp), max_runs=8, reload=reload)
    samples = batch(runs.policy.vocab_size)
    base_bytes = sum(p.numel() * p.element_size() for p in runs.policy.model.parameters())
    full = runs.get("", None)
    step(full, samples)
    full_bytes = runs.info("default", None).trainable_bytes
    full_times = []
    for _ in range(repeats):
        full_times.append(step(full, samples))
    runs.unload("default", None)

    ids = {rank: runs.create(None, lora.LoraSpec(rank=rank)) for rank in (8, 32)}
    for model_id in ids.values():
        step(runs.get(model_id, None), samples)
    a, b = runs.get(ids[32], None), runs.get(ids[8], None)
    lora_times = [step(a, samples) for _ in range(repeats)]
    rows.append(
        f"| {name} | full fine-tune | {mib(full_bytes)} | 1.00x | {statistics.median(full_times) * 1e3:.0f} ms | 1.00x |"
    )
    for rank, model_id in ids.items():
        info = runs.info(model_id, None)
        times = lora_times if rank == 32 else None
        rows.append(
            f"| {name} | LoRA rank {rank} | {mib(info.trainable_bytes)} | "
            f"{info.trainable_bytes / full_bytes:.3f}x | "
            + (
                f"{statistics.median(times) * 1e3:.0f} ms | "
                f"{statistics.median(times) / statistics.median(full_times):.2f}x |"
                if times
                else "- | - |"
            )
        )
    rows.append(f"| {name} | shared base (held once) | {mib(base_bytes)} | | | |")

    one = samples[:1]
    alone, switching = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(10):
            a.forward(one, "cispo")
        alone.append((time.perf_counter() - started) / 10)
        started = time.perf_counter()
        for i in range(10):
            (a if i % 2 == 0 else b).forward(one, "cispo")
        switching.append((time.perf_counter() - started) / 10)
    started = time.perf_counter()
    for i in range(200):
        lora.activate(runs.policy, ids[8] if i % 2 else ids[32])
    activate = (time.perf_counter() - started) / 200
    rows.append(
        f"| {name} | forward of 256 tokens: one run {statistics.median(alone) * 1e3:.1f} ms, alternating two "
        f"runs {statistics.median(switching) * 1e3:.1f} ms; `activate` alone {activate * 1e6:.0f} us | | | | |"
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {machine(args.threads)}; load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = [
        "| model | run | bytes of its own (MiB) | vs full | step (4 x 256 tokens) | vs full |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            rows += bench_model(name, tmp, args.repeats)
    print("\n".join(rows))


if __name__ == "__main__":
    main()
