"""The built-in sampler against plain references: transformers' greedy `generate`, the trainer's
forward, the intended top-k/top-p distribution, seeds, stops, limits and bad parameters."""

import math

import pytest
import torch
from reference import make_samples
from tiny_models import save_tiny_model

from cispo.worker import AdamParams, Engine, EngineConfig, InvalidInput, LimitExceeded, Sample, load_policy_model
from cispo.worker.config import SamplingLimits
from cispo.worker.sampling import SampleRequest, SamplingParams


def request(prompt, n=1, **params) -> SampleRequest:
    return SampleRequest(torch.tensor(prompt), n, SamplingParams(**params))


def sample(engine, *requests):
    results = engine.sample([engine.validate_sample(r) for r in requests])
    for r in results:
        assert not isinstance(r, Exception), r
    return results


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    """A saved tiny Llama with a word tokenizer (vocab 64)."""
    path = tmp_path_factory.mktemp("tiny") / "llama"
    save_tiny_model(path, "llama", tokenizer=True)
    return Engine(
        load_policy_model(str(path)),
        EngineConfig(checkpoint_dir=path.parent / "ckpt", sampling=SamplingLimits(max_num_samples=50_000)),
    )


@pytest.mark.parametrize("arch", ["embedded", "qwen2"])
def test_greedy_equals_transformers_generate(tmp_path, arch):
    if arch == "embedded":
        policy = load_policy_model()
    else:
        save_tiny_model(tmp_path / arch, arch, vocab_size=512)
        policy = load_policy_model(str(tmp_path / arch))
    engine = Engine(policy, EngineConfig(checkpoint_dir=tmp_path))
    prompts = [[5, 17, 3, 99], [42], [7, 7, 7, 7, 7, 7, 7, 7, 11]]  # one batch, different lengths
    results = sample(engine, *[request(p, 2, max_tokens=12, temperature=0.0) for p in prompts])
    eos = set(policy.eos_token_ids)
    for prompt, result in zip(prompts, results):
        expected = policy.model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=list(eos), pad_token_id=0
        )[0, len(prompt) :].tolist()
        for sequence in result.sequences:
            assert sequence.tokens.tolist() == expected
            assert sequence.stop_reason == ("stop" if expected[-1] in eos else "length")


def test_logprobs_equal_the_trainers_forward(engine):
    prompts = [[1, 5, 9], [300, 2, 8, 8, 14, 15, 16], [77]]
    results = sample(
        engine,
        *[request(p, 3, max_tokens=20, seed=i) for i, p in enumerate(prompts)],
        SampleRequest(
            torch.tensor([4, 8, 15, 16, 23, 42]), 1, SamplingParams(max_tokens=5), include_prompt_logprobs=True
        ),
    )
    samples, expected = [], []
    for prompt, result in zip(prompts, results):
        for sequence in result.sequences:
            full = torch.cat([torch.tensor(prompt), sequence.tokens])
            n = len(full) - 1
            samples.append(
                Sample(full[:-1], {"target_tokens": full[1:], "logprobs": torch.zeros(n), "advantages": torch.zeros(n)})
            )
            expected.append((len(prompt) - 1, sequence.logprobs))
    trained = engine.forward(samples)
    for (start, sampled), lp in zip(expected, trained.logprobs):
        torch.testing.assert_close(sampled, lp[start:], atol=1e-4, rtol=0)
    # Prompt logprobs are the trainer's logprobs of the prompt itself.
    prompt = torch.tensor([4, 8, 15, 16, 23, 42])
    lp = engine.forward(
        [Sample(prompt[:-1], {"target_tokens": prompt[1:], "logprobs": torch.zeros(5), "advantages": torch.zeros(5)})]
    ).logprobs[0]
    torch.testing.assert_close(results[-1].prompt_logprobs, lp, atol=1e-4, rtol=0)
    assert results[0].prompt_logprobs is None


def test_on_policy_data_gives_ratio_one_and_no_clipping(engine):
    result = sample(engine, request([3, 1, 4, 1, 5], 4, max_tokens=16, seed=3))[0]
    data = []
    for sequence in result.sequences:
        full = torch.cat([torch.tensor([3, 1, 4, 1, 5]), sequence.tokens])
        n = len(full) - 1
        data.append(
            Sample(
                full[:-1],
                {
                    "target_tokens": full[1:],
                    "advantages": torch.cat([torch.zeros(4), torch.ones(n - 4)]),
                    "logprobs": torch.cat([torch.zeros(4), sequence.logprobs]),
                },
            )
        )
    metrics = engine.forward(data).metrics
    assert metrics["clipped_high:sum"] == metrics["clipped_low:sum"] == 0
    assert abs(metrics["ratio:max"] - 1) < 1e-4 and abs(metrics["ratio:min"] - 1) < 1e-4
    assert abs(metrics["kl_k3:mean"]) < 1e-8


def test_same_seed_same_samples_whatever_shares_the_batch(engine):
    alone = sample(engine, request([9, 8, 7], 4, max_tokens=10, seed=11))[0]
    again = sample(
        engine,
        request([1], 2, max_tokens=6, seed=1),
        request([9, 8, 7], 4, max_tokens=10, seed=11),
        request([5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5], 3, max_tokens=30, seed=2),
    )[1]
    other = sample(engine, request([9, 8, 7], 4, max_tokens=10, seed=12))[0]
    assert [s.tokens.tolist() for s in alone.sequences] == [s.tokens.tolist() for s in again.sequences]
    for a, b in zip(alone.sequences, again.sequences):
        torch.testing.assert_close(a.logprobs, b.logprobs, atol=1e-5, rtol=0)
    assert [s.tokens.tolist() for s in alone.sequences] != [s.tokens.tolist() for s in other.sequences]
    assert len({tuple(s.tokens.tolist()) for s in alone.sequences}) == 4  # rows draw differently


def intended_distribution(engine, prompt, temperature, top_k, top_p) -> torch.Tensor:
    """q over the vocabulary for the first token: plain softmax, sort, cumsum on full logits."""
    logits = engine.policy.model(input_ids=torch.tensor([prompt])).logits[0, -1].double().detach()
    probs = torch.softmax(logits / temperature, -1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept_mass = 0.0
    for rank, token in enumerate(order.tolist()):
        if (top_k > 0 and rank >= top_k) or (rank > 0 and kept_mass >= top_p):
            break
        keep[token] = True
        kept_mass += probs[token].item() / probs[order[:top_k]].sum().item() if top_k > 0 else probs[token].item()
    q = torch.where(keep, probs, 0.0)
    return q / q.sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, -1, 1.0), (0.7, 5, 1.0), (1.3, -1, 0.6), (0.5, 8, 0.8)])
def test_empirical_top_k_top_p_distribution_matches(tiny_engine, temperature, top_k, top_p):
    prompt = [10, 20, 30]
    q = intended_distribution(tiny_engine, prompt, temperature, top_k, top_p)
    n = 20_000
    result = sample(
        tiny_engine, request(prompt, n, max_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, seed=1234)
    )[0]
    tokens = torch.tensor([s.tokens[0].item() for s in result.sequences])
    empirical = torch.bincount(tokens, minlength=q.numel()).double() / n
    assert empirical[q == 0].sum() == 0, "a token outside the top-k/top-p support was drawn"
    # Total variation of n multinomial draws: its mean is about sum sqrt(q(1-q)/(2 pi n)); the
    # bound is 4 times that (fixed seed, so the test is deterministic).
    bound = 4 * torch.sqrt(q * (1 - q) / (2 * math.pi * n)).sum().item() + 1e-3
    assert 0.5 * (empirical - q).abs().sum().item() < bound
    logq = torch.tensor([s.logprobs[0].item() for s in result.sequences]).double()
    torch.testing.assert_close(logq, q[tokens].log(), atol=1e-4, rtol=0)


def test_stop_tokens_eos_and_stop_strings(tiny_engine):
    free = sample(tiny_engine, request([10, 20], 1, max_tokens=12, temperature=0.0))[0].sequences[0].tokens.tolist()
    assert 2 not in free[:-1]
    stop_at = free[3]
    first = free.index(stop_at)
    stopped = sample(tiny_engine, request([10, 20], 1, max_tokens=12, temperature=0.0, stop_tokens=(stop_at,)))[0]
    assert stopped.sequences[0].tokens.tolist() == free[: first + 1] and stopped.sequences[0].stop_reason == "stop"
    # A string spanning two generated words stops once complete, the completing token last.
    tokenizer = tiny_engine.policy.tokenizer
    text = tokenizer.decode(free[4:6])
    end = next(i for i in range(1, len(free) + 1) if text in tokenizer.decode(free[:i]))
    by_string = sample(tiny_engine, request([10, 20], 1, max_tokens=12, temperature=0.0, stop_strings=(text,)))[0]
    assert by_string.sequences[0].tokens.tolist() == free[:end] and by_string.sequences[0].stop_reason == "stop"
    # The model's end-of-sequence token always stops, and is kept.
    assert tiny_engine.policy.eos_token_ids == (2,)
    sequences = sample(tiny_engine, request([10], 200, max_tokens=40, seed=5))[0].sequences
    ended = [s for s in sequences if s.stop_reason == "stop"]
    assert ended and all(s.tokens[-1] == 2 and 2 not in s.tokens[:-1].tolist() for s in ended)
    assert all(len(s.tokens) == 40 and 2 not in s.tokens.tolist() for s in sequences if s.stop_reason == "length")


def test_max_tokens_defaults_to_the_limit_within_the_context(tmp_path):
    engine = Engine(
        load_policy_model(), EngineConfig(checkpoint_dir=tmp_path, sampling=SamplingLimits(max_sample_tokens=7))
    )
    resolved = engine.validate_sample(request([1, 2, 3]))
    assert resolved.params.max_tokens == 7 and resolved.params.seed is not None
    near_end = engine.validate_sample(request([1] * 4093, max_tokens=7))
    assert near_end.params.max_tokens == 3  # the model's 4096 positions


@pytest.mark.parametrize(
    "bad,field",
    [
        (dict(prompt=[]), "prompt"),
        (dict(prompt=[1, 1024]), "prompt"),
        (dict(prompt=[-1]), "prompt"),
        (dict(n=0), "num_samples"),
        (dict(max_tokens=0), "sampling_params.max_tokens"),
        (dict(temperature=-0.5), "sampling_params.temperature"),
        (dict(temperature=math.nan), "sampling_params.temperature"),
        (dict(top_p=0.0), "sampling_params.top_p"),
        (dict(top_p=1.5), "sampling_params.top_p"),
        (dict(top_k=-2), "sampling_params.top_k"),
        (dict(stop_tokens=(5000,)), "sampling_params.stop_tokens"),
        (dict(stop_strings=("x",)), "sampling_params.stop_strings"),  # the embedded model has no tokenizer
    ],
)
def test_bad_parameters_are_invalid_and_name_the_field(engine, bad, field):
    prompt, n = bad.pop("prompt", [1, 2]), bad.pop("n", 1)
    with pytest.raises(InvalidInput) as info:
        engine.validate_sample(request(prompt, n, **bad))
    assert [v.field for v in info.value.violations] == [field]


@pytest.mark.parametrize(
    "bad,limit",
    [
        (dict(n=129), "max_num_samples"),
        (dict(max_tokens=4097), "max_sample_tokens"),
        (dict(n=128, max_tokens=2100), "max_sample_request_tokens"),
    ],
)
def test_limits_are_resource_exhausted(engine, bad, limit):
    n = bad.pop("n", 1)
    with pytest.raises(LimitExceeded) as info:
        engine.validate_sample(request([1, 2], n, **bad))
    assert info.value.limit == limit


def test_a_sample_sees_earlier_steps_only(engine):
    before = sample(engine, request([1, 2, 3], 1, max_tokens=8, temperature=0.0))[0].sequences[0].tokens
    engine.forward_backward(make_samples([30, 20], seed=4))
    assert torch.equal(
        sample(engine, request([1, 2, 3], 1, max_tokens=8, temperature=0.0))[0].sequences[0].tokens, before
    )  # a gradient alone changes no weight
    engine.optim_step(AdamParams(learning_rate=5e-2))
    after = sample(engine, request([1, 2, 3], 1, max_tokens=8, temperature=0.0))[0].sequences[0].tokens
    assert not torch.equal(after, before)


def test_sampling_leaves_the_accumulated_gradient_and_weights_alone(tmp_path):
    def run(sample_in_between: bool) -> dict:
        engine = Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path))
        engine.forward_backward(make_samples([30, 20], seed=4))
        if sample_in_between:
            sample(
                engine,
                request([1, 2, 3], 4, max_tokens=8, seed=0),
                SampleRequest(torch.tensor([5, 6, 7]), 2, SamplingParams(max_tokens=4), include_prompt_logprobs=True),
            )
        engine.optim_step(AdamParams(learning_rate=1e-3))
        return {n: p.detach().clone() for n, p in engine.named_params.items()}

    plain, sampled = run(False), run(True)
    assert all(torch.equal(plain[n], sampled[n]) for n in plain)
