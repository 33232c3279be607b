"""Training runs over gRPC against a real server: CreateModel, ListModels, UnloadModel, model_id
on every operation, --max-runs, ownership between token identities, isolation of interleaved
runs, and the default run for clients that name none."""

import grpc
import numpy as np
import pytest
from server_process import ServerProcess

from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

ALICE, BOB = "alice-0123456789abcdef", "bob-fedcba9876543210xyz"


def auth(token):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    proc = ServerProcess(
        "--auth-tokens-file", str(tokens), "--max-runs", "3", checkpoint_dir=tmp_path_factory.mktemp("ckpt")
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
def stub(server):
    with grpc.insecure_channel(server.address) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


def batch(model_id, seed, n=12):
    rng = np.random.default_rng(seed)
    datum = pb.Datum(
        model_input=pb.Tensor(int64_data=rng.integers(0, 1024, n).tolist()),
        loss_fn_inputs=pb.LossFnInputs(
            target_tokens=pb.Tensor(int64_data=rng.integers(0, 1024, n).tolist()),
            logprobs=pb.Tensor(float_data=np.full(n, -7.0).tolist()),
            advantages=pb.Tensor(float_data=rng.normal(size=n).tolist()),
        ),
    )
    return pb.ForwardBackwardInput(data=[datum], model_id=model_id, typed_outputs=True)


def step(stub, model_id, seed, token=ALICE):
    out = stub.ForwardBackward(batch(model_id, seed), metadata=auth(token))
    norm = stub.OptimStep(
        pb.OptimStepRequest(adam_params=pb.AdamParams(learning_rate=1e-2), model_id=model_id), metadata=auth(token)
    ).grad_norm
    return list(out.loss_fn_outputs[0].logprobs.float_data), norm


def create(stub, token=ALICE, **lora):
    return stub.CreateModel(pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=4, **lora)), metadata=auth(token))


def unload_all(stub):
    for token in (ALICE, BOB):
        for model in stub.ListModels(pb.ListModelsRequest(), metadata=auth(token)).models:
            stub.UnloadModel(pb.UnloadModelRequest(model_id=model.model_id), metadata=auth(token))


def test_lora_runs_are_isolated_and_interleaved_equal_alone(stub):
    unload_all(stub)
    a = create(stub, seed=1).model_id
    alone = [step(stub, a, i) for i in range(3)]
    stub.UnloadModel(pb.UnloadModelRequest(model_id=a), metadata=auth(ALICE))
    a, b = create(stub, seed=1).model_id, create(stub, seed=2).model_id
    interleaved = []
    for i in range(3):
        interleaved.append(step(stub, a, i))
        step(stub, b, 100 + i)
    assert interleaved == alone  # bit for bit: b's steps changed nothing of a's
    info = stub.GetInfo(pb.GetInfoRequest(model_id=a), metadata=auth(ALICE))
    assert info.model_id == a and info.step == 3 and info.lora_config.rank == 4 and info.num_runs == 2
    assert info.max_runs == 3 and info.base_model == "embedded-tiny-llama"
    listed = stub.ListModels(pb.ListModelsRequest(), metadata=auth(ALICE)).models
    assert {m.model_id for m in listed} == {a, b} and all(m.trainable_bytes > 0 for m in listed)
    unload_all(stub)


def test_limits_ownership_and_conflicts(stub):
    unload_all(stub)
    mine = create(stub).model_id
    theirs = create(stub, BOB).model_id
    create(stub)
    with pytest.raises(grpc.RpcError) as raised:
        create(stub)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "max_runs=3" in raised.value.details()
    for call in (
        lambda: step(stub, theirs, 0),
        lambda: stub.UnloadModel(pb.UnloadModelRequest(model_id=theirs), metadata=auth(ALICE)),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            call()
        assert raised.value.code() == grpc.StatusCode.NOT_FOUND, raised.value.details()
    assert theirs not in {m.model_id for m in stub.ListModels(pb.ListModelsRequest(), metadata=auth(ALICE)).models}
    with pytest.raises(grpc.RpcError) as raised:  # the default full run beside LoRA runs
        stub.ForwardBackward(batch("", 0), metadata=auth(ALICE))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "LoRA" in raised.value.details()
    for bad, field in (
        (pb.CreateModelRequest(base_model="gpt-5", lora_config=pb.LoraConfig()), "base_model"),
        (pb.CreateModelRequest(lora_config=pb.LoraConfig(rank=0)), "lora_config"),
        (
            pb.CreateModelRequest(lora_config=pb.LoraConfig(train_mlp=False, train_attn=False, train_unembed=False)),
            "lora_config",
        ),
    ):
        with pytest.raises(grpc.RpcError) as raised:
            stub.CreateModel(bad, metadata=auth(ALICE))
        assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in raised.value.details()
    with pytest.raises(grpc.RpcError) as raised:
        stub.ForwardBackward(batch("../etc", 0), metadata=auth(ALICE))
    assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "model_id" in raised.value.details()
    assert step(stub, mine, 0)[1] > 0  # still serving
    unload_all(stub)


def test_default_run_and_lora_export_and_state_round_trip(stub):
    unload_all(stub)
    assert stub.GetInfo(pb.GetInfoRequest(), metadata=auth(ALICE)).model_id == ""  # GetInfo makes no run
    step(stub, "", 0)  # the default full run, made on first use
    assert stub.GetInfo(pb.GetInfoRequest(), metadata=auth(ALICE)).model_id == "default"
    with pytest.raises(grpc.RpcError) as raised:
        create(stub)
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "UnloadModel" in raised.value.details()
    stub.UnloadModel(pb.UnloadModelRequest(model_id="default"), metadata=auth(ALICE))
    a = create(stub).model_id
    step(stub, a, 0)
    export = stub.SaveWeightsForSampler(
        pb.SaveWeightsForSamplerRequest(name="alice-a", model_id=a), metadata=auth(ALICE)
    )
    sampled = stub.Sample(
        pb.SampleRequest(
            prompt=pb.Tensor(int64_data=[1, 2, 3]),
            num_samples=2,
            model_path=export.path,
            sampling_params=pb.SamplingParams(max_tokens=4, seed=3),
        ),
        metadata=auth(ALICE),
    )
    on_run = stub.Sample(
        pb.SampleRequest(
            prompt=pb.Tensor(int64_data=[1, 2, 3]),
            num_samples=2,
            model_id=a,
            sampling_params=pb.SamplingParams(max_tokens=4, seed=3),
        ),
        metadata=auth(ALICE),
    )
    assert [s.tokens.raw_data for s in sampled.sequences] == [s.tokens.raw_data for s in on_run.sequences]
    stub.SaveState(pb.SaveStateRequest(name="alice-a-state", model_id=a), metadata=auth(ALICE))
    b = stub.CreateModel(
        pb.CreateModelRequest(from_state=pb.StateRef(path="alice-a-state", with_optimizer=True)), metadata=auth(ALICE)
    )
    assert b.info.step == 1 and b.info.lora_config.rank == 4
    assert step(stub, b.model_id, 5) == step(stub, a, 5)  # same state, same step: same numbers
    unload_all(stub)


def test_service_client_runs_lora_clients_sync_and_pipelined(server, stub):
    import asyncio

    from cispo.client import AdamParams, Datum, ModelInput, NotFoundError, SamplingParams, ServiceClient

    unload_all(stub)
    rng = np.random.default_rng(0)
    data = [
        Datum(
            model_input=ModelInput.from_ints(rng.integers(0, 1024, 10).tolist()),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, 1024, 10),
                "logprobs": np.full(10, -7.0, np.float32),
                "advantages": rng.normal(size=10).astype(np.float32),
            },
        )
    ]
    with ServiceClient(server.address, token=ALICE) as service:
        a = service.create_lora_training_client(rank=4, seed=7)
        b = service.create_lora_training_client(rank=4, seed=7)
        assert a.model_id != b.model_id and a.get_info().lora_rank == 4
        sync = a.forward_backward(data).result()
        a.optim_step(AdamParams(learning_rate=1e-2)).result()

        async def pipelined():
            forward_backward = await b.forward_backward_async(data)
            step = await b.optim_step_async(AdamParams(learning_rate=1e-2))
            return await forward_backward.result_async(), await step.result_async()

        piped, _ = asyncio.run(pipelined())
        assert piped.metrics["loss:sum"] == sync.metrics["loss:sum"]  # same seed, same data
        assert a.get_info().step == 1 and b.get_info().step == 1
        sampler = a.save_weights_and_get_sampling_client()
        sample = sampler.sample(ModelInput.from_ints([1, 2, 3]), 2, SamplingParams(max_tokens=3, seed=1)).result()
        assert len(sample.sequences) == 2
        assert {m.model_id for m in service.list_models()} == {a.model_id, b.model_id}
        service.unload_model(b.model_id)
        with pytest.raises(NotFoundError):
            b.optim_step(AdamParams()).result()
        path = a.save_state("alice-svc").result().path
        resumed = service.create_training_client_from_state_with_optimizer(path)
        assert resumed.get_info().step == 1
    unload_all(stub)
