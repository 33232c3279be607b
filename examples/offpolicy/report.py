"""The study's figures, tables and alert replay, all computed from the CSVs in results/ and
sweep/lr*/ (the sweep that looks for the feedback loop at larger lags and learning rates).

    .venv/bin/python examples/offpolicy/report.py

writes docs/evidence/*.png and rewrites the generated blocks of docs/evidence.md (between
`<!-- generated:NAME -->` and `<!-- end:NAME -->`). Every PNG carries the digest of the CSVs it
was drawn from in its metadata, and so does the document; tests/test_offpolicy_study.py checks
both, so no figure or number is typed by hand.

Alerts: each run's recorded series are replayed, one study step per minute, as promtool input
series (cispo_tokens_total by clip outcome, the cispo_sampler_trainer_kl histogram's sum and
count) against deploy/prometheus/rules.yaml, with `promtool test rules`.
"""

import argparse
import csv
import hashlib
import re
import subprocess
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from study import ARMS, RESULTS, SWEEP

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "evidence.md"
FIGURES = ROOT / "docs" / "evidence"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
TAIL = 20  # steps averaged for the "final" figures
ALERTS = ("CispoHighClipRate", "CispoSamplerTrainerKLRising")
ALERT_EVERY = 5  # minutes (= steps) between alert evaluations
NAME = re.compile(r"(?P<arm>.+)_lag(?P<lag>\d+)_seed(?P<seed>\d+)\.csv")


def load(results: Path) -> dict[tuple[str, int], list[dict[str, np.ndarray]]]:
    """(arm, lag) -> one dict of columns per seed, seeds in order."""
    runs = defaultdict(list)
    for path in sorted(results.glob("*.csv"), key=lambda p: _key(p.name)):
        match = NAME.fullmatch(path.name)
        with open(path) as f:
            rows = list(csv.DictReader(f))
        columns = {k: np.array([float(r[k]) if r[k] != "" else np.nan for r in rows]) for k in rows[0]}
        runs[(match["arm"], int(match["lag"]))].append(columns)
    return dict(runs)


def _key(name: str):
    match = NAME.fullmatch(name)
    return (match["arm"], int(match["lag"]), int(match["seed"]))


def digest(results: Path) -> str:
    """sha256 over the CSVs' names and bytes, in name order."""
    h = hashlib.sha256()
    for path in sorted(results.glob("*.csv")):
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def digest_tree(root: Path) -> str:
    """sha256 over every lr*/ folder's CSVs (names with their folder, and bytes), in name order."""
    h = hashlib.sha256()
    for path in sorted(root.glob("lr*/*.csv")):
        h.update(f"{path.parent.name}/{path.name}".encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def final(column: np.ndarray) -> float:
    return float(np.nanmean(column[-TAIL:]))


def table(runs) -> str:
    """Final reward and KL (mean of the last steps) per arm and lag: mean ± std over seeds."""
    lines = [
        "| arm | lag | seeds | final reward | final KL k3 | final clip-low rate | final clip-high rate |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (arm, lag), seeds in sorted(runs.items(), key=lambda kv: (kv[0][1], list(ARMS).index(kv[0][0]))):
        cells = []
        for key, fmt in (
            ("reward", "{:.3f} ± {:.3f}"),
            ("kl_k3", "{:.2e} ± {:.1e}"),
            ("clip_low_rate", "{:.4f} ± {:.4f}"),
            ("clip_high_rate", "{:.4f} ± {:.4f}"),
        ):
            values = [final(s[key]) for s in seeds]
            cells.append(fmt.format(np.mean(values), np.std(values)))
        lines.append(f"| {arm} | {lag} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def load_sweep(root: Path) -> dict[str, dict]:
    """learning rate (the folder's name after "lr") -> that sweep's runs, as `load` gives them."""
    return {d.name.removeprefix("lr"): load(d) for d in sorted(root.glob("lr*"), key=lambda d: float(d.name[2:]))}


def steps_to(column: np.ndarray, level: float, window: int = 5) -> int | None:
    """First step at which the mean of the last `window` steps reaches `level`."""
    means = np.convolve(np.nan_to_num(column), np.ones(window) / window, mode="valid")
    hits = np.nonzero(means >= level)[0]
    return int(hits[0]) + window - 1 if hits.size else None


def sweep_table(sweep: dict[str, dict]) -> str:
    """Per learning rate, lag and arm: peak and summed KL k3, peak clip-low rate, steps until the
    reward reaches 0.9, final reward; mean ± std over seeds."""
    lines = [
        "| lr | lag | arm | seeds | peak KL k3 | KL k3 summed over steps | peak clip-low rate | steps to reward 0.9 "
        "| final reward |",
        "| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for lr, runs in sweep.items():
        for (arm, lag), seeds in sorted(runs.items(), key=lambda kv: (kv[0][1], list(ARMS).index(kv[0][0]))):

            def cell(values, fmt):
                return fmt.format(np.mean(values), np.std(values))

            reached = [steps_to(s["reward"], 0.9) for s in seeds]
            lines.append(
                " | ".join(
                    [
                        f"| {lr}",
                        str(lag),
                        arm,
                        str(len(seeds)),
                        cell([np.nanmax(s["kl_k3"]) for s in seeds], "{:.3f} ± {:.3f}"),
                        cell([np.nansum(s["kl_k3"]) for s in seeds], "{:.1f} ± {:.1f}"),
                        cell([np.nanmax(s["clip_low_rate"]) for s in seeds], "{:.3f} ± {:.3f}"),
                        ", ".join("-" if r is None else str(r) for r in reached),
                        cell([final(s["reward"]) for s in seeds], "{:.3f} ± {:.3f}"),
                    ]
                )
                + " |"
            )
    return "\n".join(lines)


def plot_sweep(sweep: dict[str, dict], path: Path, data_digest: str) -> None:
    """KL k3 over steps, one row per learning rate, one column per lag; lower-bound arms."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = sorted({lag for runs in sweep.values() for _, lag in runs})
    fig, axes = plt.subplots(len(sweep), len(lags), figsize=(3.2 * len(lags), 2.6 * len(sweep)), squeeze=False)
    for row, (lr, runs) in zip(axes, sweep.items()):
        for ax, lag in zip(row, lags):
            if not any((arm, lag) in runs for arm in ARMS):
                ax.axis("off")
                ax.text(0.5, 0.5, f"lr {lr}, lag {lag}:\nin the main study", ha="center", va="center", fontsize=9)
                continue
            for arm in ("cispo_low0_high4", "cispo_low0.8_high4"):
                seeds = runs.get((arm, lag))
                if not seeds:
                    continue
                values = np.stack([s["kl_k3"] for s in seeds])
                (line,) = ax.plot(seeds[0]["step"], np.nanmean(values, 0), label=arm, lw=1.0)
                ax.fill_between(
                    seeds[0]["step"], np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2
                )
            ax.set_title(f"lr {lr}, lag {lag}", fontsize=9)
            ax.set_yscale("symlog", linthresh=1e-3)
            ax.grid(alpha=0.3)
    axes[-1][-1].legend(fontsize=7)
    fig.supxlabel("step")
    fig.supylabel("sampler-trainer KL k3")
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Description": f"data digest {data_digest}"})
    plt.close(fig)


def alert_table(runs) -> str:
    """First step at which each alert fires, per arm and lag (one entry per seed; - = never)."""
    lines = ["| arm | lag | " + " | ".join(ALERTS) + " |", "| --- | ---: | " + " | ".join("---" for _ in ALERTS) + " |"]
    for (arm, lag), seeds in sorted(runs.items(), key=lambda kv: (kv[0][1], list(ARMS).index(kv[0][0]))):
        fired = [first_firing(s, ARMS[arm].loss_fn) for s in seeds]
        cells = [", ".join(str(f.get(a, "-")) for f in fired) for a in ALERTS]
        lines.append(f"| {arm} | {lag} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def first_firing(run: dict[str, np.ndarray], loss_fn: str) -> dict[str, int]:
    """alert -> the first step (minute) at which promtool finds it firing on this run's series."""
    active = np.nan_to_num(run["active_tokens"])
    high = np.round(np.nan_to_num(run["clip_high_rate"]) * active)
    low = np.round(np.nan_to_num(run["clip_low_rate"]) * active)
    kl = np.nan_to_num(run["kl_k3"])
    trained = (active > 0).astype(float)
    series = {
        f'cispo_tokens_total{{loss_fn="{loss_fn}",clip="high"}}': np.cumsum(high),
        f'cispo_tokens_total{{loss_fn="{loss_fn}",clip="low"}}': np.cumsum(low),
        f'cispo_tokens_total{{loss_fn="{loss_fn}",clip="none"}}': np.cumsum(active - high - low),
        f'cispo_sampler_trainer_kl_sum{{loss_fn="{loss_fn}"}}': np.cumsum(kl * trained),
        f'cispo_sampler_trainer_kl_count{{loss_fn="{loss_fn}"}}': np.cumsum(trained),
    }
    times = range(ALERT_EVERY, len(active), ALERT_EVERY)
    lines = [f"rule_files: [{RULES}]", "evaluation_interval: 1m", "tests:", "  - interval: 1m", "    input_series:"]
    for name, values in series.items():
        lines += [f"      - series: '{name}'", "        values: '" + " ".join(f"{v:.9g}" for v in values) + "'"]
    lines.append("    alert_rule_test:")
    for t in times:
        for alert in ALERTS:
            lines += [f"      - eval_time: {t}m", f"        alertname: {alert}", "        exp_alerts: []"]
    with tempfile.NamedTemporaryFile("w", suffix=".yaml") as f:
        f.write("\n".join(lines) + "\n")
        f.flush()
        done = subprocess.run(["promtool", "test", "rules", f.name], capture_output=True, text=True)
        out = done.stdout + done.stderr  # promtool reports failed expectations on stderr
    fired = {}
    for alert, minutes in re.findall(r"alertname: (\w+), time: (\d+)m", out):
        fired[alert] = min(fired.get(alert, 10**9), int(minutes))
    return fired


def plot(runs, metric: str, ylabel: str, arms: list[str], path: Path, data_digest: str, log: bool = False) -> None:
    """One panel per lag: `metric` over steps per arm, mean line and min-max band over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lags = sorted({lag for _, lag in runs})
    fig, axes = plt.subplots(1, len(lags), figsize=(4 * len(lags), 3.4), sharey=True, squeeze=False)
    for ax, lag in zip(axes[0], lags):
        for arm in arms:
            seeds = runs.get((arm, lag))
            if not seeds:
                continue
            values = np.stack([s[metric] for s in seeds])
            steps = seeds[0]["step"]
            (line,) = ax.plot(steps, np.nanmean(values, 0), label=arm, lw=1.2)
            ax.fill_between(steps, np.nanmin(values, 0), np.nanmax(values, 0), color=line.get_color(), alpha=0.2)
        ax.set(title=f"lag {lag}", xlabel="step")
        if log:
            ax.set_yscale("symlog", linthresh=1e-6)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel(ylabel)
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Description": f"data digest {data_digest}"})
    plt.close(fig)


def write_block(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- generated:{name} -->\n).*?(\n<!-- end:{name} -->)", re.S)
    if not pattern.search(text):
        raise SystemExit(f"{DOC} has no block {name}")
    return pattern.sub(lambda m: m[1] + body + m[2], text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--sweep", type=Path, default=SWEEP)
    args = parser.parse_args()
    runs = load(args.results)
    data_digest = digest(args.results)
    FIGURES.mkdir(parents=True, exist_ok=True)
    low_arms = ["cispo_low0_high4", "cispo_low0.8_high4", "ppo_0.8_1.2"]
    high_arms = ["cispo_low0_high4", "cispo_low0_high5", "cispo_low0_high8"]
    for name, metric, label, arms, log in (
        ("kl_low_bound", "kl_k3", "sampler-trainer KL k3", low_arms, True),
        ("clip_low_rate", "clip_low_rate", "clip-low rate", low_arms, False),
        ("reward_low_bound", "reward", "reward", low_arms, False),
        ("kl_high_bound", "kl_k3", "sampler-trainer KL k3", high_arms, True),
        ("reward_high_bound", "reward", "reward", high_arms, False),
    ):
        plot(runs, metric, label, arms, FIGURES / f"{name}.png", data_digest, log)
    sweep = load_sweep(args.sweep)
    sweep_digest = digest_tree(args.sweep)
    plot_sweep(sweep, FIGURES / "sweep_kl.png", sweep_digest)
    text = DOC.read_text()
    text = write_block(
        text,
        "digest",
        f"Data digest of results/*.csv: `{data_digest}` ({sum(map(len, runs.values()))} "
        f"runs, lags {sorted({lag for _, lag in runs})}).",
    )
    text = write_block(
        text,
        "sweep-digest",
        f"Data digest of sweep/lr*/*.csv: `{sweep_digest}` "
        f"({sum(len(s) for r in sweep.values() for s in r.values())} runs).",
    )
    text = write_block(text, "sweep", sweep_table(sweep))
    text = write_block(text, "table", table(runs))
    text = write_block(text, "alerts", alert_table(runs))
    DOC.write_text(text)
    print(f"wrote {DOC} and {len(list(FIGURES.glob('*.png')))} figures (digest {data_digest})")


if __name__ == "__main__":
    main()
