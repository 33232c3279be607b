"""LoRA runs through PEFT: gradients against a PEFT reference under the seed's formula, frozen
base, seeded initialisation, isolation of adapters, and the adapter export."""

import peft
import pytest
import torch
from reference import assert_grad_close, make_samples, naive_target_logprobs, seed_cispo_loss

from cispo.worker import Engine, EngineConfig, load_policy_model, lora
from cispo.worker.optimizer import AdamParams

SPEC = lora.LoraSpec(rank=4, seed=3)


def perturbed(engine: Engine, seed: int) -> None:
    """Random adapter weights (a new adapter's B is 0, which would hide the A gradient)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in engine.named_params.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.mark.parametrize("train_unembed", [True, False])
def test_lora_gradient_equals_autograd_on_a_peft_reference(tmp_path, train_unembed):
    policy = load_policy_model()
    spec = lora.LoraSpec(rank=4, seed=3, train_unembed=train_unembed)
    lora.add_adapter(policy, "run-a", spec)
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter="run-a", lora_spec=spec)
    perturbed(engine, 0)
    samples = make_samples([17, 9, 30], seed=1)
    out = engine.forward_backward(samples, "cispo")

    base = load_policy_model().model
    config = peft.LoraConfig(
        r=spec.rank, lora_alpha=lora.LORA_ALPHA, lora_dropout=0.0, target_modules=lora.target_modules(policy, spec)
    )
    reference = peft.get_peft_model(base, config)
    ref_params = {n.replace(".default.", "."): p for n, p in base.named_parameters() if "lora_" in n}
    assert ref_params.keys() == engine.named_params.keys()
    with torch.no_grad():
        for name, p in engine.named_params.items():
            ref_params[name].copy_(p)
    loss = 0
    for sample, logprobs in zip(samples, out.logprobs):
        t = naive_target_logprobs(reference, sample)
        torch.testing.assert_close(logprobs, t.detach(), atol=1e-5, rtol=1e-5)
        loss = loss + seed_cispo_loss(t, sample.loss_fn_inputs["logprobs"], sample.loss_fn_inputs["advantages"])
    loss.backward()
    assert out.metrics["loss:sum"] == pytest.approx(loss.item(), rel=1e-5)
    for name, p in engine.named_params.items():
        assert_grad_close(p.grad, ref_params[name].grad, name)
    assert any("lm_head" in n for n in engine.named_params) == train_unembed


def test_base_is_frozen_and_bit_unchanged_by_lora_steps(tmp_path):
    policy = load_policy_model()
    before = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    lora.add_adapter(policy, "run-a", SPEC)
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter="run-a", lora_spec=SPEC)
    for step in range(3):
        engine.forward_backward(make_samples([12, 20], seed=step), "cispo")
        engine.optim_step(AdamParams(learning_rate=1e-2))
    after = {n.replace(".base_layer.", "."): p for n, p in policy.model.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert not p.requires_grad and p.grad is None, name
        assert torch.equal(p, before[name]), name
    assert set(engine.optimizer.state_tensors()) <= {
        f"{n}/{k}" for n in engine.named_params for k in ("exp_avg", "exp_avg_sq", "step")
    }


def test_same_seed_gives_the_same_adapter_bit_for_bit():
    policy = load_policy_model()
    first = lora.add_adapter(policy, "a", lora.LoraSpec(rank=8, seed=5))
    torch.manual_seed(1234)  # the global RNG does not matter
    second = lora.add_adapter(policy, "b", lora.LoraSpec(rank=8, seed=5))
    other = lora.add_adapter(policy, "c", lora.LoraSpec(rank=8, seed=6))
    fresh = lora.add_adapter(load_policy_model(), "z", lora.LoraSpec(rank=8, seed=5))
    for name, p in first.items():
        assert torch.equal(p, second[name]) and torch.equal(p, fresh[name]), name
    assert any(not torch.equal(p, other[n]) for n, p in first.items() if "lora_A" in n)
    assert all(torch.count_nonzero(p) == 0 for n, p in first.items() if "lora_B" in n)  # starts as the base


def test_two_runs_interleaved_equal_each_alone(tmp_path):
    def steps(engine, seed):
        results = []
        for i in range(3):
            out = engine.forward_backward(make_samples([10, 14], seed=seed * 10 + i), "cispo")
            results.append((torch.cat(out.logprobs), engine.optim_step(AdamParams(learning_rate=1e-2)).grad_norm))
        return results

    def alone(name, seed):
        policy = load_policy_model()
        lora.add_adapter(policy, name, lora.LoraSpec(rank=4, seed=seed))
        return steps(Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter=name), seed)

    policy = load_policy_model()
    lora.add_adapter(policy, "a", lora.LoraSpec(rank=4, seed=1))
    lora.add_adapter(policy, "b", lora.LoraSpec(rank=4, seed=2))
    a = Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter="a")
    b = Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter="b")
    interleaved = {"a": [], "b": []}
    for i in range(3):
        for name, engine, seed in (("a", a, 1), ("b", b, 2)):
            out = engine.forward_backward(make_samples([10, 14], seed=seed * 10 + i), "cispo")
            interleaved[name].append(
                (torch.cat(out.logprobs), engine.optim_step(AdamParams(learning_rate=1e-2)).grad_norm)
            )
    for name, seed in (("a", 1), ("b", 2)):
        for (lp, norm), (lp_alone, norm_alone) in zip(interleaved[name], alone(name, seed)):
            assert torch.equal(lp, lp_alone) and norm == norm_alone
