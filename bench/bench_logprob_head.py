"""Benchmark the chunked LM head (`cispo.worker.logprob_head`) against the naive one.

Forward + backward of the target log-probabilities, on the same inputs, for:

- `naive`: full logits = hidden @ W.T, log_softmax (fp32), gather; the whole (tokens x vocab) is
  materialised, and so is its gradient;
- `torch_op`: `target_logprobs(..., use_torch_op=True)` (`F.linear_cross_entropy`, torch >= 2.13);
- `fallback`: `target_logprobs(..., use_torch_op=False)` (`ChunkedTargetLogprobs`);
- `fused`: `fused_head_gradients` (what forward_backward uses): the per-token gradient `g` is
  applied inside the forward chunk loop, so logits are not recomputed in backward.

The backward is that of `sum(g * logp)` with a per-token upstream gradient `g` (the role of
`-coef * A` in CISPO; a quarter of the tokens get 0, like prompt tokens). Reported per variant:
forward+backward wall time (median and minimum over the timed repeats, after warm-up), the
extra peak memory beyond the inputs, and the largest deviation of the log-probabilities and of
both gradients from `naive`.

Method. Every configuration (variant, chunk size) gets its own fresh worker process with the
same layout: build the inputs from a fixed seed, run one tiny warm-up (32 tokens, same code
path), record the memory baseline, then take steps on command. The driver runs the warm-up and
timed steps round-robin across the workers, rotating the order every round, so that load from
other processes falls on every variant alike. With several chunk sizes, each one is a group of
its own, with its own naive run, and groups run one after another: memory held by idle workers
slows the page faults of the naive head's large allocations, so only a few workers are alive at
once. Extra peak memory, per worker, is

- on CUDA: `torch.cuda.max_memory_allocated()` minus `torch.cuda.memory_allocated()` at the
  baseline (peak statistics reset there);
- on CPU: the peak resident set size (`VmHWM`, reset at the baseline through
  `/proc/self/clear_refs` where the kernel allows it, else the process-lifetime peak) minus
  the resident set size (`VmRSS`) at the baseline.

The weight and hidden-state gradients that the backward produces count as extra memory for
every variant alike. Sizes follow issue 2: CPU N=8192, d=512, V=32000 in fp32; CUDA N=16384,
d=2048, V=131072 in bf16. Targets: chunked extra peak memory at most 0.1x naive; time at most
1.1x naive on CPU, below 1.0x on CUDA.

    python bench/bench_logprob_head.py                          # auto device, default chunk size
    python bench/bench_logprob_head.py --chunk-tokens 256,512,default --variants torch_op
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from cispo.worker.logprob_head import (
    HAS_LINEAR_CROSS_ENTROPY,
    default_chunk_tokens,
    fused_head_gradients,
    target_logprobs,
)

SIZES = {
    "cpu": {"tokens": 8192, "hidden": 512, "vocab": 32000, "dtype": "float32"},
    "cuda": {"tokens": 16384, "hidden": 2048, "vocab": 131072, "dtype": "bfloat16"},
}
VARIANTS = ("naive", "torch_op", "fallback", "fused")
MIB = 1 << 20
TIME_TARGET = {"cpu": 1.10, "cuda": 1.0}  # chunked/naive median time: <= 1.1x on CPU, < 1.0x on CUDA
MEMORY_TARGET = 0.10  # chunked/naive extra peak memory


# ----------------------------------------------------------------------------- worker process


def _read_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _rss_bytes() -> int:
    return _read_status_kib("VmRSS") * 1024


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _read_status_kib("VmHWM") * 1024 <= _rss_bytes() + 4 * MIB


def _peak_rss_bytes() -> int:
    try:
        return _read_status_kib("VmHWM") * 1024
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _make_inputs(tokens, hidden, vocab, dtype, device, seed):
    """hidden_TD, weight_VD (both requiring grad), targets_T, upstream gradient g_T (fp32); built in place."""
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden_TD = torch.randn(tokens, hidden, generator=gen, device=device, dtype=dtype)
    weight_VD = torch.randn(vocab, hidden, generator=gen, device=device, dtype=dtype)
    weight_VD.mul_(2.0 / math.sqrt(hidden))  # logits with a standard deviation of about 2
    targets_T = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    g_T = torch.randn(tokens, generator=gen, device=device, dtype=torch.float32)
    g_T[: tokens // 4] = 0.0  # prompt-like tokens: no gradient
    return hidden_TD.requires_grad_(), weight_VD.requires_grad_(), targets_T, g_T


def naive_target_logprobs(hidden_TD, weight_VD, targets_T):
    """Full (T, V) logits, fp32 log_softmax, gather: the reference the chunked head replaces."""
    logits_TV = hidden_TD @ weight_VD.T
    logp_TV = torch.log_softmax(logits_TV.float(), dim=-1)
    return logp_TV.gather(1, targets_T[:, None])[:, 0]


def _variant_fn(variant, chunk_tokens):
    """A function (h, w, t, g) -> logp that runs forward and the backward of sum(g * logp)."""
    if variant == "fused":

        def fused(h, w, t, g):
            surrogate, logp_T = fused_head_gradients(h, w, t, lambda logp_C, sl: g[sl], chunk_tokens)
            surrogate.backward()
            return logp_T

        return fused
    if variant == "naive":
        forward = naive_target_logprobs
    else:
        use_torch_op = variant == "torch_op"
        forward = lambda h, w, t: target_logprobs(h, w, t, chunk_tokens=chunk_tokens, use_torch_op=use_torch_op)  # noqa: E731

    def step(h, w, t, g):
        logp_T = forward(h, w, t)
        logp_T.backward(g)
        return logp_T.detach()

    return step


def _step(fn, hidden_TD, weight_VD, targets_T, g_T, sync):
    """One forward + backward of sum(g * logp); returns (seconds, logp)."""
    hidden_TD.grad = None
    weight_VD.grad = None
    sync()
    start = time.perf_counter()
    logp_T = fn(hidden_TD, weight_VD, targets_T, g_T)
    sync()
    return time.perf_counter() - start, logp_T


def run_worker(spec: dict) -> None:
    """Serve one configuration in this fresh process: 'step' lines time a step, 'finish' reports."""
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn = _variant_fn(spec["variant"], spec["chunk_tokens"])

    hidden_TD, weight_VD, targets_T, g_T = _make_inputs(
        spec["tokens"], spec["hidden"], spec["vocab"], dtype, device, spec["seed"]
    )
    # Tiny warm-up on the same code path (kernels, thread pools, cuBLAS workspaces) before the baseline.
    tiny = _make_inputs(32, spec["hidden"], min(spec["vocab"], 1024), dtype, device, spec["seed"] + 1)
    _step(fn, *tiny, sync)
    del tiny
    gc.collect()
    sync()
    if cuda:
        baseline = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        peak_method = "CUDA max_memory_allocated"
    else:
        baseline = _rss_bytes()
        peak_method = "VmHWM reset at baseline" if _reset_peak_rss() else "process peak RSS"

    def reply(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    reply({"ready": True})
    logp_T = None
    for line in sys.stdin:
        if line.strip() == "step":
            seconds, logp_T = _step(fn, hidden_TD, weight_VD, targets_T, g_T, sync)
            reply({"seconds": seconds})
        elif line.strip() == "finish":
            break
    peak = torch.cuda.max_memory_allocated(device) if cuda else _peak_rss_bytes()
    torch.save(
        {"logp": logp_T.cpu(), "grad_hidden": hidden_TD.grad.cpu(), "grad_weight": weight_VD.grad.cpu()},
        spec["out"],
    )
    reply({"extra_peak_bytes": peak - baseline, "baseline_bytes": baseline, "peak_method": peak_method})


# ----------------------------------------------------------------------------- driver


class Worker:
    """One configuration's process, driven line by line."""

    def __init__(self, spec: dict):
        self.spec = spec
        self.seconds: list[float] = []
        self.result: dict = {}
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    @property
    def failed(self) -> bool:
        return "error" in self.result

    def _ask(self, command: str | None) -> dict | None:
        if self.failed:
            return None
        try:
            if command is not None:
                self.proc.stdin.write(command + "\n")
                self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            self.proc.wait()
            tail = self.proc.stderr.read().strip().splitlines()[-3:]
            self.result = {"error": f"exit {self.proc.returncode}: " + " | ".join(tail)}
            return None
        return json.loads(line)

    def wait_ready(self) -> None:
        self._ask(None)

    def step(self, timed: bool) -> None:
        answer = self._ask("step")
        if answer is not None and timed:
            self.seconds.append(answer["seconds"])

    def finish(self) -> None:
        answer = self._ask("finish")
        if answer is not None:
            self.result = answer
            self.proc.wait()


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(max |a - b|, that divided by max |b|), in row blocks to bound memory."""
    diff = ref = 0.0
    for start in range(0, a.shape[0], 4096):
        a_blk, b_blk = a[start : start + 4096].double(), b[start : start + 4096].double()
        diff = max(diff, (a_blk - b_blk).abs().max().item())
        ref = max(ref, b_blk.abs().max().item())
    return diff, diff / ref if ref else float("nan")


def _machine(device: str, threads: int) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, {threads} torch threads"


def _parse_chunks(text: str, default: int) -> list[int]:
    chunks = []
    for item in text.split(","):
        item = item.strip()
        value = default if item == "default" else int(item)
        if value < 1:
            raise SystemExit(f"--chunk-tokens: {item!r} is not a positive integer or 'default'")
        if value not in chunks:
            chunks.append(value)
    return chunks


def _load() -> str:
    try:
        return "load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        return "load average unknown"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument(
        "--chunk-tokens",
        default="default",
        help="comma-separated tokens per chunk for the chunked variants; 'default' = default_chunk_tokens()",
    )
    parser.add_argument("--variants", default=",".join(VARIANTS), help="subset of " + ",".join(VARIANTS))
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=1, help="untimed full-size steps first")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch threads")
    parser.add_argument("--tokens", type=int, help="override N")
    parser.add_argument("--hidden", type=int, help="override d")
    parser.add_argument("--vocab", type=int, help="override V")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="override the dtype")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        run_worker(json.loads(args.worker))
        return 0

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available")
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
    size = dict(SIZES[device])
    for key in ("tokens", "hidden", "vocab", "dtype"):
        if getattr(args, key) is not None:
            size[key] = getattr(args, key)
    default_chunk = default_chunk_tokens(size["tokens"], size["hidden"], size["vocab"])
    chunks = _parse_chunks(args.chunk_tokens, default_chunk)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}")
    if "torch_op" in variants and not HAS_LINEAR_CROSS_ENTROPY:
        print(f"torch {torch.__version__} has no F.linear_cross_entropy: skipping torch_op")
        variants.remove("torch_op")
    # One group per chunk size: naive (the reference for every ratio and difference) and each
    # chunked variant, run round-robin. Groups run one after another, so that at most three
    # workers are alive at once (memory held by idle workers slows the naive head's page faults).
    chunked = [v for v in variants if v != "naive"]
    groups = [[("naive", None)] + [(v, c) for v in chunked] for c in chunks] if chunked else [[("naive", None)]]

    print(f"machine: {_machine(device, args.threads)}; torch {torch.__version__}")
    print(
        f"N={size['tokens']} d={size['hidden']} V={size['vocab']} {size['dtype']} on {device}; "
        f"default chunk {default_chunk} tokens; one fp32 (N x V) tensor = "
        f"{size['tokens'] * size['vocab'] * 4 / MIB:.0f} MiB; {args.warmup} warm-up + {args.repeats} timed "
        f"steps per configuration, round-robin; {_load()}",
        flush=True,
    )
    rows = []
    for configs in groups:
        rows += _run_group(configs, size, device, args)
    print(_load())

    print()
    print(
        "| variant | chunk tokens | time median (s) | time min (s) | time / naive (median; min) | "
        "extra peak memory (MiB) | memory / naive | max abs diff logp | max abs diff grad hidden | "
        "max abs diff grad weight |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    target_time = TIME_TARGET[device]
    missed = []
    for row in rows:
        if row["variant"] == "naive":
            naive = row
        chunk = "-" if row["chunk"] is None else str(row["chunk"])
        chunk += " (default)" if row["chunk"] == default_chunk else ""
        if "error" in row or "error" in naive:
            print(f"| {row['variant']} | {chunk} | failed | | | | | | | |")
            missed.append(f"{row['variant']} chunk={row['chunk']}: {'failed' if 'error' in row else 'no naive'}")
            continue
        t_ratio = row["median_s"] / naive["median_s"]
        t_ratio_min = row["min_s"] / naive["min_s"]
        m_ratio = row["extra_peak_bytes"] / naive["extra_peak_bytes"]
        diffs = [
            f"{row[f'diff_{k}'][0]:.1e} ({row[f'diff_{k}'][1]:.0e} rel)" if f"diff_{k}" in row else "-"
            for k in ("logp", "grad_hidden", "grad_weight")
        ]
        print(
            f"| {row['variant']} | {chunk} | {row['median_s']:.3f} | {row['min_s']:.3f} | "
            f"{t_ratio:.2f}x; {t_ratio_min:.2f}x | {row['extra_peak_bytes'] / MIB:.1f} | {m_ratio:.3f}x | "
            + " | ".join(diffs)
            + " |"
        )
        if row["variant"] != "naive":
            if m_ratio > MEMORY_TARGET:
                missed.append(f"{row['variant']} chunk={row['chunk']}: memory {m_ratio:.3f}x > {MEMORY_TARGET}x")
            if t_ratio > target_time or (device == "cuda" and t_ratio >= target_time):
                missed.append(f"{row['variant']} chunk={row['chunk']}: time {t_ratio:.2f}x vs {target_time}x")
    print()
    print(
        f"targets: extra peak memory <= {MEMORY_TARGET}x naive; median time "
        + ("< 1.0x naive" if device == "cuda" else f"<= {target_time}x naive")
        + "; ratios against the naive row above"
    )
    print("all targets met" if not missed else "missed: " + "; ".join(missed))
    return 0


def _run_group(configs, size, device, args) -> list[dict]:
    """Run configurations side by side (round-robin steps); one result row each, naive first."""
    with tempfile.TemporaryDirectory(prefix="bench_logprob_head_") as tmp:
        workers = []
        for variant, chunk in configs:
            spec = dict(
                size,
                variant=variant,
                chunk_tokens=chunk,
                device=device,
                threads=args.threads,
                seed=args.seed,
                out=str(Path(tmp) / f"{variant}_{chunk}.pt"),
            )
            workers.append(Worker(spec))
            workers[-1].wait_ready()  # one at a time: the inputs are built while nothing else runs
        for rnd in range(args.warmup + args.repeats):
            shift = rnd % len(workers)
            for worker in workers[shift:] + workers[:shift]:
                worker.step(timed=rnd >= args.warmup)
        for worker in workers:
            worker.finish()

        rows, reference = [], None
        for worker in workers:
            row = {"variant": worker.spec["variant"], "chunk": worker.spec["chunk_tokens"], **worker.result}
            if worker.failed:
                print(f"{row['variant']:9s} chunk={row['chunk']}: FAILED {row['error']}", flush=True)
            else:
                row["median_s"] = statistics.median(worker.seconds)
                row["min_s"] = min(worker.seconds)
                outputs = torch.load(worker.spec["out"])
                if row["variant"] == "naive":
                    reference = outputs
                elif reference is not None:
                    for key in ("logp", "grad_hidden", "grad_weight"):
                        row[f"diff_{key}"] = _max_abs_diff(outputs[key], reference[key])
                del outputs
                times = ", ".join(f"{s:.3f}" for s in worker.seconds)
                print(
                    f"{row['variant']:9s} chunk={row['chunk']}: times [{times}] s, "
                    f"extra peak {row['extra_peak_bytes'] / MIB:.1f} MiB ({row['peak_method']})",
                    flush=True,
                )
            rows.append(row)
    return rows


if __name__ == "__main__":
    sys.exit(main())
