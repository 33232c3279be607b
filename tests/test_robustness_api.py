"""Each class of bad input found by fuzzing, over a real server: a clean status, nothing changed,
the server still serving. Plus exactly-once retries, answers that survive a dying stream, and a
client that resends across a server restart and is refused there."""

import asyncio
import collections
import os
import re
import socket
import subprocess
import sys
import textwrap
import time
import urllib.request

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_process import ServerProcess

from cispo.client import AbortedError, Datum, ModelInput, TrainingClient
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

pytestmark = pytest.mark.timeout(300)
LIMIT = 1 << 20  # the server's --max-message-bytes
METHODS = {
    "GetInfo": pb.GetInfoRequest,
    "Forward": pb.ForwardBackwardInput,
    "ForwardBackward": pb.ForwardBackwardInput,
    "OptimStep": pb.OptimStepRequest,
    "SaveState": pb.SaveStateRequest,
    "LoadState": pb.LoadStateRequest,
}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess("--max-message-bytes", str(LIMIT), checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    yield proc
    assert proc.terminate() == 0
    assert "Traceback" not in proc.log()


@pytest.fixture
def channel(server):
    with grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", 4 * LIMIT)]) as ch:
        yield ch


@pytest.fixture
def stub(channel):
    return training_pb2_grpc.TrainingServiceStub(channel)


def datum(n=5, seed=0, **overrides) -> pb.Datum:
    rng = np.random.default_rng(seed)
    fields = dict(
        model_input=pb.Tensor(int64_data=rng.integers(0, 1024, n).tolist()),
        target_tokens=pb.Tensor(int64_data=rng.integers(0, 1024, n).tolist()),
        logprobs=pb.Tensor(float_data=(-rng.random(n) * 4).tolist()),
        advantages=pb.Tensor(float_data=rng.normal(size=n).tolist()),
    )
    fields.update(overrides)
    model_input = fields.pop("model_input")
    return pb.Datum(model_input=model_input, loss_fn_inputs=pb.LossFnInputs(**fields))


def fb(seed=0, key="") -> pb.ForwardBackwardInput:
    return pb.ForwardBackwardInput(data=[datum(seed=seed), datum(7, seed + 100)], idempotency_key=key)


def rejected(call, *args) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        call(*args)
    return err.value


def violations(error: grpc.RpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        if detail.Unpack(bad):
            out += [(v.field, v.description) for v in bad.field_violations]
    return out


def grad_norm_after(stub) -> float:
    """Step with lr 0 (weights unchanged): the norm of the gradient accumulated so far."""
    return stub.OptimStep(pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=0.0))).grad_norm


def inflight(server) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics").read().decode()
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith("cispo_inflight_requests ")))


@pytest.mark.parametrize("method", METHODS)
def test_undecodable_bodies_are_invalid_argument_naming_the_type(channel, stub, server, method):
    raw = channel.unary_unary(
        f"/cispo.v1.TrainingService/{method}", request_serializer=lambda b: b, response_deserializer=lambda b: b
    )
    for body in (b"\xff\xff\xff\xff", b"\x0a\x05ab", bytes(range(256))):
        err = rejected(raw, body)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (body, err.details())
        assert f"not a valid cispo.v1.{METHODS[method].__name__} message" in err.details()
    assert stub.GetInfo(pb.GetInfoRequest()).vocab_size == 1024


def test_a_corrupt_stream_item_gets_its_own_answer_and_the_stream_goes_on(channel, server):
    stream = channel.stream_stream(
        "/cispo.v1.TrainingService/Stream",
        request_serializer=lambda b: b,
        response_deserializer=pb.StreamResponse.FromString,
    )
    good = pb.StreamRequest(request_id="a", forward=fb()).SerializeToString()
    answers = list(stream(iter([good, b"\xff\xff\xff", good[:-3], good.replace(b"a", b"b", 1)])))
    assert [a.WhichOneof("result") for a in answers] == ["forward", "error", "error", "forward"]
    assert answers[1].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "cispo.v1.StreamRequest" in answers[1].error.message
    assert answers[3].request_id == "b"
    refusals = re.findall(r"(op=\S+ identity=\S+ code=\S+): .*not a valid", server.log())
    assert max(collections.Counter(refusals).values()) <= 2  # one short line per period of each key at most


def test_out_of_range_enum_and_doubles_beyond_float32(stub):
    err = rejected(
        stub.Forward, pb.ForwardBackwardInput(data=[datum(model_input=pb.Tensor(dtype=99, raw_data=b"\0" * 40))])
    )
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err) == [
        ("data[0].model_input.dtype", "raw_data needs dtype INT64, INT32, FLOAT32 or FLOAT64, got 99 (not a DType)")
    ]
    before = grad_norm_after(stub)
    for name in ("advantages", "logprobs"):
        bad = datum(**{name: pb.Tensor(double_data=[-1.0, -1e300, -1.0, -1.0, -1.0])})
        err = rejected(stub.ForwardBackward, pb.ForwardBackwardInput(data=[bad]))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not finite in float32" in violations(err)[0][1]
    assert grad_norm_after(stub) == before == 0.0


@pytest.mark.parametrize(
    "params,code,text",
    [
        (dict(eps=1e-50), "INVALID_ARGUMENT", "rounds to 0"),
        (dict(learning_rate=1e39), "INVALID_ARGUMENT", "finite in float32"),
        (dict(beta1=1.0), "INVALID_ARGUMENT", "[0, 1)"),
        (dict(learning_rate=3e38), "FAILED_PRECONDITION", "would make weights or Adam moments non-finite"),
    ],
)
def test_bad_adam_params_change_nothing(stub, params, code, text):
    stub.ForwardBackward(fb(seed=1))
    info = stub.GetInfo(pb.GetInfoRequest())
    err = rejected(stub.OptimStep, pb.OptimStepRequest(adam_params=pb.AdamParams(**params)))
    assert err.code().name == code and text in err.details()
    assert stub.GetInfo(pb.GetInfoRequest()).step == info.step
    stub.ForwardBackward(fb(seed=1))  # the gradient was kept: it is now twice one batch's
    doubled = stub.OptimStep(pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=0.0))).grad_norm
    stub.ForwardBackward(fb(seed=1))
    assert doubled == pytest.approx(2 * grad_norm_after(stub), rel=1e-5)


def test_long_names_are_invalid_argument_with_a_short_message(stub):
    for call, request in (
        (stub.SaveState, pb.SaveStateRequest(name="x" * 5000)),
        (stub.LoadState, pb.LoadStateRequest(name="y" * 5000)),
        (stub.Forward, pb.ForwardBackwardInput(data=[datum()], loss_fn="z" * 5000)),
        (stub.Forward, pb.ForwardBackwardInput(data=[datum()], loss_fn_config={"k" * 5000: 1.0})),
    ):
        err = rejected(call, request)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, err.details()
        assert len(err.details()) < 1500


def test_too_many_data_are_refused_before_decoding(stub):
    err = rejected(stub.Forward, pb.ForwardBackwardInput(data=[pb.Datum()] * 65537))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_data_per_request=65536" in err.details()
    assert stub.GetInfo(pb.GetInfoRequest()).limits.max_data_per_request == 65536


def test_many_violations_fit_in_the_trailers(stub):
    bad = [datum(model_input=pb.Tensor(int64_data=[5000] * 5)) for _ in range(3000)]
    err = rejected(stub.Forward, pb.ForwardBackwardInput(data=bad))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert len(violations(err)) == 8 and "and 2992 more" in err.details()


def test_a_stream_item_over_the_limit_is_answered_after_the_accepted_ones(channel, stub):
    before = grad_norm_after(stub)
    big = pb.StreamRequest(
        request_id="big",
        forward=pb.ForwardBackwardInput(
            data=[datum(model_input=pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=b"\1" * (LIMIT + 8)))]
        ),
    )
    requests = [
        pb.StreamRequest(request_id="fb", forward_backward=fb(seed=2)),
        big,
        pb.StreamRequest(request_id="info", get_info=pb.GetInfoRequest()),
    ]
    answers = list(stub.Stream(iter(requests)))
    assert [a.request_id for a in answers] == ["fb", "big", "info"]
    assert answers[0].HasField("forward_backward")
    assert answers[1].error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert "max_message_bytes" in answers[1].error.message
    assert before == 0.0 and grad_norm_after(stub) > 0


def test_a_retry_with_the_same_key_applies_once(stub):
    grad_norm_after(stub)
    first = stub.ForwardBackward(fb(seed=3, key="k-once"))
    again = stub.ForwardBackward(fb(seed=3, key="k-once"))
    assert again == first
    once = grad_norm_after(stub)
    stub.ForwardBackward(fb(seed=3))
    assert grad_norm_after(stub) == once
    err = rejected(stub.ForwardBackward, fb(seed=4, key="k-once"))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(err)[0][0] == "idempotency_key"
    err = rejected(stub.ForwardBackward, fb(seed=3, key="k" * 129))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and "at most 128 characters" in err.details()
    step = stub.OptimStep(pb.OptimStepRequest(idempotency_key="s-once"))
    assert stub.OptimStep(pb.OptimStepRequest(idempotency_key="s-once")) == step


def test_a_cancelled_call_still_completes_and_its_retry_gets_the_answer(stub, server):
    grad_norm_after(stub)
    batch = pb.ForwardBackwardInput(data=[datum(600, seed=s) for s in range(8)], idempotency_key="k-cancel")
    future = stub.ForwardBackward.future(batch)
    time.sleep(0.05)
    future.cancel()
    answer = stub.ForwardBackward(batch)  # waits for the running original, or replays it
    once = grad_norm_after(stub)
    assert answer.metrics["tokens:sum"] == 4800
    stub.ForwardBackward(pb.ForwardBackwardInput(data=batch.data))
    assert grad_norm_after(stub) == once
    deadline = time.monotonic() + 10
    while inflight(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inflight(server) == 0


def test_cancelled_streams_leave_no_inflight_requests(stub, server):
    for _ in range(20):
        call = stub.Stream(iter([pb.StreamRequest(request_id="1", forward=fb())] * 3))
        call.cancel()
        future = stub.GetInfo.future(pb.GetInfoRequest())
        future.cancel()
    stub.GetInfo(pb.GetInfoRequest())
    deadline = time.monotonic() + 10
    while inflight(server) != 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert inflight(server) == 0
    assert "ERROR" not in server.log()


def test_a_symlink_in_the_checkpoint_directory_is_a_clean_error(stub, server, tmp_path):
    checkpoint_dir = next(arg for arg in server.proc.args if "ckpt" in str(arg))
    os.symlink(tmp_path, os.path.join(checkpoint_dir, "planted"))
    err = rejected(stub.LoadState, pb.LoadStateRequest(name="planted"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION and "symbolic link" in err.details()
    err = rejected(stub.SaveState, pb.SaveStateRequest(name="planted"))
    assert err.code() in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.INVALID_ARGUMENT)
    assert list(tmp_path.iterdir()) == []


def test_typed_outputs_for_json_clients(stub):
    raw = stub.Forward(fb(seed=5))
    typed = stub.Forward(pb.ForwardBackwardInput(data=fb(seed=5).data, typed_outputs=True))
    for r, t in zip(raw.loss_fn_outputs, typed.loss_fn_outputs):
        assert (
            not t.logprobs.raw_data
            and list(t.logprobs.float_data) == np.frombuffer(r.logprobs.raw_data, "<f4").tolist()
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_client_resends_across_a_server_restart_and_nothing_is_applied_twice_or_silently(tmp_path):
    """SIGTERM drains server A mid-stream; server B comes up on the same port; every future
    resolves: those A accepted with their answers, the rest, resent to B, with AbortedError (B's
    default run began again from the base model, not the state the client saw), and B applies
    none of them."""
    port = str(free_port())
    data = [
        Datum(
            model_input=ModelInput.from_ints(list(range(1, 300))),
            loss_fn_inputs={
                "target_tokens": np.arange(2, 301),
                "logprobs": np.full(299, -1.0, np.float32),
                "advantages": np.ones(299, np.float32),
            },
        )
    ]
    a = ServerProcess("--port", port, "--drain-seconds", "30", checkpoint_dir=tmp_path)
    b = None
    try:
        client = TrainingClient(f"127.0.0.1:{port}", max_retries=8)

        async def submit_all():
            return [await client.forward_backward_async(data) for _ in range(40)]

        futures = asyncio.run(submit_all())
        futures[2].result(60)
        a.proc.send_signal(15)
        assert a.proc.wait(60) == 0
        b = ServerProcess("--port", port, checkpoint_dir=tmp_path)
        results = []
        for future in futures:
            try:
                results.append(future.result(120))
            except AbortedError as exc:
                assert "restored from the base model at step 0 (accumulated 0)" in exc.message  # noqa: PT017  # a future answered by A succeeds
                results.append(None)
        answered = [r for r in results if r is not None]
        assert results == answered + [None] * (40 - len(answered))  # A answered a prefix
        assert all(r.metrics["tokens:sum"] == 299 for r in answered)
        client.close()
        with TrainingClient(b.address) as fresh:
            assert fresh.get_info().version.accumulated == 0
        assert b.terminate() == 0
        accepted = [int(p.log().split("drained: ")[1].split()[0]) for p in (a, b)]
        assert accepted[0] == len(answered) > 0 and accepted[1] == 40 - len(answered) + 1  # and the get_info
    finally:
        a.kill()
        if b is not None:
            b.kill()


def test_a_client_left_open_exits_cleanly(server):
    script = textwrap.dedent(f"""
        import asyncio
        from cispo.client import TrainingClient
        client = TrainingClient("{server.address}")
        client.get_info()
        async def main():
            return [await client.get_info_async() for _ in range(5)]
        asyncio.run(main())
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "Task was destroyed" not in done.stderr and "Exception ignored" not in done.stderr, done.stderr


def test_the_server_tidies_what_a_crashed_save_left_behind(tmp_path):
    leftover = tmp_path / f".tmp-lost-{'0' * 32}"
    leftover.mkdir(parents=True)
    (leftover / "model.safetensors").write_bytes(b"\0" * 1000)  # incomplete: no manifest
    proc = ServerProcess(checkpoint_dir=tmp_path)
    try:
        assert not leftover.exists()
        assert "removed leftover" in proc.log()
    finally:
        assert proc.terminate() == 0


def test_health_watch_answers_on_the_service_port(channel, server):
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()
    assert "Traceback" not in server.log()
