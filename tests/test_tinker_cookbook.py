"""tinker-cookbook's RL loop (`tinker_cookbook.rl.train`), unmodified, against a live server's
Tinker HTTP API: the reward of a toy task rises, checkpoints are saved, nothing is downloaded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_process import ServerProcess

SCRIPT = Path(__file__).with_name("tinker_cookbook_loop.py")
TOKEN = "cookbook-0123456789abcdef"


@pytest.mark.timeout(300)
def test_the_cookbook_rl_loop_raises_the_reward(tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text(f"cookbook:{TOKEN}\n")
    server = ServerProcess(
        "--http-port",
        "0",
        "--auth-tokens-file",
        str(tokens),
        "--sampler-dtype",
        "float32",
        "--sampler-dir",
        str(tmp_path / "sampler"),
        checkpoint_dir=tmp_path / "ckpt",
    )
    try:
        env = {
            **os.environ,
            "TINKER_BASE_URL": f"http://127.0.0.1:{server.http_port}",
            "TINKER_API_KEY": f"tml-{TOKEN}",
        }
        done = subprocess.run(
            [sys.executable, str(SCRIPT), str(tmp_path)], env=env, capture_output=True, text=True, timeout=240
        )
    finally:
        assert server.terminate() == 0, server.log()
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    rewards = result["rewards"]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.15, rewards
    saved = [c for c in result["checkpoints"] if c.get("state_path")]
    assert saved and all(c["state_path"].startswith("tinker://run-") for c in saved), result["checkpoints"]
    assert "op=create_model identity=cookbook" in server.log()
