"""`cispo-server` for an operator: --help describes every flag with its default, --version,
every startup error is one line and exit code 2, JSON logs parse, and a client that cancels a
stream leaves no ERROR or traceback in the log.

Invocations that must stop before serving run in this process (`run_cli_in_process`, no torch
import per case); one of each kind also runs as a real process.
"""

import importlib.metadata
import json
import logging
import subprocess
import sys
import threading
import time

import grpc
import numpy as np
import pytest
import torch
from server_process import ServerProcess, run_cli_in_process

from cispo.service import cli
from cispo.service.log_format import JsonFormatter
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

pytestmark = pytest.mark.timeout(300)


def assert_one_line_error(code: int, output: str, *fragments: str) -> str:
    assert code == 2, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("cispo-server: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------
# --help and --version


def test_help_describes_every_flag_and_its_default():
    code, text = run_cli_in_process("--help")
    assert code == 0
    flat = " ".join(text.split())  # argparse wraps lines
    parser = cli.build_parser()
    flags = [a for a in parser._actions if a.option_strings and a.dest not in ("help", "version")]
    assert len(flags) >= 20
    for action in flags:
        flag = action.option_strings[-1]
        assert flag in flat
        description = " ".join(action.help.split())
        assert len(description) > 25 and not description.startswith("["), f"{flag}: describe it"
        squeezed = "".join(description.split())  # argparse may break lines after a hyphen
        assert squeezed in "".join(flat.split()), flag
        # Each flag names its environment variable and shows its default.
        assert f"[CISPO_{action.dest.upper()}" in description, flag
        after = "".join(flat.split()).split(squeezed, 1)[1]
        assert after.startswith("(default:"), f"{flag}: no default shown"
    for default in (
        "(default: 127.0.0.1)",
        "(default: 50051)",
        "(default: 9400)",
        "(default: -1)",
        "(default: auto)",
        "(default: INFO)",
        "(default: text)",
        "(default: off)",
    ):
        assert default in flat, default


def test_help_shows_defaults_from_the_environment():
    code, text = run_cli_in_process("--help", env={"CISPO_PORT": "6000"})
    assert code == 0 and "(default: 6000)" in " ".join(text.split())


def test_version():
    code, text = run_cli_in_process("--version")
    assert code == 0
    assert text.strip() == f"cispo-server {importlib.metadata.version('cispo')}"


# ---------------------------------------------------------------------------------------------
# Startup errors: one line, exit 2, no traceback


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_no_cuda():
    assert_one_line_error(
        *run_cli_in_process("--port", "0", "--device", "cuda"), "--device cuda", "no CUDA device is available"
    )
    assert_one_line_error(*run_cli_in_process("--port", "0", "--device", "cuda:1"), "no CUDA")


@pytest.mark.parametrize(
    "argv, fragments",
    [
        (["--dtype", "int8"], ["unknown dtype 'int8'"]),
        (["--dtype", "bfloat17"], ["unknown dtype"]),
        (["--device", "gpu"], ["--device 'gpu' is not a device"]),
        (["--model", "/no/such/checkpoint"], ["/no/such/checkpoint", "not a Hugging Face checkpoint directory"]),
        (["--port", "fifty"], ["--port", "invalid int value"]),
        (["--log-level", "LOUD"], ["--log-level", "invalid choice"]),
        (["--log-format", "xml"], ["--log-format", "invalid choice"]),
        (["--no-such-flag"], ["unrecognized arguments: --no-such-flag"]),
    ],
    ids=["dtype", "dtype-typo", "device", "model", "port", "log-level", "log-format", "unknown-flag"],
)
def test_startup_errors_are_one_line(argv, fragments):
    assert_one_line_error(*run_cli_in_process("--port", "0", "--metrics-port", "0", *argv), *fragments)


@pytest.mark.parametrize(
    "env, fragments",
    [
        ({"CISPO_PORT": "fifty"}, ["CISPO_PORT='fifty' is not a valid int"]),
        ({"CISPO_DRAIN_SECONDS": "soon"}, ["CISPO_DRAIN_SECONDS"]),
        ({"CISPO_LOG_LEVEL": "loud"}, ["CISPO_LOG_LEVEL='LOUD'"]),
        ({"CISPO_INSECURE": "perhaps"}, ["CISPO_INSECURE"]),
    ],
)
def test_bad_environment_values_are_one_line(env, fragments):
    assert_one_line_error(*run_cli_in_process(env=env), *fragments)


def test_a_bad_model_directory_in_a_real_process(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text('{"model_type": "llama"')  # truncated JSON
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cispo.service",
            "--port",
            "0",
            "--metrics-port",
            "0",
            "--model",
            str(tmp_path / "model"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.stdout == ""
    line = assert_one_line_error(proc.returncode, proc.stderr, "cannot load the model", str(tmp_path / "model"))
    assert len(line) < 400


# ---------------------------------------------------------------------------------------------
# Logging


def test_json_formatter_carries_extra_fields_and_exceptions():
    formatter = JsonFormatter()
    record = logging.LogRecord("cispo.test", logging.WARNING, __file__, 1, "hello %s", ("world",), None)
    record.fields = {"op": "forward", "identity": "alice"}
    record.peer = "ipv4:10.0.0.1:5"
    entry = json.loads(formatter.format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "cispo.test" and entry["message"] == "hello world"
    assert entry["fields"] == {"op": "forward", "identity": "alice"} and entry["peer"] == "ipv4:10.0.0.1:5"
    assert entry["time"].endswith("Z")
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert "ValueError: boom" in entry["exception"]


def stream_requests(n: int, stop: threading.Event):
    rng = np.random.default_rng(0)
    for i in range(n):
        tokens = rng.integers(0, 1024, 64).astype("<i8").tobytes()
        yield pb.StreamRequest(
            request_id=str(i),
            forward_backward=pb.ForwardBackwardInput(
                loss_fn="cispo",
                data=[
                    pb.Datum(
                        model_input=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[64], raw_data=tokens),
                        loss_fn_inputs=pb.LossFnInputs(
                            target_tokens=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[64], raw_data=tokens),
                            logprobs=pb.Tensor(float_data=[-7.0] * 64),
                            advantages=pb.Tensor(float_data=[1.0] * 64),
                        ),
                    )
                ],
            ),
        )
    stop.wait(30)  # keep the stream open until the test cancels it


def test_json_logs_and_no_errors_when_clients_cancel_streams(tmp_path):
    server = ServerProcess("--log-format", "json", checkpoint_dir=tmp_path)
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            # Cancel after the first answer, with more requests in flight.
            stop = threading.Event()
            call = stub.Stream(stream_requests(8, stop))
            first = next(call)
            assert first.WhichOneof("result") == "forward_backward", first
            call.cancel()
            stop.set()
            # Cancel before any answer.
            stop2 = threading.Event()
            call = stub.Stream(stream_requests(4, stop2))
            call.cancel()
            stop2.set()
            # A unary call cancelled in flight.
            stub.GetInfo.future(pb.GetInfoRequest()).cancel()
        # A connection dropped with a stream open (the channel closes under it).
        channel = grpc.insecure_channel(server.address)
        stop3 = threading.Event()
        call = training_pb2_grpc.TrainingServiceStub(channel).Stream(stream_requests(2, stop3))
        next(call)
        channel.close()
        stop3.set()
        time.sleep(1.0)
        # The server still serves.
        with grpc.insecure_channel(server.address) as channel:
            assert training_pb2_grpc.TrainingServiceStub(channel).GetInfo(pb.GetInfoRequest(), timeout=30).model_name
    finally:
        assert server.terminate() == 0
    log = server.log()
    assert "Traceback" not in log and "ERROR" not in log, log
    entries = []
    for line in log.splitlines():
        if line.startswith("cispo-server listening on port"):
            continue  # the startup line on stdout, which tests and scripts parse
        entry = json.loads(line)
        assert {"time", "level", "logger", "message"} <= set(entry), line
        assert entry["level"] in ("DEBUG", "INFO", "WARNING"), line
        entries.append(entry)
    messages = [e["message"] for e in entries]
    assert any("serving embedded-tiny-llama" in m for m in messages)
    assert any(m.startswith("drained:") for m in messages)
