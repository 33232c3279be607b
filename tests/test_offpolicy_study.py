"""examples/offpolicy: a smoke run of the study checks its plumbing (lagged weights really are
older, the recorded KL is the trainer's), and the committed report is consistent with the
committed CSVs. The claims themselves are not tested here: docs/evidence.md reports them."""

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image
from server_process import ServerProcess

from cispo.client import TrainingClient

STUDY = Path(__file__).resolve().parent.parent / "examples" / "offpolicy"
sys.path.insert(0, str(STUDY))
import report  # noqa: E402
import study  # noqa: E402


def kl_series(metrics_port: int) -> tuple[float, float]:
    text = requests.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
    values = [
        float(re.search(rf'^cispo_sampler_trainer_kl_{part}{{[^}}]*loss_fn="cispo"[^}}]*}} (\S+)$', text, re.M)[1])
        for part in ("sum", "count")
    ]
    return values[0], values[1]


@pytest.mark.timeout(300)
def test_smoke_run_lags_the_sampler_and_records_the_trainers_kl(tmp_path):
    server = ServerProcess("--sampler-dtype", "float32", "--sampler-cache-size", "4", checkpoint_dir=tmp_path / "c")
    setup = study.Setup(steps=6)
    try:
        with TrainingClient(server.address) as client:
            client.save_state("offpolicy-init")
            for lag, arm in ((0, "cispo_low0_high4"), (2, "cispo_low0_high4"), (2, "cispo_low0.8_high4")):
                seen = []
                kl_before = kl_series(server.metrics_port)
                rows = study.run(
                    client, study.ARMS[arm], lag, 0, setup, lambda s, d, o, seen=seen: seen.append((s, d, o))
                )
                kl_after = kl_series(server.metrics_port)
                assert [r["step"] for r in rows] == list(range(6)) and len(seen) == 6
                for (step, data, output), row in zip(seen, rows):
                    t = np.concatenate([o["logprobs"].to_numpy() for o in output.loss_fn_outputs])
                    s = np.concatenate([d.loss_fn_inputs["logprobs"].to_numpy() for d in data])
                    active = np.concatenate([d.loss_fn_inputs["advantages"].to_numpy() != 0 for d in data])
                    gap = np.abs(t - s)[active].max()
                    # Lag 0 samples the trainer's own weights; lag k samples those of k steps ago.
                    assert gap < 1e-4 if lag == 0 or step == 0 else gap > 1e-3, (lag, step, gap)
                    log_ratio = (t - s)[active]
                    k3 = np.mean(np.exp(log_ratio) - 1 - log_ratio)
                    assert row["kl_k3"] == pytest.approx(k3, rel=1e-3, abs=1e-9)
                    assert row["kl_k3"] == output.metrics["kl_k3:mean"]
                # What the server exported to Prometheus is what the study recorded.
                assert kl_after[1] - kl_before[1] == 6
                assert kl_after[0] - kl_before[0] == pytest.approx(sum(r["kl_k3"] for r in rows), rel=1e-6, abs=1e-12)
            study.write_csv(tmp_path / "x.csv", rows)
            assert study.is_complete(tmp_path / "x.csv", 6) and not study.is_complete(tmp_path / "x.csv", 7)
    finally:
        assert server.terminate() == 0


def test_the_report_is_what_the_committed_csvs_give():
    runs = report.load(study.RESULTS)
    assert runs, "examples/offpolicy/results/ holds the study's CSVs"
    data_digest = report.digest(study.RESULTS)
    text = report.DOC.read_text()
    block = lambda name: re.search(rf"<!-- generated:{name} -->\n(.*?)\n<!-- end:{name} -->", text, re.S)[1]  # noqa: E731
    assert f"`{data_digest}`" in block("digest")
    assert block("table") == report.table(runs)
    assert block("alerts") == report.alert_table(runs)
    sweep = report.load_sweep(study.SWEEP)
    sweep_digest = report.digest_tree(study.SWEEP)
    assert set(sweep) == {"1e-3", "3e-3", "1e-2"} and f"`{sweep_digest}`" in block("sweep-digest")
    assert block("sweep") == report.sweep_table(sweep)
    figures = sorted(report.FIGURES.glob("*.png"))
    assert len(figures) == 6
    for figure in figures:
        expected = sweep_digest if figure.name == "sweep_kl.png" else data_digest
        assert Image.open(figure).info.get("Description") == f"data digest {expected}", figure.name
        assert f"evidence/{figure.name}" in text
