"""The engine against plain references: the seed's four lines on materialised logits, autograd
on the naive model, finite differences, packing, accumulation and checkpoints."""

import itertools
import math

import pytest
import torch
from reference import assert_grad_close, make_samples, naive_target_logprobs, seed_cispo_loss

from cispo.worker import LOSS_FUNCTIONS, AdamParams, Engine, EngineConfig, Sample, load_policy_model
from cispo.worker.loss_stats import RATIO_BUCKET_EDGES
from cispo.worker.model import PolicyModel

LENGTHS = [37, 5, 64, 12, 90, 1, 23]


def reference_grads(model, samples, lo=0.0, hi=4.0):
    """(t per datum, loss, {name: grad}) from the seed formula on materialised logits."""
    model.zero_grad(set_to_none=True)
    ts, total = [], 0.0
    for s in samples:
        t = naive_target_logprobs(model, s)
        loss = seed_cispo_loss(t, s.loss_fn_inputs["logprobs"], s.loss_fn_inputs["advantages"], lo, hi)
        loss.backward()
        ts.append(t.detach())
        total += loss.item()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return ts, total, grads


@pytest.mark.parametrize("thresholds", [None, (0.5, 2.0)])
def test_cispo_matches_seed_formula_and_autograd(engine, thresholds):
    samples = make_samples(LENGTHS, seed=1)
    cfg = None if thresholds is None else dict(zip(("clip_low_threshold", "clip_high_threshold"), thresholds))
    ts, ref_loss, ref_grads = reference_grads(engine.policy.model, samples, *(thresholds or (0.0, 4.0)))
    result = engine.forward_backward(samples, "cispo", cfg)

    ratios = torch.cat([(t - s.loss_fn_inputs["logprobs"]).exp() for t, s in zip(ts, samples)])
    assert ratios.max() > 50 and ratios.min() < 0.05, "data must reach far outside the band on both sides"
    assert result.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-5)
    for t, lp in zip(ts, result.logprobs):
        torch.testing.assert_close(lp, t, rtol=1e-5, atol=1e-5)
    for name, p in engine.named_params.items():
        assert_grad_close(p.grad, ref_grads[name], name)


def test_default_config_is_exactly_explicit_defaults(tmp_path):
    samples = make_samples(LENGTHS, seed=2)
    results = []
    for cfg in (None, {}, {"clip_low_threshold": 0.0, "clip_high_threshold": 4.0}):
        e = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
        r = e.forward_backward(samples, "cispo", cfg)
        results.append((r.metrics, [p.grad.clone() for p in e.named_params.values()]))
    for metrics, grads in results[1:]:
        assert metrics == results[0][0]
        assert all(torch.equal(a, b) for a, b in zip(grads, results[0][1]))


def test_clip_counts_kl_and_buckets_match_reference(engine):
    samples = make_samples(LENGTHS, seed=3)
    lo, hi = 0.5, 2.0
    result = engine.forward(samples, "cispo", {"clip_low_threshold": lo, "clip_high_threshold": hi})
    t = torch.cat([naive_target_logprobs(engine.policy.model, s).detach() for s in samples]).double()
    s = torch.cat([x.loss_fn_inputs["logprobs"] for x in samples]).double()
    a = torch.cat([x.loss_fn_inputs["advantages"] for x in samples])
    active = a != 0
    r = (t - s).exp()[active]
    m = result.metrics
    assert m["tokens:sum"] == sum(LENGTHS)
    assert m["active_tokens:sum"] == int(active.sum())
    assert m["clipped_high:sum"] == int((r > hi).sum())
    assert m["clipped_low:sum"] == int((r < lo).sum())
    assert m["ratio:min"] == pytest.approx(r.min().item(), rel=1e-4)
    assert m["ratio:max"] == pytest.approx(r.max().item(), rel=1e-4)
    assert m["ratio:mean"] == pytest.approx(r.mean().item(), rel=1e-4)
    assert m["kl_k1:mean"] == pytest.approx((s - t)[active].mean().item(), rel=1e-4)
    assert m["kl_k3:mean"] == pytest.approx((r - 1 - r.log()).mean().item(), rel=1e-4)
    # Prometheus `le` buckets: count of ratios in (edge[i-1], edge[i]].
    edges = [0.0, *RATIO_BUCKET_EDGES, math.inf]
    expected = [int(((r > lo_e) & (r <= hi_e)).sum()) for lo_e, hi_e in itertools.pairwise(edges)]
    assert list(result.stats.ratio_bucket_counts) == expected


@pytest.mark.parametrize("loss_fn", ["importance_sampling", "ppo", "cross_entropy"])
def test_other_losses_match_their_formulas(engine, loss_fn):
    samples = make_samples(LENGTHS, seed=4, spread=1.0, with_weights=True)
    model = engine.policy.model
    ref = 0.0

    def formula(t, s, a, w):
        """loss_fn's loss of one datum from its target logprobs t and its inputs s, a, w."""
        r = (t - s).exp()
        return {
            "importance_sampling": lambda: -(r * a).sum(),
            "ppo": lambda: -torch.minimum(r * a, r.clamp(0.8, 1.2) * a).sum(),
            "cross_entropy": lambda: -(w * t).sum(),
        }[loss_fn]()

    for x in samples:
        t = naive_target_logprobs(model, x)
        loss = formula(t, *(x.loss_fn_inputs[k] for k in ("logprobs", "advantages", "weights")))
        loss.backward()
        ref += loss.item()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    used = ("target_tokens", *LOSS_FUNCTIONS[loss_fn].required_inputs)  # other inputs are rejected
    result = engine.forward_backward(
        [Sample(x.model_input, {k: v for k, v in x.loss_fn_inputs.items() if k in used}) for x in samples], loss_fn
    )
    assert result.metrics["loss:sum"] == pytest.approx(ref, rel=1e-5)
    for name, p in engine.named_params.items():
        assert_grad_close(p.grad, ref_grads[name], name)


def seed_dro_loss(t, s, a, beta):
    """Tinker's dro, its quadratic penalty on active tokens (advantage != 0)."""
    return -(t * a - 0.5 * beta * (t - s) ** 2 * (a != 0)).sum()


def seed_gspo_loss(t, s, a, mask, lo, hi):
    """Tinker's GSPO-token: every token carries its datum's sequence ratio, with its own gradient."""
    in_m = mask != 0
    log_s = (t.detach() - s)[in_m].mean() if in_m.any() else t.new_zeros(())
    ratio = torch.exp(log_s + t - t.detach())
    return -torch.minimum(ratio * a, ratio.clamp(lo, hi) * a).sum()


def near_policy_samples(model, lengths, seed, noise):
    """Datums whose sampling logprobs are the model's own plus per-datum offsets of up to
    `noise`, so sequence ratios fall inside and outside a 0.8/1.2 band."""
    g = torch.Generator().manual_seed(seed)
    out = []
    offsets = torch.linspace(-noise, noise, len(lengths))[torch.randperm(len(lengths), generator=g)]
    for x, offset in zip(make_samples(lengths, seed=seed), offsets):
        t = naive_target_logprobs(model, x).detach()
        s = (t + offset + 0.05 * torch.randn(t.shape, generator=g)).clamp(max=0.0)
        out.append(Sample(x.model_input, {**x.loss_fn_inputs, "logprobs": s}))
    return out


@pytest.mark.parametrize("case", ["dro", "dro_beta", "gspo", "gspo_mask", "gspo_band"])
def test_dro_and_gspo_match_their_formulas(engine, case):
    """Tinker's dro and gspo against autograd on materialised logits: loss, logprobs, every
    gradient, and gspo's clip counts by sequence ratio."""
    model = engine.policy.model
    loss_fn = case.split("_")[0]
    samples = near_policy_samples(model, LENGTHS, seed=11, noise=0.4)
    g = torch.Generator().manual_seed(12)
    if case == "gspo_mask":  # an explicit mask, one datum with none of its tokens in it
        samples = [
            Sample(
                x.model_input,
                {
                    **x.loss_fn_inputs,
                    "sequence_ratio_mask": (torch.rand(x.length, generator=g) < (0.5 if i else 0.0)).float(),
                },
            )
            for i, x in enumerate(samples)
        ]
    cfg = {"dro_beta": {"beta": 0.7}, "gspo_band": {"clip_low_threshold": 0.9, "clip_high_threshold": 1.05}}.get(case)
    resolved = LOSS_FUNCTIONS[loss_fn].resolve_config(cfg)
    model.zero_grad(set_to_none=True)
    ref, ts, clipped = 0.0, [], [0, 0]
    for x in samples:
        t = naive_target_logprobs(model, x)
        s, a = x.loss_fn_inputs["logprobs"], x.loss_fn_inputs["advantages"]
        if loss_fn == "dro":
            loss = seed_dro_loss(t, s, a, resolved["beta"])
        else:
            mask = x.loss_fn_inputs.get("sequence_ratio_mask", (a != 0).float())
            lo, hi = resolved["clip_low_threshold"], resolved["clip_high_threshold"]
            loss = seed_gspo_loss(t, s, a, mask, lo, hi)
            in_m = mask != 0
            seq_ratio = float((t.detach() - s)[in_m].mean().exp()) if in_m.any() else 1.0
            active = int((a != 0).sum())
            clipped[0] += active * (seq_ratio > hi)
            clipped[1] += active * (seq_ratio < lo)
        loss.backward()
        ref += loss.item()
        ts.append(t.detach())
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    result = engine.forward_backward(samples, loss_fn, cfg)
    assert result.metrics["loss:sum"] == pytest.approx(ref, rel=1e-5, abs=1e-4)  # terms of both signs cancel
    for t, lp in zip(ts, result.logprobs):
        torch.testing.assert_close(lp, t, rtol=1e-5, atol=1e-5)
    for name, p in engine.named_params.items():
        assert_grad_close(p.grad, ref_grads[name], name)
    if loss_fn == "gspo":
        assert [result.metrics["clipped_high:sum"], result.metrics["clipped_low:sum"]] == clipped
        if case != "gspo_mask":
            assert clipped[0] and clipped[1], "some sequences must fall on each side of the band"
        assert engine.forward(samples, loss_fn, cfg).metrics["loss:sum"] == pytest.approx(ref, rel=1e-5, abs=1e-4)
    else:
        assert result.metrics["clipped_high:sum"] == result.metrics["clipped_low:sum"] == 0


def test_gspo_packing_does_not_mix_datums(tmp_path):
    """The sequence ratio is per datum whatever shares its micro-batch."""
    policy = load_policy_model()
    samples = near_policy_samples(policy.model, LENGTHS, seed=13, noise=0.4)
    packed = Engine(policy, EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=4096))
    r_packed = packed.forward(samples, "gspo")
    alone = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=1))
    r_alone = alone.forward(samples, "gspo")
    assert r_packed.metrics["loss:sum"] == pytest.approx(r_alone.metrics["loss:sum"], rel=1e-5, abs=1e-4)
    assert r_packed.metrics["clipped_low:sum"] == r_alone.metrics["clipped_low:sum"]


def test_finite_differences_on_tiny_fp64_model(tmp_path):
    """The cispo gradient at theta0 is the gradient of sum(-coef0 * A * t(theta)) with coef0
    frozen, i.e. cross_entropy with weights coef0 * A, whose value we can difference.
    GPT-2 (tied embeddings) runs wholly in fp64, unlike Llama whose RMSNorm rounds to fp32."""
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=1024, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").double().eval()
    policy = PolicyModel("tiny-gpt2", model, torch.device("cpu"), torch.float64)
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=12))
    samples = make_samples([9, 4, 6], seed=5)
    engine.forward_backward(samples, "cispo")
    t0 = engine.forward(samples).logprobs
    frozen = []
    for s, t in zip(samples, t0):
        coef = (t.double() - s.loss_fn_inputs["logprobs"].double()).exp().clamp(0.0, 4.0)
        w = (coef * s.loss_fn_inputs["advantages"].double()).float()
        frozen.append(Sample(s.model_input, {"target_tokens": s.loss_fn_inputs["target_tokens"], "weights": w}))
    g = torch.Generator().manual_seed(0)
    eps = 1e-6
    for name in ["transformer.wte.weight", "transformer.h.0.attn.c_attn.weight", "transformer.ln_f.bias"]:
        p = engine.named_params[name]
        v = torch.randn(p.shape, generator=g, dtype=p.dtype)
        analytic = float((p.grad * v).sum())
        with torch.no_grad():
            p.add_(eps * v)
            up = engine.forward(frozen, "cross_entropy").metrics["loss:sum"]
            p.sub_(2 * eps * v)
            down = engine.forward(frozen, "cross_entropy").metrics["loss:sum"]
            p.add_(eps * v)
        assert (up - down) / (2 * eps) == pytest.approx(analytic, rel=1e-6, abs=1e-9), name


def test_packed_results_equal_per_datum_results(tmp_path):
    samples = make_samples(LENGTHS, seed=6)
    packed = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=4096))
    alone = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=1))
    rp, ra = packed.forward_backward(samples), alone.forward_backward(samples)
    for a, b in zip(rp.logprobs, ra.logprobs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert abs(rp.metrics["loss:sum"] - ra.metrics["loss:sum"]) <= loss_bound(samples, rp.logprobs)
    for (n, p), q in zip(packed.named_params.items(), alone.named_params.values()):
        assert_grad_close(p.grad, q.grad, n)


def loss_bound(samples, logprobs, rtol=1e-5, atol=1e-5):
    """How far two CISPO loss sums may differ when their logprobs agree within (rtol, atol).

    A term is -coef(t) * t * a with coef = clamp(exp(t - s), lo, hi), so a logprob error d moves
    it by at most |a| * coef * (1 + |t|) * d (coef's own change is coef * d where unclamped).
    Summing N terms in another fp32 order adds at most N * eps * sum|term|.
    """
    t = torch.cat(logprobs).double()
    s = torch.cat([x.loss_fn_inputs["logprobs"] for x in samples]).double()
    a = torch.cat([x.loss_fn_inputs["advantages"] for x in samples]).double()
    coef = (t - s).exp().clamp(0.0, 4.0)
    d = atol + rtol * t.abs()
    terms = coef * t * a
    eps = torch.finfo(torch.float32).eps
    return float((a.abs() * coef * (1 + t.abs()) * d).sum() + len(t) * eps * terms.abs().sum())


def test_k_calls_then_step_equal_one_call(tmp_path):
    samples = make_samples(LENGTHS, seed=7)
    split = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    whole = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    for chunk in (samples[:2], samples[2:5], samples[5:]):
        split.forward_backward(chunk)
    whole.forward_backward(samples)
    adam = AdamParams(learning_rate=1e-3, weight_decay=0.01, grad_clip_norm=1.0)
    assert split.optim_step(adam).grad_norm == pytest.approx(whole.optim_step(adam).grad_norm, rel=1e-5)
    for (n, p), q in zip(split.named_params.items(), whole.named_params.values()):
        assert_grad_close(p, q, n)
        assert p.grad is None


def test_save_load_step_reproduces_uninterrupted_run(tmp_path):
    adam = AdamParams(learning_rate=1e-3)
    batches = [make_samples([20, 11], seed=s) for s in (8, 9, 10)]
    straight = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    for b in batches:
        straight.forward_backward(b)
        straight.optim_step(adam)

    first = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    first.forward_backward(batches[0])
    first.optim_step(adam)
    first.save_state("after-1")
    resumed = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    assert resumed.load_state("after-1", with_optimizer=True) == 1
    for b in batches[1:]:
        resumed.forward_backward(b)
        resumed.optim_step(adam)
    assert resumed.optimizer.step_count == 3
    for (n, p), q in zip(straight.named_params.items(), resumed.named_params.values()):
        assert torch.equal(p, q), n


def test_load_weights_only_resets_optimizer(tmp_path):
    e = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
    e.forward_backward(make_samples([10], seed=11))
    e.optim_step(AdamParams())
    e.save_state("s")
    e.forward_backward(make_samples([10], seed=12))
    assert e.load_state("s") == 1
    assert e.optimizer.step_count == 0 and not e.optimizer.state
    assert all(p.grad is None for p in e.named_params.values())


def head_problem():
    """(hidden (300, 48), weight (2000, 48), both leaves requiring grad; targets; per-token weights)."""
    torch.manual_seed(0)
    h = torch.randn(300, 48, requires_grad=True)
    w = (torch.randn(2000, 48) * 0.1).requires_grad_()
    return h, w, torch.randint(0, 2000, (300,)), torch.randn(300)


def test_fallback_head_gives_the_torch_op_numbers():
    from cispo.worker.logprob_head import HAS_LINEAR_CROSS_ENTROPY, target_logprobs

    h, w, tgt, g = head_problem()
    ref = torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0]
    ref_grads = torch.autograd.grad((ref * g).sum(), [h, w])
    paths = [False, True] if HAS_LINEAR_CROSS_ENTROPY else [False]
    for use_torch_op in paths:
        lp = target_logprobs(h, w, tgt, chunk_tokens=37, use_torch_op=use_torch_op)
        assert lp.dtype == torch.float32
        torch.testing.assert_close(lp, ref, rtol=1e-5, atol=1e-5)
        for a, b in zip(torch.autograd.grad((lp * g).sum(), [h, w]), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights_and_finite_results(tmp_path):
    policy = load_policy_model(dtype="bfloat16")
    e = Engine(policy, EngineConfig(checkpoint_dir=tmp_path))
    samples = make_samples(LENGTHS, seed=13)
    r = e.forward_backward(samples)
    ref = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path)).forward(samples)
    assert all(lp.dtype == torch.float32 for lp in r.logprobs)
    for a, b in zip(r.logprobs, ref.logprobs):
        torch.testing.assert_close(a, b, rtol=0, atol=0.1)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in e.named_params.values())
    assert math.isfinite(e.optim_step(AdamParams()).grad_norm)


def test_extreme_ratios_never_reach_metrics_as_inf_or_nan(engine):
    samples = make_samples([16, 16], seed=14)
    samples[0].loss_fn_inputs["logprobs"][:] = -1e30  # exp(t - s) overflows without care
    samples[1].loss_fn_inputs["logprobs"][:] = -0.0
    for loss_fn in ("cispo", "importance_sampling", "ppo"):
        r = engine.forward_backward(samples, loss_fn)
        assert all(math.isfinite(v) for v in r.metrics.values()), (loss_fn, r.metrics)
        assert all(torch.isfinite(p.grad).all() for p in engine.named_params.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_head_gradients_equal_autograd_of_the_loss(dtype):
    """The fused head (gradient applied inside the forward chunk loop) on a non-linear
    per-token loss, against autograd through materialised logits."""
    from cispo.worker.logprob_head import fused_head_gradients

    torch.manual_seed(0)
    h = torch.randn(300, 48, requires_grad=True)
    w = (torch.randn(2000, 48) * 0.1).requires_grad_()
    tgt = torch.randint(0, 2000, (300,))
    a = torch.randn(300)

    def loss_of(logp):
        return -(torch.exp(logp + 7.0).clamp(max=2.0) * logp * a[: logp.shape[0]]).sum()

    ref_logp = torch.log_softmax((h.to(dtype) @ w.to(dtype).T).float(), -1).gather(1, tgt[:, None])[:, 0]
    ref_grads = torch.autograd.grad(loss_of(ref_logp), [h, w])

    def token_gradient(logp_C, sl):
        with torch.enable_grad():
            leaf = logp_C.detach().requires_grad_()
            return torch.autograd.grad(-(torch.exp(leaf + 7.0).clamp(max=2.0) * leaf * a[sl]).sum(), leaf)[0]

    surrogate, logp = fused_head_gradients(h.to(dtype), w.to(dtype), tgt, token_gradient, chunk_tokens=37)
    surrogate.backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(logp, ref_logp.detach(), rtol=tol, atol=tol)
    for name, got, ref in [("hidden", h.grad, ref_grads[0]), ("weight", w.grad, ref_grads[1])]:
        assert_grad_close(got, ref, name, rel=tol)


def test_fused_head_writes_a_leaf_weight_gradient_straight_into_grad():
    """weight_grad_into=w (what the engine uses): the head's weight gradient goes
    into weight.grad in the forward chunk loop, created or added to, equal to autograd's."""
    from cispo.worker.logprob_head import fused_head_gradients

    h, w, tgt, a = head_problem()
    ref_logp = torch.log_softmax(h @ w.T, -1).gather(1, tgt[:, None])[:, 0]
    ref_grads = torch.autograd.grad(-(ref_logp * a).sum(), [h, w])
    old = torch.randn(2000, 48)
    w.grad = old.clone()
    surrogate, _ = fused_head_gradients(h, w, tgt, lambda logp_C, sl: -a[sl], chunk_tokens=37, weight_grad_into=w)
    assert_grad_close(w.grad, old + ref_grads[1], "weight (before backward)", rel=1e-5)
    surrogate.backward()
    assert_grad_close(w.grad, old + ref_grads[1], "weight", rel=1e-5)
    assert_grad_close(h.grad, ref_grads[0], "hidden", rel=1e-5)
    w.grad = None
    fused_head_gradients(h.detach(), w, tgt, lambda logp_C, sl: -a[sl], chunk_tokens=37, weight_grad_into=w)[
        0
    ].backward()
    assert_grad_close(w.grad, ref_grads[1], "weight (fresh)", rel=1e-5)


LOG_SUM_EXP_OPS = (torch.ops.aten.amax, torch.ops.aten.exp_, torch.ops.aten.sum, torch.ops.aten.logsumexp)


def test_bf16_head_runs_in_the_compute_dtype_with_fp32_log_sum_exp():
    """Under --dtype bfloat16 (autocast, on the CPU here) the LM head's matmuls take bf16
    operands, the log-sum-exp and logp are fp32, the head's gradient lands in fp32 .grad, and
    logprobs and loss stay close to an fp64 reference on materialised logits."""
    from torch.utils._python_dispatch import TorchDispatchMode

    policy = load_policy_model(dtype="bfloat16")
    engine = Engine(policy, EngineConfig())
    V = policy.vocab_size
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if (func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm) and V in tensors[-1].shape) or (
                func.overloadpacket in LOG_SUM_EXP_OPS and tensors and tensors[0].shape[-1:] == (V,)
            ):
                seen.append((func.overloadpacket.__name__, tuple(t.dtype for t in tensors[-2:])))
            return out

    samples = make_samples(LENGTHS, seed=11)
    with Record():
        result = engine.forward_backward(samples)
    matmuls = [dtypes for name, dtypes in seen if name in ("mm", "addmm")]
    assert matmuls and all(d == (torch.bfloat16, torch.bfloat16) for d in matmuls), matmuls
    log_sum_exp = {(name, d) for name, d in seen if name not in ("mm", "addmm")}  # over (chunk, V) logits
    assert {name for name, _ in log_sum_exp} == {"amax", "exp_", "sum"}
    assert {d for _, d in log_sum_exp} == {(torch.float32,)}
    head = policy.model.get_output_embeddings().weight
    assert head.grad.dtype == torch.float32 and torch.isfinite(head.grad).all()

    model64 = policy.model.to(torch.float64)
    try:
        with torch.no_grad():
            ref = [naive_target_logprobs(model64, s) for s in samples]
        ref_loss = sum(
            float(seed_cispo_loss(t, s.loss_fn_inputs["logprobs"].double(), s.loss_fn_inputs["advantages"].double()))
            for t, s in zip(ref, samples)
        )
    finally:
        policy.model.to(torch.float32)
    error = max(float((lp.double() - t).abs().max()) for lp, t in zip(result.logprobs, ref))
    assert error < 0.01, error  # docs/scaling.md, "Precision": 0.0018 measured
    assert result.metrics["loss:sum"] == pytest.approx(ref_loss, rel=1e-3)  # 2e-6 measured


def test_activation_checkpointing_gives_the_same_results_and_gradients():
    """--activation-checkpointing recomputes each decoder layer in backward: same logprobs,
    loss and gradients (to float order), same parameter names."""
    samples = make_samples(LENGTHS, seed=12)
    plain, checkpointed = Engine(load_policy_model()), Engine(load_policy_model(activation_checkpointing=True))
    runs = {}
    for engine in (plain, checkpointed):  # an MLP runs once per micro-batch, and again in backward if recomputed
        calls, mlp = [], engine.policy.model.get_decoder().layers[0].mlp
        mlp.forward = lambda *args, _forward=mlp.forward, _calls=calls: _calls.append(1) or _forward(*args)
        runs[id(engine)] = (engine.forward_backward(samples), calls)
    (a, plain_calls), (b, checkpointed_calls) = runs[id(plain)], runs[id(checkpointed)]
    assert len(checkpointed_calls) == 2 * len(plain_calls) > 0
    assert plain.named_params.keys() == checkpointed.named_params.keys()
    assert b.metrics == pytest.approx(a.metrics, rel=1e-6)
    for x, y in zip(a.logprobs, b.logprobs):
        torch.testing.assert_close(y, x, rtol=1e-6, atol=1e-6)
    for name, p in plain.named_params.items():
        assert_grad_close(checkpointed.named_params[name].grad, p.grad, name, rel=1e-6)
