"""Plain references the engine is checked against: full logits, the seed's four lines."""

import torch

from cispo.worker import Sample


def naive_target_logprobs(model, sample: Sample) -> torch.Tensor:
    """(N,) target logprobs of one datum alone, through materialised [N x V] logits."""
    logits = model(input_ids=sample.model_input[None].long(), use_cache=False).logits[0].float()
    return torch.log_softmax(logits, -1).gather(-1, sample.loss_fn_inputs["target_tokens"].long()[:, None])[:, 0]


def seed_cispo_loss(t, s, a, clip_low_threshold=0.0, clip_high_threshold=4.0):
    """The loss exactly as DESIGN.md defines it."""
    ratio = torch.exp(t - s)
    coef = torch.clamp(ratio, clip_low_threshold, clip_high_threshold).detach()
    return -torch.sum(coef * t * a)


def make_samples(lengths, seed=0, vocab_size=1024, spread=5.0, with_weights=False):
    """Random datums whose sampling logprobs are -U(0, spread)-ish, so ratios fall far from 1
    on both sides; a third of the advantages are 0 (prompt tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        adv = torch.randn(n, generator=g)
        adv[torch.rand(n, generator=g) < 0.33] = 0.0
        inputs = {
            "target_tokens": torch.randint(0, vocab_size, (n,), generator=g),
            "logprobs": -torch.rand(n, generator=g) * 2 * spread - 3.0,
            "advantages": adv,
        }
        if with_weights:
            inputs["weights"] = torch.rand(n, generator=g)
        out.append(Sample(torch.randint(0, vocab_size, (n,), generator=g), inputs))
    return out


def assert_grad_close(actual, expected, name, rel=1e-5):
    """Equal up to fp32 summation order: error small relative to the tensor's scale."""
    err = (actual - expected).abs().max().item()
    assert err <= rel * expected.abs().max().item() + 1e-8, f"{name}: max error {err}"
