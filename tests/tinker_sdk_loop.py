"""A loop that uses only the official tinker SDK (`import tinker`), as its users write them; run by
tests/test_tinker_http.py against a live cispo server with

    TINKER_BASE_URL=http://127.0.0.1:<--http-port> TINKER_API_KEY=tml-<token> python tinker_sdk_loop.py MODE

MODE "loop": one run's whole loop; "concurrent": two clients on two runs at once, then each
alone. Prints one JSON object (what the test compares with the same operations over gRPC).
"""

import json
import sys
import threading

import numpy as np
import tinker
from tinker import types

CONFIG = {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
BIG = 2100  # datums: three chunks of at most 1024


def batch(seed: int, n: int = 4, length: int = 9) -> list[types.Datum]:
    rng = np.random.default_rng(seed)
    data = []
    for _ in range(n):
        advantages = rng.normal(size=length).astype(np.float32)
        advantages[:3] = 0.0
        data.append(
            types.Datum(
                model_input=types.ModelInput.from_ints(rng.integers(0, 1024, length).tolist()),
                loss_fn_inputs={
                    "target_tokens": types.TensorData.from_numpy(rng.integers(0, 1024, length)),
                    "logprobs": types.TensorData.from_numpy((-6.0 - rng.random(length)).astype(np.float32)),
                    "advantages": types.TensorData.from_numpy(advantages),
                },
            )
        )
    return data


def logprobs(output) -> list[list[float]]:
    return [o["logprobs"].to_numpy().tolist() for o in output.loss_fn_outputs]


def train(training_client, seed: int, steps: int, n: int = 4) -> dict:
    out = {"loss": [], "logprobs": [], "grad_norm": []}
    for step in range(steps):
        fwd_bwd = training_client.forward_backward(batch(seed + step, n), "cispo", CONFIG)
        optim = training_client.optim_step(types.AdamParams(learning_rate=1e-2))
        result = fwd_bwd.result()
        out["loss"].append(result.metrics["loss:sum"])
        out["logprobs"].append(logprobs(result))
        out["grad_norm"].append(optim.result().metrics["grad_norm:max"])
    return out


def loop(service_client, base_model: str) -> dict:
    training_client = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=11).result()
    info = training_client.get_info()
    out = {"model_id": info.model_id, "lora_rank": info.lora_rank, **train(training_client, 100, 2)}
    out["after"] = logprobs(training_client.forward(batch(200), "cispo", CONFIG).result())
    saved = training_client.save_state("sdk-state").result()
    out["state_path"] = saved.path
    resumed = service_client.create_training_client_from_state(saved.path).result()
    out["resumed"] = logprobs(resumed.forward(batch(200), "cispo", CONFIG).result())
    sampling_client = training_client.save_weights_and_get_sampling_client().result()
    sampled = sampling_client.sample(
        prompt=types.ModelInput.from_ints([5, 6, 7]),
        num_samples=2,
        sampling_params=types.SamplingParams(max_tokens=5, seed=3),
    ).result()
    out["samples"] = [
        {"tokens": s.tokens, "logprobs": s.logprobs, "stop_reason": s.stop_reason} for s in sampled.sequences
    ]
    named = training_client.save_weights_for_sampler("sdk-export").result()
    out["export_path"] = named.path
    again = (
        service_client.create_sampling_client(model_path=named.path)
        .result()
        .sample(
            prompt=types.ModelInput.from_ints([5, 6, 7]),
            num_samples=2,
            sampling_params=types.SamplingParams(max_tokens=5, seed=3),
        )
        .result()
    )
    out["named_samples"] = [s.tokens for s in again.sequences]
    bad = types.Datum(
        model_input=types.ModelInput.from_ints([1, 2]),
        loss_fn_inputs={
            "target_tokens": types.TensorData.from_numpy(np.array([1, 2, 3])),
            "logprobs": types.TensorData.from_numpy(np.full(2, -1.0, np.float32)),
            "advantages": types.TensorData.from_numpy(np.ones(2, np.float32)),
        },
    )
    try:
        training_client.forward_backward([bad], "cispo").result()
        out["error"] = None
    except tinker.BadRequestError as exc:
        out["error"] = {"type": type(exc).__name__, "message": str(exc)}
    out["big_batch"] = train(training_client, 300, 1, n=BIG)  # over one chunk: sent as parallel chunks
    return out


def concurrent(service_client, base_model: str) -> dict:
    def run(seed: int, results: dict) -> None:
        client = service_client.create_lora_training_client(base_model=base_model, rank=4, seed=seed).result()
        results[seed] = train(client, seed * 10, 3)

    together: dict = {}
    threads = [threading.Thread(target=run, args=(seed, together)) for seed in (1, 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    alone: dict = {}
    for seed in (1, 2):
        run(seed, alone)
    return {"together": together, "alone": alone}


if __name__ == "__main__":
    mode, base_model = sys.argv[1], sys.argv[2]
    with tinker.ServiceClient() as service:
        result = {"loop": loop, "concurrent": concurrent}[mode](service, base_model)
    print(json.dumps(result))
