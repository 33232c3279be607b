"""A complete RL loop against a cispo server, with the Python client only.

The task: continue a prompt with "even" tokens. A completion's reward is the fraction of its
tokens whose id is even, which a program checks (a verifiable reward). Each step:

  1. sample a group of completions per prompt from the current policy;
  2. reward them and centre the rewards within each group (the advantages);
  3. forward_backward with the CISPO loss, then optim_step;
  4. save the new weights for the sampler and get a sampling client on them; repeat.

    make serve                                  # in one shell: the embedded model on :50051
    .venv/bin/python examples/rl_loop.py        # in another: seconds on a laptop CPU
    .venv/bin/python examples/rl_loop.py --lora-rank 8   # the same with a LoRA run of its own

It trains the server's default run (a full fine-tune), or with --lora-rank a LoRA run that it
creates and unloads at the end. It prints one line per step and writes rewards.csv and
rewards.png to --out-dir.
"""

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from cispo.client import AdamParams, Datum, ModelInput, SamplingParams, ServiceClient


def reward(tokens: list[int]) -> float:
    """The verifiable reward of one completion: the fraction of even token ids."""
    return float(np.mean([t % 2 == 0 for t in tokens])) if tokens else 0.0


def to_datum(prompt: list[int], tokens: list[int], logprobs: list[float], advantage: float) -> Datum:
    """One sampled completion as training data: position i predicts token i + 1; prompt
    positions get advantage 0 (no gradient)."""
    P, L = len(prompt), len(tokens)
    return Datum(
        model_input=ModelInput.from_ints(prompt + tokens[:-1]),
        loss_fn_inputs={
            "target_tokens": prompt[1:] + tokens,
            "logprobs": np.array([0.0] * (P - 1) + logprobs, dtype=np.float32),
            "advantages": np.array([0.0] * (P - 1) + [advantage] * L, dtype=np.float32),
        },
    )


def sample_groups(
    sampling_client, prompts_P: list[list[int]], group_size: int, max_tokens: int, rng: np.random.Generator, reward_fn
) -> tuple[list[Datum], list[float]]:
    """Sample a group per prompt (all requests in flight at once), reward each completion and
    centre the rewards within its group: (the training data, every completion's reward).
    Completions whose advantage is 0 carry no gradient and are left out."""
    futures_P = [
        sampling_client.sample(
            ModelInput.from_ints(p),
            group_size,
            SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=int(rng.integers(2**31))),
        )
        for p in prompts_P
    ]
    data, rewards = [], []
    for prompt, future in zip(prompts_P, futures_P):
        sequences_G = future.result().sequences
        rewards_G = np.array([reward_fn(s.tokens) for s in sequences_G])
        advantages_G = rewards_G - rewards_G.mean()
        rewards.extend(rewards_G.tolist())
        data += [to_datum(prompt, s.tokens, s.logprobs, float(a)) for s, a in zip(sequences_G, advantages_G) if a != 0]
    return data, rewards


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="localhost:50051", help="the cispo server")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8, help="completions sampled per prompt")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per completion")
    parser.add_argument("--lora-rank", type=int, default=0, help="train a new LoRA run of this rank (0: full)")
    parser.add_argument("--learning-rate", type=float, default=1e-2, help="LoRA learns at it too; faster at 1e-1")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=Path("rl_loop_out"))
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)

    service = ServiceClient(args.target)
    if args.lora_rank:  # a LoRA run of its own, on the frozen served model
        training_client = service.create_lora_training_client(rank=args.lora_rank, seed=args.seed)
    else:  # the server's default run, a full fine-tune of the served model
        training_client = service.training_client("")
    print(f"run {training_client.model_id or 'default'}", flush=True)
    try:
        vocab_size = training_client.get_info().vocab_size
        prompts = [rng.integers(0, vocab_size, 4).tolist() for _ in range(32)]
        sampling_client = training_client.save_weights_and_get_sampling_client("rl-loop")
        rows = []
        for step in range(args.steps):
            started = time.perf_counter()
            # 1-2. Sample a group per prompt; rewards, and advantages centred within each group.
            batch_P = [prompts[i] for i in rng.choice(len(prompts), args.prompts_per_step, replace=False)]
            data, rewards = sample_groups(sampling_client, batch_P, args.group_size, args.max_tokens, rng, reward)
            # 3. The policy gradient step.
            metrics = {}
            if data:
                fwd_bwd_future = training_client.forward_backward(data, loss_fn="cispo")
                optim_future = training_client.optim_step(AdamParams(learning_rate=args.learning_rate))
                metrics = fwd_bwd_future.result().metrics
                optim_future.result()
            # 4. The new weights, for the next step's samples.
            sampling_client = training_client.save_weights_and_get_sampling_client("rl-loop")
            active = max(metrics.get("active_tokens:sum", 0), 1)
            row = {
                "step": step,
                "reward": float(np.mean(rewards)),
                "trained_sequences": len(data),
                "clip_rate": (metrics.get("clipped_high:sum", 0) + metrics.get("clipped_low:sum", 0)) / active,
                "kl_k3": metrics.get("kl_k3:mean", 0.0),
                "ratio_max": metrics.get("ratio:max", 1.0),
                "seconds": time.perf_counter() - started,
            }
            rows.append(row)
            print(
                f"step {step:3d}  reward {row['reward']:.3f}  clip_rate {row['clip_rate']:.4f}  "
                f"kl {row['kl_k3']:.2e}  {row['seconds']:.2f}s",
                flush=True,
            )
    finally:
        if args.lora_rank:  # the server keeps no run this script made
            service.unload_model(training_client.model_id)
        service.close()

    with open(args.out_dir / "rewards.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in rows], [r["reward"] for r in rows], marker="o")
    ax.set(xlabel="step", ylabel="mean reward", title="CISPO on the even-tokens task", ylim=(0, 1))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out_dir / "rewards.png", dpi=120)
    print(f"wrote {args.out_dir / 'rewards.csv'} and {args.out_dir / 'rewards.png'}")


if __name__ == "__main__":
    main()
