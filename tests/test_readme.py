"""The README's examples run as written against a live server."""

import re
import subprocess
import sys
from pathlib import Path

import grpc
from google.protobuf import json_format

from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from server_process import ServerProcess

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_python_and_grpcurl_examples_run(tmp_path):
    server = ServerProcess(checkpoint_dir=tmp_path)
    try:
        python_example = re.search(r"```python\n(.*?)```", README, re.S).group(1)
        run = subprocess.run([sys.executable, "-c", python_example.replace("localhost:50051", server.address)],
                             capture_output=True, text=True, timeout=120)
        assert run.returncode == 0, run.stderr
        loss, *_ = run.stdout.split()
        float(loss)

        body = re.search(r"grpcurl -plaintext -d '(.*?)' localhost:50051 cispo.v1.TrainingService/ForwardBackward",
                         README, re.S).group(1)
        request = json_format.Parse(body, pb.ForwardBackwardInput())
        with grpc.insecure_channel(server.address) as channel:
            answer = training_pb2_grpc.TrainingServiceStub(channel).ForwardBackward(request)
        assert answer.metrics["tokens:sum"] == 4 and answer.metrics["active_tokens:sum"] == 3
    finally:
        assert server.terminate() == 0
