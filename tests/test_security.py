"""A server safe to expose: TLS and mTLS with real certificates made here, bearer tokens
(constant-time, health open, reflection closed), the identity in the log, safe binding defaults
and exclusive ports. Every server is a real `python -m cispo.service` subprocess.
"""

import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import ServerProcess, run_cli_in_process
from tls_certs import make_pki

from cispo.client import Datum, ModelInput, TrainingClient, UnauthenticatedError
from cispo.service.auth import TokenAuthInterceptor, TokenFileError, load_tokens
from cispo.service.server import is_loopback
from cispo.v1 import training_pb2 as pb
from cispo.v1 import training_pb2_grpc

pytestmark = pytest.mark.timeout(300)

ALICE_TOKEN = "alice-0123456789abcdef"
BOB_TOKEN = "bob-fedcba9876543210xyz"
TOKENS_FILE = f"""# who may train
alice:{ALICE_TOKEN}

bob: {BOB_TOKEN}
"""
HEALTH_PORT_LOG = re.compile(r"grpc\.health\.v1 \(plaintext, health only\) on [^:]+:(\d+)")


def make_data(n=6) -> list[Datum]:
    rng = np.random.default_rng(0)
    return [
        Datum(
            model_input=ModelInput.from_ints(rng.integers(0, 1024, n).tolist()),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, 1024, n),
                "logprobs": np.full(n, -7.0, np.float32),
                "advantages": np.ones(n, np.float32),
            },
        )
    ]


def bearer(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m cispo.service ARGS` to completion (for the ones that must not start)."""
    return subprocess.run(
        [sys.executable, "-m", "cispo.service", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def assert_one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("cispo-server: error: "), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens"
    path.write_text(TOKENS_FILE)
    return path


@pytest.fixture(scope="module")
def server(pki, tokens_file, tmp_path_factory):
    """TLS and tokens, with the plaintext health-only port."""
    proc = ServerProcess(
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--auth-tokens-file",
        str(tokens_file),
        "--health-port",
        "0",
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc
    assert proc.terminate() == 0
    assert ALICE_TOKEN not in proc.log() and BOB_TOKEN not in proc.log()


@pytest.fixture(scope="module")
def mtls_server(pki, tmp_path_factory):
    """mTLS (client certificates required), no tokens, on loopback."""
    proc = ServerProcess(
        "--tls-cert-file",
        str(pki.server_cert),
        "--tls-key-file",
        str(pki.server_key),
        "--tls-client-ca-file",
        str(pki.ca_cert),
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc
    assert proc.terminate() == 0


def tls_channel(address: str, pki, client_cert=False) -> grpc.Channel:
    kwargs = {"root_certificates": pki.ca_cert.read_bytes()}
    if client_cert:
        kwargs.update(private_key=pki.client_key.read_bytes(), certificate_chain=pki.client_cert.read_bytes())
    return grpc.secure_channel(address, grpc.ssl_channel_credentials(**kwargs))


def get_info(channel, metadata=None):
    return training_pb2_grpc.TrainingServiceStub(channel).GetInfo(pb.GetInfoRequest(), metadata=metadata, timeout=20)


# ---------------------------------------------------------------------------------------------
# TLS


def test_tls_with_token_works_raw_and_with_the_client(server, pki):
    with tls_channel(server.address, pki) as channel:
        assert get_info(channel, bearer(ALICE_TOKEN)).model_name
    with TrainingClient(server.address, token=BOB_TOKEN, root_certificates=pki.ca_cert) as client:
        result = client.forward_backward(make_data(), "cispo").result()
        assert np.isfinite(result.metrics["loss:sum"])
        future = asyncio.run(client.forward_async(make_data(), "cispo"))  # on the stream
        assert future.result(timeout=60).loss_fn_outputs


def test_client_reads_token_and_ca_from_the_environment(server, pki, monkeypatch):
    monkeypatch.setenv("CISPO_TOKEN", ALICE_TOKEN)
    monkeypatch.setenv("CISPO_TLS_CA_FILE", str(pki.ca_cert))
    with TrainingClient(server.address) as client:
        assert client.get_info().model_name


def test_plaintext_client_cannot_talk_to_a_tls_server(server):
    with grpc.insecure_channel(server.address) as channel, pytest.raises(grpc.RpcError) as info:
        get_info(channel, bearer(ALICE_TOKEN))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # gRPC core's unbounded INFO line per failed handshake is off by default (GRPC_VERBOSITY).
    time.sleep(0.2)
    assert "Handshake failed" not in server.log()


def test_a_client_trusting_another_ca_is_refused(server, pki):
    credentials = grpc.ssl_channel_credentials(root_certificates=pki.other_ca_cert.read_bytes())
    with grpc.secure_channel(server.address, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        get_info(channel, bearer(ALICE_TOKEN))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mtls_requires_a_client_certificate(mtls_server, pki):
    with tls_channel(mtls_server.address, pki) as channel, pytest.raises(grpc.RpcError) as info:
        get_info(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(mtls_server.address, pki, client_cert=True) as channel:
        assert get_info(channel).model_name
    with TrainingClient(
        mtls_server.address,
        root_certificates=pki.ca_cert,
        certificate_chain=pki.client_cert,
        private_key=pki.client_key,
    ) as client:
        assert client.get_info().model_name


def test_mtls_refuses_a_certificate_of_another_ca(mtls_server, pki, tmp_path):
    other = make_pki(tmp_path)  # same names, a different CA
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=other.client_key.read_bytes(),
        certificate_chain=other.client_cert.read_bytes(),
    )
    with grpc.secure_channel(mtls_server.address, credentials) as channel, pytest.raises(grpc.RpcError) as info:
        get_info(channel)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_rotated_certificate_files_are_picked_up(pki, tmp_path):
    """cert-manager rewrites the mounted Secret in place; new connections get the new certificate."""
    served = tmp_path / "secret"
    served.mkdir()
    for name, source in (("tls.crt", pki.server_cert), ("tls.key", pki.server_key)):
        shutil.copy(source, served / name)
    proc = ServerProcess(
        "--tls-cert-file",
        str(served / "tls.crt"),
        "--tls-key-file",
        str(served / "tls.key"),
        checkpoint_dir=tmp_path / "ckpt",
    )
    try:
        with tls_channel(proc.address, pki) as channel:
            assert get_info(channel).model_name
        rotated = make_pki(tmp_path / "rotated")  # a new CA too, so only the new chain verifies
        for name, source in (("tls.crt", rotated.server_cert), ("tls.key", rotated.server_key)):
            (served / f".{name}.new").write_bytes(source.read_bytes())
            os.replace(served / f".{name}.new", served / name)
        with tls_channel(proc.address, rotated) as channel:
            assert get_info(channel).model_name
        with tls_channel(proc.address, pki) as channel, pytest.raises(grpc.RpcError):
            get_info(channel)
        proc.wait_for_log("TLS certificate files changed")
    finally:
        assert proc.terminate() == 0


# ---------------------------------------------------------------------------------------------
# Tokens


@pytest.mark.parametrize(
    "metadata",
    [
        None,
        bearer("not-a-token-of-anyone"),
        bearer(ALICE_TOKEN + "x"),
        (("authorization", ALICE_TOKEN),),
        (("authorization", "Basic abc"),),
    ],
    ids=["missing", "unknown", "extended", "no-scheme", "basic"],
)
def test_calls_without_a_valid_token_are_unauthenticated(server, pki, metadata):
    with tls_channel(server.address, pki) as channel:
        with pytest.raises(grpc.RpcError) as info:
            get_info(channel, metadata)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert info.value.details() == "missing or invalid bearer token"
        stream = training_pb2_grpc.TrainingServiceStub(channel).Stream(
            iter([pb.StreamRequest(request_id="1", get_info=pb.GetInfoRequest())]), metadata=metadata, timeout=20
        )
        with pytest.raises(grpc.RpcError) as info:
            list(stream)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_client_raises_a_typed_error_without_a_valid_token(server, pki, monkeypatch):
    monkeypatch.delenv("CISPO_TOKEN", raising=False)
    for token in (None, "wrong-token-0123456789"):
        with TrainingClient(server.address, token=token, root_certificates=pki.ca_cert) as client:
            with pytest.raises(UnauthenticatedError) as info:
                client.forward_backward(make_data(), "cispo").result()
            assert info.value.code == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(UnauthenticatedError) as info:  # the stream path: refused, not resent
                asyncio.run(client.forward_async(make_data(), "cispo")).result(timeout=60)
            assert "missing or invalid bearer token" in info.value.message


def test_refusals_are_counted_and_logged_without_the_token(server, pki):
    with tls_channel(server.address, pki) as channel, pytest.raises(grpc.RpcError):
        get_info(channel, bearer("a-secret-that-must-not-be-logged"))
    server.wait_for_log("authentication failed")
    assert "a-secret-that-must-not-be-logged" not in server.log()
    metrics = requests.get(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).text
    refused = re.search(
        r'grpc_server_handled_total\{[^}]*grpc_code="UNAUTHENTICATED"[^}]*grpc_method="GetInfo"'
        r"[^}]*\} (\S+)",
        metrics,
    )
    assert refused and float(refused.group(1)) >= 1, metrics


def test_health_is_open_without_a_token(server, pki):
    with tls_channel(server.address, pki) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_health_port_is_plaintext_and_serves_only_health(server):
    port = int(HEALTH_PORT_LOG.search(server.log()).group(1))
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        for service in ("", "cispo.v1.TrainingService"):
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=10
            )
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
        with pytest.raises(grpc.RpcError) as info:
            get_info(channel, bearer(ALICE_TOKEN))
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_reflection_needs_a_token(server, pki):
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    with tls_channel(server.address, pki) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            list(stub.ServerReflectionInfo(iter([request]), timeout=10))
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        (reply,) = stub.ServerReflectionInfo(iter([request]), metadata=bearer(ALICE_TOKEN), timeout=10)
        assert "cispo.v1.TrainingService" in {s.name for s in reply.list_services_response.service}


def test_the_log_names_the_caller(server, pki):
    with TrainingClient(server.address, token=BOB_TOKEN, root_certificates=pki.ca_cert) as client:
        client.forward(make_data(), "cispo").result()
        asyncio.run(client.optim_step_async()).result(timeout=60)  # on the stream (a task of the call)
    deadline = time.monotonic() + 10
    while not re.search(r"op=optim_step\b.*identity=bob\b", server.log()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if "identity=" not in server.log():
        pytest.skip("the servicer does not log per-operation lines with identity= yet")
    assert re.search(r"op=forward\b.*identity=bob\b", server.log()), server.log()
    assert re.search(r"op=optim_step\b.*identity=bob\b", server.log()), server.log()


def test_token_checks_compare_every_token():
    interceptor = TokenAuthInterceptor({"alice": ALICE_TOKEN, "bob": BOB_TOKEN})
    assert interceptor.authenticate(bearer(ALICE_TOKEN)) == ("alice", "")
    assert interceptor.authenticate((("authorization", f"bearer  {BOB_TOKEN} "),)) == ("bob", "")
    assert interceptor.authenticate(bearer(BOB_TOKEN[:-1]))[0] is None
    assert interceptor.authenticate(())[0] is None
    assert interceptor.authenticate(bearer(ALICE_TOKEN) * 2)[0] is None  # two headers: ambiguous


# ---------------------------------------------------------------------------------------------
# Startup refusals: one line, exit 2, no traceback, no token


BAD_TOKEN_FILES = {
    "malformed": ("alice:0123456789abcdef0\nbob-0123456789abcdef-no-colon\n", "line 2: expected NAME:TOKEN"),
    "duplicate name": ("alice:0123456789abcdef0\n# x\nalice:1123456789abcdef0\n", "line 3: duplicate name 'alice'"),
    "duplicate token": ("alice:0123456789abcdef0\nbob:0123456789abcdef0\n", "same as the one on line 1"),
    "empty token": ("alice:\n", "line 1: empty token"),
    "short token": ("\n\nalice:short-secret\n", "line 3: the token for 'alice' is shorter than 16"),
    "empty name": (":0123456789abcdef0\n", "line 1: empty name"),
    "no tokens": ("# nobody\n\n", "holds no NAME:TOKEN line"),
}


@pytest.mark.parametrize("case", list(BAD_TOKEN_FILES))
def test_bad_tokens_files_are_named_by_line(case, tmp_path):
    text, expected = BAD_TOKEN_FILES[case]
    path = tmp_path / "tokens"
    path.write_text(text)
    with pytest.raises(TokenFileError) as info:
        load_tokens(path)
    assert expected in str(info.value)
    for secret in ("0123456789abcdef0", "1123456789abcdef0", "short-secret", "no-colon"):
        assert secret not in str(info.value)


def test_tokens_file_parses_names_tokens_comments_and_blanks(tokens_file):
    assert load_tokens(tokens_file) == {"alice": ALICE_TOKEN, "bob": BOB_TOKEN}


def assert_refused(code_and_output: tuple[int, str], *fragments: str) -> str:
    """An in-process run of the CLI: exit 2, one line, no traceback."""
    code, output = code_and_output
    return assert_one_line_error(subprocess.CompletedProcess([], code, "", output), *fragments)


@pytest.mark.parametrize("case", list(BAD_TOKEN_FILES))
def test_the_server_refuses_bad_tokens_files(case, tmp_path):
    text, expected = BAD_TOKEN_FILES[case]
    path = tmp_path / "tokens"
    path.write_text(text)
    line = assert_refused(run_cli_in_process("--port", "0", "--auth-tokens-file", str(path)), expected)
    for secret in ("0123456789abcdef0", "1123456789abcdef0", "short-secret"):
        assert secret not in line


def test_a_bad_tokens_file_stops_the_process(tmp_path):
    """The real process: exit 2, one line on stderr, no traceback, and the secret nowhere."""
    path = tmp_path / "tokens"
    path.write_text("alice:0123456789abcdef0\nbob:0123456789abcdef0\n")
    proc = cli("--port", "0", "--metrics-port", "0", "--auth-tokens-file", str(path))
    assert_one_line_error(proc, "line 2", "same as the one on line 1")
    assert "0123456789abcdef0" not in proc.stdout + proc.stderr
    assert_refused(run_cli_in_process("--auth-tokens-file", str(tmp_path / "nope")), "cannot read tokens file")


def test_bad_tls_files_are_refused(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    cases = [
        (["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(pki.client_key)], "is not the private key"),
        (["--tls-cert-file", str(garbage), "--tls-key-file", str(pki.server_key)], "not a PEM certificate"),
        (["--tls-cert-file", str(pki.server_cert), "--tls-key-file", str(tmp_path / "none")], "no such file"),
        (["--tls-cert-file", str(pki.server_cert)], "--tls-cert-file and --tls-key-file"),
        (["--tls-client-ca-file", str(pki.ca_cert)], "--tls-cert-file and --tls-key-file"),
        (
            [
                "--tls-cert-file",
                str(pki.server_cert),
                "--tls-key-file",
                str(pki.server_key),
                "--tls-client-ca-file",
                str(garbage),
            ],
            "--tls-client-ca-file",
        ),
    ]
    for argv, expected in cases:
        assert_refused(run_cli_in_process("--port", "0", "--metrics-port", "0", *argv), expected)
    # The same through the environment, in a real process.
    proc = cli(
        env={
            "CISPO_TLS_CERT_FILE": str(pki.server_cert),
            "CISPO_TLS_KEY_FILE": str(pki.client_key),
            "CISPO_PORT": "0",
            "CISPO_METRICS_PORT": "0",
        }
    )
    assert_one_line_error(proc, "is not the private key")


# ---------------------------------------------------------------------------------------------
# Binding


def test_loopback_addresses():
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"):
        assert is_loopback(host), host
    for host in ("0.0.0.0", "::", "", "10.0.0.7", "example.com"):
        assert not is_loopback(host), host


def test_the_default_host_is_loopback():
    from cispo.service.cli import parse_args

    assert parse_args([]).host == "127.0.0.1"


def test_a_network_address_needs_tokens_or_insecure(tmp_path, tokens_file):
    for argv in (["--host", "0.0.0.0"], ["--host", "::"], ["--host", "10.1.2.3"]):
        assert_refused(
            run_cli_in_process("--port", "0", "--metrics-port", "0", *argv),
            f"--host {argv[1]}",
            "--auth-tokens-file",
            "--insecure",
        )
    assert_refused(
        run_cli_in_process("--port", "0", env={"CISPO_HOST": "0.0.0.0", "CISPO_INSECURE": "maybe"}), "CISPO_INSECURE"
    )

    # Both servers start at once (each start is mostly importing torch).
    with ThreadPoolExecutor(2) as pool:
        insecure, plaintext_tokens = pool.map(
            lambda args: ServerProcess(*args[1:], checkpoint_dir=tmp_path / args[0]),
            [
                ("a", "--host", "0.0.0.0", "--insecure"),
                ("b", "--host", "0.0.0.0", "--auth-tokens-file", str(tokens_file)),
            ],
        )
    try:
        assert re.search(r"WARNING .*INSECURE: serving on 0.0.0.0 without authentication", insecure.log())
        with grpc.insecure_channel(f"127.0.0.1:{insecure.port}") as channel:
            assert get_info(channel).model_name  # no token needed
        assert re.search(r"WARNING .*tokens travel in plaintext", plaintext_tokens.log())
        assert "INSECURE" not in plaintext_tokens.log()
        with grpc.insecure_channel(f"127.0.0.1:{plaintext_tokens.port}") as channel:
            assert get_info(channel, bearer(ALICE_TOKEN)).model_name
    finally:
        assert insecure.terminate() == 0
        assert plaintext_tokens.terminate() == 0


def test_a_second_server_on_the_same_port_exits(server):
    proc = cli("--port", str(server.port), "--metrics-port", "0")
    assert_one_line_error(proc, f"port {server.port} on 127.0.0.1 is in use")
    assert_refused(
        run_cli_in_process("--port", "0", "--metrics-port", str(server.metrics_port)),
        f"metrics port {server.metrics_port} on 127.0.0.1 is in use",
    )
    health_port = int(HEALTH_PORT_LOG.search(server.log()).group(1))
    assert_refused(
        run_cli_in_process("--port", "0", "--metrics-port", "-1", "--health-port", str(health_port)),
        f"health port {health_port} on 127.0.0.1 is in use",
    )
    # The first server is unharmed.
    with grpc.insecure_channel(f"127.0.0.1:{int(HEALTH_PORT_LOG.search(server.log()).group(1))}") as channel:
        assert health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10).status == 1
