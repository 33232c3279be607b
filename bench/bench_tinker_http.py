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

SDK_SIDE = r"""
import json, sys, time
import numpy as np
import tinker
from tinker import types
steps, shapes = int(sys.argv[1]), json.loads(sys.argv[2])
out = {}
with tinker.ServiceClient() as service:
    for n, length in shapes:
        client = service.create_lora_training_client(base_model="", rank=8, seed=0).result()
        rng = np.random.default_rng(0)
        data = [types.Datum(model_input=types.ModelInput.from_ints(rng.integers(0, 1024, length).tolist()),
                            loss_fn_inputs={"target_tokens": rng.integers(0, 1024, length),
                                            "logprobs": np.full(length, -7.0, np.float32),
                                            "advantages": rng.normal(size=length).astype(np.float32)})
                for _ in range(n)]
        times = []
        for i in range(steps + 2):
            started = time.perf_counter()
            fb = client.forward_backward(data, "cispo")
            op = client.optim_step(types.AdamParams(learning_rate=1e-4))
            fb.result(), op.result()
            times.append(time.perf_counter() - started)
        out[f"{n}x{length}"] = times[2:]
print(json.dumps(out))
"""


def grpc_side(address: str, steps: int) -> dict:
    import cispo.client as cispo

    out = {}
    with cispo.ServiceClient(address) as service:
        for n, length in SHAPES:
            client = service.create_lora_training_client(rank=8, seed=0)
            rng = np.random.default_rng(0)
            data = [cispo.Datum(model_input=cispo.ModelInput.from_ints(rng.integers(0, 1024, length)),
                                loss_fn_inputs={"target_tokens": rng.integers(0, 1024, length),
                                                "logprobs": np.full(length, -7.0, np.float32),
                                                "advantages": rng.normal(size=length).astype(np.float32)})
                    for _ in range(n)]
            times = []
            for _ in range(steps + 2):
                started = time.perf_counter()
                fb = client.forward_backward(data, "cispo")
                op = client.optim_step(cispo.AdamParams(learning_rate=1e-4))
                fb.result(), op.result()
                times.append(time.perf_counter() - started)
            out[f"{n}x{length}"] = times[2:]
            service.unload_model(client.model_id)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        server = ServerProcess("--http-port", "0", checkpoint_dir=Path(tmp) / "ckpt")
        try:
            grpc = grpc_side(server.address, args.steps)
            env = {**os.environ, "TINKER_BASE_URL": f"http://127.0.0.1:{server.http_port}",
                   "TINKER_API_KEY": "tml-bench", "TINKER_TELEMETRY": "0"}
            done = subprocess.run([sys.executable, "-c", SDK_SIDE, str(args.steps), json.dumps(SHAPES)], env=env,
                                  capture_output=True, text=True, check=True)
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
