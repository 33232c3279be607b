"""A Node.js client (@grpc/grpc-js + @grpc/proto-loader) calls ForwardBackward with typed fields,
and Sample with raw and typed answers, and gets what Python gets; its invalid calls get
INVALID_ARGUMENT with the BadRequest field name. It makes, trains, lists and unloads a LoRA
training run, and computes on it what Python computes on a run of the same seed.

The clients are tests/node/{forward_backward,sample,runs}.mjs; their npm packages are installed by
`make test-tools`.
"""

import asyncio
import dataclasses
import json
import os
import shutil
import subprocess
from pathlib import Path

import google.rpc
import grpc
import numpy as np
import pytest
from server_process import ServerProcess
from tls_certs import make_pki

from cispo.client import AdamParams, Datum, ModelInput, SampleResponse, SamplingParams, ServiceClient, TrainingClient
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

pytestmark = pytest.mark.timeout(300)

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "tests" / "node"
FORWARD_BACKWARD = NODE_DIR / "forward_backward.mjs"
SAMPLE = NODE_DIR / "sample.mjs"
RUNS = NODE_DIR / "runs.mjs"
NODE_PACKAGES = ("@grpc/grpc-js", "@grpc/proto-loader", "protobufjs")
# cispo/v1/training.proto, and google/rpc/{status,error_details}.proto from googleapis-common-protos.
INCLUDE_DIRS = (REPO / "protos", Path(next(iter(google.rpc.__path__))).parent.parent)
LOSS_FN_CONFIG = {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}


def to_datums(batch: dict) -> list[Datum]:
    """The JSON batch the Node client reads, as the Python client's Datums."""
    return [
        Datum(
            model_input=ModelInput.from_ints(d["model_input"]),
            loss_fn_inputs={
                "target_tokens": np.asarray(d["target_tokens"], np.int64),
                "logprobs": np.asarray(d["logprobs"], np.float32),
                "advantages": np.asarray(d["advantages"], np.float32),
            },
        )
        for d in batch["data"]
    ]


def make_batch(seed=0, lengths=(5, 9, 4)) -> dict:
    """Token ids and float32-exact floats, so JSON, float_data and raw bytes all carry the same values."""
    rng = np.random.default_rng(seed)
    data = []
    for n in lengths:
        advantages = rng.normal(size=n).astype(np.float32)
        advantages[: n // 3] = 0.0  # prompt tokens
        # Near the embedded model's own logprobs (about -ln(vocab)), spread so some ratios clip.
        logprobs = np.minimum(-7.0 + 1.5 * rng.normal(size=n), -1e-3).astype(np.float32)
        data.append(
            {
                "model_input": rng.integers(0, 1024, n).tolist(),
                "target_tokens": rng.integers(0, 1024, n).tolist(),
                "logprobs": logprobs.tolist(),
                "advantages": advantages.tolist(),
            }
        )
    return {"data": data, "loss_fn": "cispo", "loss_fn_config": LOSS_FN_CONFIG}


@pytest.fixture(scope="module")
def node():
    node_bin = shutil.which("node")
    missing = [p for p in NODE_PACKAGES if not (NODE_DIR / "node_modules" / p / "package.json").is_file()]
    if node_bin is None or missing:
        pytest.fail(
            f"the Node.js client needs node and the npm packages in {NODE_DIR.relative_to(REPO)} "
            f"(missing: {'node' if node_bin is None else ', '.join(missing)}); run `make test-tools`",
            pytrace=False,
        )
    return node_bin


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    yield proc
    assert proc.terminate() == 0


def node_client_process(
    node: str, script: Path, address: str, request: dict, env: dict | None = None
) -> subprocess.CompletedProcess:
    cmd = [node, str(script), address, *(arg for d in INCLUDE_DIRS for arg in ("-I", str(d)))]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("CISPO_")}
    return subprocess.run(
        cmd,
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=NODE_DIR,
        env={**clean, **(env or {})},
    )


def run_node_client(node: str, script: Path, address: str, request: dict, env: dict | None = None) -> dict:
    proc = node_client_process(node, script, address, request, env)
    assert proc.returncode == 0, f"node client failed ({proc.returncode}):\n{proc.stderr}"
    return json.loads(proc.stdout)


def typed_request(batch: dict) -> pb.ForwardBackwardInput:
    return pb.ForwardBackwardInput(
        loss_fn=batch["loss_fn"],
        loss_fn_config=batch["loss_fn_config"],
        data=[
            pb.Datum(
                model_input=pb.Tensor(int64_data=d["model_input"]),
                loss_fn_inputs=pb.LossFnInputs(
                    target_tokens=pb.Tensor(int64_data=d["target_tokens"]),
                    logprobs=pb.Tensor(float_data=d["logprobs"]),
                    advantages=pb.Tensor(float_data=d["advantages"]),
                ),
            )
            for d in batch["data"]
        ],
    )


def test_node_client_matches_python(node, server):
    batch = make_batch()
    from_node = run_node_client(node, FORWARD_BACKWARD, server.address, batch)

    # ForwardBackward adds to the accumulated gradient but leaves the weights alone, so Python's
    # calls on the same server see the same weights. First the raw stub with the same typed fields:
    with grpc.insecure_channel(server.address) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        response = stub.ForwardBackward(typed_request(batch), timeout=60)
    python_metrics = dict(response.metrics)
    python_logprobs = [np.frombuffer(out.logprobs.raw_data, "<f4") for out in response.loss_fn_outputs]
    # then the Python client's Forward, which packs raw little-endian bytes.
    with TrainingClient(server.address) as client:
        result = client.forward(data=to_datums(batch), loss_fn="cispo", loss_fn_config=LOSS_FN_CONFIG).result()

    assert from_node["metrics"]["tokens:sum"] == sum(len(d["model_input"]) for d in batch["data"])
    assert from_node["metrics"]["clipped_high:sum"] > 0  # the batch exercises the clip
    for metrics in (python_metrics, result.metrics):
        assert set(from_node["metrics"]) == set(metrics)
        for key, value in metrics.items():
            assert from_node["metrics"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert len(from_node["logprobs"]) == len(batch["data"])
    for i, d in enumerate(batch["data"]):
        node_lp = np.asarray(from_node["logprobs"][i], np.float32)
        assert node_lp.shape == (len(d["model_input"]),)
        assert np.all(node_lp < 0)
        np.testing.assert_array_equal(node_lp, python_logprobs[i])
        # Forward's head (no gradient) may round differently from ForwardBackward's fused one.
        np.testing.assert_allclose(node_lp, result.loss_fn_outputs[i]["logprobs"].to_numpy(), rtol=1e-6, atol=1e-6)

    invalid = from_node["invalid"]
    assert invalid["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0] == 3
    assert invalid["code_name"] == "INVALID_ARGUMENT"
    assert invalid["status"]["code"] == 3
    n = len(batch["data"][1]["model_input"])
    assert {
        "field": "data[1].loss_fn_inputs.logprobs",
        "description": f"length {n - 1} != model_input length {n}",
    } in invalid["field_violations"]


SAMPLE_REQUEST = {
    "prompt": [1, 5, 9, 2],
    "num_samples": 3,
    "include_prompt_logprobs": True,
    "sampling_params": {"max_tokens": 8, "temperature": 1.0, "seed": 7},
}
# StopReason as Node sees it (enum names), as the Python client gives it.
STOP_REASONS = {"STOP_REASON_LENGTH": "length", "STOP_REASON_STOP": "stop"}


def python_sample(address: str, request: dict) -> SampleResponse:
    """The Python client's answer to the JSON request the Node client reads."""
    params = request["sampling_params"]
    with TrainingClient(address) as client:
        return (
            client.create_sampling_client()
            .sample(
                ModelInput.from_ints(request["prompt"]),
                request["num_samples"],
                SamplingParams(
                    max_tokens=params["max_tokens"],
                    temperature=params["temperature"],
                    seed=params["seed"],
                    stop=params.get("stop_tokens"),
                ),
                include_prompt_logprobs=request["include_prompt_logprobs"],
            )
            .result()
        )


def assert_same_samples(from_node: dict, expected: SampleResponse) -> None:
    """Node's raw and typed answers both hold the Python client's tokens, float32 logprobs and stop reasons."""
    assert from_node["raw"]["fields"] == ["raw_data"]
    assert from_node["typed"]["fields"] == ["float_data", "int64_data"]
    assert expected.prompt_logprobs[0] is None
    for answer in (from_node["raw"], from_node["typed"]):
        assert len(answer["sequences"]) == len(expected.sequences)
        for node_seq, seq in zip(answer["sequences"], expected.sequences):
            assert node_seq["tokens"] == seq.tokens
            np.testing.assert_array_equal(np.float32(node_seq["logprobs"]), np.float32(seq.logprobs))
            assert STOP_REASONS[node_seq["stop_reason"]] == seq.stop_reason
        np.testing.assert_array_equal(np.float32(answer["prompt_logprobs"]), np.float32(expected.prompt_logprobs[1:]))


def test_node_sample_matches_python(node, server):
    from_node = run_node_client(node, SAMPLE, server.address, SAMPLE_REQUEST)
    expected = python_sample(server.address, SAMPLE_REQUEST)
    assert_same_samples(from_node, expected)
    assert [len(seq.tokens) for seq in expected.sequences] == [8, 8, 8]
    assert len(expected.prompt_logprobs) == len(SAMPLE_REQUEST["prompt"])
    assert all(lp < 0 for seq in expected.sequences for lp in seq.logprobs)

    invalid = from_node["invalid"]
    assert invalid["code"] == invalid["status"]["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert invalid["code_name"] == "INVALID_ARGUMENT"
    assert {"field": "sampling_params.top_p", "description": "must be in (0, 1], got 2.0"} in invalid[
        "field_violations"
    ]


def test_node_sample_stop_reasons(node, server):
    """A stop token that sequence 0 draws third ends it there ("stop"); the others run on ("length")."""
    unstopped = python_sample(server.address, SAMPLE_REQUEST).sequences[0].tokens
    request = {
        **SAMPLE_REQUEST,
        "sampling_params": {**SAMPLE_REQUEST["sampling_params"], "stop_tokens": [unstopped[2]]},
    }
    from_node = run_node_client(node, SAMPLE, server.address, request)
    expected = python_sample(server.address, request)
    assert_same_samples(from_node, expected)
    assert (expected.sequences[0].tokens, expected.sequences[0].stop_reason) == (unstopped[:3], "stop")
    assert "length" in {seq.stop_reason for seq in expected.sequences}


LORA = {"rank": 4, "seed": 7, "train_mlp": True, "train_attn": True, "train_unembed": False}
ADAM = AdamParams(learning_rate=1e-2)


async def python_lora_steps(service: ServiceClient, model_id: str, batch: dict):
    """ForwardBackward, OptimStep and Forward on run `model_id`, pipelined by the async API."""
    training, data = service.training_client(model_id), to_datums(batch)
    forward_backward = await training.forward_backward_async(data, loss_fn="cispo", loss_fn_config=LOSS_FN_CONFIG)
    optim_step = await training.optim_step_async(ADAM)
    forward = await training.forward_async(data, loss_fn="cispo", loss_fn_config=LOSS_FN_CONFIG)
    return [await f.result_async() for f in (forward_backward, optim_step, forward)]


def test_node_client_training_runs(node, server):
    batch = make_batch(seed=2, lengths=(6, 5))
    with grpc.insecure_channel(server.address) as channel, ServiceClient(server.address) as service:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        # The other tests here train the default run, a full fine-tune, which excludes LoRA runs.
        if "default" in {m.model_id for m in stub.ListModels(pb.ListModelsRequest(), timeout=60).models}:
            stub.UnloadModel(pb.UnloadModelRequest(model_id="default"), timeout=60)
        try:
            from_node = run_node_client(
                node, RUNS, server.address, {**batch, "lora_config": LORA, "adam_params": dataclasses.asdict(ADAM)}
            )
            # A fresh run of the same LoRA options and seed, from the Python client.
            twin = stub.CreateModel(pb.CreateModelRequest(lora_config=pb.LoraConfig(**LORA)), timeout=60).model_id
            forward_backward, optim_step, forward = asyncio.run(python_lora_steps(service, twin, batch))
            other = stub.CreateModel(
                pb.CreateModelRequest(lora_config=pb.LoraConfig(**{**LORA, "seed": 8})), timeout=60
            ).model_id
            other_forward = asyncio.run(python_lora_steps(service, other, batch))[2]
        finally:  # leave no LoRA run behind for the default run of the other tests
            for model in stub.ListModels(pb.ListModelsRequest(), timeout=60).models:
                stub.UnloadModel(pb.UnloadModelRequest(model_id=model.model_id), timeout=60)

    model_id = from_node["created"]["model_id"]
    assert model_id.startswith("run-") and model_id != twin
    lora = {
        k: (int(v) if k in ("rank", "seed") else v)
        for k, v in from_node["info"]["lora_config"].items()
        if not k.startswith("_")
    }  # proto-loader's oneof markers of the optional fields
    assert lora == LORA
    for info, step in ((from_node["created"]["info"], "0"), (from_node["info"], "1")):
        assert (info["model_id"], info["step"], info["lora_config"]["rank"]) == (model_id, step, "4")
    assert from_node["info"]["base_model"] == "embedded-tiny-llama" and from_node["info"]["num_runs"] == "1"

    # Node's numbers on its run are Python's on a run of the same seed, bit for bit.
    assert from_node["forward_backward"]["metrics"] == forward_backward.metrics
    assert from_node["forward_backward"]["metrics"]["loss:sum"] != 0
    assert (from_node["optim_step"]["grad_norm"], from_node["optim_step"]["step"]) == (optim_step.grad_norm, "1")
    assert optim_step.grad_norm > 0
    assert from_node["forward"]["metrics"] == forward.metrics
    for i, d in enumerate(batch["data"]):
        before = np.asarray(from_node["forward_backward"]["logprobs"][i], np.float32)
        after = np.asarray(from_node["forward"]["logprobs"][i], np.float32)
        assert before.shape == after.shape == (len(d["model_input"]),)
        np.testing.assert_array_equal(before, forward_backward.loss_fn_outputs[i]["logprobs"].to_numpy())
        np.testing.assert_array_equal(after, forward.loss_fn_outputs[i]["logprobs"].to_numpy())
        assert not np.array_equal(before, after)  # the step moved the adapter
        # which another seed draws otherwise, so the equality above is the seed's
        assert not np.array_equal(after, other_forward.loss_fn_outputs[i]["logprobs"].to_numpy())

    [listed] = [m for m in from_node["listed"] if m["model_id"] == model_id]
    assert (listed["lora_config"]["rank"], listed["step"]) == ("4", "1")
    assert listed["trainable_parameters"] == from_node["info"]["num_parameters"] != "0"
    assert from_node["unloaded"] == {"model_id": model_id}
    assert model_id not in {m["model_id"] for m in from_node["listed_after"]}
    for error in from_node["after_unload"].values():
        assert error["code"] == error["status"]["code"] == grpc.StatusCode.NOT_FOUND.value[0]
        assert error["code_name"] == "NOT_FOUND"
        assert error["message"].startswith(f"no training run '{model_id}'"), error["message"]


NODE_TOKEN = "node-client-token-0123456789"


@pytest.fixture(scope="module")
def secure_server(tmp_path_factory):
    """TLS (a CA made here) and a bearer token."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"node:{NODE_TOKEN}\n")
    proc = ServerProcess(
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--auth-tokens-file",
        str(tokens),
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc, pki
    assert proc.terminate() == 0


def test_node_client_with_tls_and_a_token(node, secure_server):
    server, pki = secure_server
    batch = make_batch(seed=1)
    env = {"CISPO_TLS_CA_FILE": str(pki.ca_cert), "CISPO_TOKEN": NODE_TOKEN}
    from_node = run_node_client(node, FORWARD_BACKWARD, server.address, batch, env)
    assert from_node["invalid"]["code_name"] == "INVALID_ARGUMENT"  # authenticated, then validated

    # The Python client over the same TLS channel and token computes the same logprobs.
    with TrainingClient(server.address, token=NODE_TOKEN, root_certificates=pki.ca_cert) as client:
        result = client.forward(data=to_datums(batch), loss_fn="cispo", loss_fn_config=LOSS_FN_CONFIG).result()
    for i in range(len(batch["data"])):
        np.testing.assert_allclose(
            np.asarray(from_node["logprobs"][i], np.float32),
            result.loss_fn_outputs[i]["logprobs"].to_numpy(),
            rtol=1e-6,
            atol=1e-6,
        )

    no_token = node_client_process(
        node, FORWARD_BACKWARD, server.address, batch, {"CISPO_TLS_CA_FILE": str(pki.ca_cert)}
    )
    assert no_token.returncode != 0 and "UNAUTHENTICATED" in no_token.stderr, no_token.stderr
    plaintext = node_client_process(node, FORWARD_BACKWARD, server.address, batch, {"CISPO_TOKEN": NODE_TOKEN})
    assert plaintext.returncode != 0 and "UNAVAILABLE" in plaintext.stderr, plaintext.stderr
