"""Real Hugging Face checkpoint directories (made with save_pretrained) load and train."""

import pytest
import torch
from reference import make_samples, naive_target_logprobs
from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2Config

from cispo.worker import AdamParams, Engine, EngineConfig, Sample, load_policy_model

SHAPES = {
    "llama": LlamaConfig(
        vocab_size=512,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    ),
    "qwen2": Qwen2Config(
        vocab_size=512,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    ),
}


def save_checkpoint(config, path, dtype=torch.float32):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(dtype)
    model.save_pretrained(path, safe_serialization=True)
    return model


@pytest.mark.parametrize("arch", list(SHAPES))
def test_checkpoint_loads_exactly_and_trains(tmp_path, arch):
    original = save_checkpoint(SHAPES[arch], tmp_path / arch).eval()
    assert (tmp_path / arch / "model.safetensors").is_file()
    policy = load_policy_model(str(tmp_path / arch))
    assert policy.name == str(tmp_path / arch) and policy.vocab_size == 512 and policy.max_sequence_length == 256
    for (n, p), q in zip(policy.model.named_parameters(), original.parameters()):
        assert torch.equal(p, q), n

    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path / "states", micro_batch_tokens=32))
    samples = make_samples([20, 13, 7], seed=1, vocab_size=512)
    first = engine.forward_backward(samples)
    for s, lp in zip(samples, first.logprobs):
        torch.testing.assert_close(lp, naive_target_logprobs(original, s).detach(), rtol=1e-5, atol=1e-5)

    # Cross-entropy on fixed sequences: a few steps must raise their likelihood.
    sft = [
        Sample(s.model_input, {"target_tokens": s.loss_fn_inputs["target_tokens"], "weights": torch.ones(s.length)})
        for s in samples
    ]
    engine.optim_step(AdamParams())
    losses = []
    for _ in range(5):
        losses.append(engine.forward_backward(sft, "cross_entropy").metrics["loss:sum"])
        engine.optim_step(AdamParams(learning_rate=1e-2))
    assert losses[-1] < losses[0] - 1.0, losses


def test_bf16_checkpoint_is_held_in_fp32(tmp_path):
    save_checkpoint(SHAPES["llama"], tmp_path / "m", dtype=torch.bfloat16)
    policy = load_policy_model(str(tmp_path / "m"), dtype="bfloat16")
    assert policy.compute_dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in policy.model.parameters())


def test_not_a_checkpoint_and_unsupported_models(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_policy_model(str(tmp_path))
    gemma = Gemma2Config(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=30.0,
    )
    save_checkpoint(gemma, tmp_path / "gemma2")
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        load_policy_model(str(tmp_path / "gemma2"))
