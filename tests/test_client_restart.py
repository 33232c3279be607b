"""A Python client that lives through a server restart with operations in flight says nothing on
stderr: no asyncio error, no task destroyed or exception unretrieved, no unclosed resource."""

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from server_process import ServerProcess

pytestmark = pytest.mark.timeout(300)
NOISE = (
    "aclose(): asynchronous generator is already running",
    "Task was destroyed but it is pending",
    "Task exception was never retrieved",
    "Exception ignored",
    "ResourceWarning",
    "Traceback",
)
CLIENT = textwrap.dedent("""
    import gc, sys
    import numpy as np
    from cispo.client import AbortedError, Datum, ModelInput, TrainingClient
    data = [Datum(model_input=ModelInput.from_ints([3, 1, 4, 1, 5, 9]), loss_fn_inputs={
        "target_tokens": np.array([1, 4, 1, 5, 9, 2]), "logprobs": np.full(6, -1.0, np.float32),
        "advantages": np.ones(6, np.float32)})]
    client = TrainingClient(sys.argv[1], wait_for_ready=True)
    client.forward_backward(data).result(60)
    print("ready", flush=True)
    sys.stdin.readline()  # the server is stopped
    in_flight = [client.forward_backward(data) for _ in range(8)]
    print("submitted", flush=True)
    sys.stdin.readline()  # the server was killed and started again
    aborted = 0
    for future in in_flight:
        try:
            future.result(120)
        except AbortedError:
            aborted += 1
    gc.collect()  # what the broken streams left behind, now rather than at some later time
    client.close()
    with TrainingClient(sys.argv[1]) as fresh:
        tokens = fresh.forward_backward(data).result(60).metrics["tokens:sum"]
    print("aborted", aborted, "tokens", tokens, flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_restart_with_operations_in_flight_leaves_no_noise_in_the_client(tmp_path):
    """The server is stopped with eight forward_backwards sent to it, killed, and started again on
    the same port. The client resends them to the new server (AbortedError, by design), a fresh
    client trains, and the client process's stderr holds none of asyncio's complaints."""
    port = str(free_port())
    a = ServerProcess("--port", port, checkpoint_dir=tmp_path)
    b = None
    client = subprocess.Popen(
        [sys.executable, "-W", "always::ResourceWarning", "-c", CLIENT, a.address],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert client.stdout.readline() == "ready\n"
        os.kill(a.proc.pid, signal.SIGSTOP)  # the eight are sent and never answered
        client.stdin.write("\n")
        client.stdin.flush()
        assert client.stdout.readline() == "submitted\n"
        a.kill()
        b = ServerProcess("--port", port, checkpoint_dir=tmp_path)
        out, err = client.communicate("\n", timeout=240)
        assert client.returncode == 0, err
        assert out == "aborted 8 tokens 6.0\n", err
        assert not [noise for noise in NOISE if noise in err], err
        assert b.terminate() == 0
    finally:
        client.kill()
        a.kill()
        if b is not None:
            b.kill()
