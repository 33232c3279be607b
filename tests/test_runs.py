"""Training runs on one base: full and LoRA runs exclude each other, limits, ownership, a
fresh base after a run of the other kind, states per run, and LoRA exports that PEFT loads."""

import peft
import pytest
import torch
from reference import make_samples, naive_target_logprobs
from transformers import AutoModelForCausalLM

from cispo.worker import EngineConfig, load_policy_model, lora
from cispo.worker.config import ExportConfig
from cispo.worker.errors import LimitExceeded, RunConflict, RunNotFound, StateNotFound
from cispo.worker.optimizer import AdamParams
from cispo.worker.runs import DEFAULT_RUN, TrainingRuns
from cispo.worker.sampling import SampleRequest, SamplingParams, validate_sample_request

SPEC = lora.LoraSpec(rank=4, seed=1)


@pytest.fixture
def runs(tmp_path):
    config = EngineConfig(
        checkpoint_dir=tmp_path / "states", export=ExportConfig(sampler_dir=tmp_path / "sampler", dtype="float32")
    )
    return TrainingRuns(load_policy_model(), config, max_runs=3, reload=load_policy_model)


def train(engine, seed=0, steps=2):
    for i in range(steps):
        engine.forward_backward(make_samples([12, 7], seed=seed + i), "cispo")
        engine.optim_step(AdamParams(learning_rate=5e-2))


def test_full_and_lora_runs_exclude_each_other(runs):
    default = runs.get("", None)
    assert default.adapter is None and [r.model_id for r in runs.list_runs(None)] == [DEFAULT_RUN]
    with pytest.raises(RunConflict, match="unload it"):
        runs.create("alice", SPEC)
    runs.unload(DEFAULT_RUN, None)
    a = runs.create("alice", SPEC)
    with pytest.raises(RunConflict, match="name a LoRA run"):
        runs.get("", None)
    with pytest.raises(RunConflict, match="LoRA run"):
        runs.create("alice", None)
    assert runs.info(a, "alice").lora == SPEC


def test_max_runs_and_ownership(runs):
    ids = [runs.create("alice", SPEC), runs.create("bob", SPEC), runs.create(None, SPEC)]
    with pytest.raises(LimitExceeded, match="max_runs=3") as raised:
        runs.create("alice", SPEC)
    assert raised.value.limit == "max_runs"
    with pytest.raises(RunNotFound):
        runs.get(ids[1], "alice")  # bob's run is invisible to alice
    with pytest.raises(RunNotFound):
        runs.unload(ids[1], "alice")
    assert {r.model_id for r in runs.list_runs("alice")} == {ids[0], ids[2]}
    runs.unload(ids[0], "alice")
    assert len(runs) == 2 and runs.create("alice", SPEC)


def test_a_run_after_a_full_run_starts_from_the_served_model(runs):
    served = {n: p.detach().clone() for n, p in runs.policy.model.named_parameters()}
    train(runs.get("", None))
    runs.unload(DEFAULT_RUN, None)
    a = runs.get(runs.create(None, SPEC), None)
    sample = make_samples([9], seed=5)[0]
    out = a.forward([sample], "cispo")
    reference = load_policy_model().model
    torch.testing.assert_close(out.logprobs[0], naive_target_logprobs(reference, sample).detach(), atol=1e-5, rtol=0)
    base = {n.replace(".base_layer.", "."): p for n, p in runs.policy.model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(base[n], p) for n, p in served.items())
    runs.unload(a.adapter, None)
    assert runs.policy.peft is None
    full = runs.get("", None)  # and a full run after LoRA runs trains every parameter again
    assert len(full.named_params) == len(served) and all(p.requires_grad for p in full.named_params.values())


def test_lora_state_saves_and_creates_a_run_with_or_without_optimizer(runs):
    a = runs.get(runs.create("alice", SPEC), "alice")
    train(a)
    a.save_state("a-state", owner="alice")
    before = {n: p.detach().clone() for n, p in a.named_params.items()}
    for with_optimizer in (True, False):
        b = runs.get(runs.create_from_state("alice", "a-state", with_optimizer), "alice")
        assert b.lora_spec == SPEC and b.optimizer.step_count == (2 if with_optimizer else 0)
        assert all(torch.equal(p, before[n]) for n, p in b.named_params.items())
        runs.unload(b.adapter, "alice")
    with pytest.raises(StateNotFound, match="^no saved state named 'a-state'"):
        runs.create_from_state("bob", "a-state", True)  # another identity's state: as if missing
    assert len(runs) == 1
    runs.unload(a.adapter, "alice")
    full = runs.get("", None)
    with pytest.raises(StateNotFound, match="full fine-tuning run"):
        full.load_state("a-state", owner="alice")
    train(full)
    full.save_state("full-state")
    runs.unload(DEFAULT_RUN, None)
    with pytest.raises(StateNotFound, match="LoRA run"):  # a full state into a LoRA run
        runs.get(runs.create(None, SPEC), None).load_state("full-state")


def test_lora_export_loads_in_peft_with_identical_logprobs_and_samples_on_its_adapter(runs, tmp_path):
    a = runs.get(runs.create(None, SPEC), None)
    train(a)
    path = a.save_weights_for_sampler("a-export")
    assert {p.name for p in path.iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    sample = make_samples([15], seed=9)[0]
    ours = a.forward([sample], "cispo").logprobs[0]
    loaded = peft.PeftModel.from_pretrained(load_policy_model().model, str(path))
    torch.testing.assert_close(ours, naive_target_logprobs(loaded, sample).detach(), atol=1e-5, rtol=0)

    # Sampling at T=1 on the run and on its export: logprobs are the trainer's.
    prompt = torch.tensor([3, 14, 15, 92])
    for model_path in ("", "a-export"):
        request = validate_sample_request(
            SampleRequest(prompt, 2, SamplingParams(max_tokens=6, seed=4), model_path=model_path),
            a.policy,
            a.config.sampling,
        )
        result = a.sample([request])[0]
        for seq in result.sequences:
            tokens = torch.cat([prompt, seq.tokens])
            full = naive_target_logprobs(loaded, type(sample)(tokens[:-1], {"target_tokens": tokens[1:]}))
            torch.testing.assert_close(seq.logprobs, full[len(prompt) - 1 :].detach(), atol=1e-4, rtol=0)

    merged = a.save_weights_for_sampler("a-merged", merged=True)
    model = AutoModelForCausalLM.from_pretrained(merged)
    torch.testing.assert_close(ours, naive_target_logprobs(model, sample).detach(), atol=1e-5, rtol=0)
