"""examples/rl_loop.py, short, against a real server, full and LoRA: the reward rises, and the
data it trains on is on-policy (ratio 1, no clipping, KL 0) because the sampler's logprobs equal
the trainer's. The LoRA run the example creates is gone when it exits."""

import csv
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import ServerProcess

from cispo.client import ServiceClient

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "rl_loop.py"


@pytest.mark.timeout(300)
@pytest.mark.parametrize(("flags", "steps"), [([], 15), (["--lora-rank", "8"], 15)], ids=["full", "lora"])
def test_rl_loop_raises_the_reward_on_policy(tmp_path, flags, steps):
    server = ServerProcess(
        "--sampler-dir", str(tmp_path / "sampler"), "--sampler-dtype", "float32", checkpoint_dir=tmp_path / "ckpt"
    )
    try:
        run = subprocess.run(
            [
                sys.executable,
                str(EXAMPLE),
                "--target",
                server.address,
                "--steps",
                str(steps),
                *flags,
                "--out-dir",
                str(tmp_path / "out"),
            ],
            capture_output=True,
            text=True,
            timeout=240,
        )
        with ServiceClient(server.address) as service:
            runs_left = [m.model_id for m in service.list_models()]
    finally:
        assert server.terminate() == 0
    assert run.returncode == 0, run.stdout + run.stderr
    assert sum(line.startswith("step ") for line in run.stdout.splitlines()) == steps
    if flags:  # the example's own LoRA run, unloaded at its end; the default run never made
        assert runs_left == [], run.stdout
    with open(tmp_path / "out" / "rewards.csv") as f:
        rows = list(csv.DictReader(f))
    rewards = [float(r["reward"]) for r in rows]
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    assert all(float(r["clip_rate"]) == 0 and abs(float(r["kl_k3"])) < 1e-8 for r in rows)
    assert all(abs(float(r["ratio_max"]) - 1) < 1e-4 for r in rows)
    assert (tmp_path / "out" / "rewards.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
