"""Data-parallel groups on real torch.distributed (gloo on CPU), launched as on a cluster."""

import asyncio
import os
import socket
import sys
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from safetensors.torch import load_file
from server_process import ServerProcess

from cispo.client import (
    AdamParams,
    Datum,
    FailedPreconditionError,
    InvalidArgumentError,
    ModelInput,
    SamplingParams,
    TrainingClient,
    UnavailableError,
)
from cispo.worker.group import shard_by_tokens

pytestmark = pytest.mark.timeout(300)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch(seed: int, lengths=(5, 40, 7, 19, 3, 11, 26)) -> list[Datum]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        adv = rng.normal(size=n).astype(np.float32)
        adv[rng.random(n) < 0.3] = 0
        out.append(
            Datum(
                model_input=ModelInput.from_ints(rng.integers(0, 1024, n).tolist()),
                loss_fn_inputs={
                    "target_tokens": rng.integers(0, 1024, n),
                    "logprobs": -rng.random(n).astype(np.float32) * 12,
                    "advantages": adv,
                },
            )
        )
    return out


def train(address: str, checkpoint_dir) -> dict:
    """Two forward_backward + step rounds (a refused step between them: after the cross-rank
    sum, the gradient must still count once; and in the first, a forward_backward whose one
    datum of huge advantages makes a non-finite gradient on one rank only, refused by every
    rank with the gradient unchanged), a save; returns what the test compares."""
    with TrainingClient(address, wait_for_ready=True) as client:
        out = {"world_size": client.get_info().world_size, "results": [], "grad_norms": []}
        for seed in (1, 2):
            r = client.forward_backward(
                batch(seed), "cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
            ).result()
            out["results"].append(r)
            if seed == 1:
                huge = batch(4, lengths=(30, 2))
                huge[0].loss_fn_inputs["advantages"] = np.full(30, 3e38, dtype=np.float32)
                with pytest.raises(InvalidArgumentError, match="not finite.*unchanged"):
                    client.forward_backward(huge, "cispo").result()
            with pytest.raises(FailedPreconditionError, match="non-finite"):
                client.optim_step(AdamParams(learning_rate=3e38)).result()
            out["grad_norms"].append(
                client.optim_step(AdamParams(learning_rate=1e-3, grad_clip_norm=50.0)).result().grad_norm
            )
        out["final"] = client.forward(batch(3)).result()
        client.save_state("final").result()
        # Rank 0 samples and exports alone, on the weights every rank holds.
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        out["sample"] = client.create_sampling_client().sample(ModelInput.from_ints([4, 5, 6]), 2, greedy).result()
        saved = client.save_weights_and_get_sampling_client("final")
        again = saved.sample(ModelInput.from_ints([4, 5, 6]), 2, greedy).result()
        for a, b in zip(again.sequences, out["sample"].sequences):
            assert a.tokens == b.tokens and np.allclose(a.logprobs, b.logprobs, atol=1e-5)
    out["weights"] = load_file(checkpoint_dir / "final" / "model.safetensors")
    return out


def test_shards_balance_tokens_and_cover_every_datum():
    lengths = [5, 40, 7, 19, 3, 11, 26]
    shards = shard_by_tokens(lengths, 2)
    assert sorted(i for s in shards for i in s) == list(range(7))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert abs(loads[0] - loads[1]) <= max(lengths)
    assert shard_by_tokens([4], 3) == [[0], [], []]


def test_two_ranks_under_torchrun_equal_one_rank(tmp_path):
    single = ServerProcess("--sampler-dtype", "float32", checkpoint_dir=tmp_path / "w1")
    try:
        one = train(single.address, tmp_path / "w1")
    finally:
        single.terminate()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", f"--master-port={free_port()}"]
    group = ServerProcess("--sampler-dtype", "float32", checkpoint_dir=tmp_path / "w2", launcher=torchrun)
    try:
        two = train(group.address, tmp_path / "w2")
    finally:
        group.terminate()
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for a, b in zip(one["results"] + [one["final"]], two["results"] + [two["final"]]):
        assert a.metrics.keys() == b.metrics.keys()
        for key in a.metrics:
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-5, abs=1e-6), key
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
            np.testing.assert_allclose(y["logprobs"].to_numpy(), x["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    assert [s.tokens for s in two["sample"].sequences] == [s.tokens for s in one["sample"].sequences]
    for name, w in one["weights"].items():
        err = (two["weights"][name] - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item() + 1e-7, name
    assert "rank 1: shutdown" in group.log()


def start_cluster_ranks(tmp_path, world_size: int, **env):
    """Ranks started with torchrun's env vars directly, as a cluster would; rank 0 serves."""
    base = {
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "CISPO_RANK_TIMEOUT_SECONDS": "3",
        **env,
    }
    import subprocess

    workers = [
        subprocess.Popen(
            [sys.executable, "-m", "cispo.service", "--checkpoint-dir", str(tmp_path)],
            env={**os.environ, **base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for r in range(1, world_size)
    ]
    leader = ServerProcess(checkpoint_dir=tmp_path, env={**base, "RANK": "0", "LOCAL_RANK": "0"})
    return leader, workers


def test_group_resizes_through_a_saved_state(tmp_path):
    """A state saved by a group of 2 loads into a single rank, and back into a group of 3."""
    leader, workers = start_cluster_ranks(tmp_path, 2)
    try:
        with TrainingClient(leader.address, wait_for_ready=True) as client:
            client.forward_backward(batch(4)).result()
            client.optim_step(AdamParams(learning_rate=1e-2)).result()
            client.save_state("from-2").result()
            expected = client.forward(batch(5)).result()
    finally:
        leader.terminate()
        [w.wait(30) for w in workers]
    for world_size in (1, 3):
        leader, workers = start_cluster_ranks(tmp_path, world_size)
        try:
            with TrainingClient(leader.address, wait_for_ready=True) as client:
                assert client.load_state_with_optimizer("from-2").result().step == 1
                got = client.forward(batch(5)).result()
        finally:
            leader.terminate()
            [w.wait(30) for w in workers]
        assert got.metrics["loss:sum"] == pytest.approx(expected.metrics["loss:sum"], rel=1e-5)


@pytest.mark.parametrize("sharding", ["replicated", "fsdp"])
def test_killing_a_rank_mid_stream_gives_unavailable_naming_it(tmp_path, sharding):
    leader, workers = start_cluster_ranks(tmp_path, 2, CISPO_SHARDING=sharding)
    try:
        channel = grpc.insecure_channel(leader.address)
        health = health_pb2_grpc.HealthStub(channel)
        assert health.Check(health_pb2.HealthCheckRequest(service="cispo.v1.TrainingService")).status == 1
        with TrainingClient(leader.address, wait_for_ready=True) as client:
            client.forward_backward(batch(6)).result()  # the group works
            started = time.monotonic()

            async def stream():
                futures = []
                for i in range(40):
                    futures.append(await client.forward_backward_async(batch(100 + i, lengths=(200, 180, 150))))
                    if i == 2:
                        workers[0].kill()
                outcomes = []
                for f in futures:
                    try:
                        await f.result_async(timeout=60)
                        outcomes.append("ok")
                    except Exception as exc:
                        outcomes.append(exc)
                return outcomes

            outcomes = asyncio.run(stream())
            elapsed = time.monotonic() - started
        errors = [o for o in outcomes if o != "ok"]
        assert errors, outcomes
        assert outcomes[: outcomes.index(errors[0])] == ["ok"] * outcomes.index(errors[0])
        for e in errors:
            assert e.code == grpc.StatusCode.UNAVAILABLE, e
        assert "rank 1" in errors[0].message, errors[0].message
        assert elapsed < 60
        status = health.Check(health_pb2.HealthCheckRequest(service="cispo.v1.TrainingService")).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        with TrainingClient(leader.address) as client, pytest.raises(UnavailableError, match="rank 1"):
            client.forward(batch(7)).result()
    finally:
        assert leader.terminate(timeout=60) == 3
        for w in workers:
            w.kill()
