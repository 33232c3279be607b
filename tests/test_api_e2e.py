"""The public API over a real server on loopback: the README snippet, unary vs stream, pipelining,
errors (each followed by a successful call), health, reflection and SIGTERM drain."""

import asyncio
import math
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from server_process import ServerProcess

from cispo.client import (
    AdamParams,
    Datum,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInput,
    ResourceExhaustedError,
    TrainingClient,
    wire,
)
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import AdamParams as EngineAdamParams
from cispo.worker import Engine, EngineConfig, Sample, load_policy_model

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        "--max-tokens-per-request",
        "5000",
        "--max-message-bytes",
        str(4 << 20),
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc
    assert proc.terminate() == 0


@pytest.fixture
def client(server):
    with TrainingClient(server.address) as c:
        yield c


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


def make_data(seed=0, lengths=(7, 12, 3)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        adv = rng.normal(size=n).astype(np.float32)
        adv[: n // 3] = 0.0  # prompt tokens
        data.append(
            Datum(
                model_input=ModelInput.from_ints(rng.integers(0, 1024, n).tolist()),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, 1024, n),
                    "logprobs": (-rng.random(n) * 12).astype(np.float32),
                    "advantages": adv,
                },
            )
        )
    return data


def test_readme_snippet_runs_verbatim(client):
    data = make_data()
    training_client = client

    async def main():
        fwd_bwd_future = await training_client.forward_backward_async(
            data=data, loss_fn="cispo", loss_fn_config={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}
        )
        fwd_bwd_result = await fwd_bwd_future.result_async()
        return fwd_bwd_result

    result = asyncio.run(main())
    assert math.isfinite(result.metrics["loss:sum"])
    assert [o["logprobs"].to_numpy().shape for o in result.loss_fn_outputs] == [(7,), (12,), (3,)]
    client.optim_step(AdamParams()).result()


def test_unary_and_stream_give_identical_results(client, stub):
    data = make_data(1)
    unary = wire.forward_backward_output_from_pb(stub.Forward(wire.forward_backward_input_to_pb(data, "ppo")))

    async def streamed():
        return await (await client.forward_async(data, "ppo")).result_async()

    stream = asyncio.run(streamed())
    assert unary.metrics == stream.metrics
    for a, b in zip(unary.loss_fn_outputs, stream.loss_fn_outputs):
        assert np.array_equal(a["logprobs"].to_numpy(), b["logprobs"].to_numpy())


def test_service_matches_in_process_engine(client, server):
    """Same weights (loaded from a state the server saved) give the same numbers in-process."""
    client.save_state("compare").result()
    engine = Engine(load_policy_model(), EngineConfig(checkpoint_dir=server_checkpoint_dir(server)))
    engine.load_state("compare")
    data = make_data(2)
    expected = engine.forward(to_samples(data))
    got = client.forward(data).result()
    assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-6)
    for o, lp in zip(got.loss_fn_outputs, expected.logprobs):
        np.testing.assert_allclose(o["logprobs"].to_numpy(), lp.numpy(), rtol=1e-6, atol=1e-6)


def server_checkpoint_dir(server) -> Path:
    cmd = server.proc.args
    return Path(cmd[cmd.index("--checkpoint-dir") + 1])


def to_samples(data: list[Datum]) -> list[Sample]:
    """The client's datums as the engine's samples."""
    return [
        Sample(
            torch.tensor(d.model_input.to_ints()),
            {k: torch.from_numpy(np.array(v.to_numpy())) for k, v in d.loss_fn_inputs.items()},
        )
        for d in data
    ]


def test_hundred_pipelined_requests_come_back_in_order(client):
    async def run():
        futures = []
        for i in range(100):
            if i % 10 == 9:
                futures.append(await client.get_info_async())  # an answer: get_info waits, in order
            else:
                futures.append(await client.forward_async(make_data(i, lengths=(i % 7 + 1,))))
        return [f if i % 10 == 9 else await f.result_async() for i, f in enumerate(futures)]

    results = asyncio.run(run())
    for i, r in enumerate(results):
        if i % 10 == 9:
            assert r.vocab_size == 1024
        else:
            assert r.metrics["tokens:sum"] == i % 7 + 1
            assert r.loss_fn_outputs[0]["logprobs"].to_numpy().shape == (i % 7 + 1,)


def test_stream_errors_come_back_per_item_and_the_stream_survives(stub):
    good = pb.Datum(
        model_input=pb.Tensor(int64_data=[1, 2, 3]),
        loss_fn_inputs=pb.LossFnInputs(
            target_tokens=pb.Tensor(int64_data=[2, 3, 4]),
            logprobs=pb.Tensor(float_data=[-1, -2, -3]),
            advantages=pb.Tensor(float_data=[1, 0, -1]),
        ),
    )
    bad = pb.Datum()
    bad.CopyFrom(good)
    bad.loss_fn_inputs.logprobs.float_data.append(-1.0)
    requests = [
        pb.StreamRequest(request_id="a", forward=pb.ForwardBackwardInput(data=[good])),
        pb.StreamRequest(request_id="b", forward_backward=pb.ForwardBackwardInput(data=[good, bad])),
        pb.StreamRequest(request_id="c", forward=pb.ForwardBackwardInput(data=[good], loss_fn="nope")),
        pb.StreamRequest(request_id="d"),
        pb.StreamRequest(request_id="e", load_state=pb.LoadStateRequest(name="missing")),
        pb.StreamRequest(request_id="f", forward=pb.ForwardBackwardInput(data=[good])),
        pb.StreamRequest(request_id="g", get_info=pb.GetInfoRequest()),
    ]
    answers = list(stub.Stream(iter(requests)))
    assert [a.request_id for a in answers] == list("abcdefg")
    kinds = [a.WhichOneof("result") for a in answers]
    assert kinds == ["forward", "error", "error", "error", "error", "forward", "get_info"]
    codes = [a.error.code for a in answers if a.HasField("error")]
    assert codes == [grpc.StatusCode.INVALID_ARGUMENT.value[0]] * 3 + [grpc.StatusCode.FAILED_PRECONDITION.value[0]]
    br = error_details_pb2.BadRequest()
    answers[1].error.details[0].Unpack(br)
    assert [(v.field, v.description) for v in br.field_violations] == [
        ("data[1].loss_fn_inputs.logprobs", "length 4 != model_input length 3")
    ]
    assert answers[0].forward == answers[5].forward


def test_health_and_reflection_answer(server):
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "cispo.v1.TrainingService"):
            assert (
                health.Check(health_pb2.HealthCheckRequest(service=name)).status
                == health_pb2.HealthCheckResponse.SERVING
            )
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        answer = next(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in answer.list_services_response.service}
        assert {"cispo.v1.TrainingService", "grpc.health.v1.Health"} <= names
        answer = next(
            reflection.ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(file_containing_symbol="cispo.v1.TrainingService")])
            )
        )
        assert answer.file_descriptor_response.file_descriptor_proto


def raw_datum(**overrides) -> pb.Datum:
    fields = dict(
        model_input=pb.Tensor(int64_data=[1, 2, 3]),
        target_tokens=pb.Tensor(int64_data=[2, 3, 4]),
        logprobs=pb.Tensor(float_data=[-1, -2, -3]),
        advantages=pb.Tensor(float_data=[1, 0, -1]),
    )
    fields.update(overrides)
    model_input = fields.pop("model_input")
    return pb.Datum(model_input=model_input, loss_fn_inputs=pb.LossFnInputs(**fields))


ERROR_CASES = {
    "token outside vocab": (
        dict(model_input=pb.Tensor(int64_data=[1, 2, 5000])),
        {},
        "INVALID_ARGUMENT",
        "data[1].model_input",
        "outside the vocabulary",
    ),
    "nan advantage": (
        dict(advantages=pb.Tensor(float_data=[1, float("nan"), 0])),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.advantages",
        "not finite",
    ),
    "inf logprob": (
        dict(logprobs=pb.Tensor(double_data=[-1, float("-inf"), -1])),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.logprobs",
        "not finite",
    ),
    "logprob > 0": (
        dict(logprobs=pb.Tensor(float_data=[-1, 0.25, -1])),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.logprobs",
        "must be <= 0",
    ),
    "ragged raw bytes": (
        dict(logprobs=pb.Tensor(dtype=pb.DTYPE_FLOAT32, raw_data=b"\x00" * 11)),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.logprobs.raw_data",
        "not a multiple of the DTYPE_FLOAT32 size 4",
    ),
    "raw without dtype": (
        dict(target_tokens=pb.Tensor(raw_data=b"\x00" * 24)),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.target_tokens.dtype",
        "raw_data needs dtype",
    ),
    "two payloads": (
        dict(advantages=pb.Tensor(float_data=[1, 0, 0], double_data=[1, 0, 0])),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.advantages",
        "exactly one",
    ),
    "length mismatch": (
        dict(logprobs=pb.Tensor(float_data=[-1, -2])),
        {},
        "INVALID_ARGUMENT",
        "data[1].loss_fn_inputs.logprobs",
        "length 2 != model_input length 3",
    ),
    "cap below 1": (
        {},
        {"clip_high_threshold": 0.2},
        "INVALID_ARGUMENT",
        "loss_fn_config.clip_high_threshold",
        "not offsets from 1",
    ),
    "negative floor": (
        {},
        {"clip_low_threshold": -1.0},
        "INVALID_ARGUMENT",
        "loss_fn_config.clip_low_threshold",
        ">= 0",
    ),
    "unknown key": ({}, {"epsilon": 0.2}, "INVALID_ARGUMENT", "loss_fn_config.epsilon", "unknown key"),
    "too many tokens": (
        dict(
            model_input=pb.Tensor(int64_data=[1] * 5000),
            target_tokens=pb.Tensor(int64_data=[1] * 5000),
            logprobs=pb.Tensor(float_data=[-1] * 5000),
            advantages=pb.Tensor(float_data=[1] * 5000),
        ),
        {},
        "RESOURCE_EXHAUSTED",
        None,
        "max_tokens_per_request=5000",
    ),
}


@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_each_error_case_then_a_successful_call(stub, case):
    overrides, config, code, field, text = ERROR_CASES[case]
    before = stub.Forward(pb.ForwardBackwardInput(data=[raw_datum()]))
    with pytest.raises(grpc.RpcError) as err:
        stub.ForwardBackward(pb.ForwardBackwardInput(data=[raw_datum(), raw_datum(**overrides)], loss_fn_config=config))
    assert err.value.code().name == code, err.value.details()
    assert text in err.value.details()
    assert "Traceback" not in err.value.details()
    status = rpc_status.from_call(err.value)
    if field is not None:
        br = error_details_pb2.BadRequest()
        assert status.details[0].Unpack(br)
        assert field in [v.field for v in br.field_violations], br
    after = stub.Forward(pb.ForwardBackwardInput(data=[raw_datum()]))
    assert after == before


def test_errors_change_no_state(server, client):
    """Bad requests between good ones leave the gradient as if they never came."""
    data = make_data(3)
    engine = Engine(load_policy_model(), EngineConfig(checkpoint_dir=server_checkpoint_dir(server)))
    client.save_state("errors-base").result()
    engine.load_state("errors-base")
    client.load_state("errors-base").result()
    client.forward_backward(data).result()
    bad = make_data(4)
    bad[0].loss_fn_inputs["logprobs"] = np.full(bad[0].model_input.length, 0.5, dtype=np.float32)
    with pytest.raises(InvalidArgumentError) as err:
        client.forward_backward(bad).result()
    assert err.value.field_violations[0].field == "data[0].loss_fn_inputs.logprobs"
    with pytest.raises(InvalidArgumentError):
        client.forward_backward(data, "cispo", {"clip_high_threshold": 0.28}).result()
    with pytest.raises(InvalidArgumentError) as err:
        client.optim_step(AdamParams(learning_rate=-1.0)).result()
    assert err.value.field_violations[0].field == "adam_params.learning_rate"
    got = client.optim_step(AdamParams(learning_rate=1e-3)).result()
    engine.forward_backward(to_samples(data))
    expected = engine.optim_step(EngineAdamParams(learning_rate=1e-3))
    assert got.grad_norm == pytest.approx(expected.grad_norm, rel=1e-6)


def test_failed_precondition_and_bad_names(client):
    with pytest.raises(FailedPreconditionError, match="no saved state named 'never-saved'"):
        client.load_state("never-saved").result()
    with pytest.raises(InvalidArgumentError) as err:
        client.save_state("../outside").result()
    assert err.value.field_violations[0].field == "name"
    assert client.get_info().vocab_size == 1024


def test_message_over_the_size_limit_is_resource_exhausted(stub):
    huge = raw_datum(model_input=pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=b"\x01" * (5 << 20)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Forward(pb.ForwardBackwardInput(data=[huge]))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert stub.GetInfo(pb.GetInfoRequest()).limits.max_message_bytes == 4 << 20


def test_client_refuses_oversized_requests_before_sending(server):
    with TrainingClient(server.address, max_message_bytes=1000) as small, pytest.raises(ResourceExhaustedError):
        small.forward(make_data(5, lengths=(400,)))


def test_sigterm_during_a_stream_loses_no_accepted_operation(tmp_path):
    proc = ServerProcess("--drain-seconds", "60", checkpoint_dir=tmp_path)
    requests = [
        pb.StreamRequest(
            request_id=str(i),
            forward_backward=pb.ForwardBackwardInput(
                data=[
                    raw_datum(
                        model_input=pb.Tensor(int64_data=list(range(1, 600))),
                        target_tokens=pb.Tensor(int64_data=list(range(2, 601))),
                        logprobs=pb.Tensor(float_data=[-1.0] * 599),
                        advantages=pb.Tensor(float_data=[1.0] * 599),
                    )
                ]
            ),
        )
        for i in range(200)
    ]
    answered, final = [], None
    with grpc.insecure_channel(proc.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        try:
            for answer in stub.Stream(iter(requests)):
                answered.append(answer)
                if len(answered) == 3:
                    proc.proc.send_signal(15)
        except grpc.RpcError as exc:
            final = exc
    assert proc.proc.wait(60) == 0
    assert final is not None and final.code() == grpc.StatusCode.UNAVAILABLE and "draining" in final.details()
    assert [a.request_id for a in answered] == [str(i) for i in range(len(answered))]
    assert all(a.HasField("forward_backward") for a in answered)
    assert 3 <= len(answered) < 200
    proc.wait_for_log("drained")
    assert f"drained: {len(answered)} operations accepted, {len(answered)} completed" in proc.log()
