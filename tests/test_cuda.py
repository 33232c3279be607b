"""The CUDA paths, on a machine with a GPU (skipped elsewhere; `bench/gpu_checks.sh` runs them
with the GPU benchmarks): varlen attention for packed bf16 micro-batches against the same
datums one by one and against the dense block mask, and the bf16 head against fp64."""

import pytest
import torch
from reference import make_samples
from test_packed_attention import LENGTHS, dense_reference

from cispo.worker import Engine, EngineConfig, attention, load_policy_model
from cispo.worker.logprob_head import target_logprobs

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_varlen_is_the_kernel_for_bf16_on_this_gpu():
    q = torch.zeros(8, 4, 64, device="cuda", dtype=torch.bfloat16)
    assert attention.varlen_attn is not None, "torch.nn.attention.varlen is missing from this torch"
    assert attention._use_varlen(q, 0.0, True) == (torch.cuda.get_device_capability() >= (8, 0))


@pytest.mark.parametrize("sliding_window", [None, 7])
def test_varlen_attention_equals_the_dense_mask(sliding_window):
    g = torch.Generator(device="cuda").manual_seed(0)
    T, H, Hkv, Dh = sum(LENGTHS), 4, 2, 64
    q, k, v = (torch.randn(1, h, T, Dh, generator=g, device="cuda", dtype=torch.bfloat16) for h in (H, Hkv, Hkv))
    kwargs = attention.packed_attention_kwargs(LENGTHS, torch.device("cuda"))
    out, _ = attention.packed_attention_forward(
        torch.nn.Module(), q, k, v, None, scaling=Dh**-0.5, sliding_window=sliding_window, **kwargs
    )
    expected = dense_reference(q.double(), k.double(), v.double(), LENGTHS, sliding_window)
    torch.testing.assert_close(out.double(), expected, rtol=2e-2, atol=2e-2)


def test_packed_bf16_results_equal_per_datum_results(tmp_path):
    policies = [load_policy_model(device="cuda", dtype="bfloat16") for _ in range(2)]
    samples = make_samples(LENGTHS, seed=3, vocab_size=policies[0].vocab_size)
    packed = Engine(policies[0], EngineConfig(checkpoint_dir=tmp_path / "p", micro_batch_tokens=4096))
    alone = Engine(policies[1], EngineConfig(checkpoint_dir=tmp_path / "a", micro_batch_tokens=1))
    rp, ra = packed.forward_backward(samples), alone.forward_backward(samples)
    for a, b in zip(rp.logprobs, ra.logprobs):
        torch.testing.assert_close(a, b, rtol=2e-2, atol=5e-2)
    assert rp.metrics["loss:sum"] == pytest.approx(ra.metrics["loss:sum"], rel=2e-2)


def test_bf16_head_against_fp64():
    g = torch.Generator(device="cuda").manual_seed(0)
    N, D, V = 4096, 1024, 32768
    hidden = torch.randn(N, D, generator=g, device="cuda") / D**0.5
    weight = torch.randn(V, D, generator=g, device="cuda")
    targets = torch.randint(0, V, (N,), generator=g, device="cuda")
    exact = torch.log_softmax(hidden.double() @ weight.double().T, -1).gather(-1, targets[:, None])[:, 0]
    with torch.autocast("cuda", torch.bfloat16):
        got = target_logprobs(hidden.bfloat16(), weight.bfloat16(), targets)
    assert got.dtype == torch.float32
    bf16_inputs = torch.log_softmax(hidden.bfloat16().double() @ weight.bfloat16().double().T, -1)
    torch.testing.assert_close(got.double(), bf16_inputs.gather(-1, targets[:, None])[:, 0], rtol=0, atol=5e-2)
    assert (got.double() - exact).abs().max() < 0.5  # bf16 rounding of the inputs themselves
