"""The Tinker-shaped client against a real server: a Tinker-style RL loop written against the
`tinker`-named API only, the tinker SDK's own objects, forward_backward_custom and its ordering,
futures everywhere, paths from saves, and the new losses end to end."""

import asyncio

import numpy as np
import pytest
import tinker as sdk  # the official SDK (the dev extra), whose objects the client must accept
import torch
from server_process import ServerProcess

import cispo.client as tinker
from cispo.client import types

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        "--sampler-dir",
        str(tmp_path_factory.mktemp("sampler")),
        "--sampler-dtype",
        "float32",
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
    )
    yield proc
    assert proc.terminate() == 0, proc.log()


@pytest.fixture
def service(server):
    with tinker.ServiceClient(server.address) as service:
        yield service
        for model in service.list_models():
            service.unload_model(model.model_id)


def reward(tokens):
    """The toy task: the fraction of completion tokens that are multiples of 8."""
    return float(np.mean([t % 8 == 0 for t in tokens])) if tokens else 0.0


def test_ported_tinker_rl_loop_raises_the_reward(service):
    """A GRPO-style loop as Tinker's docs write it: sample groups from the latest weights,
    group-centred advantages, forward_backward + optim_step submitted back to back."""
    rng = np.random.default_rng(0)
    training_client = service.create_lora_training_client(base_model="", rank=16, seed=0).result()
    info = training_client.get_info()
    assert info.lora_rank == 16 and info.model_id == training_client.model_id
    prompts = [rng.integers(0, info.vocab_size, 4).tolist() for _ in range(16)]
    params = types.SamplingParams(max_tokens=8, temperature=1.0)
    rewards_by_step, steps_trained = [], 0
    for _ in range(12):
        sampling_client = training_client.save_weights_and_get_sampling_client()
        batch = [prompts[i] for i in rng.choice(len(prompts), 8, replace=False)]
        futures = [
            sampling_client.sample(prompt=types.ModelInput.from_ints(p), num_samples=8, sampling_params=params)
            for p in batch
        ]
        data, step_rewards = [], []
        for prompt, future in zip(batch, futures):
            sequences = future.result().sequences
            group = [reward(s.tokens) for s in sequences]
            step_rewards += group
            for sequence, r in zip(sequences, group):
                advantage = r - float(np.mean(group))
                if advantage == 0:
                    continue
                tokens = prompt + sequence.tokens
                n = len(tokens) - 1
                data.append(
                    types.Datum(
                        model_input=types.ModelInput.from_ints(tokens[:-1]),
                        loss_fn_inputs={
                            "target_tokens": types.TensorData.from_numpy(np.array(tokens[1:], np.int64)),
                            "logprobs": types.TensorData.from_numpy(
                                np.array([0.0] * (len(prompt) - 1) + list(sequence.logprobs), np.float32)
                            ),
                            "advantages": types.TensorData.from_numpy(
                                np.array([0.0] * (len(prompt) - 1) + [advantage] * (n - len(prompt) + 1), np.float32)
                            ),
                        },
                    )
                )
        rewards_by_step.append(float(np.mean(step_rewards)))
        if data:
            fwd_bwd_future = training_client.forward_backward(data, loss_fn="cispo")
            optim_future = training_client.optim_step(types.AdamParams(learning_rate=5e-2))
            fwd_bwd_result = fwd_bwd_future.result()
            assert optim_future.result().metrics["grad_norm:max"] > 0
            assert fwd_bwd_result.metrics["clipped_high:sum"] == 0  # on-policy: ratio 1
            steps_trained += 1
    assert np.mean(rewards_by_step[-3:]) > np.mean(rewards_by_step[:3]) + 0.15, rewards_by_step
    assert training_client.get_info().step == steps_trained


def datum(seed, n=10):
    rng = np.random.default_rng(seed)
    advantages = rng.normal(size=n).astype(np.float32)
    advantages[:3] = 0.0
    return rng.integers(0, 1024, n), rng.integers(0, 1024, n), np.full(n, -6.5, np.float32), advantages


def test_tinker_sdk_objects_give_the_same_answers(service):
    """tinker.Datum / ModelInput / TensorData / AdamParams / SamplingParams are converted:
    two runs of one seed, one fed the SDK's objects and one cispo's, agree bit for bit."""
    ours = service.create_lora_training_client(rank=4, seed=3)
    theirs = service.create_lora_training_client(rank=4, seed=3)
    inputs, targets, logprobs, advantages = datum(1)
    our_data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(inputs.tolist()),
            loss_fn_inputs={"target_tokens": targets, "logprobs": logprobs, "advantages": advantages},
        )
    ]
    sdk_data = [
        sdk.Datum(
            model_input=sdk.ModelInput.from_ints(inputs.tolist()),
            loss_fn_inputs={
                "target_tokens": sdk.TensorData.from_numpy(targets),
                "logprobs": sdk.TensorData.from_numpy(logprobs),
                "advantages": sdk.TensorData.from_numpy(advantages),
            },
        )
    ]
    answers = []
    for client, data, adam in (
        (ours, our_data, types.AdamParams(learning_rate=1e-2)),
        (theirs, sdk_data, sdk.AdamParams(learning_rate=1e-2)),
    ):
        fwd_bwd = client.forward_backward(data, "cispo")
        step = client.optim_step(adam)
        after = client.forward(data, "cispo")
        answers.append((fwd_bwd.result(), step.result(), after.result()))
    (f1, s1, a1), (f2, s2, a2) = answers
    assert f1.metrics == f2.metrics and s1.grad_norm == s2.grad_norm and a1.metrics == a2.metrics
    assert np.array_equal(a1.loss_fn_outputs[0]["logprobs"].to_numpy(), a2.loss_fn_outputs[0]["logprobs"].to_numpy())
    prompt = inputs[:4].tolist()
    ours_sampled = (
        ours.create_sampling_client()
        .sample(types.ModelInput.from_ints(prompt), 2, types.SamplingParams(max_tokens=5, seed=7))
        .result()
    )
    sdk_sampled = (
        theirs.create_sampling_client()
        .sample(sdk.ModelInput.from_ints(prompt), 2, sdk.SamplingParams(max_tokens=5, seed=7))
        .result()
    )
    assert [s.tokens for s in ours_sampled.sequences] == [s.tokens for s in sdk_sampled.sequences]
    with pytest.raises(TypeError, match=r"data\[0\]: expected cispo.client.Datum, got tinker.*TensorData"):
        ours.forward([sdk.TensorData.from_numpy(targets)], "cispo")


def test_forward_backward_custom_equals_the_builtin_loss_and_orders_what_follows(service):
    """A custom loss -sum(w * logp) gives cross_entropy's gradient; the optim_step submitted
    right after it (before its backward left) steps on that gradient."""
    inputs, targets, _, _ = datum(2)
    weights = np.linspace(0.1, 1.0, len(targets)).astype(np.float32)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(inputs.tolist()),
            loss_fn_inputs={"target_tokens": targets, "weights": weights},
        )
    ]
    builtin = service.create_lora_training_client(rank=4, seed=5)
    custom = service.create_lora_training_client(rank=4, seed=5)
    expected = builtin.forward_backward(data, "cross_entropy")
    expected_step = builtin.optim_step(types.AdamParams(learning_rate=1e-2))

    def weighted_nll(batch, logprobs):
        loss = sum(
            -(torch.from_numpy(d.loss_fn_inputs["weights"].to_numpy()) * lp).sum() for d, lp in zip(batch, logprobs)
        )
        return loss, {"custom_metric:sum": 1.5}

    got = custom.forward_backward_custom(data, weighted_nll)
    got_step = custom.optim_step(types.AdamParams(learning_rate=1e-2))
    result, step = got.result(), got_step.result()
    assert result.metrics["loss:sum"] == pytest.approx(expected.result().metrics["loss:sum"], rel=1e-5)
    assert result.metrics["surrogate_loss:sum"] == pytest.approx(result.metrics["loss:sum"], rel=1e-5)
    assert result.metrics["custom_metric:sum"] == 1.5
    assert step.grad_norm == pytest.approx(expected_step.result().grad_norm, rel=1e-5)
    assert step.step == 1
    np.testing.assert_allclose(
        result.loss_fn_outputs[0]["logprobs"].to_numpy(),
        expected.result().loss_fn_outputs[0]["logprobs"].to_numpy(),
        rtol=1e-6,
    )


def test_a_failing_custom_loss_fails_what_waits_behind_it_and_changes_nothing(service):
    inputs, targets, _, _ = datum(3)
    data = [
        types.Datum(model_input=types.ModelInput.from_ints(inputs.tolist()), loss_fn_inputs={"target_tokens": targets})
    ]
    run = service.create_lora_training_client(rank=4, seed=6)

    def broken(batch, logprobs):
        raise RuntimeError("the loss broke")

    failed = run.forward_backward_custom(data, broken)
    waiting = run.optim_step(types.AdamParams(learning_rate=1e-2))
    with pytest.raises(RuntimeError, match="the loss broke"):
        failed.result()
    with pytest.raises(tinker.FailedPreconditionError, match="forward_backward_custom submitted before it failed"):
        waiting.result()
    assert run.get_info().step == 0
    assert run.optim_step(types.AdamParams()).result().grad_norm == 0.0  # no gradient was accumulated


def test_every_operation_returns_a_future_and_saves_return_the_paths_loads_take(service):
    run = service.create_lora_training_client(rank=4, seed=7)
    inputs, targets, logprobs, advantages = datum(4)
    data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(inputs.tolist()),
            loss_fn_inputs={"target_tokens": targets, "logprobs": logprobs, "advantages": advantages},
        )
    ]
    futures = [
        run.forward_backward(data, "cispo"),
        run.optim_step(optim_params=types.AdamParams(learning_rate=1e-2)),
        run.save_state("tinker-style", ttl_seconds=3600),
    ]
    assert all(isinstance(f, tinker.APIFuture) for f in futures)
    saved = futures[-1].result()
    assert saved.path.endswith("/tinker-style") and saved.step == 1
    run.optim_step(adam_params=types.AdamParams(learning_rate=1e-2)).result()
    assert run.load_state_with_optimizer(saved.path).result().step == 1
    with pytest.raises(ValueError, match="optim_params or adam_params"):
        run.optim_step(types.AdamParams(), adam_params=types.AdamParams())
    with pytest.raises(tinker.InvalidArgumentError, match="not a state of this server"):
        run.load_state("/elsewhere/tinker-style").result()
    resumed = service.create_training_client_from_state_with_optimizer(saved.path)
    assert resumed.get_info().step == 1 and resumed.get_info().lora_rank == 4

    async def awaited():
        future = await run.forward_backward_async(data, "cispo")
        return (await future).metrics, (await run.optim_step(types.AdamParams())).step, await run.get_info_async()

    metrics, step, info = asyncio.run(awaited())
    assert "loss:sum" in metrics and step == 2 and info.step == 2
    exported = run.save_weights_for_sampler("tinker-adapter").result()
    assert exported.path.endswith("/tinker-adapter")
    sampled = (
        service.create_sampling_client(model_path=exported.path)
        .sample(types.ModelInput.from_ints([1, 2, 3]), 2, types.SamplingParams(max_tokens=3))
        .result()
    )
    assert len(sampled.sequences) == 2


@pytest.mark.parametrize("loss_fn, config", [("dro", {"beta": 0.1}), ("gspo", {"clip_high_threshold": 1.3})])
def test_tinker_losses_over_the_wire(service, loss_fn, config):
    run = service.create_lora_training_client(rank=4, seed=8)
    inputs, targets, logprobs, advantages = datum(5)
    inputs_ = {"target_tokens": targets, "logprobs": logprobs, "advantages": advantages}
    if loss_fn == "gspo":
        inputs_["sequence_ratio_mask"] = (advantages != 0).astype(np.float32)
    data = [types.Datum(model_input=types.ModelInput.from_ints(inputs.tolist()), loss_fn_inputs=inputs_)]
    result = run.forward_backward(data, loss_fn, config).result()
    assert np.isfinite(result.metrics["loss:sum"]) and result.metrics["active_tokens:sum"] == 7
    assert {f.name for f in run.get_info().loss_functions} >= {"dro", "gspo"}
    with pytest.raises(tinker.InvalidArgumentError) as err:
        run.forward_backward(
            data, loss_fn, {"beta": -1.0} if loss_fn == "dro" else {"clip_low_threshold": -1.0}
        ).result()
    assert err.value.field_violations[0].field.startswith("loss_fn_config.")
