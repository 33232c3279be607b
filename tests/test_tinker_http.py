"""The official tinker SDK, unmodified, against a live server's --http-port: a loop that uses only
`import tinker` gives bit for bit what the same operations give over gRPC; parallel chunks
accumulate into one gradient; two SDK clients at once equal each alone; bad input raises the
SDK's BadRequestError with cispo's field violation; the API key maps to the token identities;
unknown and hosted-only routes answer JSON errors; HTTP requests appear in the metrics."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from server_process import ServerProcess

import cispo.client as cispo

pytestmark = pytest.mark.timeout(300)
SCRIPT = Path(__file__).with_name("tinker_sdk_loop.py")
ALICE, BOB = "alice-tinker-0123456789", "bob-tinker-9876543210ab"
sys.path.insert(0, str(SCRIPT.parent))
import tinker_sdk_loop as loop_script  # noqa: E402 - its batches (tinker.Datum, which cispo's client takes)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tokens = tmp_path_factory.mktemp("tokens") / "tokens"
    tokens.write_text(f"alice:{ALICE}\nbob:{BOB}\n")
    sampler_dir = tmp_path_factory.mktemp("sampler")
    proc = ServerProcess(
        "--http-port",
        "0",
        "--auth-tokens-file",
        str(tokens),
        "--sampler-dtype",
        "float32",
        "--sampler-dir",
        str(sampler_dir),
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    proc.sampler_dir = sampler_dir
    yield proc
    assert proc.terminate() == 0, proc.log()


def run_sdk(server, mode: str, token: str = ALICE) -> dict:
    env = {
        **os.environ,
        "TINKER_BASE_URL": f"http://127.0.0.1:{server.http_port}",
        "TINKER_API_KEY": f"tml-{token}",
        "TINKER_TELEMETRY": "0",
    }
    done = subprocess.run([sys.executable, str(SCRIPT), mode, ""], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def grpc_train(run, seed: int, steps: int, n: int = 4) -> dict:
    out = {"loss": [], "logprobs": [], "grad_norm": []}
    for step in range(steps):
        fwd_bwd = run.forward_backward(loop_script.batch(seed + step, n), "cispo", loop_script.CONFIG)
        optim = run.optim_step(cispo.AdamParams(learning_rate=1e-2))
        result = fwd_bwd.result()
        out["loss"].append(result.metrics["loss:sum"])
        out["logprobs"].append([o["logprobs"].to_numpy().tolist() for o in result.loss_fn_outputs])
        out["grad_norm"].append(optim.result().grad_norm)
    return out


def test_the_sdk_loop_equals_the_same_operations_over_grpc(server):
    sdk = run_sdk(server, "loop")
    assert sdk["lora_rank"] == 4 and ":train:" in sdk["model_id"]
    with cispo.ServiceClient(server.address, token=ALICE) as service:
        run = service.create_lora_training_client(rank=4, seed=11)
        grpc = grpc_train(run, 100, 2)
        after = run.forward(loop_script.batch(200), "cispo", loop_script.CONFIG).result()
        sampled = (
            run.save_weights_and_get_sampling_client()
            .result()
            .sample(cispo.ModelInput.from_ints([5, 6, 7]), 2, cispo.SamplingParams(max_tokens=5, seed=3))
            .result()
        )
        big = grpc_train(run, 300, 1, n=loop_script.BIG)
        service.unload_model(run.model_id)
    assert sdk["loss"] == grpc["loss"] and sdk["logprobs"] == grpc["logprobs"]  # bit for bit
    assert sdk["grad_norm"] == pytest.approx(grpc["grad_norm"], rel=1e-6)
    assert sdk["after"] == [o["logprobs"].to_numpy().tolist() for o in after.loss_fn_outputs]
    assert sdk["resumed"] == sdk["after"]  # create_training_client_from_state(save_state's path)
    assert sdk["state_path"].startswith("tinker://run-") and sdk["state_path"].endswith("/weights/sdk-state")
    assert [s["tokens"] for s in sdk["samples"]] == [s.tokens for s in sampled.sequences]
    np.testing.assert_allclose(
        [s["logprobs"] for s in sdk["samples"]], [s.logprobs for s in sampled.sequences], atol=1e-6
    )
    assert sdk["named_samples"] == [s["tokens"] for s in sdk["samples"]]  # a named export of the same weights
    # Three chunks sent in parallel accumulate into one gradient, as one gRPC request does.
    assert sdk["big_batch"]["grad_norm"] == pytest.approx(big["grad_norm"], rel=1e-5)
    assert sdk["big_batch"]["loss"] == pytest.approx(big["loss"], rel=1e-5)
    np.testing.assert_allclose(
        np.concatenate(sdk["big_batch"]["logprobs"][0]),  # packed otherwise: float order
        np.concatenate(big["logprobs"][0]),
        rtol=1e-5,
        atol=1e-5,
    )
    assert sdk["error"]["type"] == "BadRequestError"
    assert "data[0].loss_fn_inputs.target_tokens: length 3 != model_input length 2" in sdk["error"]["message"]


def test_two_sdk_clients_at_once_equal_each_alone(server):
    result = run_sdk(server, "concurrent")
    assert result["together"] == result["alone"]


def test_api_keys_map_to_the_token_identities(server):
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    refused = requests.post(f"{base}/create_session", json={}, headers={"X-API-Key": "tml-nobody-at-all-12345"})
    assert refused.status_code == 401 and "API key" in refused.json()["error"]
    alice = {"X-API-Key": f"tml-{ALICE}"}
    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    future = requests.post(
        f"{base}/create_model",
        headers=alice,
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 4}},
    ).json()
    result = requests.post(f"{base}/retrieve_future", headers=alice, json={"request_id": future["request_id"]}).json()
    model_id = result["model_id"]
    bob = {"X-API-Key": f"tml-{BOB}"}
    assert requests.post(f"{base}/get_info", headers=bob, json={"model_id": model_id}).status_code == 404
    assert (
        requests.post(f"{base}/retrieve_future", headers=bob, json={"request_id": future["request_id"]}).status_code
        == 410
    )
    assert requests.post(f"{base}/get_info", headers=alice, json={"model_id": model_id}).json()["lora_rank"] == 4
    assert requests.post(f"{base}/sessions/{session}/finish", headers=alice, json={}).status_code == 200
    with cispo.ServiceClient(server.address, token=ALICE) as service:
        assert service.list_models() == []  # finishing the session unloaded its run


def test_errors_unknown_and_hosted_routes(server):
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    alice = {"X-API-Key": f"tml-{ALICE}"}
    unknown = requests.post(f"{base}/no_such_route", json={}, headers=alice)
    assert unknown.status_code == 404 and "no route" in unknown.json()["error"]
    hosted = requests.post(f"{base}/create_custom_loss", json={}, headers=alice)
    assert hosted.status_code == 400 and "not supported by cispo" in hosted.json()["error"]
    garbage = requests.post(f"{base}/forward_backward", data=b"\xff" * 17, headers=alice)
    assert garbage.status_code == 400 and "ForwardBackwardRequest" in garbage.json()["error"]
    not_json = requests.post(f"{base}/optim_step", data=b"{", headers=alice)
    assert not_json.status_code == 400
    missing = requests.post(f"{base}/optim_step", json={"model_id": "nope:train:0", "seq_id": 1}, headers=alice)
    assert missing.status_code == 404
    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    no_lora = requests.post(
        f"{base}/create_model",
        headers=alice,
        json={"session_id": session, "model_seq_id": 0, "base_model": "someone/else"},
    )
    assert no_lora.status_code == 400
    wrong_base = requests.post(
        f"{base}/create_model",
        headers=alice,
        json={"session_id": session, "model_seq_id": 0, "base_model": "someone/else", "lora_config": {"rank": 4}},
    )
    assert wrong_base.status_code == 400 and wrong_base.json()["field_violations"][0]["field"] == "base_model"
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    assert 'cispo_http_requests_total{route="create_custom_loss",status="400"} 1.0' in metrics
    assert 'cispo_http_requests_total{route="forward_backward",status="200"}' in metrics


def test_a_repeated_idempotency_key_applies_once(server):
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    alice = {"X-API-Key": f"tml-{ALICE}"}

    def result(future):
        return requests.post(f"{base}/retrieve_future", headers=alice, json={"request_id": future["request_id"]}).json()

    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    model_id = result(
        requests.post(
            f"{base}/create_model",
            headers=alice,
            json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 4}},
        ).json()
    )["model_id"]
    data = loop_script.batch(7)
    fwd_bwd = requests.post(
        f"{base}/forward_backward",
        headers={**alice, "Content-Type": "application/x-protobuf"},
        data=forward_backward_body(model_id, 1, data),
    ).json()
    assert fwd_bwd["model_id"] == model_id
    step = {"model_id": model_id, "seq_id": 2, "adam_params": {"learning_rate": 1e-2}}
    once = [
        result(requests.post(f"{base}/optim_step", json=step, headers={**alice, "X-Idempotency-Key": "step-1"}).json())
        for _ in range(2)
    ]
    assert once[0] == once[1] and once[0]["metrics"]["step:max"] == 1.0 and once[0]["metrics"]["grad_norm:max"] > 0
    again = result(requests.post(f"{base}/optim_step", json={**step, "seq_id": 3}, headers=alice).json())
    assert again["metrics"]["step:max"] == 2.0  # the repeat was not a step; this one is
    assert requests.post(f"{base}/sessions/{session}/finish", headers=alice, json={}).status_code == 200


def forward_backward_body(model_id: str, seq_id: int, data) -> bytes:
    """A forward_backward body exactly as the SDK builds it."""
    from tinker import types
    from tinker.proto.request_conv import forward_backward_request_to_proto

    request = types.ForwardBackwardRequest(
        forward_backward_input=types.ForwardBackwardInput(data=data, loss_fn="cispo"), model_id=model_id, seq_id=seq_id
    )
    return forward_backward_request_to_proto(request).SerializeToString()


FUZZ_ROUTES = (
    "create_session",
    "session_heartbeat",
    "create_model",
    "get_info",
    "forward_backward",
    "optim_step",
    "save_weights",
    "load_weights",
    "save_weights_for_sampler",
    "create_sampling_session",
    "asample",
    "retrieve_future",
    "client/config",
)


def fuzz_value(rng, depth=0):
    makers = [
        lambda: None,
        lambda: True,
        lambda: int(rng.integers(-(2**40), 2**40)),
        lambda: float(rng.normal() * 1e6),
        lambda: "x" * int(rng.integers(0, 300)),
        lambda: "tinker://a/b",
        lambda: [fuzz_value(rng, depth + 1) for _ in range(int(rng.integers(0, 4)))],
        lambda: {str(k): fuzz_value(rng, depth + 1) for k in rng.choice(FIELDS, int(rng.integers(0, 5)))},
    ]
    return makers[int(rng.integers(0, 8 if depth < 2 else 6))]()


FIELDS = [
    "session_id",
    "model_id",
    "seq_id",
    "model_seq_id",
    "base_model",
    "lora_config",
    "adam_params",
    "path",
    "optimizer",
    "sampling_session_id",
    "sampling_session_seq_id",
    "num_samples",
    "prompt",
    "sampling_params",
    "request_id",
    "rank",
    "chunks",
    "tokens",
    "max_tokens",
    "stop",
    "kind",
    "prompt_logprobs",
]


def test_fuzzed_bodies_get_client_errors_and_the_server_keeps_serving(server):
    """Random JSON (and bytes) to every route: answers are 2xx/4xx with a JSON error, never a 5xx,
    and a real loop still works afterwards."""
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    alice = {"X-API-Key": f"tml-{ALICE}"}
    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    created = requests.post(
        f"{base}/create_model",
        headers=alice,
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 4}},
    ).json()
    model_id = requests.post(f"{base}/retrieve_future", headers=alice, json=created).json()["model_id"]
    export = requests.post(
        f"{base}/save_weights_for_sampler", headers=alice, json={"model_id": model_id, "seq_id": 1, "path": "fuzzed"}
    ).json()
    export_path = requests.post(f"{base}/retrieve_future", headers=alice, json=export).json()["path"]
    sampler = requests.post(
        f"{base}/create_sampling_session",
        headers=alice,
        json={"session_id": session, "sampling_session_seq_id": 0, "model_path": export_path},
    ).json()
    valid = {
        "session_id": session,
        "model_id": model_id,
        "sampling_session_id": sampler["sampling_session_id"],
        "request_id": created["request_id"],
    }
    rng = np.random.default_rng(0)
    for i in range(300):
        route = FUZZ_ROUTES[i % len(FUZZ_ROUTES)]
        body = {str(k): fuzz_value(rng) for k in rng.choice(FIELDS, int(rng.integers(0, 6)))}
        body.update({k: v for k, v in valid.items() if rng.random() < 0.5})
        if rng.random() < 0.2:
            answer = requests.post(f"{base}/{route}", data=rng.bytes(int(rng.integers(0, 200))), headers=alice)
        else:
            answer = requests.post(f"{base}/{route}", json=body, headers=alice)
        assert answer.status_code < 500, (route, body, answer.text)
        if answer.status_code >= 400:
            assert "error" in answer.json(), (route, answer.text)
    assert run_sdk(server, "concurrent")["together"]  # still serving


def test_ephemeral_exports_are_pruned_and_removed_with_their_session(server):
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    alice = {"X-API-Key": f"tml-{ALICE}"}

    def result(future):
        return requests.post(f"{base}/retrieve_future", headers=alice, json={"request_id": future["request_id"]}).json()

    def ephemeral_exports():
        return sorted(p.name for p in server.sampler_dir.glob("@alice/*") if ".ephemeral-" in p.name)  # alice's names

    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    model_id = result(
        requests.post(
            f"{base}/create_model",
            headers=alice,
            json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 4}},
        ).json()
    )["model_id"]
    before = ephemeral_exports()
    samplers = [
        result(
            requests.post(
                f"{base}/save_weights_for_sampler",
                headers=alice,
                json={"model_id": model_id, "seq_id": seq, "sampling_session_seq_id": seq},
            ).json()
        )["sampling_session_id"]
        for seq in range(1, 7)
    ]
    deadline = time.monotonic() + 30
    while len(ephemeral_exports()) - len(before) > 4 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(ephemeral_exports()) - len(before) == 4
    assert requests.get(f"{base}/samplers/{samplers[0]}", headers=alice).status_code == 404  # pruned with it
    assert requests.get(f"{base}/samplers/{samplers[-1]}", headers=alice).status_code == 200
    assert requests.post(f"{base}/sessions/{session}/finish", headers=alice, json={}).status_code == 200
    assert ephemeral_exports() == before


def hostile_tensor(rng, n: int):
    """A loss-input tensor for a datum of n tokens, often lying about its shape or indices."""
    from tinker.proto import tinker_public_pb2 as tpb

    dtype = int(rng.choice([tpb.DTYPE_FLOAT32, tpb.DTYPE_INT64, tpb.DTYPE_INT32, 7]))
    shapes = [[n], [1, n], [n + 1], [2**62], [1, 5 * 10**8], [3, n], [], [0], [-1]]
    shape = shapes[int(rng.integers(0, len(shapes)))]
    if rng.random() < 0.5:
        nnz = int(rng.integers(0, 4))
        cols = rng.integers(-2, max(n, 1) + 2 ** int(rng.integers(0, 40)), nnz)
        return tpb.Tensor(
            dtype=dtype,
            shape=shape,
            sparse_csr=tpb.SparseCsr(
                crow_indices=np.array(
                    [[0, nnz], [0, nnz + 1], [1, nnz], [0]][int(rng.integers(0, 4))], "<i8"
                ).tobytes(),
                col_indices=cols.astype("<i8").tobytes(),
                values=rng.bytes(4 * nnz),
            ),
        )
    return tpb.Tensor(dtype=dtype, shape=shape, dense=rng.bytes(int(rng.choice([4 * n, 8 * n, 3, 0]))))


def test_fuzzed_tensors_bodies_and_keys_never_5xx_and_rss_stays_bounded(server):
    """forward_backward bodies with hostile tensor shapes, mutated and truncated protobuf, zstd
    bombs, oversized and deep JSON, wrong types, and requests without or with a wrong key: never
    a 5xx, and the server's RSS stays within idle + 2 x --max-message-bytes."""
    import zstandard
    from tinker.proto import tinker_public_pb2 as tpb

    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    alice = {"X-API-Key": f"tml-{ALICE}"}
    limit = 32 << 20
    session = requests.post(f"{base}/create_session", json={}, headers=alice).json()["session_id"]
    created = requests.post(
        f"{base}/create_model",
        headers=alice,
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 4}},
    ).json()
    model_id = requests.post(f"{base}/retrieve_future", headers=alice, json=created).json()["model_id"]
    valid = forward_backward_body(model_id, 1, loop_script.batch(3))
    rss = lambda: int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{server.proc.pid}/status").read_text())[1]) << 10  # noqa: E731
    idle = rss()
    rng = np.random.default_rng(1)
    protobuf = {**alice, "Content-Type": "application/x-protobuf"}
    codes = []
    for i in range(400):
        kind = i % 8
        headers = dict(protobuf)
        if kind == 0:  # hostile tensors
            n = int(rng.integers(1, 6))
            datum = tpb.Datum(
                model_input=[
                    tpb.Chunk(encoded_text=tpb.EncodedTextChunk(tokens=rng.integers(0, 100, n).astype("<i4").tobytes()))
                ]
            )
            for name in rng.choice(["target_tokens", "logprobs", "advantages", "weights", "bogus"], 3):
                datum.loss_fn_inputs[str(name)].CopyFrom(hostile_tensor(rng, n))
            body = tpb.ForwardBackwardRequest(
                model_id=model_id,
                seq_id=int(rng.integers(-5, 2**31 - 1)),
                data=[datum],
                loss_fn=str(rng.choice(["cispo", "ppo", "nope"])),
            ).SerializeToString()
        elif kind == 1:  # mutated
            body = bytearray(valid)
            for at in rng.integers(0, len(body), int(rng.integers(1, 8))):
                body[at] = int(rng.integers(0, 256))
            body = bytes(body)
        elif kind == 2:  # truncated
            body = valid[: int(rng.integers(0, len(valid)))]
        elif kind == 3:  # a zstd bomb: small on the wire, over the limit inflated
            body = zstandard.ZstdCompressor().compress(b"\0" * (limit + 1))
            headers["Content-Encoding"] = "zstd"
        elif kind == 4:  # deep or wide JSON to JSON routes
            route = str(rng.choice(["optim_step", "create_model", "asample", "save_weights"]))
            depth = int(rng.choice([10, 1000, 50_000]))
            answer = requests.post(f"{base}/{route}", data=b"[" * depth + b"]" * depth, headers=alice)
            codes.append(answer.status_code)
            continue
        elif kind == 5:  # wrong types in every field of a JSON route
            route = str(rng.choice(["optim_step", "create_model", "load_weights", "save_weights_for_sampler"]))
            body_json = {
                "model_id": model_id,
                "session_id": session,
                "seq_id": str(i),
                "model_seq_id": [1],
                "adam_params": {"learning_rate": ["1e-3", None, [1], {"a": 1}, 10**400, -0.0][i % 6]},
                "lora_config": {"rank": [-1, 0, 2**31, "4", 1.5][i % 5]},
                "path": [1, "", None][i % 3],
            }
            answer = requests.post(f"{base}/{route}", data=json.dumps(body_json), headers=alice)
            codes.append(answer.status_code)
            continue
        elif kind == 6:  # no key, or a wrong one
            headers = {} if rng.random() < 0.5 else {"X-API-Key": "tml-not-a-key-of-anyone"}
            body = valid
        else:  # oversized, declared or not
            body = b"\0" * (limit + int(rng.integers(1, 1 << 20)))
        answer = requests.post(f"{base}/forward_backward", data=body, headers=headers)
        codes.append(answer.status_code)
        assert answer.status_code < 500, (kind, answer.text)
        assert "error" in answer.json() or answer.status_code == 200, (kind, answer.text)
    assert all(code < 500 for code in codes), codes
    assert {401, 400, 413} <= set(codes)
    assert rss() <= idle + 2 * limit, (idle, rss())
    assert run_sdk(server, "concurrent")["together"]  # still serving
