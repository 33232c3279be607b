"""The cost of the Tinker HTTP front: the official tinker SDK against cispo's own gRPC client, same
server, same LoRA run shape, same data, side by side in one run.

For batches of 1 datum x 16 tokens (where the front's cost shows) and 8 x 256 tokens (where the
engine's does), it times one step, forward_backward + optim_step submitted back to back and then
both awaited, as loops do, after two untimed warm-up steps. It reports the medians of
`--steps` steps and the SDK / gRPC ratio. The SDK is run from a subprocess, which is how users
run it.

    .venv/bin/python bench/bench_tinker_http.py [--steps 30]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from server_process import ServerProcess  # noqa: E402

SHAPES = ((1, 16), (8, 256))


def datums(types, n: int, length: int) -> list:
    """n datums of `length` tokens, built with `types` (cispo.client's or the tinker SDK's)."""
    rng = np.random.default_rng(0)
    return [
        types.Datum(
            model_input=types.ModelInput.from_ints(rng.integers(0, 1024, length).tolist()),
            loss_fn_inputs={
                "target_tokens": rng.integers(0, 1024, length),
                "logprobs": np.full(length, -7.0, np.float32),
                "advantages": rng.normal(size=length).astype(np.float32),
            },
        )
        for _ in range(n)
    ]


def time_steps(create, types, steps: int) -> dict:
    """Seconds per step for each shape, on a new LoRA run from `create()` per shape."""
    out = {}
    for n, length in SHAPES:
        client, data = create(), datums(types, n, length)
        times = []
        for _ in range(steps + 2):
            started = time.perf_counter()
            fwd_bwd = client.forward_backward(data, "cispo")
            step = client.optim_step(types.AdamParams(learning_rate=1e-4))
            fwd_bwd.result(), step.result()
            times.append(time.perf_counter() - started)
        out[f"{n}x{length}"] = times[2:]
    return out


def sdk_side(steps: int) -> None:
    """The SDK's half, in its own process (TINKER_BASE_URL and TINKER_API_KEY set)."""
    import tinker
    from tinker import types

    with tinker.ServiceClient() as service:
        print(
            json.dumps(
                time_steps(
                    lambda: service.create_lora_training_client(base_model="", rank=8, seed=0).result(), types, steps
                )
            )
        )


def grpc_side(address: str, steps: int) -> dict:
    import cispo.client as cispo

    with cispo.ServiceClient(address) as service:
        return time_steps(lambda: service.create_lora_training_client(rank=8, seed=0), cispo, steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--sdk-side", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.sdk_side:
        sdk_side(args.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("--http-port", "0", checkpoint_dir=Path(tmp) / "ckpt")
        try:
            grpc = grpc_side(server.address, args.steps)
            env = {
                **os.environ,
                "TINKER_BASE_URL": f"http://127.0.0.1:{server.http_port}",
                "TINKER_API_KEY": "tml-bench",
                "TINKER_TELEMETRY": "0",
            }
            done = subprocess.run(
                [sys.executable, __file__, "--sdk-side", "--steps", str(args.steps)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            sdk = json.loads(done.stdout.strip().splitlines()[-1])
        finally:
            server.terminate()
    print("| batch | gRPC client, ms/step | tinker SDK over HTTP, ms/step | SDK / gRPC |")
    print("|---|---|---|---|")
    for key in grpc:
        g, h = statistics.median(grpc[key]) * 1e3, statistics.median(sdk[key]) * 1e3
        print(f"| {key.replace('x', ' x ')} tokens | {g:.1f} | {h:.1f} | {h / g:.2f}x |")


if __name__ == "__main__":
    main()
