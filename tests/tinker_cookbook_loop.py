"""tinker-cookbook's own RL loop (`tinker_cookbook.rl.train.main`), unmodified, on a toy task
defined here, against cispo's Tinker HTTP API; run by tests/test_tinker_cookbook.py as

    TINKER_BASE_URL=http://127.0.0.1:<--http-port> TINKER_API_KEY=tml-<token> python tinker_cookbook_loop.py LOG_DIR

Nothing is downloaded: the tokenizer is built here (1024 ids, the embedded model's vocabulary),
there is no dataset, the cookbook's pricing fetch is marked done, and any socket connection to a
non-loopback address raises. The task: after a prompt of ids outside [4, 260), sample up to 8
tokens; the reward is the fraction of them in [4, 260) (about 0.25 for the untrained model).
Prints one JSON line: the cookbook's per-step mean rewards (its own metrics.jsonl).
"""

import asyncio
import ipaddress
import json
import os
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TINKER_TELEMETRY", "0")

import chz
import tinker
from tinker_cookbook import tokenizer_utils
from tinker_cookbook.completers import StopCondition
from tinker_cookbook.rl import train
from tinker_cookbook.rl.types import Action, Env, EnvGroupBuilder, Observation, RLDataset, RLDatasetBuilder, StepResult
from tinker_cookbook.utils import cost_estimation

VOCAB, BOS, EOS = 1024, 1, 2
TARGET = range(4, 260)
MODEL_NAME = "embedded-tiny-llama"  # the served model's name, which create_model checks


def loopback_only() -> None:
    """Every Python socket connection to a non-loopback address raises."""
    connect = socket.socket.connect

    def guarded(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host != "localhost" and not ipaddress.ip_address(host).is_loopback:
            raise ConnectionRefusedError(f"no network in this test: refused {address!r}")
        return connect(self, address)

    socket.socket.connect = guarded


def build_tokenizer(directory: Path):
    """Word-level: <unk> <s> </s> <pad>, then w0..w1019: exactly the model's 1024 ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": BOS, "</s>": EOS, "<pad>": 3, **{f"w{i}": 4 + i for i in range(VOCAB - 4)}}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    tokenizer.save_pretrained(directory)
    return PreTrainedTokenizerFast.from_pretrained(str(directory))


class TokenSetEnv(Env):
    def __init__(self, prompt: Sequence[int]):
        self.prompt = list(prompt)

    async def initial_observation(self) -> tuple[Observation, StopCondition]:
        return tinker.ModelInput.from_ints(self.prompt), [EOS]

    async def step(self, action: Action, *, extra=None) -> StepResult:
        reward = sum(t in TARGET for t in action) / max(len(action), 1)
        return StepResult(
            reward=reward,
            episode_done=True,
            next_observation=tinker.ModelInput.empty(),
            next_stop_condition=[EOS],
            metrics={},
        )


@dataclass(frozen=True)
class TokenSetGroup(EnvGroupBuilder):
    prompt: tuple[int, ...]
    group_size: int

    async def make_envs(self) -> Sequence[Env]:
        return [TokenSetEnv(self.prompt) for _ in range(self.group_size)]

    def logging_tags(self) -> list[str]:
        return ["token_set"]


class TokenSetDataset(RLDataset):
    def __init__(self, batches: int, groups: int, group_size: int):
        self.batches, self.groups, self.group_size = batches, groups, group_size

    def get_batch(self, index: int) -> Sequence[EnvGroupBuilder]:
        return [
            TokenSetGroup((BOS, *(512 + (k * 37 + i * 11) % 500 for i in range(3))), self.group_size)
            for k in range(index * self.groups, (index + 1) * self.groups)
        ]

    def __len__(self) -> int:
        return self.batches


@chz.chz
class TokenSetDatasetBuilder(RLDatasetBuilder):
    batches: int = 8
    groups: int = 8
    group_size: int = 8

    async def __call__(self) -> tuple[RLDataset, RLDataset | None]:
        return TokenSetDataset(self.batches, self.groups, self.group_size), None


def main(log_dir: Path) -> None:
    loopback_only()
    cost_estimation._pricing_fetched = True  # the loop's one download (a price list): not here
    tokenizer = build_tokenizer(log_dir / "tokenizer")
    tokenizer_utils.register_tokenizer(MODEL_NAME, lambda: tokenizer)
    log_path = log_dir / "log"
    config = train.Config(
        learning_rate=5e-2,
        dataset_builder=TokenSetDatasetBuilder(),
        model_name=MODEL_NAME,
        recipe_name="cispo_toy",
        max_tokens=8,
        log_path=str(log_path),
        base_url=os.environ["TINKER_BASE_URL"],
        lora_rank=8,
        loss_fn="cispo",
        loss_fn_config={"clip_low_threshold": 0.0, "clip_high_threshold": 4.0},
        eval_every=0,
        save_every=4,
        wandb_project=None,
        rollout_error_tolerance=False,
    )
    asyncio.run(train.main(config))
    rows = [json.loads(line) for line in (log_path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    checkpoints = (log_path / "checkpoints.jsonl").read_text().splitlines()
    print(
        json.dumps(
            {
                "rewards": [r["env/all/reward/total"] for r in rows if "env/all/reward/total" in r],
                "checkpoints": [json.loads(c) for c in checkpoints],
            }
        )
    )


if __name__ == "__main__":
    main(Path(sys.argv[1]))
