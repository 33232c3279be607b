"""No request can make weights non-finite, and a refused step or batch changes nothing: AdamParams
checked in float32, a dry run before every step, gradients checked before they are summed."""

import math

import pytest
import torch

from cispo.worker import AdamParams, InvalidInput, Sample, StepRefused
from reference import make_samples


def snapshot(engine):
    """Weights, gradients, moments and step count, copied."""
    return (
        {n: p.detach().clone() for n, p in engine.named_params.items()},
        {n: None if p.grad is None else p.grad.clone() for n, p in engine.named_params.items()},
        {k: v.clone() for k, v in engine.optimizer.state_tensors().items()},
        engine.optimizer.step_count,
    )


def assert_same(a, b):
    weights_a, grads_a, moments_a, step_a = a
    weights_b, grads_b, moments_b, step_b = b
    assert step_a == step_b
    assert weights_a.keys() == weights_b.keys() and moments_a.keys() == moments_b.keys()
    for n in weights_a:
        assert torch.equal(weights_a[n], weights_b[n]), n
        assert (grads_a[n] is None and grads_b[n] is None) or torch.equal(grads_a[n], grads_b[n]), n
    for k in moments_a:
        assert torch.equal(moments_a[k], moments_b[k]), k


@pytest.fixture
def stepped(engine):
    """An engine one step in (so it has moments) with a gradient accumulated."""
    engine.forward_backward(make_samples([8, 5], seed=0))
    engine.optim_step(AdamParams(learning_rate=1e-3))
    engine.forward_backward(make_samples([6], seed=1))
    return engine


@pytest.mark.parametrize("field,value,text", [
    ("eps", 1e-50, "rounds to 0"),
    ("eps", 0.0, "> 0"),
    ("learning_rate", 1e39, "finite in float32"),
    ("learning_rate", -1e-4, ">= 0"),
    ("learning_rate", math.nan, "finite"),
    ("beta1", 1.0, "[0, 1)"),
    ("beta2", 1 - 1e-12, "rounds to 1.0"),
    ("beta2", -0.1, "[0, 1)"),
    ("weight_decay", math.inf, "finite"),
    ("grad_clip_norm", -1.0, ">= 0"),
])
def test_adam_params_are_checked_in_float32(field, value, text):
    with pytest.raises(InvalidInput) as err:
        AdamParams(**{field: value})
    [violation] = err.value.violations
    assert violation.field == f"adam_params.{field}" and text in violation.description


def test_matches_torch_adamw(engine):
    """The step is torch's AdamW arithmetic (decoupled weight decay), bit for bit."""
    params = {n: p for n, p in engine.named_params.items()}
    reference = {n: p.detach().clone().requires_grad_() for n, p in params.items()}
    adamw = torch.optim.AdamW(list(reference.values()), lr=1e-3, betas=(0.8, 0.9), eps=1e-8, weight_decay=0.1)
    adam = AdamParams(learning_rate=1e-3, beta1=0.8, beta2=0.9, eps=1e-8, weight_decay=0.1)
    for seed in range(3):
        engine.forward_backward(make_samples([7, 4], seed=seed))
        for n, p in params.items():
            reference[n].grad = p.grad.clone()
        engine.optim_step(adam)
        adamw.step()
    for n, p in params.items():
        assert torch.equal(p.detach(), reference[n].detach()), n


def test_a_step_that_would_overflow_changes_nothing_and_keeps_the_gradient(stepped):
    before = snapshot(stepped)
    with pytest.raises(StepRefused, match="would make weights or Adam moments non-finite.*gradient is kept"):
        stepped.optim_step(AdamParams(learning_rate=3e38))  # finite in float32, the update is not
    assert_same(snapshot(stepped), before)
    stepped.optim_step(AdamParams(learning_rate=1e-3))  # the kept gradient applies normally
    assert all(torch.isfinite(p).all() for p in stepped.named_params.values())


def test_a_tiny_eps_that_overflows_the_update_is_refused(stepped):
    for p in stepped.named_params.values():  # moments of 0 where the gradient is tiny
        p.grad.mul_(1e-30)
    before = snapshot(stepped)
    try:
        stepped.optim_step(AdamParams(eps=1e-45, learning_rate=1e30, beta2=0.0))
    except StepRefused:
        assert_same(snapshot(stepped), before)
    assert all(torch.isfinite(p).all() for p in stepped.named_params.values())


def test_a_non_finite_gradient_is_dropped_and_the_step_refused(stepped):
    weights, _, moments, step = snapshot(stepped)
    next(iter(stepped.named_params.values())).grad[0] = math.inf
    with pytest.raises(StepRefused, match="not finite.*dropped.*unchanged"):
        stepped.optim_step(AdamParams())
    assert_same(snapshot(stepped), (weights, dict.fromkeys(weights), moments, step))


def test_huge_advantages_are_refused_with_the_gradient_unchanged(stepped):
    before = snapshot(stepped)
    [sample] = make_samples([6], seed=2)
    huge = Sample(sample.model_input, {**sample.loss_fn_inputs, "advantages": torch.full((6,), 3e38)})
    with pytest.raises(InvalidInput, match="not finite in float32.*accumulated gradient is unchanged"):
        stepped.forward_backward([huge])
    assert_same(snapshot(stepped), before)


def test_doubles_beyond_float32_are_rejected(stepped):
    before = snapshot(stepped)
    [sample] = make_samples([6], seed=3)
    advantages = sample.loss_fn_inputs["advantages"].double()
    advantages[4] = 1e300
    with pytest.raises(InvalidInput) as err:
        stepped.forward_backward([Sample(sample.model_input, {**sample.loss_fn_inputs, "advantages": advantages})])
    [violation] = err.value.violations
    assert violation.field == "data[0].loss_fn_inputs.advantages"
    assert "1e+300 at position 4 is not finite in float32" in violation.description
    assert_same(snapshot(stepped), before)


def test_loss_inputs_the_loss_does_not_use_are_rejected(engine):
    [sample] = make_samples([5], seed=4, with_weights=True)
    with pytest.raises(InvalidInput) as err:
        engine.forward_backward([sample], "cispo")
    [violation] = err.value.violations
    assert violation.field == "data[0].loss_fn_inputs.weights"
    assert "not used by loss 'cispo'" in violation.description
    assert all(p.grad is None for p in engine.named_params.values())
