"""Weights for samplers: exports that transformers loads as they are, with identical logprobs;
dtype, sharding, tied embeddings, tokenizer files; atomic, per identity; sampling on saved weights."""

import json

import pytest
import torch
from reference import make_samples, naive_target_logprobs
from safetensors import safe_open
from tiny_models import save_tiny_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cispo.worker import AdamParams, Engine, EngineConfig, InvalidInput, StateNotFound, load_policy_model
from cispo.worker.config import ExportConfig
from cispo.worker.sampling import SampleRequest, SamplingParams


def make_engine(tmp_path, model_dir=None, **export) -> Engine:
    config = ExportConfig(sampler_dir=tmp_path / "sampler", **export)
    return Engine(
        load_policy_model(model_dir and str(model_dir)), EngineConfig(checkpoint_dir=tmp_path / "ckpt", export=config)
    )


def train_a_step(engine, seed=0):
    engine.forward_backward(make_samples([24, 9], seed=seed, vocab_size=engine.policy.vocab_size))
    engine.optim_step(AdamParams(learning_rate=1e-2))


def tensor_names(directory) -> dict[str, torch.dtype]:
    names = {}
    for file in directory.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names.update({k: f.get_tensor(k).dtype for k in f.keys()})  # noqa: SIM118  # safe_open is not iterable
    return names


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_export_loads_in_transformers_with_identical_logprobs(tmp_path, arch):
    save_tiny_model(tmp_path / "base", arch, vocab_size=256, tokenizer=True)
    engine = make_engine(tmp_path, tmp_path / "base", dtype="float32")
    train_a_step(engine)
    path = engine.save_weights_for_sampler("step-1")
    assert {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "model.safetensors",
        "manifest.json",
    } <= {p.name for p in path.iterdir()}
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    for sample in make_samples([17, 5], seed=3, vocab_size=256):
        expected = engine.forward([sample]).logprobs[0]
        torch.testing.assert_close(naive_target_logprobs(loaded, sample).detach(), expected, atol=1e-5, rtol=0)
    exported, served = AutoTokenizer.from_pretrained(path), AutoTokenizer.from_pretrained(tmp_path / "base")
    assert exported.get_vocab() == served.get_vocab() and exported.decode([4, 5, 2]) == served.decode([4, 5, 2])
    names = tensor_names(path)
    if arch == "qwen2":  # tied: the head is the embedding, stored once
        assert (
            "lm_head.weight" not in names
            and loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
        )
    else:
        assert "lm_head.weight" in names
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["step"] == 1 and manifest["layout"] == "full" and manifest["owner"] is None


def test_default_export_is_bfloat16_and_shards_with_an_index(tmp_path):
    engine = make_engine(tmp_path, max_shard_bytes=100_000)
    path = engine.save_weights_for_sampler("sharded")
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 1 and set(index["weight_map"].values()) == set(shards)
    assert json.loads((path / "config.json").read_text())["dtype"] == "bfloat16"
    assert set(tensor_names(path).values()) == {torch.bfloat16}
    loaded = AutoModelForCausalLM.from_pretrained(path)
    for name, p in engine.policy.model.named_parameters():
        assert torch.equal(loaded.get_parameter(name).float(), p.detach().to(torch.bfloat16).float()), name


def test_sampling_saved_weights_sees_them_as_saved(tmp_path):
    engine = make_engine(tmp_path, dtype="float32", cache_size=1)
    greedy = SamplingParams(max_tokens=10, temperature=0.0)
    prompt = torch.tensor([3, 30, 300])

    def tokens(model_path=""):
        r = engine.validate_sample(SampleRequest(prompt, 1, greedy, model_path=model_path))
        result = engine.sample([r])[0]
        assert not isinstance(result, Exception), result
        return result.sequences[0].tokens.tolist(), result.sequences[0].logprobs

    at_save, logprobs = tokens()
    path = engine.save_weights_for_sampler("snap")
    train_a_step(engine)
    assert tokens()[0] != at_save
    cached, cached_logprobs = tokens(str(path))  # from the cache, no reload
    assert cached == at_save
    torch.testing.assert_close(cached_logprobs, logprobs, atol=1e-5, rtol=0)
    engine.save_weights_for_sampler("other")  # evicts "snap" (cache_size=1)
    reloaded, reloaded_logprobs = tokens("snap")  # from disk
    assert reloaded == at_save
    torch.testing.assert_close(reloaded_logprobs, logprobs, atol=1e-5, rtol=0)


def test_saving_replaces_atomically_in_its_owners_directory(tmp_path):
    engine = make_engine(tmp_path)
    engine.save_weights_for_sampler("mine", owner="alice")
    assert engine.save_weights_for_sampler("mine", owner="bob") == tmp_path / "sampler" / "@bob" / "mine"
    train_a_step(engine)
    path = engine.save_weights_for_sampler("mine", owner="alice")
    assert path == tmp_path / "sampler" / "@alice" / "mine"
    assert json.loads((path / "manifest.json").read_text())["step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["mine"]  # no temporary copies left


def test_bad_model_paths_are_refused(tmp_path):
    engine = make_engine(tmp_path)
    for bad in ("/etc/passwd", "../ckpt/x", ".hidden", str(tmp_path / "ckpt" / "x")):
        with pytest.raises(InvalidInput) as info:
            engine.validate_sample(SampleRequest(torch.tensor([1]), model_path=bad))
        assert info.value.violations[0].field == "model_path"
    missing = engine.validate_sample(
        SampleRequest(torch.tensor([1]), params=SamplingParams(max_tokens=1), model_path="nothing-here")
    )
    result = engine.sample([missing])[0]
    assert isinstance(result, StateNotFound) and "no saved weights named 'nothing-here'" in str(result)
    (tmp_path / "sampler" / "broken").mkdir(parents=True)
    (tmp_path / "sampler" / "broken" / "manifest.json").write_text(
        json.dumps({"format": "cispo.sampler_weights.v1", "layout": "full", "step": 0, "owner": None})
    )
    broken = engine.validate_sample(
        SampleRequest(torch.tensor([1]), params=SamplingParams(max_tokens=1), model_path="broken")
    )
    assert isinstance(engine.sample([broken])[0], StateNotFound)
    assert not isinstance(
        engine.sample(
            [missing, engine.validate_sample(SampleRequest(torch.tensor([1]), params=SamplingParams(max_tokens=1)))]
        )[1],
        Exception,
    )  # others in the batch go on
