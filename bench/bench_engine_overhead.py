"""Fixed cost and gradient memory of `Engine.forward_backward`, for one or more source trees
side by side (e.g. the tree before a change, from `git worktree add`, and the tree after).

For each model (the embedded one, and a 44M Llama built with `from_config`: 4 layers, d=512,
V=32k, untied), each tree runs in its own fresh subprocess (PYTHONPATH set to the tree's
import roots) that reports:

- `first`: the time of a tiny forward_backward (1 datum x 16 tokens, cispo) with no
  accumulated gradient (the first call after a step), median of `--repeats` after 3 warm-up
  calls;
- `accumulating`: the same call onto an existing accumulated gradient;
- `extra peak`: the peak RSS growth (VmHWM, reset through /proc/self/clear_refs) over a
  forward_backward on a 2 x 512-token batch with no accumulated gradient (after an untimed
  one, then zero_grad), with glibc told to mmap every allocation over 64 KiB so RSS follows
  the live bytes; in MiB. It includes the new gradient itself (4 bytes per parameter).
  Once with the default head chunks (at d=512 a chunk's (C x V) logits are as large as the
  (V x D) head gradient), once with `head_chunk_tokens=128`;
- `accumulating peak`, with `--accumulation`: the same growth over a forward_backward onto an
  accumulated gradient, under `gradient_accumulation` "exact" (the new gradient apart from the
  old one) and "in-place" (trees that have the option);
- with `--step`, instead of all the above: the time of `Engine.optim_step` (lr 1e-4) after an
  untimed forward_backward, of `Optimizer.step` alone (the same step without the engine's check
  of the policy) and of that check alone (`Engine.degenerate`, trees that have it); medians of
  `--repeats` after 3 warm-up rounds, the three interleaved.

Trees alternate: every round runs each tree once, in a rotating order, and the table gives
medians over rounds (`--rounds`).

    .venv/bin/python bench/bench_engine_overhead.py --tree before=/tmp/engine-before --tree after=.
"""

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile

MODELS = ("embedded", "llama44m")


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def child(model: str, what: str, repeats: int) -> dict:
    import time

    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    from cispo.worker import AdamParams, Engine, EngineConfig, Sample, load_policy_model

    tmp = tempfile.mkdtemp()
    if model == "embedded":
        policy = load_policy_model(None)
    else:
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=32000,
            hidden_size=512,
            intermediate_size=1408,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(os.path.join(tmp, "m"))
        policy = load_policy_model(os.path.join(tmp, "m"))
    options = {"gradient_accumulation": what.removeprefix("accumulating:")} if what.startswith("accumulating:") else {}
    engine = Engine(
        policy, EngineConfig(checkpoint_dir=tmp, head_chunk_tokens=128 if what == "memory128" else None, **options)
    )
    vocab = policy.vocab_size
    g = torch.Generator().manual_seed(0)

    def batch(data: int, length: int):
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

    params = list(engine.named_params.values())
    out = {"params_M": sum(p.numel() for p in params) / 1e6}
    if what.startswith("memory"):
        return out | {f"extra_peak_{what}_MiB": extra_peak_mib(engine, batch(2, 512))}
    if what.startswith("accumulating:"):
        return out | {f"extra_peak_{what}_MiB": extra_peak_mib(engine, batch(2, 512), accumulating=True)}
    tiny = batch(1, 16)
    if what == "step":
        return out | step_times(engine, tiny, AdamParams(learning_rate=1e-4), repeats)

    def timed(reset: bool) -> float:
        if reset:
            engine.optimizer.zero_grad()
        started = time.perf_counter()
        engine.forward_backward(tiny, "cispo")
        return time.perf_counter() - started

    for name, reset in (("first_ms", True), ("accumulating_ms", False)):
        for _ in range(3):
            timed(reset)
        out[name] = statistics.median(timed(reset) for _ in range(repeats)) * 1e3
    return out


def step_times(engine, tiny, adam, repeats: int) -> dict:
    """Median ms of optim_step, of Optimizer.step (no check of the policy) and of the check."""
    import time

    def step(optimizer_only: bool) -> float:
        engine.forward_backward(tiny, "cispo")
        started = time.perf_counter()
        engine.optimizer.step(adam) if optimizer_only else engine.optim_step(adam)
        return time.perf_counter() - started

    def probe() -> float:
        started = time.perf_counter()
        engine.degenerate()
        return time.perf_counter() - started

    times: dict[str, list[float]] = {"step_ms": [], "step_unchecked_ms": [], "probe_ms": []}
    for i in range(repeats + 3):  # 3 warm-up rounds
        rounds = {"step_ms": step(False), "step_unchecked_ms": step(True)}
        if hasattr(engine, "degenerate"):
            rounds["probe_ms"] = probe()
        for key, value in rounds.items():
            if i >= 3:
                times[key].append(value)
    return {key: statistics.median(values) * 1e3 if values else math.nan for key, values in times.items()}


def extra_peak_mib(engine, big, accumulating: bool = False) -> float:
    import gc

    engine.forward_backward(big, "cispo")  # first-call work (kernels, thread pools), untimed
    if not accumulating:
        engine.optimizer.zero_grad()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
        f.write("5")
    before = _status_kib("VmRSS")
    engine.forward_backward(big, "cispo")
    return (_status_kib("VmHWM") - before) / 1024


def import_root(tree: str) -> str:
    """The PYTHONPATH that imports cispo from `tree` (each top-level folder holds a `cispo/`
    namespace package), ahead of the installed checkout."""
    tree = os.path.abspath(tree)
    return os.pathsep.join(os.path.join(tree, folder) for folder in ("worker", "service", "client_py", "protos"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", default=None, help="label=path (default: this tree)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument(
        "--accumulation", action="store_true", help="also the peak of an accumulating call, exact and in-place"
    )
    parser.add_argument(
        "--step",
        action="store_true",
        help="instead, optim_step with and without the engine's check of the policy, and the check",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, what = args.child.split(":", 1)
        print(json.dumps(child(model, what, args.repeats)))
        return
    trees = [
        t.split("=", 1) for t in (args.tree or [f"this={os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}"])
    ]
    roots = {label: import_root(path) for label, path in trees}
    results = {(m, label): [] for m in args.models for label, _ in trees}
    for r in range(args.rounds):
        for model in args.models:
            order = trees[r % len(trees) :] + trees[: r % len(trees)]
            for label, _ in order:
                result = {}
                extra = ("accumulating:exact", "accumulating:in-place") if args.accumulation else ()
                for what in ("step",) if args.step else ("time", "memory", "memory128", *extra):
                    # Memory: every allocation over 64 KiB is mmapped and unmapped when freed, so
                    # RSS follows the live bytes. Times: glibc's default (it reuses memory).
                    env = dict(os.environ, PYTHONPATH=roots[label])
                    if what not in ("time", "step"):
                        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
                    proc = subprocess.run(
                        [
                            sys.executable,
                            os.path.abspath(__file__),
                            "--child",
                            f"{model}:{what}",
                            "--repeats",
                            str(args.repeats),
                        ],
                        env=env,
                        capture_output=True,
                        text=True,
                        cwd=tempfile.gettempdir(),
                    )
                    if proc.returncode:
                        sys.exit(f"{label} {model} failed:\n{proc.stderr[-3000:]}")
                    result |= json.loads(proc.stdout.strip().splitlines()[-1])
                results[(model, label)].append(result)
                print(f"  round {r} {model} {label}: {results[(model, label)][-1]}", flush=True)
    accumulating = (
        (" | accumulating peak, exact | accumulating peak, in-place", "|---|---") if args.accumulation else ("", "")
    )
    if args.step:
        print("\n| model | tree | optim_step | Optimizer.step alone | the check alone |\n|---|---|---|---|---|")
        for model in args.models:
            for label, _ in trees:
                rs = results[(model, label)]
                print(
                    f"| {model} ({rs[0]['params_M']:.1f}M) | {label} |"
                    + "".join(
                        f" {statistics.median(r[key] for r in rs):.2f} ms |"
                        for key in ("step_ms", "step_unchecked_ms", "probe_ms")
                    )
                )
        return
    print(
        "\n| model | tree | tiny fwd_bwd, no gradient yet | tiny fwd_bwd, accumulating | "
        f"extra peak, fwd_bwd 2 x 512 | same, 128-token head chunks{accumulating[0]} |"
    )
    print(f"|---|---|---|---|---|---{accumulating[1]}|")
    for model in args.models:
        for label, _ in trees:
            rs = results[(model, label)]
            med = {k: statistics.median(x[k] for x in rs) for k in rs[0]}
            cells = "".join(
                f" {med[f'extra_peak_accumulating:{mode}_MiB']:.0f} MiB |"
                for mode in ("exact", "in-place")
                if args.accumulation
            )
            print(
                f"| {model} ({med['params_M']:.1f}M) | {label} | {med['first_ms']:.1f} ms | "
                f"{med['accumulating_ms']:.1f} ms | {med['extra_peak_memory_MiB']:.0f} MiB | "
                f"{med['extra_peak_memory128_MiB']:.0f} MiB |{cells}"
            )


if __name__ == "__main__":
    main()
