"""Per-rank memory of full fine-tuning (or, with `--lora`, of a LoRA run), replicated against
`--sharding fsdp`, at W = 1, 2, 4 (torch.distributed with gloo on the CPU, launched by torchrun
as the server's groups are).

    .venv/bin/python bench/bench_fsdp.py [--layers 4 --hidden 512 --vocab 32000 --world-sizes 1 2 4] [--lora]
        [--dtype bfloat16] [--device cuda --world-sizes 1]   # nccl on one GPU per rank

A Llama (random init, `save_pretrained`, loaded with `load_policy_model`) runs two steps of
forward_backward (the same batch, split over the ranks by tokens) + optim_step on each rank's
Engine. Reported per rank, in MiB:
  state     what the engine reports (GetInfo.memory, cispo_run_state_bytes) after a
            forward_backward: weights + gradient + AdamW moments
  predicted `sharding.state_bytes` for the same model: the accounting docs/scaling.md uses
  base      --lora: the bytes of the frozen base this rank holds (every base parameter, 1/W
            of each under fsdp), beside the adapter's state (whole on every rank); it is held
            in the compute dtype (`--dtype`)
  peak RSS  the process's peak resident memory (torch, the model load, activations included)
and seconds per step. Optional `--activation-checkpointing` row at the largest W.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig


def worker(args) -> None:
    """One rank: load, shard (W > 1 and fsdp), two steps; rank 0 prints every rank's figures."""
    import torch.distributed as dist

    from cispo.worker import AdamParams, Engine, EngineConfig, Sample, load_policy_model, lora
    from cispo.worker.group import init_group, member, shard_by_tokens
    from cispo.worker.sharding import local_bytes, state_bytes

    ctx = init_group(torch.device(args.device))  # gloo on the CPU, nccl on CUDA
    device = f"cuda:{ctx.rank}" if args.device == "cuda" else args.device
    policy = load_policy_model(
        args.model,
        device,
        args.dtype,
        activation_checkpointing=args.activation_checkpointing,
        shard=args.sharding == "fsdp",
    )
    run = {}
    if args.lora:
        spec = lora.LoraSpec(rank=args.lora_rank)
        lora.add_adapter(policy, "bench", spec)
        run = {"adapter": "bench", "lora_spec": spec}
    engine = Engine(policy, EngineConfig(checkpoint_dir=args.tmp), member=member(ctx), **run)
    base = local_bytes(p for n, p in policy.model.named_parameters() if "lora_" not in n)
    g = torch.Generator().manual_seed(0)
    lengths = [512] * 8
    samples = [
        Sample(
            torch.randint(0, args.vocab, (n,), generator=g),
            {
                "target_tokens": torch.randint(0, args.vocab, (n,), generator=g),
                "logprobs": -torch.rand(n, generator=g) * 5 - 1,
                "advantages": torch.randn(n, generator=g),
            },
        )
        for n in lengths
    ]
    mine = [samples[i] for i in shard_by_tokens(lengths, ctx.world_size)[ctx.rank]]
    loss = engine.validate(mine, "cispo", None)
    times, state = [], None
    for _ in range(2):
        started = time.perf_counter()
        engine.run_batch(mine, *loss, backward=True, micro_batches=1)
        state = engine.memory_use()
        engine.optim_step(AdamParams(learning_rate=1e-4))
        times.append(time.perf_counter() - started)
    num_parameters = sum(p.numel() for p in engine.named_params.values())
    predicted = state_bytes(num_parameters, ctx.world_size, "replicated" if args.lora else args.sharding)
    mine = {
        "rank": ctx.rank,
        "state": state.total,
        "predicted": predicted.total,
        "base": base,
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": times[-1],
    }
    everyone = [None] * ctx.world_size
    dist.all_gather_object(everyone, mine, group=ctx.control)
    if ctx.rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.destroy_process_group()


def run(args, world_size: int, sharding: str, checkpointing: bool = False) -> list[dict]:
    cmd = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={world_size}",
            __file__,
            "--worker",
            "--model",
            args.model,
            "--vocab",
            str(args.vocab),
            "--sharding",
            sharding,
            "--tmp",
            args.tmp,
            "--lora-rank",
            str(args.lora_rank),
            "--dtype",
            args.dtype,
            "--device",
            args.device,
        ]
        + (["--activation-checkpointing"] if checkpointing else [])
        + (["--lora"] if args.lora else [])
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // world_size))}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--lora", action="store_true", help="a LoRA run (every linear layer) in place of a full fine-tune")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--dtype", default="float32", help="the compute dtype (bfloat16 autocasts on the CPU too)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--sharding", default="replicated", help=argparse.SUPPRESS)
    p.add_argument("--tmp", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 11 // 4,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
        )
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        args.model, args.tmp = os.path.join(tmp, "llama"), tmp
        model.save_pretrained(args.model)
        n = sum(t.numel() for t in model.parameters())
        print(
            f"model: {n / 1e6:.1f}M parameters ({args.layers} layers, d={args.hidden}, V={args.vocab}); "
            f"batch 8 x 512 tokens; {'CUDA, nccl' if args.device == 'cuda' else 'CPU, gloo'}; compute dtype {args.dtype}"
            + (f"; LoRA r={args.lora_rank}" if args.lora else "")
        )
        print(
            "| W | sharding | state per rank (MiB) | predicted (MiB) | frozen base per rank (MiB) "
            "| peak RSS per rank (MiB) | s/step |"
        )
        print("|---|---|---|---|---|---|---|")
        rows = [
            (w, "replicated" if w == 1 else mode, False)
            for w in args.world_sizes
            for mode in (("replicated",) if w == 1 else ("replicated", "fsdp"))
        ]
        if args.activation_checkpointing:
            rows.append((max(args.world_sizes), "fsdp", True))
        mib = 1 << 20

        def base(ranks) -> str:
            return f"{max(r['base'] for r in ranks) / mib:.1f}" if args.lora else "-"

        for world_size, sharding, checkpointing in rows:
            ranks = run(args, world_size, sharding, checkpointing)
            print(
                f"| {world_size} | {sharding}{' + activation checkpointing' if checkpointing else ''} "
                f"| {max(r['state'] for r in ranks) / mib:.1f} | {ranks[0]['predicted'] / mib:.1f} "
                f"| {base(ranks)} "
                f"| {max(r['peak_rss'] for r in ranks) / mib:.0f} | {max(r['seconds'] for r in ranks):.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
