"""Sample and SaveWeightsForSampler over a real server: order of operations, the Python
SamplingClient, batching across concurrent requests, errors, idempotent retries."""

import asyncio
import json
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from server_process import ServerProcess

from cispo.client import (
    AdamParams,
    Datum,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInput,
    ResourceExhaustedError,
    SamplingClient,
    SamplingParams,
    TrainingClient,
)
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc
from cispo.worker import AdamParams as EngineAdamParams
from cispo.worker import Engine, EngineConfig, Sample, load_policy_model
from cispo.worker.sampling import SampleRequest as EngineSampleRequest
from cispo.worker.sampling import SamplingParams as EngineSamplingParams

pytestmark = pytest.mark.timeout(300)
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)
PROMPT = [11, 22, 33, 44]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    proc = ServerProcess(
        "--sampler-dir",
        str(root / "sampler"),
        "--sampler-dtype",
        "float32",
        "--max-num-samples",
        "16",
        "--max-sample-tokens",
        "64",
        checkpoint_dir=root / "ckpt",
    )
    proc.sampler_dir = root / "sampler"
    yield proc
    assert proc.terminate() == 0


@pytest.fixture
def client(server):
    with TrainingClient(server.address) as c:
        yield c


def batch(seed: int) -> list[Datum]:
    rng = np.random.default_rng(seed)
    return [
        Datum(
            model_input=ModelInput.from_ints(rng.integers(0, 1024, 16)),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, 1024, 16),
                "logprobs": -rng.random(16).astype(np.float32) * 7,
                "advantages": rng.normal(size=16).astype(np.float32),
            },
        )
        for _ in range(2)
    ]


def local_greedy(engine: Engine) -> list[int]:
    r = engine.validate_sample(
        EngineSampleRequest(torch.tensor(PROMPT), 1, EngineSamplingParams(max_tokens=12, temperature=0.0))
    )
    return engine.sample([r])[0].sequences[0].tokens.tolist()


def test_a_sample_sees_every_earlier_step_and_none_later(client, tmp_path):
    """Pipelined on one stream: sample, forward_backward, optim_step, sample; each sample gives
    exactly what a local engine gives at that point of the same sequence of operations."""
    assert client.get_info().step == 0  # the first test: the server holds the embedded model's seeded weights
    sampler = client.create_sampling_client()
    reference = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))

    async def pipeline():
        before = sampler.sample(ModelInput.from_ints(PROMPT), 1, GREEDY)
        fb = await client.forward_backward_async(batch(1))
        step = await client.optim_step_async(AdamParams(learning_rate=2e-2))
        after = sampler.sample(ModelInput.from_ints(PROMPT), 1, GREEDY)
        return [await f for f in (before, fb, step, after)]

    before, _, _, after = asyncio.run(pipeline())
    assert before.sequences[0].tokens == local_greedy(reference)
    samples = [
        Sample(
            torch.tensor(d.model_input.to_ints()),
            {k: torch.from_numpy(v.to_numpy()) for k, v in d.loss_fn_inputs.items()},
        )
        for d in batch(1)
    ]
    reference.forward_backward(samples)
    reference.optim_step(EngineAdamParams(learning_rate=2e-2))
    assert after.sequences[0].tokens == local_greedy(reference) != before.sequences[0].tokens


def test_saved_weights_stay_as_saved_and_load_in_transformers(client, server):
    sampling = client.save_weights_and_get_sampling_client("frozen").result()
    assert Path(sampling.model_path) == server.sampler_dir.resolve() / "frozen"
    frozen = sampling.sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0]
    client.forward_backward(batch(2)).result()
    client.optim_step(AdamParams(learning_rate=2e-2)).result()
    assert sampling.sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0] == frozen
    assert (
        client.create_sampling_client().sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0] != frozen
    )
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(sampling.model_path)
    generated = model.generate(
        torch.tensor([PROMPT]), max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert generated == frozen.tokens
    # A standalone client on the same path, by name too.
    with SamplingClient(server.address, model_path="frozen") as standalone:
        assert standalone.sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences[0] == frozen


def test_concurrent_requests_match_requests_alone(server):
    prompts = [[i + 1, i + 2, i + 3] for i in range(12)]
    params = [SamplingParams(max_tokens=10, seed=100 + i) for i in range(12)]
    with TrainingClient(server.address) as c:
        sampler = c.create_sampling_client()
        alone = [sampler.sample(ModelInput.from_ints(p), 2, sp).result() for p, sp in zip(prompts, params)]
        futures = [sampler.sample(ModelInput.from_ints(p), 2, sp) for p, sp in zip(prompts, params)]
        together = [f.result() for f in futures]
    for a, b in zip(alone, together):
        assert [s.tokens for s in a.sequences] == [s.tokens for s in b.sequences]
        np.testing.assert_allclose([s.logprobs for s in a.sequences], [s.logprobs for s in b.sequences], atol=1e-5)


def test_compute_logprobs_and_prompt_logprobs(client):
    sampler = client.create_sampling_client()
    logprobs = sampler.compute_logprobs(ModelInput.from_ints(PROMPT)).result()
    assert logprobs[0] is None and len(logprobs) == len(PROMPT)
    n = len(PROMPT) - 1
    trained = client.forward(
        [
            Datum(
                model_input=ModelInput.from_ints(PROMPT[:-1]),
                loss_fn_inputs={"target_tokens": PROMPT[1:], "logprobs": [0.0] * n, "advantages": [0.0] * n},
            )
        ]
    ).result()
    np.testing.assert_allclose(logprobs[1:], trained.loss_fn_outputs[0]["logprobs"].to_numpy(), atol=1e-4)


def details(error: grpc.RpcError):
    status = rpc_status.from_call(error)
    for detail in status.details:
        for kind in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure):
            if detail.Is(kind.DESCRIPTOR):
                message = kind()
                detail.Unpack(message)
                return message
    return None


def test_errors_are_specific_and_the_stream_goes_on(client, server):
    sampler = client.create_sampling_client()
    with pytest.raises(InvalidArgumentError) as info:
        sampler.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(top_p=0.0)).result()
    assert [v.field for v in info.value.field_violations] == ["sampling_params.top_p"]
    with pytest.raises(InvalidArgumentError, match="stop_strings: need a tokenizer"):
        sampler.sample(ModelInput.from_ints(PROMPT), 1, SamplingParams(stop="done")).result()
    with pytest.raises(ResourceExhaustedError, match="max_num_samples=16"):
        sampler.sample(ModelInput.from_ints(PROMPT), 17, SamplingParams(max_tokens=1)).result()
    with pytest.raises(FailedPreconditionError, match="no saved weights named 'absent'"):
        client.create_sampling_client("absent").sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result()
    with pytest.raises(InvalidArgumentError) as info:
        client.create_sampling_client("/etc").sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result()
    assert info.value.field_violations[0].field == "model_path"
    with pytest.raises(InvalidArgumentError, match="not a valid state name"):
        client.save_weights_for_sampler("../escape").result()
    assert sampler.sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result().sequences  # still serving
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as raw:
            stub.Sample(pb.SampleRequest(prompt=pb.Tensor(float_data=[1.5])))
        assert raw.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert details(raw.value).field_violations[0].field == "prompt"
        with pytest.raises(grpc.RpcError) as raw:
            stub.Sample(
                pb.SampleRequest(prompt=pb.Tensor(int64_data=[1]), sampling_params=pb.SamplingParams(max_tokens=10**9))
            )
        assert raw.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert details(raw.value).violations[0].subject == "max_sample_tokens"
        typed = stub.Sample(
            pb.SampleRequest(
                prompt=pb.Tensor(int64_data=PROMPT),
                num_samples=2,
                typed_outputs=True,
                sampling_params=pb.SamplingParams(max_tokens=3, seed=5),
            )
        )
        assert [len(s.tokens.int64_data) for s in typed.sequences] == [3, 3]


def test_a_retried_sample_without_seed_gets_the_same_answer(server):
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        request = pb.SampleRequest(
            prompt=pb.Tensor(int64_data=PROMPT),
            num_samples=3,
            idempotency_key="k-sample-1",
            sampling_params=pb.SamplingParams(max_tokens=8),
        )
        first, again = stub.Sample(request), stub.Sample(request)
        fresh = stub.Sample(
            pb.SampleRequest(
                prompt=pb.Tensor(int64_data=PROMPT), num_samples=3, sampling_params=pb.SamplingParams(max_tokens=8)
            )
        )
    assert first == again and first != fresh


def test_exports_are_owned_and_recorded(server):
    manifest = json.loads((server.sampler_dir / "frozen" / "manifest.json").read_text())
    assert manifest["format"] == "cispo.sampler_weights.v1" and manifest["owner"] is None
    assert "op=save_weights_for_sampler" in server.log()


def mutated_sample_bodies(rng: np.random.Generator, count: int) -> list[bytes]:
    """Good SampleRequest bodies with random fields set to odd values, truncated or bit-flipped."""
    odd_values = {
        "num_samples": [0, -1, 2**40, 17],
        "max_tokens": [0, -5, 2**62, 5000],
        "temperature": [-1.0, float("nan"), float("inf"), 1e300, 0.0],
        "top_k": [-2, 2**62, 0],
        "top_p": [0.0, -0.1, 1.5, float("nan")],
        "seed": [-(2**63), 2**63 - 1],
        "stop_tokens": [[-1], [2**40], [5]],
        "stop_strings": [["x"], [""]],
        "model_path": ["../x", "/", "a" * 5000, "nope", ".tmp-x"],
        "prompt": [
            pb.Tensor(float_data=[1.0]),
            pb.Tensor(int64_data=[]),
            pb.Tensor(int64_data=[-3]),
            pb.Tensor(int64_data=[10**6]),
            pb.Tensor(dtype=99, raw_data=b"\x00" * 8),
            pb.Tensor(dtype=pb.DTYPE_INT64, raw_data=b"\x01" * 7),
            pb.Tensor(int64_data=[1] * 5000),
        ],
    }
    bodies = []
    for _ in range(count):
        message = pb.SampleRequest(
            prompt=pb.Tensor(int64_data=PROMPT), num_samples=2, sampling_params=pb.SamplingParams(max_tokens=3, seed=1)
        )
        for name in rng.choice(list(odd_values), size=rng.integers(1, 3), replace=False):
            value = odd_values[name][rng.integers(len(odd_values[name]))]
            target = message.sampling_params if name in pb.SamplingParams.DESCRIPTOR.fields_by_name else message
            if isinstance(value, list):
                getattr(target, name).extend(value)
            elif isinstance(value, pb.Tensor):
                target.prompt.CopyFrom(value)
            else:
                setattr(target, name, value)
        body = bytearray(message.SerializeToString())
        kind = rng.integers(3)
        if kind == 1:
            body = body[: rng.integers(len(body))]
        elif kind == 2:
            body[rng.integers(len(body))] ^= 1 << int(rng.integers(8))
        bodies.append(bytes(body))
    return bodies


def test_fuzzed_sample_requests_get_clear_errors_and_change_nothing(server):
    allowed = {
        grpc.StatusCode.OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.FAILED_PRECONDITION,
    }
    with TrainingClient(server.address) as c:
        before = c.create_sampling_client().sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result()
        step = c.get_info().step
    codes = {}
    with grpc.insecure_channel(server.address) as channel:
        call = channel.unary_unary(
            "/cispo.v1.TrainingService/Sample",
            request_serializer=lambda b: b,
            response_deserializer=pb.SampleResponse.FromString,
        )
        for body in mutated_sample_bodies(np.random.default_rng(2026), 200):
            try:
                call(body, timeout=60)
                code = grpc.StatusCode.OK
            except grpc.RpcError as error:
                code = error.code()
                assert error.details(), body  # noqa: PT017  # a mutated body may also be valid
            assert code in allowed, (code, body)
            codes[code] = codes.get(code, 0) + 1
    assert codes.get(grpc.StatusCode.INVALID_ARGUMENT, 0) > 100 and len(codes) >= 3, codes
    with TrainingClient(server.address) as c:
        assert c.create_sampling_client().sample(ModelInput.from_ints(PROMPT), 1, GREEDY).result() == before
        assert c.get_info().step == step
    assert "Traceback" not in server.log()
