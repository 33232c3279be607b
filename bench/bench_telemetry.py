"""Telemetry overhead: bulk on-device ratio statistics vs the forward_backward they describe,
and vs a per-token `Histogram.observe` loop. Run: `.venv/bin/python bench/bench_telemetry.py`.

At 64k tokens on the embedded model, one run measures side by side:
  step      engine.forward_backward (cispo) over the batch
  bulk      what telemetry adds: token_stats (bucketize + bincount + reductions, one transfer)
            on the whole batch, plus ServiceMetrics.observe_batch
  per-token the same ratio histogram filled with Histogram.observe, one call per token
"""

import argparse
import statistics
import time

import torch
from prometheus_client import CollectorRegistry, Histogram

from cispo.service.metrics import ServiceMetrics
from cispo.worker import RATIO_BUCKET_EDGES, Engine, EngineConfig, Sample, load_policy_model
from cispo.worker.loss_stats import stats_from_vector, token_stats


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=65536)
    parser.add_argument("--datum-tokens", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--micro-batch-tokens",
        type=int,
        default=2048,
        help="one datum per micro-batch by default: packing with a dense block mask costs quadratic attention on CPU",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    n_datums = args.tokens // args.datum_tokens
    samples = []
    for _ in range(n_datums):
        n = args.datum_tokens
        adv = torch.randn(n)
        adv[: n // 4] = 0
        samples.append(
            Sample(
                torch.randint(0, 1024, (n,)),
                {"target_tokens": torch.randint(0, 1024, (n,)), "logprobs": -torch.rand(n) * 4 - 5, "advantages": adv},
            )
        )
    engine = Engine(load_policy_model(), EngineConfig(micro_batch_tokens=args.micro_batch_tokens))

    step = median_seconds(lambda: engine.forward_backward(samples), args.repeats)

    log_ratio = (-torch.rand(args.tokens) * 4 + 2).clamp(-60, 60)
    active = torch.cat([s.loss_fn_inputs["advantages"] for s in samples]) != 0
    metrics = ServiceMetrics()

    def bulk():
        stats = stats_from_vector(token_stats(active, log_ratio, 0.0, 4.0).tolist(), 0.0, args.tokens)
        metrics.observe_batch("forward_backward", "cispo", stats, "default")

    bulk_s = median_seconds(bulk, 20)
    ratios = log_ratio[active].exp().tolist()
    histogram = Histogram("ratio", "per-token", buckets=RATIO_BUCKET_EDGES, registry=CollectorRegistry())

    def per_token():
        for r in ratios:
            histogram.observe(r)

    loop_s = median_seconds(per_token, args.repeats)
    print(f"tokens={args.tokens} datums={n_datums} threads={torch.get_num_threads()}")
    print("| measure | seconds | share of step |")
    print("|---|---|---|")
    print(f"| forward_backward (step) | {step:.3f} | 100% |")
    print(f"| bulk telemetry (token_stats + observe_batch) | {bulk_s:.5f} | {100 * bulk_s / step:.3f}% |")
    print(f"| per-token Histogram.observe loop | {loop_s:.4f} | {100 * loop_s / step:.2f}% |")
    print(f"per-token loop / bulk = {loop_s / bulk_s:.0f}x")


if __name__ == "__main__":
    main()
