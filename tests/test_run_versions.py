"""Run versions (reference/run-state.md): every answer carries its run's version, counted right
(a failure that drops the gradient empties the count); a request that expects another step or
accumulation is FAILED_PRECONDITION; after a restart the client's next and resent operations
are ABORTED (AbortedError; 410 over the Tinker HTTP door) and nothing is applied, while a fresh
client works; a raw request without a version keeps working, unless its connection saw an
earlier incarnation of the run."""

import os
import signal
import socket

import grpc
import numpy as np
import pytest
import requests
import torch
from reference import make_samples
from server_process import ServerProcess

from cispo.client import AbortedError, AdamParams, Datum, ModelInput, ServiceClient, TrainingClient
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import EngineConfig, InvalidInput, Sample, load_policy_model
from cispo.worker.runs import DEFAULT_RUN, ExpectedVersion, TrainingRuns

pytestmark = pytest.mark.timeout(300)
DATA = [
    Datum(
        model_input=ModelInput.from_ints([3, 1, 4, 1, 5, 9]),
        loss_fn_inputs={
            "target_tokens": np.array([1, 4, 1, 5, 9, 2]),
            "logprobs": np.full(6, -1.0, np.float32),
            "advantages": np.ones(6, np.float32),
        },
    )
]
RESTORED = r"run 'default' was restored from the base model at step 0 \(accumulated 0\)"
RESUME = "it no longer holds the state you last saw; resume from your last saved state"


@pytest.mark.parametrize("accumulation", ["exact", "in-place"])
def test_the_accumulation_counts_what_the_gradient_holds(tmp_path, accumulation):
    """A forward_backward that fails keeps the count where the gradient is kept (exact
    accumulation), and empties it where the gradient is dropped (in place)."""
    runs = TrainingRuns(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, gradient_accumulation=accumulation))
    nothing = ExpectedVersion()

    def forward_backward(samples):
        return runs.apply("", None, nothing, "forward_backward", lambda engine: engine.forward_backward(samples))[1]

    assert forward_backward(make_samples([6, 4], seed=0)).accumulated == 1
    assert forward_backward(make_samples([5], seed=1)).accumulated == 2
    [sample] = make_samples([6], seed=2)
    huge = Sample(sample.model_input, {**sample.loss_fn_inputs, "advantages": torch.full((6,), 3e38)})
    with pytest.raises(InvalidInput, match="not finite"):
        forward_backward([huge])
    assert runs.info(DEFAULT_RUN, None).version.accumulated == (2 if accumulation == "exact" else 0)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    yield proc
    assert proc.terminate() == 0
    assert "Traceback" not in proc.log()


def connect(address: str) -> grpc.Channel:
    """A channel with a connection of its own (channels alike share one by default)."""
    return grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])


def fb_request(**fields) -> pb.ForwardBackwardInput:
    datum = pb.Datum(
        model_input=pb.Tensor(int64_data=[3, 1, 4, 1, 5, 9]),
        loss_fn_inputs=pb.LossFnInputs(
            target_tokens=pb.Tensor(int64_data=[1, 4, 1, 5, 9, 2]),
            logprobs=pb.Tensor(float_data=[-1.0] * 6),
            advantages=pb.Tensor(float_data=[1.0] * 6),
        ),
    )
    return pb.ForwardBackwardInput(data=[datum], **fields)


def drop_default_run(address: str) -> None:
    with connect(address) as channel:
        try:
            training_pb2_grpc.TrainingServiceStub(channel).UnloadModel(pb.UnloadModelRequest(model_id="default"))
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.NOT_FOUND  # noqa: PT017  # dropping a run that is not there is fine


def counts(answer) -> tuple[int, int]:
    return answer.version.step, answer.version.accumulated


def test_every_answer_carries_the_run_version(server):
    drop_default_run(server.address)
    with TrainingClient(server.address) as client:
        answers = [
            client.forward_backward(DATA).result(),
            client.forward_backward(DATA).result(),
            client.forward(DATA).result(),
            client.optim_step(AdamParams(learning_rate=1e-3)).result(),
        ]
        saved = client.save_state("versions").result()
        answers += [
            saved,
            client.forward_backward(DATA).result(),
            client.create_sampling_client().sample(ModelInput.from_ints([3, 1]), 1).result(),
            client.save_weights_for_sampler("versions").result(),
            client.get_info(),
            client.load_state_with_optimizer(saved.path).result(),
            client.load_state(saved.path).result(),
        ]
    assert [counts(a) for a in answers] == [
        (0, 1),
        (0, 2),
        (0, 2),
        (1, 0),
        (1, 0),
        (1, 1),
        (1, 1),
        (1, 1),
        (1, 1),
        (1, 0),
        (0, 0),
    ]
    assert answers[3].step == saved.step == 1
    incarnations = {a.version.incarnation for a in answers}
    assert len(incarnations) == 1 and len(incarnations.pop()) == 16

    drop_default_run(server.address)
    with ServiceClient(server.address) as service:
        lora = service.create_lora_training_client(rank=4)
        created = lora.get_info().version
        assert counts(lora.forward_backward(DATA).result()) == (0, 1)
        assert (created.step, created.accumulated) == (0, 0) and created.incarnation not in {
            a.version.incarnation for a in answers
        }
        service.unload_model(lora.model_id)


def test_a_request_expecting_another_step_or_accumulation_is_refused(server):
    drop_default_run(server.address)
    with connect(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        incarnation = stub.ForwardBackward(fb_request()).version.incarnation
        for expected, wanted in [
            (dict(step=3), "expects step 3"),
            (dict(accumulated=2), "expects accumulated 2"),
            (dict(step=0, accumulated=5), "expects step 0 and accumulated 5"),
        ]:
            with pytest.raises(grpc.RpcError) as raised:
                stub.OptimStep(pb.OptimStepRequest(expected_version=pb.RunVersion(incarnation=incarnation, **expected)))
            assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert raised.value.details() == f"run 'default' is at step 0 (accumulated 1), but the request {wanted}"
        with pytest.raises(grpc.RpcError) as raised:
            stub.OptimStep(pb.OptimStepRequest(expected_version=pb.RunVersion(incarnation="0" * 16)))
        assert raised.value.code() == grpc.StatusCode.ABORTED
        assert raised.value.details() == (
            "run 'default' was restored from the base model at step 0 (accumulated 0), "
            f"and is now at step 0 (accumulated 1); {RESUME}"
        )
        step = stub.OptimStep(
            pb.OptimStepRequest(expected_version=pb.RunVersion(incarnation=incarnation, step=0, accumulated=1))
        )
        assert step.step == 1 and counts(step) == (1, 0)  # nothing refused was applied
        assert counts(stub.ForwardBackward(fb_request())) == (1, 1)  # and a request without a version is
        info = stub.GetInfo(pb.GetInfoRequest())
        assert counts(info) == (1, 1) and info.version.incarnation == incarnation


def test_a_connection_that_saw_an_earlier_incarnation_is_refused_until_it_reconnects(server):
    """The default run unloaded and made again: a raw client (no version) whose connection
    trained the old one is ABORTED on the new one; other connections, and new ones, are not."""
    drop_default_run(server.address)
    with connect(server.address) as old, connect(server.address) as other:
        old_stub, other_stub = (training_pb2_grpc.TrainingServiceStub(c) for c in (old, other))
        assert counts(old_stub.ForwardBackward(fb_request())) == (0, 1)
        other_stub.UnloadModel(pb.UnloadModelRequest(model_id="default"))
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as raised:
                old_stub.ForwardBackward(fb_request())
            assert raised.value.code() == grpc.StatusCode.ABORTED
            assert raised.value.details() == (
                f"run 'default' was restored from the base model at step 0 (accumulated 0); {RESUME}"
            )
        assert counts(other_stub.ForwardBackward(fb_request())) == (0, 1)
        assert old_stub.Forward(fb_request()).version.accumulated == 1  # reading is not refused
    with connect(server.address) as new:
        assert counts(training_pb2_grpc.TrainingServiceStub(new).ForwardBackward(fb_request())) == (0, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_after_a_restart_the_client_is_refused_and_nothing_is_applied(tmp_path):
    """The default run trained to step 3; the server stopped with a forward_backward and a step
    in flight, killed, and started again on the same ports. The resent operations and the next
    ones are ABORTED, naming what the run holds; the new server's run stays at step 0; a fresh
    client trains it. Over HTTP, a Tinker model id of the old server is 410 with that message."""
    ports = ("--port", str(free_port()), "--http-port", str(free_port()))
    a = ServerProcess(*ports, checkpoint_dir=tmp_path)
    b = None
    try:
        http = f"http://127.0.0.1:{a.http_port}/api/v1"
        session = requests.post(f"{http}/create_session", json={}).json()["session_id"]
        created = requests.post(
            f"{http}/create_model", json={"session_id": session, "model_seq_id": 0, "lora_config": {"rank": 4}}
        ).json()
        tinker_model = requests.post(f"{http}/retrieve_future", json=created).json()["model_id"]
        with connect(a.address) as channel:  # its LoRA run out of the way of the full default run
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            (run,) = stub.ListModels(pb.ListModelsRequest()).models
            stub.UnloadModel(pb.UnloadModelRequest(model_id=run.model_id))
        client = TrainingClient(a.address, wait_for_ready=True)
        for _ in range(3):
            client.forward_backward(DATA)
            client.optim_step(AdamParams(learning_rate=1e-3))
        before = client.get_info().version
        assert (before.step, before.accumulated) == (3, 0)

        os.kill(a.proc.pid, signal.SIGSTOP)  # these two are sent and never answered
        in_flight = [client.forward_backward(DATA), client.optim_step(AdamParams(learning_rate=1e-3))]
        a.kill()
        b = ServerProcess(*ports, checkpoint_dir=tmp_path)
        next_ones = [client.forward_backward(DATA), client.optim_step(AdamParams(learning_rate=1e-3))]
        for future in in_flight + next_ones:
            with pytest.raises(AbortedError, match=f"^ABORTED: {RESTORED}; {RESUME}$"):
                future.result(120)
        with pytest.raises(AbortedError):
            client.save_state("after-restart").result(120)
        client.close()

        with TrainingClient(b.address) as fresh:
            now = fresh.get_info().version
            assert (now.step, now.accumulated) == (0, 0) and now.incarnation != before.incarnation
            fresh.forward_backward(DATA)
            assert counts(fresh.optim_step(AdamParams(learning_rate=1e-3)).result()) == (1, 0)

        gone = requests.post(
            f"http://127.0.0.1:{b.http_port}/api/v1/optim_step",
            json={"model_id": tinker_model, "seq_id": 1, "adam_params": {"learning_rate": 1e-3}},
        )
        assert gone.status_code == 410 and gone.json()["code"] == "ABORTED" and RESUME in gone.json()["error"]
        assert b.terminate() == 0
        assert "Traceback" not in b.log()
    finally:
        a.kill()
        if b is not None:
            b.kill()
