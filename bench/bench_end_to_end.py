"""End to end: a step of `Engine.forward_backward` against a hand-written HF CISPO step, in
one run on the same model and data.

Model: a Llama built with `from_config` (seeded, nothing downloaded), saved with
`save_pretrained` and loaded with `load_policy_model(dir)`: 4 layers, d=512, 8 heads, untied,
at V=32k and V=128k. Datums (target tokens, sampler logprobs around -ln V, advantages, a
quarter of them 0 like prompt tokens) from a fixed seed. Configurations (`--configs`):

    32k-long    V=32000,  4 datums of 2048, 1536, 1024, 1024 tokens (5632)
    32k-short   V=32000,  32 x 256 (8192)
    128k-long   V=128000, 2 x 1024 (2048)
    128k-short  V=128000, 16 x 256 (4096)

Three steps, each from no gradient (`.grad = None` first) to the gradient in `.grad`:

- cispo: `Engine.forward_backward(samples, "cispo")`, default EngineConfig (micro-batches of
  up to 8192 tokens, so every batch here is one packed micro-batch with per-datum attention;
  the chunked, fused head: no (tokens x V) logits);
- hf loop: the HF model (stock "sdpa" attention) on one datum at a time, full logits, the
  seed's four lines and `loss.backward()` per datum (gradients accumulate in `.grad`);
- hf padded: the same on one right-padded batch (attention_mask; padding has advantage 0).

The seed's four lines, on materialised fp32 logits:

    logp = log_softmax(logits, -1).gather(-1, target_tokens[..., None])[..., 0]
    ratio = exp(logp - sampling_logprobs); coef = clamp(ratio, 0.0, 4.0).detach()
    loss = -(coef * logp * advantages).sum()
    loss.backward()

Before timing, each configuration checks that the three give the same loss (rel 1e-4) and the
same gradient (every parameter's ||g - g_hf|| / ||g_hf|| <= 1e-4, against hf loop).

Time: one process per V, the steps in an order that rotates every round (`--repeats` rounds,
after the checking calls, which are the warm-up); medians. The hand-written reference is the
faster of hf loop and hf padded (by median), named in the table.

Extra peak memory: in a fresh process per V, with glibc told to mmap every allocation over
64 KiB (`MALLOC_MMAP_THRESHOLD_=65536`) so that RSS follows the live bytes, as
bench_engine_overhead.py does: peak RSS (VmHWM, reset through /proc/self/clear_refs) minus RSS
just before the step (weights loaded, no gradient, after an untimed step of the same kind).
It includes the new gradient (4 bytes per parameter) for every step alike.

Targets (issue 11): cispo faster than hand-written at every size; at V=128k, at most 1/4 of its
extra memory.

    .venv/bin/python bench/bench_end_to_end.py
    .venv/bin/python bench/bench_end_to_end.py --configs 128k-long --repeats 5
    .venv/bin/python bench/bench_end_to_end.py --tree /tmp/snapshot   # cispo from another tree
"""

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

CONFIGS = {
    "32k-long": (32000, [2048, 1536, 1024, 1024]),
    "32k-short": (32000, [256] * 32),
    "128k-long": (128000, [1024, 1024]),
    "128k-short": (128000, [256] * 16),
}
STEPS = ("cispo", "hf loop", "hf padded")
REL_TOL = 1e-4


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def describe(lengths: list[int]) -> str:
    if len(set(lengths)) == 1:
        return f"{len(lengths)} x {lengths[0]}"
    return "+".join(str(n) for n in lengths)


class Bench:
    """One model (loaded from `path`) and its three steps."""

    def __init__(self, path: str, tmp: str):
        import torch

        from cispo.worker import Engine, EngineConfig, load_policy_model

        self.torch = torch
        self.policy = load_policy_model(path)
        self.model = self.policy.model
        self.packed_attention = self.model.config._attn_implementation
        self.engine = Engine(self.policy, EngineConfig(checkpoint_dir=tmp))
        self.params = list(self.model.parameters())
        self.vocab = self.policy.vocab_size

    def samples(self, lengths: list[int], seed: int = 0):
        from cispo.worker import Sample

        torch = self.torch
        g = torch.Generator().manual_seed(seed)
        out = []
        for n in lengths:
            advantages = torch.randn(n, generator=g)
            advantages[torch.rand(n, generator=g) < 0.25] = 0.0  # prompt tokens
            out.append(
                Sample(
                    torch.randint(0, self.vocab, (n,), generator=g),
                    {
                        "target_tokens": torch.randint(0, self.vocab, (n,), generator=g),
                        # around the random model's own logprobs (-ln V), so that some ratios pass 4
                        "logprobs": -math.log(self.vocab) + torch.randn(n, generator=g),
                        "advantages": advantages,
                    },
                )
            )
        return out

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def run(self, step: str, samples) -> float:
        """One step from no gradient; its loss."""
        self.zero_grad()
        if step == "cispo":
            self.model.set_attn_implementation(self.packed_attention)
            return self.engine.forward_backward(samples, "cispo").metrics["loss:sum"]
        self.model.set_attn_implementation("sdpa")
        if step == "hf loop":
            total = 0.0
            for s in samples:
                inputs = s.loss_fn_inputs
                logits = self.model(input_ids=s.model_input[None], use_cache=False).logits
                total += hf_cispo_loss(
                    logits, inputs["target_tokens"][None], inputs["logprobs"][None], inputs["advantages"][None]
                )
            return total
        torch = self.torch
        B, L = len(samples), max(s.length for s in samples)
        ids, targets = torch.zeros(B, L, dtype=torch.long), torch.zeros(B, L, dtype=torch.long)
        sampling, advantages = torch.zeros(B, L), torch.zeros(B, L)
        mask = torch.zeros(B, L, dtype=torch.long)
        for b, s in enumerate(samples):
            n = s.length
            ids[b, :n], mask[b, :n] = s.model_input, 1
            targets[b, :n] = s.loss_fn_inputs["target_tokens"]
            sampling[b, :n] = s.loss_fn_inputs["logprobs"]
            advantages[b, :n] = s.loss_fn_inputs["advantages"]
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        return hf_cispo_loss(logits, targets, sampling, advantages)

    def grads(self) -> dict:
        return {n: p.grad.clone() for n, p in self.model.named_parameters()}


def hf_cispo_loss(logits, target_tokens, sampling_logprobs, advantages) -> float:
    """The seed's four lines; backward; the loss."""
    from torch import clamp, exp
    from torch.nn.functional import log_softmax

    logp = log_softmax(logits, -1).gather(-1, target_tokens[..., None])[..., 0]
    ratio = exp(logp - sampling_logprobs)
    coef = clamp(ratio, 0.0, 4.0).detach()
    loss = -(coef * logp * advantages).sum()
    loss.backward()
    return float(loss.detach())


def check(bench: Bench, samples) -> dict:
    """Loss and gradient of each step against hf loop; raises when they differ by more than 1e-4."""
    torch = bench.torch
    losses, grads = {}, {}
    for step in ("hf loop", "hf padded", "cispo"):
        losses[step] = bench.run(step, samples)
        grads[step] = bench.grads()
    bench.zero_grad()
    ref = grads["hf loop"]
    out = {}
    for step in ("hf padded", "cispo"):
        loss_rel = abs(losses[step] - losses["hf loop"]) / abs(losses["hf loop"])
        grad_rel = max(
            float(torch.linalg.vector_norm(grads[step][n] - g) / torch.linalg.vector_norm(g)) for n, g in ref.items()
        )
        out[step] = (loss_rel, grad_rel)
        if not (loss_rel <= REL_TOL and grad_rel <= REL_TOL):
            sys.exit(f"{step} differs from hf loop: loss rel {loss_rel:.2e}, worst gradient rel {grad_rel:.2e}")
    del grads
    gc.collect()
    return out


def time_child(path: str, names: list[str], repeats: int) -> dict:
    import torch

    tmp = tempfile.mkdtemp()
    bench = Bench(path, tmp)
    out = {"params": sum(p.numel() for p in bench.params)}
    for name in names:
        samples = bench.samples(CONFIGS[name][1])
        out[name] = {"check": check(bench, samples), "times": {s: [] for s in STEPS}}
        for r in range(repeats):
            for step in STEPS[r % 3 :] + STEPS[: r % 3]:
                started = time.perf_counter()
                bench.run(step, samples)
                out[name]["times"][step].append(time.perf_counter() - started)
                print(f"  {name} {step}: {out[name]['times'][step][-1]:.2f} s", file=sys.stderr, flush=True)
        bench.zero_grad()
        gc.collect()
    out["threads"] = torch.get_num_threads()
    return out


def memory_child(path: str, names: list[str]) -> dict:
    tmp = tempfile.mkdtemp()
    bench = Bench(path, tmp)
    out = {}
    for name in names:
        samples = bench.samples(CONFIGS[name][1])
        out[name] = {}
        for step in STEPS:
            bench.run(step, samples)  # first-call work, untimed
            bench.zero_grad()
            gc.collect()
            with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
                f.write("5")
            before = _status_kib("VmRSS")
            bench.run(step, samples)
            out[name][step] = (_status_kib("VmHWM") - before) / 1024
            bench.zero_grad()
            gc.collect()
            print(f"  {name} {step}: extra peak {out[name][step]:.0f} MiB", file=sys.stderr, flush=True)
    return out


def save_model(path: str, vocab: int, layers: int, hidden: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 64,
        max_position_embeddings=8192,
        tie_word_embeddings=False,
    )
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)


def spawn(what: str, path: str, names: list[str], repeats: int, tree: str | None) -> dict:
    env = dict(os.environ)
    if tree:  # import cispo from `tree` (its four import roots, as bench_engine_overhead does)
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from bench_engine_overhead import import_root

        env["PYTHONPATH"] = import_root(tree)
    if what == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            what,
            "--path",
            path,
            "--configs",
            *names,
            "--repeats",
            str(repeats),
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if proc.returncode:
        sys.exit(f"{what} child failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--no-memory", action="store_true", help="skip the memory processes")
    parser.add_argument("--tree", default=None, help="import cispo from this source tree (default: the installed one)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--path", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if args.child:
        result = (time_child if args.child == "time" else memory_child)(
            args.path, args.configs, *([args.repeats] if args.child == "time" else [])
        )
        print(json.dumps(result))
        return
    import torch

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, "
        f"load average {os.getloadavg()[0]:.2f}",
        flush=True,
    )
    time_rows, memory_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for vocab in sorted({CONFIGS[n][0] for n in args.configs}):
            names = [n for n in args.configs if CONFIGS[n][0] == vocab]
            path = os.path.join(tmp, f"llama-v{vocab}")
            save_model(path, vocab, args.layers, args.hidden)
            timing = spawn("time", path, names, args.repeats, args.tree)
            memory = {} if args.no_memory else spawn("memory", path, names, args.repeats, args.tree)
            grad_mib = timing["params"] * 4 / 2**20
            print(
                f"V={vocab}: {timing['params'] / 1e6:.1f}M parameters (gradient {grad_mib:.0f} MiB), "
                f"{timing['threads']} threads, load average {os.getloadavg()[0]:.2f}",
                flush=True,
            )
            for name in names:
                times = timing[name]["times"]
                med = {s: statistics.median(v) for s, v in times.items()}
                best = {s: min(v) for s, v in times.items()}
                hf = min(("hf loop", "hf padded"), key=med.get)  # the hand-written reference: the faster
                ratio = statistics.median(c / h for c, h in zip(times["cispo"], times[hf]))
                loss_rel, grad_rel = timing[name]["check"]["cispo"]
                lengths = CONFIGS[name][1]
                head = f"| {vocab // 1000}k | {describe(lengths)} | {sum(lengths)} |"
                time_rows.append(
                    head
                    + "".join(f" {med[s]:.2f} ({best[s]:.2f}) |" for s in STEPS)
                    + f" {hf} | {ratio:.2f}x | {best['cispo'] / best[hf]:.2f}x |"
                    f" {loss_rel:.1e} | {grad_rel:.1e} |"
                )
                print(time_rows[-1], flush=True)
                mem = memory.get(name)
                if mem:
                    memory_rows.append(
                        head + "".join(f" {mem[s]:.0f} |" for s in STEPS) + f" {grad_mib:.0f} |"
                        f" {hf} | {mem['cispo'] / mem[hf]:.3f}x |"
                        f" {mem['cispo'] / mem['hf loop']:.3f}x | {mem['cispo'] / mem['hf padded']:.3f}x |"
                    )
                    print(memory_rows[-1], flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.2f}")
    print("\nTime (s), median of the rounds (min in brackets):\n")
    print(
        "| V | datums | tokens | cispo | hf loop | hf padded | hand-written (faster) | cispo / hand-written "
        "(median of rounds) | cispo / hand-written (mins) | loss rel diff | worst gradient rel diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(time_rows))
    if memory_rows:
        print("\nExtra peak memory (MiB, above the weights; includes the new gradient):\n")
        print(
            "| V | datums | tokens | cispo | hf loop | hf padded | of which gradient | hand-written (faster) | "
            "cispo / hand-written | cispo / hf loop | cispo / hf padded |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        print("\n".join(memory_rows))


if __name__ == "__main__":
    main()
