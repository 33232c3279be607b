"""`--sharding fsdp`: FSDP2 groups on real torch.distributed (gloo on CPU), launched with torchrun."""

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from server_process import ServerProcess
from test_data_parallel import batch, free_port, start_cluster_ranks
from transformers import AutoModelForCausalLM

from cispo.client import AdamParams, FailedPreconditionError, ModelInput, SamplingParams, TrainingClient
from cispo.worker import sharded_checkpoint
from cispo.worker.sharding import state_bytes

pytestmark = pytest.mark.timeout(600)


def torchrun(world_size: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={world_size}",
        f"--master-port={free_port()}",
    ]


def read_state(path) -> dict[str, torch.Tensor]:
    """A saved state's weights, whole, whatever its format (v1 safetensors, v2 DCP)."""
    if (path / "model.safetensors").exists():
        return load_file(path / "model.safetensors")
    shapes = sharded_checkpoint.saved_tensors(path, path.name)
    targets = {
        k: torch.empty(shape, dtype=dtype)
        for k, (shape, dtype) in shapes.items()
        if k.startswith(sharded_checkpoint.WEIGHTS)
    }
    sharded_checkpoint.load(path, path.name, targets, None)
    return {k.removeprefix(sharded_checkpoint.WEIGHTS): v for k, v in targets.items()}


def train(address: str, checkpoint_dir) -> dict:
    """Two rounds of forward_backward (two calls in the first) + step, with a refused step
    between them, a save, samples and an export; returns what the test compares."""
    with TrainingClient(address, wait_for_ready=True) as client:
        info = client.get_info()
        out = {"info": [info], "results": [], "grad_norms": []}
        for seeds in ((1, 4), (2,)):  # the first step's gradient accumulates over two calls
            for seed in seeds:
                out["results"].append(
                    client.forward_backward(
                        batch(seed), "cispo", {"clip_low_threshold": 0.5, "clip_high_threshold": 2.0}
                    ).result()
                )
            with pytest.raises(FailedPreconditionError, match="non-finite"):
                client.optim_step(AdamParams(learning_rate=3e38)).result()
            out["grad_norms"].append(
                client.optim_step(AdamParams(learning_rate=1e-3, grad_clip_norm=50.0)).result().grad_norm
            )
            out["info"].append(client.get_info())
        out["final"] = client.forward(batch(3)).result()
        client.save_state("final").result()
        greedy = SamplingParams(max_tokens=12, temperature=0.0)
        drawn = SamplingParams(max_tokens=12, temperature=1.0, seed=7)
        sampler = client.create_sampling_client()
        out["sample"] = [sampler.sample(ModelInput.from_ints([4, 5, 6]), 2, p).result() for p in (greedy, drawn)]
        saved = client.save_weights_and_get_sampling_client("final")
        again = saved.sample(ModelInput.from_ints([4, 5, 6]), 2, greedy).result()
        assert [s.tokens for s in again.sequences] == [s.tokens for s in out["sample"][0].sequences]
    out["weights"] = read_state(checkpoint_dir / "final")
    return out


def test_fsdp_two_ranks_equal_one_rank(tmp_path):
    """W=2 fsdp (activation checkpointing, in-place gradient accumulation) against W=1
    (replicated, exact accumulation): the same results, steps, samples, weights and export."""
    single = ServerProcess("--sampler-dtype", "float32", checkpoint_dir=tmp_path / "w1")
    try:
        one = train(single.address, tmp_path / "w1")
    finally:
        single.terminate()
    group = ServerProcess(
        "--sampler-dtype",
        "float32",
        "--sharding",
        "fsdp",
        "--activation-checkpointing",
        "--gradient-accumulation",
        "in-place",
        "--sampler-max-shard-bytes",
        "300000",
        checkpoint_dir=tmp_path / "w2",
        launcher=torchrun(2),
    )
    try:
        two = train(group.address, tmp_path / "w2")
    finally:
        group.terminate()
    assert [i.sharding for i in (one["info"][0], two["info"][0])] == ["replicated", "fsdp"]
    for a, b in zip(one["results"] + [one["final"]], two["results"] + [two["final"]]):
        assert a.metrics.keys() == b.metrics.keys()
        for key in a.metrics:
            assert b.metrics[key] == pytest.approx(a.metrics[key], rel=1e-5, abs=1e-6), key
        for x, y in zip(a.loss_fn_outputs, b.loss_fn_outputs):
            np.testing.assert_allclose(y["logprobs"].to_numpy(), x["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5)
    assert min(one["grad_norms"]) > 50  # clipping to 50 is at work: the group clips by the norm over all shards
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-5)
    for a, b in zip(one["sample"], two["sample"]):
        assert [s.tokens for s in b.sequences] == [s.tokens for s in a.sequences]
        for x, y in zip(a.sequences, b.sequences):
            np.testing.assert_allclose(y.logprobs, x.logprobs, atol=1e-4)
    assert one["weights"].keys() == two["weights"].keys()
    for name, w in one["weights"].items():
        err = (two["weights"][name] - w).abs().max().item()
        assert err <= 1e-5 * w.abs().max().item() + 1e-7, name
    # The streamed export is an HF directory transformers loads, with the trained weights, in
    # files of at most --sampler-max-shard-bytes (a bigger tensor alone) and their index.
    files = sorted(p.name for p in (tmp_path / "w2-sampler" / "final").glob("model*.safetensors*"))
    assert len(files) > 2 and files[-1] == "model.safetensors.index.json", files
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "w2-sampler" / "final", dtype=torch.float32)
    for name, p in exported.named_parameters():
        torch.testing.assert_close(p.detach(), two["weights"][name], rtol=0, atol=0)
    # Each rank holds about half the parameters and moments of a single rank (one shard of each).
    whole, shard = one["info"][1].memory, two["info"][1].memory  # after a step (a single process's run
    assert whole.parameter_bytes == 4 * sum(w.numel() for w in one["weights"].values())  # is made by the first)
    assert shard.parameter_bytes == pytest.approx(whole.parameter_bytes / 2, rel=0.01)
    assert whole.optimizer_bytes >= 2 * whole.parameter_bytes
    assert shard.optimizer_bytes == pytest.approx(whole.optimizer_bytes / 2, rel=0.01)
    assert (whole.gradient_bytes, shard.gradient_bytes) == (0, 0)  # stepped: no gradient left
    # The accounting docs/scaling.md tabulates predicts both (AdamW's step counters aside).
    n = sum(w.numel() for w in one["weights"].values())
    for use, predicted in ((whole, state_bytes(n)), (shard, state_bytes(n, 2, "fsdp"))):
        assert use.parameter_bytes == pytest.approx(predicted.parameters, rel=0.01)
        assert use.optimizer_bytes == pytest.approx(predicted.optimizer, rel=0.01)


def test_fsdp_states_load_across_group_sizes_and_formats(tmp_path):
    """A state saved by an fsdp group of 2 loads into a single process and into an fsdp group of
    3, which saves one that loads back into 2; and a v1 state (a single process's) loads into
    an fsdp group."""
    root = tmp_path / "states"
    group = ServerProcess("--sharding", "fsdp", checkpoint_dir=root, launcher=torchrun(2))
    try:
        with TrainingClient(group.address, wait_for_ready=True) as client:
            client.forward_backward(batch(4)).result()
            client.optim_step(AdamParams(learning_rate=1e-2)).result()
            client.save_state("from-2").result()
            expected = client.forward(batch(5)).result().metrics["loss:sum"]
            client.forward_backward(batch(6)).result()
            stepped = client.optim_step(AdamParams(learning_rate=1e-2)).result().grad_norm
    finally:
        group.terminate()
    assert (root / "from-2" / ".metadata").is_file()

    def check(client: TrainingClient, name: str) -> None:
        """State `name` is the one saved at step 1: same loss, and the same next step."""
        assert client.load_state_with_optimizer(name).result().step == 1
        assert client.forward(batch(5)).result().metrics["loss:sum"] == pytest.approx(expected, rel=1e-5)
        client.forward_backward(batch(6)).result()
        assert client.optim_step(AdamParams(learning_rate=1e-2)).result().grad_norm == pytest.approx(stepped, rel=1e-5)
        client.load_state_with_optimizer(name).result()

    single = ServerProcess(checkpoint_dir=root)
    try:
        with TrainingClient(single.address, wait_for_ready=True) as client:
            check(client, "from-2")
            client.save_state("v1").result()  # a single process writes v1
    finally:
        single.terminate()
    assert (root / "v1" / "model.safetensors").is_file()
    leader, workers = start_cluster_ranks(root, 3, CISPO_SHARDING="fsdp")
    try:
        with TrainingClient(leader.address, wait_for_ready=True) as client:
            check(client, "from-2")
            client.save_state("from-3").result()
            check(client, "v1")
    finally:
        leader.terminate()
        [w.wait(60) for w in workers]
    group = ServerProcess("--sharding", "fsdp", checkpoint_dir=root, launcher=torchrun(2))
    try:
        with TrainingClient(group.address, wait_for_ready=True) as client:
            check(client, "from-3")
    finally:
        group.terminate()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_fsdp_reads_a_checkpoint_into_shards(tmp_path, arch):
    """A sharded group builds the model without weights and each rank reads its shards from
    the checkpoint: the same logprobs and loss as a single process that loads it whole."""
    from tiny_models import save_tiny_model

    save_tiny_model(tmp_path / arch, arch, vocab_size=1024)
    data = batch(8)
    results = []
    for launcher, flags in ((None, ()), (torchrun(2), ("--sharding", "fsdp"))):
        server = ServerProcess(
            "--model", str(tmp_path / arch), *flags, checkpoint_dir=tmp_path / f"c{len(results)}", launcher=launcher
        )
        try:
            with TrainingClient(server.address, wait_for_ready=True) as client:
                results.append(client.forward(data).result())
        finally:
            server.terminate()
    one, two = results
    assert two.metrics["loss:sum"] == pytest.approx(one.metrics["loss:sum"], rel=1e-5)
    for x, y in zip(one.loss_fn_outputs, two.loss_fn_outputs):
        np.testing.assert_allclose(y["logprobs"].to_numpy(), x["logprobs"].to_numpy(), rtol=1e-5, atol=1e-5)
