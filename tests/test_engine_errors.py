"""Every rejection of the engine: a specific message, and the accumulated gradient untouched."""

import math
import pickle

import pytest
import torch
from reference import make_samples

from cispo.worker import (
    AdamParams,
    ComputeFailed,
    Engine,
    EngineConfig,
    InvalidInput,
    LimitExceeded,
    Sample,
    StateNotFound,
    errors,
    load_policy_model,
)
from cispo.worker.errors import FieldViolation


def grads_of(engine):
    return [None if p.grad is None else p.grad.clone() for p in engine.named_params.values()]


def assert_grads_equal(engine, before):
    for p, g in zip(engine.named_params.values(), before):
        assert (p.grad is None and g is None) or torch.equal(p.grad, g)


@pytest.fixture
def primed(engine):
    """An engine with some gradient already accumulated."""
    engine.forward_backward(make_samples([8, 5], seed=0))
    return engine


def with_input(sample: Sample, **changes) -> Sample:
    inputs = dict(sample.loss_fn_inputs)
    for k, v in changes.items():
        if v is None:
            inputs.pop(k)
        else:
            inputs[k] = v
    return Sample(sample.model_input, inputs)


CONFIG_CASES = [
    ({"clip_hi": 4.0}, "loss_fn_config.clip_hi", "unknown key"),
    ({"clip_low_threshold": -0.1}, "loss_fn_config.clip_low_threshold", ">= 0"),
    ({"clip_low_threshold": 3.0, "clip_high_threshold": 2.0}, "loss_fn_config.clip_high_threshold", "below"),
    ({"clip_high_threshold": math.nan}, "loss_fn_config.clip_high_threshold", "finite"),
    ({"clip_high_threshold": math.inf}, "loss_fn_config.clip_high_threshold", "finite"),
    ({"clip_high_threshold": 1e39}, "loss_fn_config.clip_high_threshold", "finite in float32"),
    (
        {"clip_high_threshold": 0.2},
        "loss_fn_config.clip_high_threshold",
        "not offsets from 1: for an epsilon of 0.2, pass 1.2",
    ),
]


@pytest.mark.parametrize("config,field,text", CONFIG_CASES)
def test_bad_config_is_rejected_and_changes_nothing(primed, config, field, text):
    before = grads_of(primed)
    with pytest.raises(InvalidInput) as err:
        primed.forward_backward(make_samples([4], seed=1), "cispo", config)
    assert [v.field for v in err.value.violations] == [field]
    assert text in err.value.violations[0].description
    assert_grads_equal(primed, before)


def test_ppo_thresholds_are_validated_too(primed):
    with pytest.raises(InvalidInput, match="epsilon of 0.2"):
        primed.forward(make_samples([4]), "ppo", {"clip_low_threshold": 0.0, "clip_high_threshold": 0.2})


def test_unknown_loss_and_keys_of_keyless_losses(primed):
    with pytest.raises(InvalidInput, match="unknown loss 'grpo'"):
        primed.forward_backward(make_samples([4]), "grpo")
    with pytest.raises(InvalidInput, match="allowed: none"):
        primed.forward_backward(make_samples([4]), "importance_sampling", {"clip_high_threshold": 2.0})


def bad_batches():
    good = make_samples([6], seed=2)[0]
    t = good.loss_fn_inputs
    return {
        "length mismatch": (
            with_input(good, logprobs=t["logprobs"][:5]),
            "data[1].loss_fn_inputs.logprobs",
            "length 5 != model_input length 6",
        ),
        "token outside vocab": (
            Sample(torch.tensor([1, 2, 3, 4, 5, 1024]), t),
            "data[1].model_input",
            "outside the vocabulary",
        ),
        "negative target": (
            with_input(good, target_tokens=torch.tensor([1, 2, -1, 4, 5, 6])),
            "data[1].loss_fn_inputs.target_tokens",
            "outside the vocabulary",
        ),
        "nan advantage": (
            with_input(good, advantages=torch.tensor([0.0, 1, math.nan, 0, 0, 0])),
            "data[1].loss_fn_inputs.advantages",
            "not finite",
        ),
        "inf logprob": (
            with_input(good, logprobs=torch.tensor([-1.0, -math.inf, -1, -1, -1, -1])),
            "data[1].loss_fn_inputs.logprobs",
            "not finite",
        ),
        "positive logprob": (
            with_input(good, logprobs=torch.tensor([-1.0, -1, 0.5, -1, -1, -1])),
            "data[1].loss_fn_inputs.logprobs",
            "must be <= 0; position 2",
        ),
        "missing advantages": (
            with_input(good, advantages=None),
            "data[1].loss_fn_inputs.advantages",
            "required by loss 'cispo'",
        ),
        "float tokens": (Sample(good.model_input.float(), t), "data[1].model_input", "integer token ids"),
        "int logprobs": (
            with_input(good, logprobs=torch.zeros(6, dtype=torch.int64)),
            "data[1].loss_fn_inputs.logprobs",
            "must hold floats",
        ),
        "2-D input": (Sample(good.model_input[None], t), "data[1].model_input", "must be 1-D"),
        "empty datum": (
            Sample(torch.zeros(0, dtype=torch.int64), {k: v[:0] for k, v in t.items()}),
            "data[1].model_input",
            "at least one token",
        ),
        "unknown input": (
            with_input(good, rewards=torch.zeros(6)),
            "data[1].loss_fn_inputs.rewards",
            "unknown loss input",
        ),
    }


@pytest.mark.parametrize("case", list(bad_batches()))
def test_bad_datum_is_rejected_with_its_field_and_changes_nothing(primed, case):
    sample, field, text = bad_batches()[case]
    before = grads_of(primed)
    batch = [make_samples([3], seed=3)[0], sample]
    with pytest.raises(InvalidInput) as err:
        primed.forward_backward(batch)
    assert field in [v.field for v in err.value.violations], err.value.violations
    assert any(text in v.description for v in err.value.violations), err.value.violations
    assert_grads_equal(primed, before)


def test_all_violations_are_reported_at_once(primed):
    good = make_samples([6], seed=4)[0]
    bad = [
        with_input(good, logprobs=good.loss_fn_inputs["logprobs"][:2]),
        good,
        with_input(good, advantages=torch.full((6,), math.nan)),
    ]
    with pytest.raises(InvalidInput) as err:
        primed.forward_backward(bad)
    assert [v.field for v in err.value.violations] == [
        "data[0].loss_fn_inputs.logprobs",
        "data[2].loss_fn_inputs.advantages",
    ]


def test_empty_batch_and_limits(primed):
    before = grads_of(primed)
    with pytest.raises(InvalidInput, match="at least one datum"):
        primed.forward_backward([])
    with pytest.raises(LimitExceeded, match="max_sequence_length=4096") as err:
        primed.forward_backward(make_samples([4097]))
    assert err.value.limit == "max_sequence_length"
    assert_grads_equal(primed, before)


def test_token_limit_per_request(tmp_path):
    from cispo.worker import Engine, EngineConfig, load_policy_model

    engine = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, max_tokens_per_request=100))
    with pytest.raises(LimitExceeded, match="101 tokens, over the limit max_tokens_per_request=100"):
        engine.forward_backward(make_samples([50, 51]))
    assert all(p.grad is None for p in engine.named_params.values())


def fail_on_second_call(calls):
    """A forward pre-hook that raises a simulated out-of-memory error on its second call."""

    def hook(module, args):
        calls.append(1)
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated: CUDA out of memory")

    return hook


def test_failure_mid_way_leaves_gradient_exactly_as_it_was(primed):
    """A fault in the second micro-batch (as an out-of-memory error would strike) must not
    leave the first micro-batch's gradient behind."""
    before = grads_of(primed)
    calls = []
    handle = primed.policy.model.model.layers[1].register_forward_pre_hook(fail_on_second_call(calls))
    try:
        with pytest.raises(ComputeFailed, match="out of memory.*accumulated gradient is unchanged") as err:
            primed.forward_backward(make_samples([60, 60, 60], seed=5))  # 3 micro-batches of 64 tokens
        assert err.value.out_of_memory
    finally:
        handle.remove()
    assert len(calls) == 2
    assert_grads_equal(primed, before)
    primed.forward_backward(make_samples([4], seed=6))  # still works afterwards


@pytest.mark.parametrize(
    "field,value",
    [
        ("learning_rate", -1.0),
        ("beta1", 1.0),
        ("beta2", math.nan),
        ("eps", 0.0),
        ("weight_decay", -0.1),
        ("grad_clip_norm", math.inf),
    ],
)
def test_bad_adam_params(field, value):
    with pytest.raises(InvalidInput) as err:
        AdamParams(**{field: value})
    assert err.value.violations[0].field == f"adam_params.{field}"


@pytest.mark.parametrize(
    "name", ["../escape", "/etc/passwd", "a/b", "..", ".", ".hidden", "", "x" * 129, "a\x00b", "naïve"]
)
def test_state_names_never_escape_the_checkpoint_dir(primed, name):
    before = grads_of(primed)
    with pytest.raises(InvalidInput, match="not a valid state name"):
        primed.save_state(name)
    with pytest.raises(InvalidInput, match="not a valid state name"):
        primed.load_state(name)
    assert not any(primed.config.checkpoint_dir.parent.glob("escape*"))
    assert_grads_equal(primed, before)


def test_missing_and_mismatched_states(primed, tmp_path):
    with pytest.raises(StateNotFound, match="no saved state named 'nope'"):
        primed.load_state("nope")
    primed.save_state("ok")
    weights_before = [p.detach().clone() for p in primed.named_params.values()]
    from safetensors.torch import load_file, save_file

    path = primed.config.checkpoint_dir / "ok" / "model.safetensors"
    tensors = load_file(path)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][:10]
    save_file(tensors, path)
    with pytest.raises(StateNotFound, match="does not fit this model.*lm_head.weight"):
        primed.load_state("ok")
    assert all(torch.equal(p, w) for p, w in zip(primed.named_params.values(), weights_before))


def test_saving_replaces_atomically_and_leaves_no_temporaries(primed):
    primed.save_state("s")
    primed.optim_step(AdamParams(learning_rate=0.1))
    primed.save_state("s")
    root = primed.config.checkpoint_dir
    assert sorted(p.name for p in root.iterdir()) == ["s"]
    assert sorted(p.name for p in (root / "s").iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
    ]
    assert primed.load_state("s", with_optimizer=True) == 1


def test_failure_mid_way_with_no_gradient_yet_leaves_none(engine):
    """The first forward_backward after a step writes straight into fresh .grads (the head's
    in its forward chunk loop); a fault in its second micro-batch leaves no gradient at all."""
    calls = []
    handle = engine.policy.model.model.layers[1].register_forward_pre_hook(fail_on_second_call(calls))
    try:
        with pytest.raises(ComputeFailed, match="out of memory.*accumulated gradient is unchanged"):
            engine.forward_backward(make_samples([60, 60, 60], seed=5))
    finally:
        handle.remove()
    assert all(p.grad is None for p in engine.named_params.values())


def test_a_non_finite_sum_leaves_the_old_gradient_tensors_themselves_untouched(primed):
    """The old gradient is added into the new buffers, never the other way round: a refused
    batch puts back the very tensors that were there, bit for bit."""
    tensors = [p.grad for p in primed.named_params.values()]
    before = grads_of(primed)
    [sample] = make_samples([6], seed=2)
    huge = Sample(sample.model_input, {**sample.loss_fn_inputs, "advantages": torch.full((6,), 3e38)})
    with pytest.raises(InvalidInput, match="not finite in float32.*accumulated gradient is unchanged"):
        primed.forward_backward([huge])
    assert all(p.grad is t for p, t in zip(primed.named_params.values(), tensors))
    assert_grads_equal(primed, before)


def test_accumulated_gradient_is_the_sum_of_the_calls(engine):
    """Two calls accumulate exactly what one call over both batches gives (within rounding),
    the head's gradient (written in the forward chunk loop) included."""
    a, b = make_samples([8, 5], seed=0), make_samples([7], seed=1)
    engine.forward_backward(a)
    engine.forward_backward(b)
    two = grads_of(engine)
    engine.optimizer.zero_grad()
    engine.forward_backward(b)
    only_b = grads_of(engine)
    engine.optimizer.zero_grad()
    engine.forward_backward(a)
    only_a = grads_of(engine)
    for got, ga, gb in zip(two, only_a, only_b):
        torch.testing.assert_close(got, ga + gb, rtol=1e-5, atol=1e-7)


@pytest.fixture
def in_place(tmp_path) -> Engine:
    """An engine with --gradient-accumulation in-place and small micro-batches."""
    return Engine(
        load_policy_model(),
        EngineConfig(checkpoint_dir=tmp_path / "ckpt", micro_batch_tokens=64, gradient_accumulation="in-place"),
    )


def test_in_place_accumulation_adds_into_the_same_tensors(in_place, engine):
    """In place, backward adds into the accumulated .grads themselves (no second gradient), and
    the sum equals what exact accumulation gives."""
    a, b = make_samples([8, 5], seed=0), make_samples([60, 60, 60], seed=1)  # b: 3 micro-batches
    for e in (in_place, engine):
        e.forward_backward(a)
    storage = [p.grad.untyped_storage().data_ptr() for p in in_place.named_params.values()]
    for e in (in_place, engine):
        e.forward_backward(b)
    assert [p.grad.untyped_storage().data_ptr() for p in in_place.named_params.values()] == storage
    for got, want in zip(grads_of(in_place), grads_of(engine)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_in_place_failure_discards_the_accumulated_gradient_and_says_so(in_place):
    in_place.forward_backward(make_samples([8, 5], seed=0))
    weights = [p.detach().clone() for p in in_place.named_params.values()]
    calls = []
    handle = in_place.policy.model.model.layers[1].register_forward_pre_hook(fail_on_second_call(calls))
    try:
        with pytest.raises(
            ComputeFailed,
            match="out of memory.*accumulated since the last optim_step was "
            "discarded.*weights and optimizer state are unchanged",
        ):
            in_place.forward_backward(make_samples([60, 60, 60], seed=5))
    finally:
        handle.remove()
    assert all(p.grad is None for p in in_place.named_params.values())
    in_place.forward_backward(make_samples([6], seed=2))
    [sample] = make_samples([6], seed=2)
    huge = Sample(sample.model_input, {**sample.loss_fn_inputs, "advantages": torch.full((6,), 3e38)})
    with pytest.raises(
        InvalidInput, match="not finite in float32.*accumulated since the last optim_step was discarded"
    ):
        in_place.forward_backward([huge])
    assert all(p.grad is None for p in in_place.named_params.values())
    assert all(torch.equal(p, w) for p, w in zip(in_place.named_params.values(), weights))
    with pytest.raises(InvalidInput, match="not finite in float32.*accumulated gradient is unchanged"):
        in_place.forward_backward([huge])  # nothing was accumulated: nothing is lost


def test_gradient_accumulation_mode_is_checked():
    with pytest.raises(ValueError, match="gradient_accumulation must be one of exact, in-place, got 'inplace'"):
        EngineConfig(gradient_accumulation="inplace")


def test_every_engine_error_pickles_whole():
    """A group's ranks send their errors to rank 0 pickled: type, message and fields survive."""
    raised = [
        InvalidInput([FieldViolation("data[0].model_input", "required"), FieldViolation("loss_fn", "unknown")]),
        LimitExceeded("max_runs", "at most 1 run"),
        ComputeFailed("out of memory: x", out_of_memory=True),
        ComputeFailed("not finite", non_finite=True),
        errors.RankUnavailable(1, "rank 1 is gone"),
        errors.StateNotFound("no state 'x'"),
        errors.StepRefused("refused"),
        errors.RunNotFound("no run"),
        errors.RunConflict("a full run"),
        errors.PermissionDenied("not yours"),
    ]
    for error in raised:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error) and str(copy) == str(error) and vars(copy) == vars(error), error
