"""The pipeline's hand-off cost: operations queued back to back through `OperationPipeline`,
against the same engine work run directly on one thread.

    .venv/bin/python bench/bench_pipeline.py [--ops 2000 --repeats 5] [--compare-with OLD.py]

Two workloads, each reported in microseconds per operation:
  idle loop   each operation a few microseconds of engine work; the event loop only submits.
              The difference to direct calls is the pipeline's own cost per operation.
  busy loop   each operation some torch work (it releases the GIL), and the event loop spends
              numpy work on each request before submitting the next (decoding and validating it,
              as the service does). "direct" is both run one after the other; a pipeline that
              hands off without cost overlaps them.
`--compare-with` runs another version of service/cispo/service/pipeline.py (e.g. `git show REV:service/cispo/service/pipeline.py
> /tmp/old.py`) side by side in the same run.
"""

import argparse
import asyncio
import importlib.util
import statistics
import time

import numpy as np
import torch

from cispo.service import pipeline as current

A = torch.randn(160, 160)


def tiny() -> int:
    return sum(range(50))


def engine_work() -> float:
    x = A
    for _ in range(6):
        x = torch.tanh(x @ A)
    return float(x[0, 0])


RAW = np.random.default_rng(0).integers(0, 1 << 20, 30_000).astype(np.int64).tobytes()


def decode() -> None:
    """About 200 us of what the service does to a request: numpy over its bytes (much of it
    without the GIL)."""
    tokens = np.frombuffer(RAW, dtype=np.int64)
    np.sort(tokens)
    assert (tokens >= 0).all()


async def through(module, ops: int, work, decoding: bool) -> float:
    pipeline = module.OperationPipeline(capacity=64)
    pipeline.start()
    started = time.perf_counter()
    futures = []
    for _ in range(ops):
        if decoding:
            decode()
        futures.append(await pipeline.submit(work))
    await asyncio.gather(*futures)
    elapsed = time.perf_counter() - started
    await pipeline.close()
    return elapsed / ops * 1e6


def direct(ops: int, work) -> float:
    started = time.perf_counter()
    for _ in range(ops):
        work()
    return (time.perf_counter() - started) / ops * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ops", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-with", help="another pipeline.py to run side by side")
    args = p.parse_args()
    torch.set_num_threads(1)
    versions = {"this pipeline": current}
    if args.compare_with:
        spec = importlib.util.spec_from_file_location("compared_pipeline", args.compare_with)
        versions["compared"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(versions["compared"])
    print(f"us per operation, median of {args.repeats} runs of {args.ops} operations")
    print("| workload | direct | " + " | ".join(versions) + " |\n|---|---|" + "---|" * len(versions))
    for name, work, decoding in (("idle loop", tiny, False), ("busy loop", engine_work, True)):
        runs = {v: [] for v in versions}
        plain = []
        for _ in range(args.repeats):
            plain.append(direct(args.ops, work) + (direct(args.ops, decode) if decoding else 0.0))
            for v, module in versions.items():
                runs[v].append(asyncio.run(through(module, args.ops, work, decoding)))
        print(
            f"| {name} | {statistics.median(plain):.1f} | "
            + " | ".join(f"{statistics.median(r):.1f}" for r in runs.values())
            + " |"
        )


if __name__ == "__main__":
    main()
