"""Training runs in data-parallel groups (torchrun, gloo): LoRA runs on a replicated base and on a
base that `--sharding fsdp` shards, interleaved with each other, saved, resumed, exported and
sampled, then a full fine-tune on a fresh base, against the same calls on a single process."""

import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from server_process import ServerProcess
from test_data_parallel import batch
from test_fsdp import read_state, torchrun

from cispo.client import (
    AdamParams,
    FailedPreconditionError,
    ModelInput,
    NotFoundError,
    ResourceExhaustedError,
    SamplingParams,
    ServiceClient,
)

pytestmark = pytest.mark.timeout(600)
ADAM = AdamParams(learning_rate=1e-2, grad_clip_norm=1.0)


def outputs(result) -> dict:
    return {"metrics": result.metrics, "logprobs": [o["logprobs"].to_numpy() for o in result.loss_fn_outputs]}


def train_runs(address: str, checkpoint_dir, sampler_dir) -> dict:
    """Two LoRA runs interleaved (one adapting only the MLP, one everything), a state saved and
    resumed into a third run, exports sampled, every run unloaded, then the default full run."""
    out = {"results": [], "grad_norms": [], "samples": []}
    greedy = SamplingParams(max_tokens=6, temperature=0.0)
    with ServiceClient(address, wait_for_ready=True) as service:
        a = service.create_lora_training_client(rank=4, seed=1)
        b = service.create_lora_training_client(rank=2, seed=2, train_attn=False, train_unembed=False)
        for step in range(2):
            for run, seed in ((a, 10 + step), (b, 20 + step)):
                out["results"].append(outputs(run.forward_backward(batch(seed)).result()))
                out["grad_norms"].append(run.optim_step(ADAM).result().grad_norm)
        out["info"] = [a.get_info(), b.get_info()]
        out["listed"] = sorted((m.lora_rank, m.step) for m in service.list_models())
        a.save_state("a-state").result()
        adapter = a.save_weights_and_get_sampling_client("a-adapter")
        out["samples"].append(adapter.sample(ModelInput.from_ints([4, 5, 6]), 2, greedy).result())
        out["samples"].append(a.create_sampling_client().sample(ModelInput.from_ints([4, 5, 6]), 2, greedy).result())
        a.save_weights_for_sampler("shared").result()
        path = b.save_weights_for_sampler("shared").result().path  # b wrote the files last
        for sampler in (service.create_sampling_client(model_path=path), b.create_sampling_client()):
            out["samples"].append(
                sampler.sample(ModelInput.from_ints([7, 8, 9]), 1, greedy, include_prompt_logprobs=True).result()
            )
        a.save_weights_for_sampler("a-merged", merged=True).result()
        resumed = service.create_training_client_from_state_with_optimizer("a-state")
        out["resumed_step"] = resumed.get_info().step
        out["resumed"] = [outputs(run.forward_backward(batch(30)).result()) for run in (resumed, a)]
        out["resumed_norms"] = [run.optim_step(ADAM).result().grad_norm for run in (resumed, a)]
        with pytest.raises(FailedPreconditionError, match="LoRA run"):
            service.create_full_training_client()  # LoRA runs share the base
        for run in (a, b, resumed):
            service.unload_model(run.model_id)
        with pytest.raises(NotFoundError):
            b.optim_step(ADAM).result()
        full = service.create_full_training_client()  # on a fresh base: no adapter ever trained it
        out["full"] = outputs(full.forward_backward(batch(40)).result())
        out["full_norm"] = full.optim_step(ADAM).result().grad_norm
    out["state"] = read_state(checkpoint_dir / "a-state")
    out["adapter"] = load_file(sampler_dir / "a-adapter" / "adapter_model.safetensors")
    out["merged"] = read_state(sampler_dir / "a-merged")
    return out


def assert_same(expected: dict, got: dict) -> None:
    for a, b in zip(
        expected["results"] + expected["resumed"] + [expected["full"]],
        got["results"] + got["resumed"] + [got["full"]],
        strict=True,
    ):
        assert a["metrics"].keys() == b["metrics"].keys()
        for key in a["metrics"]:
            assert b["metrics"][key] == pytest.approx(a["metrics"][key], rel=1e-5, abs=1e-6), key
        for x, y in zip(a["logprobs"], b["logprobs"], strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-5)
    for key in ("grad_norms", "resumed_norms", "full_norm"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key
    assert got["resumed_step"] == expected["resumed_step"] == 2 and got["listed"] == expected["listed"]
    for a, b in zip(expected["samples"], got["samples"], strict=True):
        assert [s.tokens for s in b.sequences] == [s.tokens for s in a.sequences]
        assert (a.prompt_logprobs is None) == (b.prompt_logprobs is None)
        if a.prompt_logprobs is not None:
            np.testing.assert_allclose(b.prompt_logprobs[1:], a.prompt_logprobs[1:], rtol=1e-5, atol=1e-5)
    by_path, on_b = got["samples"][-2:]  # the export b wrote last is b's weights
    np.testing.assert_allclose(by_path.prompt_logprobs[1:], on_b.prompt_logprobs[1:], rtol=1e-5, atol=1e-5)
    for key in ("state", "adapter", "merged"):
        assert got[key].keys() == expected[key].keys(), key
        for name, w in expected[key].items():
            torch.testing.assert_close(got[key][name], w, rtol=1e-5, atol=1e-6, msg=f"{key} {name}")
    for mine, theirs in zip(expected["info"], got["info"], strict=True):
        assert theirs.memory.parameter_bytes == mine.memory.parameter_bytes > 0  # the adapter: whole on each rank


FLAGS = ("--sampler-dtype", "float32")


@pytest.fixture(scope="module")
def expected(tmp_path_factory):
    """What a single process gives."""
    root = tmp_path_factory.mktemp("w1")
    single = ServerProcess(*FLAGS, checkpoint_dir=root / "states")
    try:
        return train_runs(single.address, root / "states", root / "states-sampler")
    finally:
        single.terminate()


@pytest.mark.parametrize(
    "sharding, flags",
    [("replicated", ("--gradient-accumulation", "in-place")), ("fsdp", ("--activation-checkpointing",))],
)
def test_lora_runs_in_a_group_equal_a_single_process(tmp_path, expected, sharding, flags):
    group = ServerProcess(*FLAGS, "--sharding", sharding, *flags, checkpoint_dir=tmp_path / "w2", launcher=torchrun(2))
    try:
        got = train_runs(group.address, tmp_path / "w2", tmp_path / "w2-sampler")
    finally:
        group.terminate()
    assert [i.sharding for i in got["info"]] == [sharding] * 2
    assert_same(expected, got)


def test_a_run_made_on_only_some_ranks_is_dropped_everywhere(tmp_path):
    """Rank 1 alone holds at most one run (CISPO_MAX_RUNS=1 in its environment only), so a
    second LoRA run is made on rank 0 and refused on rank 1: the group drops it on rank 0 too,
    answers RESOURCE_EXHAUSTED, and goes on serving the first; once that is unloaded a new one
    is made everywhere."""
    rank_1_limited = [
        "--no-python",
        "sh",
        "-c",
        'if [ "$RANK" = 1 ]; then export CISPO_MAX_RUNS=1; fi; exec "$0" "$@"',
        sys.executable,
    ]
    group = ServerProcess(*FLAGS, checkpoint_dir=tmp_path / "states", launcher=torchrun(2) + rank_1_limited)
    try:
        with ServiceClient(group.address, wait_for_ready=True) as service:
            a = service.create_lora_training_client(rank=2, seed=1)
            with pytest.raises(ResourceExhaustedError, match="runs"):
                service.create_lora_training_client(rank=2, seed=2)
            assert [m.model_id for m in service.list_models()] == [a.model_id]  # none left on rank 0
            a.forward_backward(batch(1)).result()
            assert a.optim_step(ADAM).result().grad_norm > 0
            service.unload_model(a.model_id)
            b = service.create_lora_training_client(rank=2, seed=2)
            assert [m.model_id for m in service.list_models()] == [b.model_id]
            b.forward_backward(batch(2)).result()
            assert b.optim_step(ADAM).result().grad_norm > 0
    finally:
        group.terminate()


def bf16_lora_steps(address: str) -> dict:
    """A LoRA run's two steps and a forward after them, in bf16."""
    out = {"results": [], "grad_norms": []}
    with ServiceClient(address, wait_for_ready=True) as service:
        run = service.create_lora_training_client(rank=4, seed=1)
        for seed in (50, 51):
            out["results"].append(outputs(run.forward_backward(batch(seed)).result()))
            out["grad_norms"].append(run.optim_step(ADAM).result().grad_norm)
        out["final"] = outputs(run.forward(batch(52)).result())
    return out


def test_lora_over_bf16_shards_equals_a_replicated_bf16_base(tmp_path):
    """Under fsdp a LoRA run's frozen base is cast to bf16 shards (half the bytes of fp32 ones),
    its buffers (rotary frequencies) left in fp32: two steps and a forward equal those of a
    replicated group, whose whole base is bf16."""
    got = {}
    for sharding in ("replicated", "fsdp"):
        server = ServerProcess(
            *FLAGS,
            "--dtype",
            "bfloat16",
            "--sharding",
            sharding,
            checkpoint_dir=tmp_path / sharding,
            launcher=torchrun(2),
        )
        try:
            got[sharding] = bf16_lora_steps(server.address)
        finally:
            server.terminate()
    replicated, fsdp = got["replicated"], got["fsdp"]
    assert fsdp["grad_norms"] == pytest.approx(replicated["grad_norms"], rel=1e-6)
    for a, b in zip(replicated["results"] + [replicated["final"]], fsdp["results"] + [fsdp["final"]], strict=True):
        assert b["metrics"] == pytest.approx(a["metrics"], rel=1e-6, abs=1e-6)
        for x, y in zip(a["logprobs"], b["logprobs"], strict=True):
            np.testing.assert_allclose(y, x, rtol=1e-6, atol=1e-6)
