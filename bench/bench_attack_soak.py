"""Soak under attack: the official Tinker SDK and the gRPC client train side by side while an
attacker sends rejected requests and holds slow connections; how much throughput is kept, how
RSS moves, and how fast health checks answer.

Run: `.venv/bin/python bench/bench_attack_soak.py` (`--seconds` per phase, default 60).

It starts `cispo-server` (the embedded model, loopback, tokens on, --http-port) and runs two
trainers for the whole time: a gRPC client (cispo.client, a LoRA run: forward_backward of 4x32
tokens then optim_step, in a loop) and the unmodified tinker SDK in a subprocess (the same loop
on its own LoRA run). The first phase is quiet; in the second an attacker runs beside them:
- rejected HTTP requests: forward_backward bodies declaring [1, 5e8] sparse tensors, bodies over
  the size limit (declared and not), JSON nested 50,000 deep, requests without a key;
- rejected gRPC requests: forward_backward with mismatched lengths, ~1 MiB each;
- slowloris: as many connections as --http-max-connections allows, trickling header bytes and
  reopened when the server closes them.
Every `--sample-seconds` it samples the server's VmRSS and times a gRPC health check and an HTTP
healthz. It prints (Markdown) the steps per second of each trainer in each phase and their
ratio, RSS (start, max, end of each phase), and health-check latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import requests
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tinker.proto import tinker_public_pb2 as tpb

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from server_process import ServerProcess  # noqa: E402

import cispo.client as cispo  # noqa: E402
from cispo.v1 import training_pb2 as pb  # noqa: E402
from cispo.v1 import training_pb2_grpc  # noqa: E402

TOKEN = "bench-attack-soak-0123456789"
SDK_LOOP = """
import sys, time
import numpy as np
import tinker
from tinker import types
seconds = float(sys.argv[1])
client = tinker.ServiceClient().create_lora_training_client(base_model="", rank=4, seed=1).result()
rng = np.random.default_rng(0)
def datum():
    adv = rng.normal(size=32).astype(np.float32)
    return types.Datum(model_input=types.ModelInput.from_ints(rng.integers(0, 1000, 32).tolist()), loss_fn_inputs={
        "target_tokens": types.TensorData.from_numpy(rng.integers(0, 1000, 32)),
        "logprobs": types.TensorData.from_numpy(np.full(32, -7.0, np.float32)),
        "advantages": types.TensorData.from_numpy(adv)})
start = time.monotonic()
while time.monotonic() - start < seconds:
    client.forward_backward([datum() for _ in range(4)], "cispo").result()
    client.optim_step(types.AdamParams(learning_rate=1e-4)).result()
    print(time.monotonic(), flush=True)
"""


def grpc_trainer(address: str, stop: threading.Event, stamps: list[float]) -> None:
    rng = np.random.default_rng(1)
    with cispo.ServiceClient(address, token=TOKEN) as service:
        run = service.create_lora_training_client(rank=4, seed=2)
        while not stop.is_set():
            data = [
                cispo.Datum(
                    model_input=cispo.ModelInput.from_ints(rng.integers(0, 1000, 32).tolist()),
                    loss_fn_inputs={
                        "target_tokens": rng.integers(0, 1000, 32),
                        "logprobs": np.full(32, -7.0, np.float32),
                        "advantages": rng.normal(size=32).astype(np.float32),
                    },
                )
                for _ in range(4)
            ]
            run.forward_backward(data, "cispo").result()
            run.optim_step(cispo.AdamParams(learning_rate=1e-4)).result()
            stamps.append(time.monotonic())


def attacker_model(base: str, key: dict) -> str:
    """A model of the attacker's own, so its bombs reach the tensor checks (not a 404)."""
    session = requests.post(f"{base}/create_session", json={}, headers=key).json()["session_id"]
    submitted = requests.post(
        f"{base}/create_model",
        headers=key,
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 1}},
    ).json()
    while (answer := requests.post(f"{base}/retrieve_future", json=submitted, headers=key).json()).get(
        "type"
    ) == "try_again":
        pass
    return answer["model_id"]


def sparse_bomb(model_id: str) -> bytes:
    tokens = np.arange(4, dtype="<i4").tobytes()
    datum = tpb.Datum(model_input=[tpb.Chunk(encoded_text=tpb.EncodedTextChunk(tokens=tokens))])
    datum.loss_fn_inputs["advantages"].CopyFrom(
        tpb.Tensor(
            dtype=tpb.DTYPE_FLOAT32,
            shape=[1, 5 * 10**8],
            sparse_csr=tpb.SparseCsr(
                crow_indices=np.array([0, 1], "<i8").tobytes(),
                col_indices=np.array([7], "<i8").tobytes(),
                values=np.ones(1, "<f4").tobytes(),
            ),
        )
    )
    return tpb.ForwardBackwardRequest(model_id=model_id, seq_id=1, data=[datum]).SerializeToString()


def http_attacker(base: str, model_id: str, limit: int, stop: threading.Event, counts: dict) -> None:
    key = {"X-API-Key": f"tml-{TOKEN}"}
    bodies = [
        ("forward_backward", sparse_bomb(model_id), key),
        ("forward_backward", b"\0" * (limit + 1), key),
        ("optim_step", b"[" * 50_000 + b"]" * 50_000, key),
        ("forward_backward", b"\0" * 100, {}),
    ]
    with requests.Session() as http:
        while not stop.is_set():
            for route, body, headers in bodies:
                try:
                    code = http.post(f"{base}/{route}", data=body, headers=headers, timeout=30).status_code
                except requests.RequestException:
                    code = "error"
                counts[code] = counts.get(code, 0) + 1


def grpc_attacker(address: str, stop: threading.Event, counts: dict) -> None:
    bad = pb.ForwardBackwardInput(
        data=[
            pb.Datum(
                model_input=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1 << 17], raw_data=bytes(8 << 17)),
                loss_fn_inputs=pb.LossFnInputs(
                    target_tokens=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[3], raw_data=bytes(24))
                ),
            )
        ]
    )
    with grpc.insecure_channel(address, options=[("grpc.max_send_message_length", 64 << 20)]) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        while not stop.is_set():
            try:
                stub.ForwardBackward(bad, metadata=[("authorization", f"Bearer {TOKEN}")], timeout=30)
                counts["ok"] = counts.get("ok", 0) + 1
            except grpc.RpcError as exc:
                counts[exc.code().name] = counts.get(exc.code().name, 0) + 1


def slowloris(port: int, connections: int, stop: threading.Event, counts: dict) -> None:
    held: list[socket.socket] = []
    while not stop.is_set():
        while len(held) < connections:
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                sock.sendall(b"POST /api/v1/create_session HTTP/1.1\r\n")
                held.append(sock)
                counts["opened"] = counts.get("opened", 0) + 1
            except OSError:
                break
        for sock in list(held):
            try:
                sock.sendall(b"X")
            except OSError:
                held.remove(sock)
                sock.close()
                counts["cut"] = counts.get("cut", 0) + 1
        time.sleep(0.5)
    for sock in held:
        sock.close()


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each phase")
    parser.add_argument("--sample-seconds", type=float, default=0.5)
    parser.add_argument("--max-connections", type=int, default=64)
    args = parser.parse_args()
    limit = 32 << 20
    tmp = Path(tempfile.mkdtemp(prefix="attack-soak-"))
    (tmp / "tokens").write_text(f"bench:{TOKEN}\n")
    server = ServerProcess(
        "--http-port",
        "0",
        "--auth-tokens-file",
        str(tmp / "tokens"),
        "--http-max-connections",
        str(args.max_connections),
        checkpoint_dir=tmp / "ckpt",
    )
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    bomb_model = attacker_model(base, {"X-API-Key": f"tml-{TOKEN}"})
    stop_all, stop_attack = threading.Event(), threading.Event()
    grpc_stamps: list[float] = []
    counts: dict = {"http": {}, "grpc": {}, "slowloris": {}}
    samples: list[tuple[float, int, float, float]] = []  # (time, rss bytes, grpc health s, http health s)
    sdk = subprocess.Popen(
        [sys.executable, "-c", SDK_LOOP, str(2 * args.seconds)],
        stdout=subprocess.PIPE,
        text=True,
        env={
            **os.environ,
            "TINKER_BASE_URL": f"http://127.0.0.1:{server.http_port}",
            "TINKER_API_KEY": f"tml-{TOKEN}",
            "TINKER_TELEMETRY": "0",
        },
    )
    trainer = threading.Thread(target=grpc_trainer, args=(server.address, stop_all, grpc_stamps), daemon=True)
    trainer.start()
    start = time.monotonic()
    attack_at = start + args.seconds
    attackers = []
    with grpc.insecure_channel(server.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < start + 2 * args.seconds:
            if not attackers and time.monotonic() >= attack_at:
                attackers = [
                    threading.Thread(target=http_attacker, args=(base, bomb_model, limit, stop_attack, counts["http"])),
                    threading.Thread(target=grpc_attacker, args=(server.address, stop_attack, counts["grpc"])),
                    threading.Thread(
                        target=slowloris,
                        args=(server.http_port, args.max_connections, stop_attack, counts["slowloris"]),
                    ),
                ]
                for thread in attackers:
                    thread.start()
            t0 = time.perf_counter()
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
            t1 = time.perf_counter()
            try:
                requests.get(f"{base}/healthz", timeout=30)
                t2 = time.perf_counter() - t1
            except requests.RequestException:
                t2 = float("nan")  # refused: the cap was full
            rss = int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{server.proc.pid}/status").read_text())[1]) << 10
            samples.append((time.monotonic(), rss, t1 - t0, t2))
            time.sleep(args.sample_seconds)
    stop_attack.set()
    stop_all.set()
    for thread in attackers:
        thread.join()
    trainer.join()
    sdk_stamps = [float(line) for line in sdk.communicate()[0].split()]
    server.terminate()

    def rate(stamps: list[float], lo: float, hi: float) -> float:
        return sum(lo <= s < hi for s in stamps) / (hi - lo)

    end = start + 2 * args.seconds
    print(f"### Soak under attack ({args.seconds:.0f} s quiet, then {args.seconds:.0f} s attacked)\n")
    print("| trainer | steps/s quiet | steps/s attacked | kept |\n|---|---|---|---|")
    for name, stamps in (("gRPC client", grpc_stamps), ("Tinker SDK", sdk_stamps)):
        quiet, attacked = rate(stamps, start + 5, attack_at), rate(stamps, attack_at + 5, end)
        print(f"| {name} | {quiet:.2f} | {attacked:.2f} | {attacked / quiet:.2f}x |")
    print(
        "\n| phase | RSS start MiB | RSS max MiB | RSS end MiB | gRPC health p50/p99 ms | HTTP healthz p50/p99 ms "
        "(refused) |\n|---|---|---|---|---|---|"
    )
    for name, lo, hi in (("quiet", start, attack_at), ("attacked", attack_at, end)):
        phase = [s for s in samples if lo <= s[0] < hi]
        rss = [s[1] / 2**20 for s in phase]
        g = [s[2] * 1e3 for s in phase]
        h = [s[3] * 1e3 for s in phase if s[3] == s[3]]
        print(
            f"| {name} | {rss[0]:.0f} | {max(rss):.0f} | {rss[-1]:.0f} | {percentile(g, 50):.1f} / "
            f"{percentile(g, 99):.1f} | {percentile(h, 50):.1f} / {percentile(h, 99):.1f} "
            f"({len(phase) - len(h)}) |"
        )
    print(
        f"\nattack: HTTP answers {json.dumps(counts['http'])}; gRPC answers {json.dumps(counts['grpc'])}; "
        f"slow connections {json.dumps(counts['slowloris'])}; RSS median quiet "
        f"{statistics.median(s[1] for s in samples if s[0] < attack_at) / 2**20:.0f} MiB"
    )


if __name__ == "__main__":
    main()
