"""Memory after refused requests: the resident set of a real server over a stream of large
requests that validation refuses (issue 23: 120 of them took it from 0.49 to 6.07 GB).

Run: `.venv/bin/python bench/bench_refused_memory.py` (gRPC; `--door http` for the Tinker HTTP
port; `--requests`, `--max-message-bytes`, `--data`, `--tokens`).

It starts `cispo-server` (the embedded model, on loopback) and sends `--requests` requests one
after another, each `--data` datums of `--tokens` raw tokens whose advantages are one too short:
24 bytes a token over gRPC (512 x 2048: 24 MiB), 20 over HTTP. Each is refused with
INVALID_ARGUMENT (HTTP 400) once it is decoded whole. It reads the server's VmRSS from
/proc/<pid>/status when idle, after each answer, and each 0.5 s for `--settle-seconds` after the
last; VmHWM is the peak.

It reports (Markdown) those figures over the idle server's and the target: the settled RSS
within idle + 2 x --max-message-bytes. Exit status 1 when it is not.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import grpc
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from refused_requests import mismatched_forward_backward, mismatched_tinker_forward_backward, rss_bytes  # noqa: E402
from server_process import ServerProcess  # noqa: E402

MIB = 1 << 20


def peak_bytes(pid: int) -> int:
    """VmHWM (the peak resident set) of a process."""
    line = next(x for x in Path(f"/proc/{pid}/status").read_text().splitlines() if x.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


def grpc_sender(server: ServerProcess, data: int, tokens: int, limit: int):
    """A function that sends the refused request once over gRPC and checks the refusal."""
    body = mismatched_forward_backward(data, tokens)
    channel = grpc.insecure_channel(server.address, options=[("grpc.max_send_message_length", limit)])
    call = channel.unary_unary("/cispo.v1.TrainingService/ForwardBackward")

    def send() -> None:
        try:
            call(body)
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.INVALID_ARGUMENT:
                raise
        else:
            raise AssertionError("the request was accepted")

    return send, len(body)


def http_sender(server: ServerProcess, data: int, tokens: int):
    """The same over the Tinker HTTP port, to a LoRA model created for it."""
    base = f"http://127.0.0.1:{server.http_port}/api/v1"
    session = requests.post(f"{base}/create_session", json={}).json()["session_id"]
    created = requests.post(
        f"{base}/create_model",
        json={"session_id": session, "model_seq_id": 0, "base_model": "", "lora_config": {"rank": 2}},
    ).json()
    while (answer := requests.post(f"{base}/retrieve_future", json={"request_id": created["request_id"]}).json()).get(
        "type"
    ) == "try_again":
        pass
    body = mismatched_tinker_forward_backward(answer["model_id"], data, tokens)
    http = requests.Session()

    def send() -> None:
        refused = http.post(f"{base}/forward_backward", data=body, headers={"Content-Type": "application/x-protobuf"})
        if refused.status_code != 400:
            raise AssertionError(f"HTTP {refused.status_code}: {refused.text[:200]}")

    return send, len(body)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--door", choices=("grpc", "http"), default="grpc")
    parser.add_argument("--requests", type=int, default=120)
    parser.add_argument("--max-message-bytes", type=int, default=32 * MIB)
    parser.add_argument("--data", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--settle-seconds", type=float, default=5.0)
    args = parser.parse_args()
    limit = args.max_message_bytes
    flags = ["--max-message-bytes", str(limit), "--http-port", "0" if args.door == "http" else "-1"]
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess(*flags, checkpoint_dir=Path(tmp) / "ckpt")
        try:
            send, size = (
                grpc_sender(server, args.data, args.tokens, limit)
                if args.door == "grpc"
                else http_sender(server, args.data, args.tokens)
            )
            pid = server.proc.pid
            idle = rss_bytes(pid)
            after = []
            for _ in range(args.requests):
                send()
                after.append(rss_bytes(pid))
            settled = []
            for _ in range(int(args.settle_seconds / 0.5)):
                time.sleep(0.5)
                settled.append(rss_bytes(pid))
            peak = peak_bytes(pid)
        finally:
            server.kill()
    bound = idle + 2 * limit
    row = lambda name, value: print(f"| {name} | {value / MIB:.0f} | {(value - idle) / MIB:+.0f} |")  # noqa: E731
    print(
        f"\n{args.requests} refused requests of {size / MIB:.1f} MiB over {args.door}, "
        f"--max-message-bytes {limit / MIB:.0f} MiB\n"
    )
    print("| server RSS | MiB | over idle |")
    print("|---|---|---|")
    row("idle", idle)
    row("after the first answer", after[0])
    row(f"after answer {len(after) // 2}", after[len(after) // 2 - 1])
    row("max after an answer", max(after))
    row("after the last answer", after[-1])
    row(f"{args.settle_seconds:g} s after the last answer", settled[-1])
    row("peak (VmHWM)", peak)
    row("target: idle + 2 x max-message-bytes", bound)
    ok = settled[-1] <= bound
    print(f"\nsettled RSS {'within' if ok else 'OVER'} the target")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
