"""Decode and validation of a ForwardBackward request: the server's path from the request's
bytes to the validated batch the engine receives, timed per stage, in ms and ms per MB.

Requests are built by the Python client (`cispo.client.wire.forward_backward_input_to_pb`:
raw little-endian tensors, int64 tokens, float32 logprobs and advantages), or with `--typed` in
the typed fields as the Node client and grpcurl send them (int64_data, float_data), and
serialised once.
Each shape is timed in these stages, as the operations layer's handler runs them on a codec thread:

  parse     `servicer.parse_body(ForwardBackwardInput, body)`: the body as the gRPC door reads it
  decode    `convert.decode_forward_backward`: tensors out of the message
  validate  `validate_forward` (loss, config and `validation.validate_batch`), as `runs.validate`
  key       `idempotency.fingerprint`: the client puts a key on every forward_backward

Shapes "B x N" are B datums of N tokens; "B x a-b" draws each length uniformly in [a, b]. The
figure is the median of `--repeats` rounds after one warm-up. `--profile SHAPE` prints where the
time of parse + decode + validate goes (cProfile, top 15 by own time).

    .venv/bin/python bench/bench_validation.py
    .venv/bin/python bench/bench_validation.py --typed
    .venv/bin/python bench/bench_validation.py --shapes "60000 x 1" --profile "60000 x 1"
"""

import argparse
import cProfile
import pstats
import statistics
import time

import numpy as np

from cispo.client import Datum, ModelInput
from cispo.client.wire import forward_backward_input_to_pb
from cispo.service import convert
from cispo.service.idempotency import fingerprint
from cispo.service.servicer import parse_body
from cispo.v1 import training_pb2 as pb
from cispo.v1.tensors import RAW_DTYPES
from cispo.worker import EngineConfig, load_policy_model
from cispo.worker.engine import validate_forward

SHAPES = ("60000 x 1", "4096 x 16", "64 x 4096", "2048 x 1-256")
MAX_TOKENS = 1 << 21


def request_body(shape: str, vocab_size: int, typed: bool = False, seed: int = 0) -> bytes:
    """A serialised ForwardBackwardInput of `shape`, as the Python client sends it (`typed`: in
    the typed fields)."""
    count, length = (part.strip() for part in shape.split("x"))
    rng = np.random.default_rng(seed)
    low, high = (int(x) for x in length.split("-")) if "-" in length else (int(length), int(length))
    data = []
    for n in rng.integers(low, high + 1, int(count)):
        data.append(
            Datum(
                model_input=ModelInput.from_ints(rng.integers(0, vocab_size, n)),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, vocab_size, n),
                    "logprobs": -rng.random(n, dtype=np.float32) * 5,
                    "advantages": rng.standard_normal(n, dtype=np.float32),
                },
            )
        )
    request = forward_backward_input_to_pb(
        data, "cispo", {"clip_high_threshold": 4.0}, out=pb.ForwardBackwardInput(idempotency_key="k")
    )
    for datum in request.data if typed else ():
        for tensor in (datum.model_input, *(value for _, value in datum.loss_fn_inputs.ListFields())):
            array = np.frombuffer(tensor.raw_data, RAW_DTYPES[tensor.dtype])
            tensor.Clear()
            getattr(tensor, "int64_data" if array.dtype.kind == "i" else "float_data").extend(array.tolist())
    return request.SerializeToString()


def stages(body: bytes, policy, config: EngineConfig) -> dict:
    """Seconds of each stage on `body`, one run."""
    times = {}
    start = time.perf_counter()
    request = parse_body(pb.ForwardBackwardInput, body)
    times["parse"] = time.perf_counter() - start
    start = time.perf_counter()
    samples, loss_fn, loss_config = convert.decode_forward_backward(request, 1 << 30, MAX_TOKENS)
    times["decode"] = time.perf_counter() - start
    start = time.perf_counter()
    validate_forward(policy, config, samples, loss_fn, loss_config)
    times["validate"] = time.perf_counter() - start
    start = time.perf_counter()
    fingerprint("forward_backward", request)
    times["key"] = time.perf_counter() - start
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--typed", action="store_true", help="tensors in the typed fields, as the Node client sends")
    parser.add_argument("--profile", metavar="SHAPE", help="profile parse + decode + validate of this shape")
    args = parser.parse_args()
    policy = load_policy_model()
    config = EngineConfig(max_tokens_per_request=MAX_TOKENS)
    print(
        f"{'shape':>14} {'MB':>6} {'parse':>7} {'decode':>8} {'validate':>9} {'key':>6} {'total':>8} {'ms/MB':>7}"
        f" {'ms/MB w/o key':>14}"
    )
    for shape in args.shapes:
        body = request_body(shape, policy.vocab_size, args.typed)
        stages(body, policy, config)  # warm-up
        rounds = [stages(body, policy, config) for _ in range(args.repeats)]
        ms = {k: 1e3 * statistics.median(r[k] for r in rounds) for k in rounds[0]}
        total = 1e3 * statistics.median(sum(r.values()) for r in rounds)
        mb = len(body) / 1e6
        print(
            f"{shape:>14} {mb:6.2f} {ms['parse']:7.1f} {ms['decode']:8.1f} {ms['validate']:9.1f} {ms['key']:6.1f}"
            f" {total:8.1f} {total / mb:7.1f} {(total - ms['key']) / mb:14.1f}"
        )
    if args.profile:
        body = request_body(args.profile, policy.vocab_size, args.typed)
        profile = cProfile.Profile()
        profile.runcall(lambda: [stages(body, policy, config) for _ in range(3)])
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)


if __name__ == "__main__":
    main()
