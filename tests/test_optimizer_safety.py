"""No request can make weights non-finite or the policy degenerate, and a refused step or batch
changes nothing: AdamParams checked in float32, every step tried and undone unless its weights
are finite and the policy they make is not degenerate, gradients checked before they are summed."""

import math
import os

import pytest
import torch
import torch.multiprocessing as mp
from reference import make_samples

from cispo.worker import AdamParams, Engine, EngineConfig, InvalidInput, Sample, StepRefused, load_policy_model, lora
from cispo.worker.sharding import local


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


@pytest.mark.parametrize(
    "field,value,text",
    [
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
    ],
)
def test_adam_params_are_checked_in_float32(field, value, text):
    with pytest.raises(InvalidInput) as err:
        AdamParams(**{field: value})
    [violation] = err.value.violations
    assert violation.field == f"adam_params.{field}" and text in violation.description


def test_matches_torch_adamw(engine):
    """The step is torch's AdamW arithmetic (decoupled weight decay), bit for bit."""
    params = dict(engine.named_params)
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


UNIFORM = -math.log(1024)  # the embedded model's logprob of every token under a uniform distribution


def uniform(engine) -> bool:
    """Whether forward gives every token UNIFORM: -log(1024) rounded once to float32, so within
    half an ulp of [4, 8), 2**-22 (the issue's -6.931472)."""
    logprobs = torch.cat(engine.forward(make_samples([8, 5], seed=9)).logprobs).double()
    return bool(((logprobs - UNIFORM).abs() <= 2**-22).all())


def test_a_learning_rate_that_collapses_the_policy_is_refused_and_changes_nothing(engine, tmp_path):
    """Issue 23: lr=1e6 leaves every weight finite (about +-1e6), but the RMS norms' sums of
    squares overflow to inf and their outputs to 0, so every logit is 0 and every logprob
    UNIFORM. The step is refused; a smaller one then applies as if the refused one never was."""
    engine.forward_backward(make_samples([8, 5], seed=0))
    before = snapshot(engine)
    with pytest.raises(
        StepRefused,
        match=r"would make the policy degenerate \(.*all equal.*learning_rate=1e\+06.*"
        r"gradient is kept: retry with a smaller learning_rate",
    ):
        engine.optim_step(AdamParams(learning_rate=1e6))
    assert_same(snapshot(engine), before)
    assert engine.optim_step(AdamParams(learning_rate=1e-3)).step == 1
    assert not uniform(engine)
    fresh = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path / "fresh", micro_batch_tokens=64))
    fresh.forward_backward(make_samples([8, 5], seed=0))
    fresh.optim_step(AdamParams(learning_rate=1e-3))
    assert_same(snapshot(engine), snapshot(fresh))


def test_a_lora_step_that_collapses_the_policy_is_refused_and_changes_nothing(tmp_path):
    policy = load_policy_model()
    spec = lora.LoraSpec(rank=4, seed=3)
    lora.add_adapter(policy, "run", spec)
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path), adapter="run", lora_spec=spec)
    engine.forward_backward(make_samples([8, 5], seed=0))
    before = snapshot(engine)
    with pytest.raises(StepRefused, match="would make the policy degenerate.*learning_rate=1e\\+06"):
        engine.optim_step(AdamParams(learning_rate=1e6))
    assert_same(snapshot(engine), before)
    engine.optim_step(AdamParams(learning_rate=1e-3))
    assert not uniform(engine)


def collapse(engine) -> None:
    """Weights as a step of lr=1e6 leaves them, applied past the engine's check (as a state
    saved before it existed would load)."""
    engine.forward_backward(make_samples([8, 5], seed=0))
    engine.optimizer.step(AdamParams(learning_rate=1e6))
    assert uniform(engine)


def test_a_step_on_a_policy_degenerate_already_blames_the_weights(engine):
    collapse(engine)
    engine.forward_backward(make_samples([6], seed=1))
    before = snapshot(engine)
    with pytest.raises(StepRefused, match=r"degenerate already, before this step \(.*all equal.*load an earlier state"):
        engine.optim_step(AdamParams(learning_rate=1e-3))
    assert_same(snapshot(engine), before)


def test_a_non_finite_gradient_that_the_weights_cause_is_blamed_on_them(engine):
    with torch.no_grad():  # every logit +-inf: each logprob inf - inf = NaN, whatever the batch
        engine.policy.model.get_output_embeddings().weight.fill_(3e38)
    with pytest.raises(
        InvalidInput,
        match="not finite in float32 because of the weights, not this batch: the "
        "policy is degenerate .*not finite.*accumulated gradient is unchanged",
    ):
        engine.forward_backward(make_samples([6], seed=1))


def _group_rank(rank: int, port: int, sharding: str, out_dir: str) -> None:
    """One rank of a 2-rank gloo group: a forward_backward and a step to be refused; writes what
    it saw.
    "diverged": rank 1's replica alone is degenerate (its final norm zeroed) and the step (lr=0)
    leaves it so, so only rank 1 would refuse on its own."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from cispo.worker.group import init_group, member

    ctx = init_group(torch.device("cpu"))
    engine = Engine(
        load_policy_model(shard=sharding == "fsdp"), EngineConfig(checkpoint_dir=out_dir), member=member(ctx)
    )
    if sharding == "diverged" and rank == 1:
        with torch.no_grad():
            engine.policy.model.model.norm.weight.zero_()
    samples = make_samples([8], seed=rank)
    engine.run_batch(samples, *engine.validate(samples, "cispo", None), backward=True, micro_batches=1)
    before = {n: local(p.detach()).clone() for n, p in engine.named_params.items()}
    try:
        engine.optim_step(AdamParams(learning_rate=1e6 if sharding != "diverged" else 0.0))
        refusal = None
    except StepRefused as exc:
        refusal = str(exc)
    unchanged = all(torch.equal(before[n], local(p.detach())) for n, p in engine.named_params.items())
    torch.save(
        {"refusal": refusal, "unchanged": unchanged, "step": engine.optimizer.step_count},
        os.path.join(out_dir, f"rank{rank}.pt"),
    )
    torch.distributed.destroy_process_group()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sharding", ["replicated", "fsdp", "diverged"])
def test_every_rank_of_a_group_refuses_together(tmp_path, sharding):
    from test_data_parallel import free_port

    mp.spawn(_group_rank, args=(free_port(), sharding, str(tmp_path)), nprocs=2)
    seen = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = "degenerate already" if sharding == "diverged" else "would make the policy degenerate"
    for rank in seen:
        assert rank["unchanged"] and rank["step"] == 0
        assert rank["refusal"] is not None and expected in rank["refusal"], rank["refusal"]
