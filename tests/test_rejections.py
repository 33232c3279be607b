"""Refused requests over a real server: they leave no memory behind (issue 23, item 7), every
one reaches the log, as a line or in a count of lines held back (item 13), and every name or
path a client gives is checked, NUL and other unprintable characters first, before it reaches
the file system (item 15): INVALID_ARGUMENT naming the field, nothing written."""

import logging
import os
import re
import time

import grpc
import pytest
import requests
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from refused_requests import mismatched_forward_backward, rss_bytes
from server_process import ServerProcess

from cispo.service.log_limits import RateLimitedLog
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

pytestmark = pytest.mark.timeout(300)
MIB = 1 << 20


def eventually(condition, describe, timeout: float = 60) -> None:
    """Wait for `condition()`; AssertionError with `describe()` if it is still false at `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(describe())
        time.sleep(0.2)


@pytest.mark.slow
def test_refused_large_requests_leave_no_memory_behind(tmp_path):
    """120 refused 24 MiB requests: RSS after each answer stays within a few bodies of the idle
    server's, and goes back to within 2 x --max-message-bytes of it (issue 23 measured 0.49 ->
    6.07 GB: each refusal's buffers were held by reference cycles, then by the allocator)."""
    limit = 32 * MIB
    body = mismatched_forward_backward(512, 2048)
    assert 23 * MIB < len(body) < 25 * MIB
    server = ServerProcess("--max-message-bytes", str(limit), checkpoint_dir=tmp_path / "ckpt")
    try:
        with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", limit)]) as channel:
            forward_backward = channel.unary_unary("/cispo.v1.TrainingService/ForwardBackward")
            idle = rss_bytes(server.proc.pid)
            during = []
            for _ in range(120):
                with pytest.raises(grpc.RpcError) as refused:
                    forward_backward(body)
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "advantages: length 2047 != model_input length 2048" in refused.value.details()
                during.append(rss_bytes(server.proc.pid) - idle)
            assert max(during) < 8 * limit, [round(d / MIB) for d in during]
            over_idle = lambda: rss_bytes(server.proc.pid) - idle  # noqa: E731
            eventually(lambda: over_idle() < 2 * limit, lambda: f"RSS {over_idle() / MIB:.0f} MiB over idle")
        assert server.terminate() == 0
        assert "Traceback" not in server.log()
    finally:
        server.kill()


# --- the log of refusals --------------------------------------------------------------------------

TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab"}


def test_every_refusal_reaches_the_log_per_identity_and_error_class(tmp_path):
    """20 refused requests, 5 for each of 2 identities x 2 error classes: each pair has its own
    line, and the lines held back are counted in the log (issue 23: 18 of 20 left no line)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("".join(f"{name}:{token}\n" for name, token in TOKENS.items()))
    server = ServerProcess("--auth-tokens-file", str(tokens), checkpoint_dir=tmp_path / "ckpt")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            classes = {
                ("save_state", "INVALID_ARGUMENT"): (stub.SaveState, pb.SaveStateRequest(name="..")),
                ("optim_step", "NOT_FOUND"): (stub.OptimStep, pb.OptimStepRequest(model_id="no-such-run")),
            }
            for token in TOKENS.values():
                for (_op, code), (method, request) in classes.items():
                    for _ in range(5):
                        with pytest.raises(grpc.RpcError) as refused:
                            method(request, metadata=(("authorization", f"Bearer {token}"),))
                        assert refused.value.code().name == code
        assert server.terminate() == 0  # at exit, the counts of every period still open
    finally:
        server.kill()
    log = server.log()
    for name in TOKENS:
        for op, code in classes:
            who = f"op={op} identity={name} code={code}"
            lines = re.findall(rf"{re.escape(who)}: (?!\d+ similar lines held back)", log)
            held = [int(n) for n in re.findall(rf"{re.escape(who)}: (\d+) similar lines held back in 10 s", log)]
            assert lines and len(lines) + sum(held) == 5, (who, lines, held, log)


class Lines(logging.Handler):
    """The messages a logger writes."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def lines():
    logger = logging.getLogger("test_rejections.limited")
    handler = Lines()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield logger, handler.messages
    logger.removeHandler(handler)


def test_a_held_back_count_is_logged_when_its_period_ends_with_no_line_after_it(lines):
    logger, messages = lines
    limited = RateLimitedLog(logger, period_seconds=2)
    for i in range(3):
        limited.log("a", "refused %d", i)
    assert messages == ["refused 0"]
    eventually(lambda: len(messages) > 1, lambda: messages, timeout=30)
    assert messages == ["refused 0", "a: 2 similar lines held back in 2 s"]


def test_a_held_back_count_is_logged_before_the_next_line_of_any_key(lines):
    logger, messages = lines
    limited = RateLimitedLog(logger, period_seconds=1)
    limited.log("a", "a 1")
    limited.log("a", "a 2")
    limited.log("b", "b 1")
    time.sleep(1.1)  # both periods over, whether or not the timer has fired yet
    limited.log("c", "c 1")
    assert messages == ["a 1", "b 1", "a: 1 similar lines held back in 1 s", "c 1"]
    limited.log("a", "a 3")  # a new period: written at once
    assert messages[-1] == "a 3"


def test_a_held_back_count_is_logged_at_flush(lines):
    logger, messages = lines
    limited = RateLimitedLog(logger, period_seconds=3600)
    for key in ("a", "b", "a", "a"):
        limited.log(key, "line of %s", key)
    limited.flush()
    assert messages == ["line of a", "line of b", "a: 2 similar lines held back in 3600 s"]
    limited.flush()
    assert len(messages) == 3


# --- names and paths ------------------------------------------------------------------------------

BAD_NAMES = ["", ".", "..", "a\x00b", "\x00", "a\nb", "a\x7fb", "a\u2028b", "a/b", "../escape", ".hidden", "x" * 129]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A server with the Tinker HTTP port, its checkpoint and sampler directories."""
    ckpt = tmp_path_factory.mktemp("names") / "ckpt"
    server = ServerProcess("--http-port", "0", checkpoint_dir=ckpt)
    yield server, ckpt, ckpt.parent / "ckpt-sampler"
    assert server.terminate() == 0
    assert "Traceback" not in server.log()


@pytest.fixture
def stub(served):
    with grpc.insecure_channel(served[0].address) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


def refused_field(call, request) -> tuple[str, str]:
    """(field, description) of the one violation an INVALID_ARGUMENT answer names."""
    with pytest.raises(grpc.RpcError) as refused:
        call(request)
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, refused.value.details()
    bad = error_details_pb2.BadRequest()
    [detail] = rpc_status.from_call(refused.value).details
    assert detail.Unpack(bad)
    [violation] = bad.field_violations
    return violation.field, violation.description


def listing(*directories) -> list:
    return [sorted(os.listdir(d)) if os.path.isdir(d) else None for d in directories]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused_naming_the_field_and_nothing_is_written(served, stub, name):
    _, ckpt, sampler = served
    before = listing(ckpt, sampler)
    calls = {
        "SaveState": (stub.SaveState, pb.SaveStateRequest(name=name), "name"),
        "LoadState": (stub.LoadState, pb.LoadStateRequest(name=name), "name"),
        "SaveWeightsForSampler": (stub.SaveWeightsForSampler, pb.SaveWeightsForSamplerRequest(name=name), "name"),
        "CreateModel": (stub.CreateModel, pb.CreateModelRequest(from_state=pb.StateRef(path=name)), "from_state.path"),
        "Sample": (stub.Sample, pb.SampleRequest(prompt=pb.Tensor(int64_data=[1, 2]), model_path=name), "model_path"),
    }
    if not name:
        del calls["Sample"]  # an empty model_path samples the run's current weights
    for method, (call, request, field) in calls.items():
        if "/" in name and method in ("LoadState", "CreateModel", "Sample"):
            field_given, description = refused_field(call, request)  # a path elsewhere
            assert field_given == field and "of this server (its" in description, (method, description)
            continue
        field_given, description = refused_field(call, request)
        assert field_given == field, (method, field_given)
        assert "is not a valid state name: it " in description, (method, description)
    assert listing(ckpt, sampler) == before
    assert stub.GetInfo(pb.GetInfoRequest()).model_name  # still serving


@pytest.mark.parametrize("control", ["\x00", "\x01", "\n", "\x7f", "\x85", "\u2028"])
def test_paths_with_unprintable_characters_are_refused_before_the_file_system(served, stub, control):
    """A path in the right directory but with a NUL (which Path.resolve refuses with ValueError:
    INTERNAL before) or another unprintable character, in every field that takes paths."""
    _, ckpt, sampler = served
    state_path, export_path = f"{ckpt}/a{control}b", f"{sampler}/a{control}b"
    for call, request, field in [
        (stub.LoadState, pb.LoadStateRequest(name=state_path), "name"),
        (stub.CreateModel, pb.CreateModelRequest(from_state=pb.StateRef(path=state_path)), "from_state.path"),
        (stub.Sample, pb.SampleRequest(prompt=pb.Tensor(int64_data=[1, 2]), model_path=export_path), "model_path"),
        (stub.LoadState, pb.LoadStateRequest(name=f"{ckpt}{control}/a"), "name"),
    ]:
        field_given, description = refused_field(call, request)
        assert field_given == field
        assert f"contains the unprintable character {control!r}" in description


def test_a_path_too_long_for_the_file_system_is_refused(stub):
    field, description = refused_field(stub.LoadState, pb.LoadStateRequest(name="a/" * 5000))
    assert field == "name" and "is not a state of this server: it is 10000 characters long" in description


def test_every_request_of_a_stream_is_checked_too(stub, served):
    _, ckpt, _ = served
    requests_ = [
        pb.StreamRequest(request_id="1", load_state=pb.LoadStateRequest(name=f"{ckpt}/a\x00b")),
        pb.StreamRequest(request_id="2", save_state=pb.SaveStateRequest(name="a\x00b")),
    ]
    answers = list(stub.Stream(iter(requests_)))
    assert [a.request_id for a in answers] == ["1", "2"]
    for answer in answers:
        assert answer.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
        assert "unprintable character '\\x00'" in answer.error.message


def test_the_tinker_http_door_refuses_them_too(served):
    server, ckpt, _ = served
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    session = requests.post(f"{base}/create_session", json={}).json()["session_id"]
    answer = requests.post(
        f"{base}/load_weights", json={"session_id": session, "model_seq_id": 0, "path": f"{ckpt}/a\x00b"}
    )
    assert answer.status_code == 400, answer.text
    assert "unprintable character" in answer.json()["error"]
