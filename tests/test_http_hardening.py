"""The Tinker HTTP port under attack and under mistakes: hostile tensor shapes and bodies cost no
memory, slow connections are cut and capped while gRPC keeps serving, a refused request never
stalls its model's order, client mistakes are 4xx naming the field, the SDK's telemetry is
accepted, a drain answers every request that got an id, and TLS rotation reaches the HTTP port."""

import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest
from server_process import ServerProcess
from tinker.proto import tinker_public_pb2 as tpb
from tls_certs import make_pki

from cispo.service.metrics import RUN_LABEL_MODES, ServiceMetrics

pytestmark = pytest.mark.timeout(300)
LIMIT = 4 << 20  # --max-message-bytes of these servers
FLAGS = (
    "--http-port",
    "0",
    "--max-message-bytes",
    str(LIMIT),
    "--http-max-connections",
    "8",
    "--http-header-timeout-seconds",
    "2",
    "--http-body-timeout-seconds",
    "2",
    "--http-seq-gap-seconds",
    "2",
)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(*FLAGS, checkpoint_dir=tmp_path_factory.mktemp("ckpt"))
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture(scope="module")
def shared_model(server) -> str:
    """One model for the tests whose requests are all refused (the server allows 16 runs)."""
    return new_model(api(server))


def api(server) -> str:
    return f"http://127.0.0.1:{server.http_port}/api/v1"


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a process, in KiB."""
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("VmRSS", "VmHWM")}


def result(base: str, submitted: dict, timeout: float = 120) -> requests.Response:
    """The answer of a submitted request, polling retrieve_future until it is not try_again."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Connection: close, or the kept answers would hold their connections (these servers allow few).
        answer = requests.post(
            f"{base}/retrieve_future", json={"request_id": submitted["request_id"]}, headers={"Connection": "close"}
        )
        if (
            answer.headers.get("content-type", "").startswith("application/json")
            and answer.json().get("type") == "try_again"
        ):
            continue
        return answer
    raise TimeoutError(f"{submitted} not answered in {timeout} s")


def new_model(base: str) -> str:
    session = requests.post(f"{base}/create_session", json={}).json()["session_id"]
    created = requests.post(
        f"{base}/create_model",
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 2}},
    ).json()
    return result(base, created).json()["model_id"]


def fwd_bwd_body(model_id: str, seq_id: int, tokens=(1, 2, 3, 4), **inputs: tpb.Tensor) -> bytes:
    n = len(tokens)
    datum = tpb.Datum(
        model_input=[tpb.Chunk(encoded_text=tpb.EncodedTextChunk(tokens=np.asarray(tokens, "<i4").tobytes()))]
    )
    dense = {
        "target_tokens": tpb.Tensor(dtype=tpb.DTYPE_INT64, shape=[n], dense=np.arange(n, dtype="<i8").tobytes()),
        "logprobs": tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[n], dense=np.full(n, -1, "<f4").tobytes()),
        "advantages": tpb.Tensor(dtype=tpb.DTYPE_FLOAT32, shape=[n], dense=np.ones(n, "<f4").tobytes()),
    }
    for name, tensor in {**dense, **inputs}.items():
        datum.loss_fn_inputs[name].CopyFrom(tensor)
    return tpb.ForwardBackwardRequest(
        model_id=model_id, seq_id=seq_id, data=[datum], loss_fn="cispo"
    ).SerializeToString()


def post_fwd_bwd(base: str, body: bytes, session: requests.Session | None = None) -> requests.Response:
    return (session or requests).post(
        f"{base}/forward_backward", data=body, headers={"Content-Type": "application/x-protobuf"}
    )


# --- memory ---------------------------------------------------------------------------------------


def test_a_sparse_tensor_declaring_a_huge_shape_costs_no_memory(server):
    """A ~240-byte body declaring a [1, 1e8] sparse tensor is refused naming the field, before
    anything of that size is allocated; a stream of them leaves RSS where it was."""
    base = api(server)
    model_id = new_model(base)
    before = memory_kib(server.proc.pid)
    for cols in (100_000_000, 2_000_000_000, 2**62):
        sparse = tpb.Tensor(
            dtype=tpb.DTYPE_FLOAT32,
            shape=[1, cols],
            sparse_csr=tpb.SparseCsr(
                crow_indices=np.array([0, 1], "<i8").tobytes(),
                col_indices=np.array([cols - 1], "<i8").tobytes(),
                values=np.ones(1, "<f4").tobytes(),
            ),
        )
        body = fwd_bwd_body(model_id, 0, advantages=sparse)
        assert len(body) < 300
        for _ in range(10):
            answer = post_fwd_bwd(base, body)
            assert answer.status_code == 400, answer.text
            assert answer.json()["field_violations"][0]["field"] == "data[0].loss_fn_inputs.advantages"
            assert "model_input length 4" in answer.json()["field_violations"][0]["description"]
    after = memory_kib(server.proc.pid)
    # Peak: idle + 2 x the message limit, the bound the server keeps for any request.
    assert after["VmHWM"] <= max(before["VmHWM"], before["VmRSS"] + 2 * LIMIT // 1024), (before, after)
    assert after["VmRSS"] <= before["VmRSS"] + 2 * LIMIT // 1024, (before, after)


def test_a_sparse_tensor_of_the_datums_length_is_read(server):
    base = api(server)
    model_id = new_model(base)
    sparse = tpb.Tensor(
        dtype=tpb.DTYPE_FLOAT32,
        shape=[4],
        sparse_csr=tpb.SparseCsr(
            crow_indices=np.array([0, 2], "<i8").tobytes(),
            col_indices=np.array([1, 3], "<i8").tobytes(),
            values=np.array([1.0, -0.5], "<f4").tobytes(),
        ),
    )
    submitted = post_fwd_bwd(base, fwd_bwd_body(model_id, 1, advantages=sparse))
    assert submitted.status_code == 200, submitted.text
    output = tpb.ForwardBackwardOutput.FromString(result(base, submitted.json()).content)
    assert output.metrics["active_tokens:sum"] == 2.0


def test_a_declared_content_length_over_the_limit_is_refused_before_the_body(server):
    """The answer comes while the client has sent only its headers."""
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(
            b"POST /api/v1/optim_step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 2147483648\r\n\r\n"
        )
        answer = b""
        while chunk := sock.recv(4096):  # the server closes the connection after its answer
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer
    assert b"max_message_bytes" in answer


def test_a_chunked_body_is_refused_as_soon_as_it_passes_the_limit(server):
    """No Content-Length: the body is counted as it arrives and refused once over the limit, long
    before the client has sent all it meant to."""
    chunk = b"x" * (256 << 10)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as sock:
        sock.sendall(b"POST /api/v1/optim_step HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        sent = 0
        try:
            while sent < 64 * LIMIT:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        try:
            head = sock.recv(4096)
        except ConnectionResetError:  # the answer was sent, then the connection closed on unread bytes
            head = b""
    assert head.startswith(b"HTTP/1.1 413") or head == b"", head
    assert sent < 4 * LIMIT


# --- slow connections ------------------------------------------------------------------------------


def test_slow_connections_are_cut_and_capped_while_grpc_serves(server):
    """Connections trickling header bytes are closed at the header deadline; over the cap, a new
    one is answered 503 at once; gRPC health answers throughout; the log says so in a few lines."""
    held = []
    for _ in range(8):
        sock = socket.create_connection(("127.0.0.1", server.http_port), timeout=30)
        sock.sendall(b"POST /api/v1/create_session HTTP/1.1\r\n")
        held.append(sock)
    with socket.create_connection(("127.0.0.1", server.http_port), timeout=30) as extra:
        extra.sendall(b"GET /api/v1/healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        refused = extra.recv(4096)
    assert refused.startswith(b"HTTP/1.1 503") and b"Retry-After" in refused, refused
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=20)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    for sock in held:  # trickling does not keep a connection: it is closed at the deadline
        for _ in range(200):
            try:
                sock.sendall(b"X")
            except OSError:
                break
            sock.settimeout(0.1)
            try:
                if sock.recv(1) == b"":
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        else:
            pytest.fail("a trickling connection was kept open")
        sock.close()
    assert requests.get(f"{api(server)}/healthz").status_code == 200  # room again
    server.wait_for_log("closed: its headers did not arrive within 2 s")
    assert server.log().count("closed: its headers did not arrive") <= 3  # once a period, with a count held back


# --- order ------------------------------------------------------------------------------------------


def test_a_refused_load_weights_gives_up_its_turn(server):
    """A load_weights refused for its path (read before its turn was taken, before) no longer
    stalls the model's later requests."""
    base = api(server)
    model_id = new_model(base)
    bad = requests.post(f"{base}/load_weights", json={"model_id": model_id, "seq_id": 1, "path": "tinker://x"})
    assert bad.status_code == 400 and "tinker://<run>/weights/<name>" in bad.json()["error"]
    submitted = post_fwd_bwd(base, fwd_bwd_body(model_id, 2))
    assert submitted.status_code == 200
    assert result(base, submitted.json(), timeout=60).status_code == 200


def test_a_seq_id_that_never_comes_holds_later_ones_only_for_the_gap(server):
    """seq_id 1's body could not be read (so nobody knows its turn): 2 and 3 wait for it at most
    --http-seq-gap-seconds, then run in order."""
    base = api(server)
    model_id = new_model(base)
    assert post_fwd_bwd(base, b"\xff" * 9).status_code == 400
    second = post_fwd_bwd(base, fwd_bwd_body(model_id, 2)).json()
    third = requests.post(
        f"{base}/optim_step", json={"model_id": model_id, "seq_id": 3, "adam_params": {"learning_rate": 1e-3}}
    ).json()
    assert result(base, second, timeout=60).status_code == 200
    step = result(base, third, timeout=60).json()
    assert step["metrics"]["step:max"] == 1.0
    server.wait_for_log("seq_id 1 never came within 2 s; going on from seq_id 2")


# --- client mistakes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "route, body, field",
    [
        ("create_model", {"model_seq_id": 0, "lora_config": {"rank": 10**30}}, "lora_config.rank"),
        ("create_model", {"model_seq_id": 0, "lora_config": {"rank": 4, "seed": 2**64}}, "lora_config.seed"),
        ("optim_step", {"seq_id": 1, "adam_params": {"learning_rate": 10**400}}, "adam_params.learning_rate"),
        ("optim_step", {"seq_id": 10**30, "adam_params": {"learning_rate": 1e-3}}, "seq_id"),
        (
            "asample",
            {"num_samples": 1, "prompt": {"chunks": [{"tokens": [1]}]}, "sampling_params": {"max_tokens": 2**70}},
            "sampling_params.max_tokens",
        ),
    ],
    ids=["rank", "seed", "learning-rate", "seq-id", "max-tokens"],
)
def test_numbers_out_of_range_are_400_naming_the_field(server, shared_model, route, body, field):
    base, model_id = api(server), shared_model
    with requests.Session() as http:
        session = http.post(f"{base}/create_session", json={}).json()["session_id"]
        export = http.post(
            f"{base}/save_weights_for_sampler", json={"model_id": model_id, "seq_id": 1, "path": "numbers"}
        ).json()
        sampler = http.post(
            f"{base}/create_sampling_session",
            json={
                "session_id": session,
                "sampling_session_seq_id": 0,
                "model_path": result(base, export).json()["path"],
            },
        ).json()
        full = {
            "session_id": session,
            "model_id": model_id,
            **body,
            "sampling_session_id": sampler["sampling_session_id"],
        }
        answer = http.post(f"{base}/{route}", data=json.dumps(full), headers={"Content-Type": "application/json"})
        assert answer.status_code == 400, answer.text
        assert field in answer.text
        assert http.get(f"{base}/healthz").status_code == 200  # the same connection goes on


def test_json_nested_too_deeply_is_400(server):
    with requests.Session() as http:
        answer = http.post(f"{api(server)}/create_session", data=b"[" * 1000 + b"]" * 1000)
        assert answer.status_code == 400 and "nested" in answer.json()["error"]
        deep = http.post(f"{api(server)}/create_session", data=b'{"a":' * 100_000 + b"1" + b"}" * 100_000)
        assert deep.status_code == 400
        assert http.get(f"{api(server)}/healthz").status_code == 200


def test_the_sdk_telemetry_is_accepted_and_dropped(server):
    answer = requests.post(f"{api(server)}/telemetry", json={"events": [{"event": "x"}]})
    assert answer.status_code == 204


# --- drain ------------------------------------------------------------------------------------------


def test_a_drain_answers_every_request_that_got_an_id(tmp_path):
    """40 submissions get ids, then SIGTERM: every one is answered with its result (none with
    "draining" or INTERNAL); a submission after SIGTERM is 503 with Retry-After."""
    proc = ServerProcess(*FLAGS, "--drain-seconds", "120", checkpoint_dir=tmp_path / "ckpt")
    try:
        base = api(proc)
        model_id = new_model(base)
        with requests.Session() as http:
            submitted = []
            for seq in range(1, 41):
                if seq % 4:
                    answer = post_fwd_bwd(base, fwd_bwd_body(model_id, seq, tokens=range(1, 65)), http)
                else:
                    answer = http.post(
                        f"{base}/optim_step",
                        json={"model_id": model_id, "seq_id": seq, "adam_params": {"learning_rate": 1e-4}},
                    )
                assert answer.status_code == 200, answer.text
                submitted.append(answer.json())
            proc.proc.send_signal(15)
            proc.wait_for_log("draining")
            late = http.post(
                f"{base}/optim_step", json={"model_id": model_id, "seq_id": 41, "adam_params": {"learning_rate": 1e-4}}
            )
            assert late.status_code == 503 and late.headers["Retry-After"], late.text
            answers = [result(base, s) for s in submitted]
        assert all(a.status_code == 200 for a in answers), [a.text for a in answers if a.status_code != 200]
        steps = [a.json()["metrics"]["step:max"] for a in answers[3::4]]
        assert steps == list(range(1, 11))
        assert proc.proc.wait(120) == 0
    finally:
        proc.kill()


# --- TLS -----------------------------------------------------------------------------------------------


def test_the_http_port_follows_certificate_rotation(tmp_path):
    pki = make_pki(tmp_path / "pki")
    served = tmp_path / "secret"
    served.mkdir()
    for name, source in (("tls.crt", pki.server_cert), ("tls.key", pki.server_key)):
        shutil.copy(source, served / name)
    proc = ServerProcess(
        "--http-port",
        "0",
        "--tls-cert-file",
        str(served / "tls.crt"),
        "--tls-key-file",
        str(served / "tls.key"),
        checkpoint_dir=tmp_path / "ckpt",
    )
    url = f"https://127.0.0.1:{proc.http_port}/api/v1/healthz"
    try:
        assert requests.get(url, verify=str(pki.ca_cert)).status_code == 200
        rotated = make_pki(tmp_path / "rotated")
        for name, source in (("tls.crt", rotated.server_cert), ("tls.key", rotated.server_key)):
            (served / f".{name}.new").write_bytes(source.read_bytes())
            os.replace(served / f".{name}.new", served / name)
        assert requests.get(url, verify=str(rotated.ca_cert)).status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(url, verify=str(pki.ca_cert))
    finally:
        assert proc.terminate() == 0, proc.log()


# --- names and ids -------------------------------------------------------------------------------------


def test_metrics_do_not_show_run_ids_by_default(server):
    """/metrics has no authentication: a run's series carry a keyed hash of its id, not the id."""
    base = api(server)
    model_id = new_model(base)
    submitted = post_fwd_bwd(base, fwd_bwd_body(model_id, 1))
    assert result(base, submitted.json()).status_code == 200
    text = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics").text
    labels = set(re.findall(r'\brun="([^"]*)"', text))
    assert "run-" not in text and labels - {"default"}
    assert all(re.fullmatch(r"r-[0-9a-f]{12}", label) for label in labels - {"default"}), labels


@pytest.mark.parametrize("mode", RUN_LABEL_MODES)
def test_run_label_modes(mode):
    """id: the id; hash: stable per run, distinct between runs; off: one series for all runs
    (the default run's too), removed with the last of them."""
    metrics = ServiceMetrics(run_label=mode)
    a, b = metrics.add_run("run-a"), metrics.add_run("run-b")
    assert metrics.add_run("run-a") == a and metrics.run_label("run-a") == a
    assert (a, b) == {"id": ("run-a", "run-b"), "off": ("all", "all")}.get(mode, (a, b))
    assert (a == b) == (mode == "off")
    metrics.observe_step(1.0, "run-a")
    metrics.forget_run("run-a")
    exposed = generate_latest(metrics.registry).decode()
    assert (f'run="{a}"' in exposed) == (mode == "off")  # b shares the label only when off
    assert f'run="{b}"' in exposed
    metrics.forget_run("run-b")  # off: the default run, still live, shares "all"
    assert (f'run="{b}"' in generate_latest(metrics.registry).decode()) == (mode == "off")


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\x00b", "x" * 200])
@pytest.mark.parametrize("route", ["save_weights", "save_weights_for_sampler"])
def test_odd_checkpoint_names_are_refused_not_mangled(server, shared_model, route, name):
    """Never saved under a mangled name (`run-x.`, `run-x..`): 400 naming `path`, before anything
    is queued; a tinker:// path with such a name is refused the same way."""
    base, model_id = api(server), shared_model
    answer = requests.post(f"{base}/{route}", json={"model_id": model_id, "seq_id": 1, "path": name})
    assert answer.status_code == 400, answer.text
    assert answer.json()["field_violations"][0]["field"] == "path"
    loaded = requests.post(
        f"{base}/load_weights", json={"model_id": model_id, "seq_id": 2, "path": f"tinker://run-x/weights/{name}"}
    )
    assert loaded.status_code == 400 and loaded.json()["field_violations"][0]["field"] == "path"


def test_a_low_descriptor_limit_caps_http_and_grpc_keeps_serving(tmp_path):
    """With 256 descriptors the HTTP port holds at most 64 connections; 300 connections opened at
    once get 503 or wait, gRPC answers throughout, and the log says so in a few lines."""
    proc = ServerProcess(
        "--http-port",
        "0",
        "--http-header-timeout-seconds",
        "2",
        checkpoint_dir=tmp_path / "ckpt",
        launcher=["prlimit", "--nofile=256:256", sys.executable],
    )
    try:
        assert "--http-max-connections 256 lowered to 64" in proc.log()
        held, refused = [], 0
        for _ in range(300):
            try:
                sock = socket.create_connection(("127.0.0.1", proc.http_port), timeout=10)
                sock.sendall(b"GET /api/v1/healthz HTTP/1.1\r\n")
                held.append(sock)
            except OSError:
                refused += 1
        with grpc.insecure_channel(proc.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=30)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        answers = []
        for sock in held:
            sock.settimeout(10)
            try:
                answers.append(sock.recv(64))
            except OSError:
                answers.append(b"")
            sock.close()
        assert sum(a.startswith(b"HTTP/1.1 503") for a in answers) >= 300 - 64 - refused
        assert requests.get(f"{api(proc)}/healthz", timeout=30).status_code == 200
        log = proc.log()
        assert "Traceback" not in log and log.count("refused:") <= 5, log[-3000:]
    finally:
        assert proc.terminate() == 0, proc.log()[-3000:]


def test_a_sampling_session_on_a_missing_export_is_refused_at_once(server):
    base = api(server)
    session = requests.post(f"{base}/create_session", json={}).json()["session_id"]
    answer = requests.post(
        f"{base}/create_sampling_session",
        json={"session_id": session, "sampling_session_seq_id": 0, "model_path": "tinker://run-x/sampler_weights/none"},
    )
    assert answer.status_code == 404 and "run-x.none" in answer.json()["error"], answer.text
