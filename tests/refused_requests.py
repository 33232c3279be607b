"""Large requests that validation refuses only after decoding them whole, and the resident
memory of the server that refuses them (tests/test_rejections.py, bench/bench_refused_memory.py)."""

from pathlib import Path

import numpy as np

from cispo.v1 import training_pb2 as pb


def rss_bytes(pid: int) -> int:
    """VmRSS of a process, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def _columns(tokens: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(model_input, target_tokens, logprobs, advantages) of a datum, advantages one too short."""
    rng = np.random.default_rng(0)
    return (rng.integers(0, 1000, tokens), rng.integers(0, 1000, tokens), -rng.random(tokens), rng.random(tokens - 1))


def mismatched_forward_backward(data: int, tokens: int) -> bytes:
    """A ForwardBackwardInput (gRPC) of `data` datums of `tokens` raw tokens, each with one
    advantage too few: 24 bytes a token."""
    model_input, target, logprobs, advantages = _columns(tokens)

    def raw(values: np.ndarray, dtype: str) -> pb.Tensor:
        return pb.Tensor(
            raw_data=values.astype(dtype).tobytes(),
            shape=[len(values)],
            dtype=pb.DTYPE_INT64 if dtype == "<i8" else pb.DTYPE_FLOAT32,
        )

    datum = pb.Datum(
        model_input=raw(model_input, "<i8"),
        loss_fn_inputs=pb.LossFnInputs(
            target_tokens=raw(target, "<i8"), logprobs=raw(logprobs, "<f4"), advantages=raw(advantages, "<f4")
        ),
    )
    return pb.ForwardBackwardInput(data=[datum] * data).SerializeToString()


def mismatched_tinker_forward_backward(model_id: str, data: int, tokens: int) -> bytes:
    """The same refused request for the Tinker HTTP port (its protobuf body): 20 bytes a token."""
    from tinker.proto import tinker_public_pb2 as tpb

    model_input, target, logprobs, advantages = _columns(tokens)

    def dense(values: np.ndarray, dtype: str) -> tpb.Tensor:
        return tpb.Tensor(
            dense=values.astype(dtype).tobytes(),
            shape=[len(values)],
            dtype=tpb.DTYPE_INT64 if dtype == "<i8" else tpb.DTYPE_FLOAT32,
        )

    datum = tpb.Datum(
        model_input=[tpb.Chunk(encoded_text=tpb.EncodedTextChunk(tokens=model_input.astype("<i4").tobytes()))]
    )
    for name, tensor in {
        "target_tokens": dense(target, "<i8"),
        "logprobs": dense(logprobs, "<f4"),
        "advantages": dense(advantages, "<f4"),
    }.items():
        datum.loss_fn_inputs[name].CopyFrom(tensor)
    return tpb.ForwardBackwardRequest(model_id=model_id, data=[datum] * data, loss_fn="cispo").SerializeToString()
