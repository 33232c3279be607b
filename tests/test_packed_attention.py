"""Packed attention (worker.attention): per-datum results, for every supported architecture, with
no (T x T) tensor anywhere in the forward or the backward."""

import pytest
import torch
from reference import assert_grad_close, make_samples, naive_target_logprobs
from tiny_models import ARCHS
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GPT2Config, Qwen2Config

from cispo.worker import Engine, EngineConfig, load_policy_model
from cispo.worker.attention import PACKED_ATTENTION, packed_attention_forward, packed_attention_kwargs

LENGTHS = [37, 5, 64, 12, 90, 1, 23, 12, 1]  # repeated lengths, apart: batched SDPA calls
VOCAB = 512
SHAPES = {
    "llama": ARCHS["llama"](VOCAB),  # GQA
    "qwen2": ARCHS["qwen2"](VOCAB),
    "qwen2-sliding": Qwen2Config(
        vocab_size=VOCAB,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=1,
    ),  # layer 1 slides
    "gpt2": GPT2Config(vocab_size=VOCAB, n_embd=48, n_layer=2, n_head=4, n_positions=256),
}


def policy_for(arch, tmp_path):
    if arch == "embedded":
        return load_policy_model(), None
    torch.manual_seed(0)
    original = AutoModelForCausalLM.from_config(SHAPES[arch], attn_implementation="sdpa").eval()
    original.save_pretrained(tmp_path / arch)
    return load_policy_model(str(tmp_path / arch)), original


@pytest.mark.parametrize("arch", ["embedded", *SHAPES])
def test_packed_results_equal_per_datum_results(tmp_path, arch):
    packed_policy, original = policy_for(arch, tmp_path)
    alone_policy, _ = policy_for(arch, tmp_path)
    assert packed_policy.model.config._attn_implementation == PACKED_ATTENTION
    vocab = packed_policy.vocab_size
    samples = make_samples(LENGTHS, seed=3, vocab_size=vocab)
    packed = Engine(packed_policy, EngineConfig(checkpoint_dir=tmp_path / "p", micro_batch_tokens=4096))
    alone = Engine(alone_policy, EngineConfig(checkpoint_dir=tmp_path / "a", micro_batch_tokens=1))
    rp, ra = packed.forward_backward(samples), alone.forward_backward(samples)
    for i, (a, b) in enumerate(zip(rp.logprobs, ra.logprobs)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        if original is not None:  # and equal to stock transformers (sdpa) on the datum alone
            torch.testing.assert_close(a, naive_target_logprobs(original, samples[i]).detach(), rtol=1e-5, atol=1e-5)
    assert rp.metrics["loss:sum"] == pytest.approx(ra.metrics["loss:sum"], rel=1e-5)
    for (n, p), q in zip(packed.named_params.items(), alone.named_params.values()):
        assert_grad_close(p.grad, q.grad, n)


def dense_reference(q, k, v, lengths, sliding_window=None):
    """SDPA over the whole (1, H, T, Dh) sequence with the dense block-diagonal causal mask."""
    datum_T = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    i_T = torch.arange(datum_T.shape[0])
    back_TT = i_T[:, None] - i_T[None, :]
    mask_TT = (datum_T[:, None] == datum_T[None, :]) & (back_TT >= 0)
    if sliding_window is not None:
        mask_TT &= back_TT < sliding_window
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask_TT).transpose(1, 2)


@pytest.mark.parametrize("sliding_window", [None, 7])
@pytest.mark.parametrize("boundaries", ["cu_seq_lens", "position_ids"])
def test_attention_function_equals_the_dense_mask(boundaries, sliding_window):
    g = torch.Generator().manual_seed(0)
    T, H, Hkv, Dh = sum(LENGTHS), 4, 2, 8
    q, k, v = (torch.randn(1, h, T, Dh, generator=g, dtype=torch.float64, requires_grad=True) for h in (H, Hkv, Hkv))
    module = torch.nn.Module()
    if boundaries == "cu_seq_lens":
        kwargs = packed_attention_kwargs(LENGTHS, torch.device("cpu"))
    else:
        kwargs = {"position_ids": torch.cat([torch.arange(n) for n in LENGTHS])[None]}
    out, _ = packed_attention_forward(module, q, k, v, None, scaling=Dh**-0.5, sliding_window=sliding_window, **kwargs)
    expected = dense_reference(q, k, v, LENGTHS, sliding_window)
    torch.testing.assert_close(out, expected)
    cotangent = torch.randn(out.shape, generator=g, dtype=torch.float64)
    grads = torch.autograd.grad(out, (q, k, v), cotangent)
    for a, b in zip(grads, torch.autograd.grad(expected, (q, k, v), cotangent)):
        torch.testing.assert_close(a, b)


class SquareTensors(TorchDispatchMode):
    """Records the shape of every tensor an op returns that has two dimensions of size T."""

    def __init__(self, T: int):
        super().__init__()
        self.T, self.found = T, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and list(t.shape).count(self.T) >= 2:
                self.found.append((str(func), tuple(t.shape)))
        return out


def test_no_T_by_T_tensor_in_forward_or_backward(tmp_path):
    lengths = [120, 77, 70, 40, 40]  # T = 347: no model dimension has that size
    T = sum(lengths)
    samples = make_samples(lengths, seed=4)
    policy = load_policy_model()
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path, micro_batch_tokens=T))
    with SquareTensors(T) as packed:
        engine.forward_backward(samples)
    assert packed.found == []
    policy.model.set_attn_implementation("sdpa")  # the detector sees stock transformers' dense mask
    with SquareTensors(T) as stock:
        engine.forward_backward(samples)
    assert stock.found, "the detector saw no (T x T) tensor on the dense-mask path"
