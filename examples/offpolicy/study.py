"""Off-policy study: does a positive lower clip bound feed back on a lagging sampler, and does the
upper bound matter? Runs every arm x lag x seed through the public client against a real server.

The task. A completion's reward is the fraction of its tokens whose id is a multiple of 8 (a
program checks it): one token in eight at the start, so the policy has room to move, and the
reward rises over a few hundred steps with full fine-tuning of the embedded model.

Lag. At step n the samples come from the weights saved for the sampler at step n - k (k = lag),
so the trainer's importance ratio pi_n / pi_(n-k) moves away from 1 as k grows.

    .venv/bin/python examples/offpolicy/study.py            # starts its own server; ~45 min on 2 CPUs
    .venv/bin/python examples/offpolicy/report.py           # plots and table from the CSVs

The sweep that looks for the feedback loop (docs/evidence.md; about 20 minutes):

    for spec in "1e-3:16 32" "3e-3:0 8 16 32" "1e-2:0 8 16 32"; do lr=${spec%%:*}
      .venv/bin/python examples/offpolicy/study.py --arms cispo_low0_high4 cispo_low0.8_high4 \
        --lags ${spec#*:} --learning-rate $lr --results examples/offpolicy/sweep/lr$lr --workdir .offpolicy-sweep-$lr
    done

Resumable: a run whose CSV is complete is skipped; CSVs are written whole at the end of a run.
"""

import argparse
import csv
import os
import re
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cispo.client import AdamParams, Datum, TrainingClient

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from rl_loop import sample_groups  # noqa: E402  the loop's sampling and advantages, shared

RESULTS = HERE / "results"
SWEEP = HERE / "sweep"  # one folder per learning rate, lr<value>/, written with --results
FIELDS = (
    "step",
    "reward",
    "kl_k1",
    "kl_k3",
    "clip_high_rate",
    "clip_low_rate",
    "ratio_p10",
    "ratio_p50",
    "ratio_p90",
    "ratio_max",
    "grad_norm",
    "active_tokens",
)


@dataclass(frozen=True)
class Arm:
    name: str
    loss_fn: str
    low: float
    high: float


ARMS = {
    arm.name: arm
    for arm in (
        Arm("cispo_low0_high4", "cispo", 0.0, 4.0),
        Arm("cispo_low0.8_high4", "cispo", 0.8, 4.0),
        Arm("ppo_0.8_1.2", "ppo", 0.8, 1.2),
        Arm("cispo_low0_high5", "cispo", 0.0, 5.0),
        Arm("cispo_low0_high8", "cispo", 0.0, 8.0),
    )
}
LAGS = (0, 2, 4, 8)
SEEDS = (0, 1, 2)


@dataclass(frozen=True)
class Setup:
    steps: int = 200
    prompts_per_step: int = 8
    group_size: int = 8
    max_tokens: int = 8
    learning_rate: float = 1e-3


def reward(tokens: list[int]) -> float:
    """The verifiable reward: the fraction of token ids that are multiples of 8."""
    return float(np.mean([t % 8 == 0 for t in tokens])) if tokens else 0.0


def run(client: TrainingClient, arm: Arm, lag: int, seed: int, setup: Setup, on_step=None) -> list[dict]:
    """One training run from the initial state; returns one row per step. `on_step(step, data,
    output)` sees what was trained on and what the trainer answered."""
    client.load_state("offpolicy-init").result()  # the embedded model's initial weights, a fresh optimizer
    rng = np.random.default_rng(seed)
    vocab_size = client.get_info().vocab_size
    prompts = [rng.integers(0, vocab_size, 4).tolist() for _ in range(32)]
    exports = deque()  # sampler weights of the last lag + 1 steps, oldest first
    rows = []
    for step in range(setup.steps):
        exports.append(client.save_weights_for_sampler(f"offpolicy-lag{lag}-{step % (lag + 1)}").result().path)
        sampler = client.create_sampling_client(exports[0])  # the weights of step max(step - lag, 0)
        if len(exports) > lag:
            exports.popleft()
        chosen = [prompts[i] for i in rng.choice(len(prompts), setup.prompts_per_step, replace=False)]
        data, rewards = sample_groups(sampler, chosen, setup.group_size, setup.max_tokens, rng, reward)
        row = {"step": step, "reward": float(np.mean(rewards))}
        if data:
            output_future = client.forward_backward(
                data, arm.loss_fn, {"clip_low_threshold": arm.low, "clip_high_threshold": arm.high}
            )
            grad_norm = client.optim_step(AdamParams(learning_rate=setup.learning_rate)).result().grad_norm
            output = output_future.result()
            row.update(_metrics(data, output, grad_norm))
            if on_step is not None:
                on_step(step, data, output)
        rows.append({field: row.get(field, "") for field in FIELDS})
    return rows


def _metrics(data: list[Datum], output, grad_norm: float) -> dict:
    """The step's row from the trainer's answer; ratio quantiles from its per-token logprobs."""
    m = output.metrics
    log_ratios = []
    for datum, out in zip(data, output.loss_fn_outputs):
        active = datum.loss_fn_inputs["advantages"].to_numpy() != 0
        log_ratios.append((out["logprobs"].to_numpy() - datum.loss_fn_inputs["logprobs"].to_numpy())[active])
    ratio = np.exp(np.concatenate(log_ratios))
    active = max(m["active_tokens:sum"], 1.0)
    p10, p50, p90 = np.quantile(ratio, [0.1, 0.5, 0.9])
    return {
        "kl_k1": m["kl_k1:mean"],
        "kl_k3": m["kl_k3:mean"],
        "clip_high_rate": m["clipped_high:sum"] / active,
        "clip_low_rate": m["clipped_low:sum"] / active,
        "ratio_p10": p10,
        "ratio_p50": p50,
        "ratio_p90": p90,
        "ratio_max": m["ratio:max"],
        "grad_norm": grad_norm,
        "active_tokens": m["active_tokens:sum"],
    }


def csv_path(results: Path, arm: str, lag: int, seed: int) -> Path:
    return results / f"{arm}_lag{lag}_seed{seed}.csv"


def is_complete(path: Path, steps: int) -> bool:
    if not path.is_file():
        return False
    with open(path) as f:
        return sum(1 for _ in csv.DictReader(f)) == steps


def write_csv(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def start_server(workdir: Path, max_lag: int) -> tuple[subprocess.Popen, str]:
    """A cispo server on loopback for the study: fp32 sampler weights (lag 0 is exactly
    on-policy) and a sampler cache that holds the last max_lag + 1 exports."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cispo.service",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--checkpoint-dir",
            str(workdir / "checkpoints"),
            "--sampler-dir",
            str(workdir / "sampler"),
            "--sampler-dtype",
            "float32",
            "--sampler-cache-size",
            str(max_lag + 2),
            "--log-level",
            "WARNING",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:
        match = re.search(r"listening on port (\d+)", line)
        if match:
            return proc, f"127.0.0.1:{match.group(1)}"
    raise RuntimeError("the server did not start")


def progress(done: int, total: int, started: float, label: str) -> None:
    elapsed = time.monotonic() - started
    eta = elapsed / max(done, 1) * (total - done)
    bar = "#" * int(30 * done / total)
    print(
        f"\r[{bar:<30}] {done}/{total} runs  {elapsed / 60:.1f} min, ~{eta / 60:.1f} min left  {label:<40}",
        end="",
        file=sys.stderr,
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", help="a running cispo server (default: start one)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--lags", nargs="+", type=int, default=list(LAGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=list(SEEDS))
    parser.add_argument("--steps", type=int, default=Setup.steps)
    parser.add_argument("--learning-rate", type=float, default=Setup.learning_rate)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=Path(".offpolicy"), help="the started server's files")
    args = parser.parse_args()
    setup = Setup(steps=args.steps, learning_rate=args.learning_rate)
    args.results.mkdir(parents=True, exist_ok=True)
    runs = [(arm, lag, seed) for lag in args.lags for arm in args.arms for seed in args.seeds]
    todo = [r for r in runs if not is_complete(csv_path(args.results, *r), setup.steps)]
    print(f"{len(runs)} runs, {len(runs) - len(todo)} already done", file=sys.stderr)
    if not todo:
        return
    server, target = (None, args.target) if args.target else start_server(args.workdir, max(args.lags))
    try:
        with TrainingClient(target, wait_for_ready=True) as client:
            if args.target is None:
                client.save_state("offpolicy-init").result()
            started = time.monotonic()
            for done, (arm, lag, seed) in enumerate(todo):
                progress(done, len(todo), started, f"{arm} lag {lag} seed {seed}")
                write_csv(csv_path(args.results, arm, lag, seed), run(client, ARMS[arm], lag, seed, setup))
            progress(len(todo), len(todo), started, "done")
            print(file=sys.stderr)
    finally:
        if server is not None:
            server.terminate()
            server.wait(60)


if __name__ == "__main__":
    main()
