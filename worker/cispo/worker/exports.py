"""A run's sampler weights: save_weights_for_sampler in its four variants (full or a LoRA
adapter, replicated or sharded, an adapter also merged into full weights), and which saved
weights a Sample request of the run may read.

The files are laid out by worker.sampler_weights, for external samplers to load as they are.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from cispo.worker import checkpoint, sampler_weights
from cispo.worker.config import SERVING_DTYPES, ExportConfig
from cispo.worker.errors import StateNotFound
from cispo.worker.model import PolicyModel
from cispo.worker.sampler_weights import ExportCache, SamplerWeights
from cispo.worker.states import save_failures

SHARDED_EXPORT_SAMPLING = (
    "a sharded group (--sharding fsdp) samples its current weights only (and the sampler "
    "weights a run saved of them last, when --sampler-dtype is the compute dtype and, for a "
    "LoRA adapter, float32; never merged ones); serve other saved sampler weights with an "
    "external sampler such as vLLM"
)


@dataclass
class SamplerExports:
    """The sampler weights of the run training `policy` (its `adapter`, None for a full
    fine-tune), kept loaded in `cache`. `rank` and `group`: its place in a data-parallel group."""

    policy: PolicyModel
    config: ExportConfig
    adapter: str | None
    cache: ExportCache
    rank: int = 0
    group: dist.ProcessGroup | None = None
    current: str | None = None
    """Sharded: the saved sampler weights that are exactly the run's current weights."""

    def save(self, name: str, step: int, owner: str | None, merged: bool) -> Path | None:
        """Write the weights as a directory samplers load as it is (see worker.sampler_weights),
        owned by `owner`, and keep them loaded for Sample requests that name it. A LoRA run
        writes its PEFT adapter, or with `merged` full weights with the adapter merged in.
        Sharded, every rank calls it; rank 0 returns the path, others may return None."""
        export, policy, adapter = self.config, self.policy, self.adapter
        checkpoint.state_dir(export.sampler_dir, name)
        with save_failures(f"sampler weights '{name}'", "export"):
            if policy.sharded is not None:  # streamed; sampled from files by external samplers
                path: Path | None
                if adapter is not None and not merged:  # whole on every rank: rank 0 writes it
                    path = (
                        sampler_weights.export_adapter(policy, export, adapter, name, step, owner)
                        if self.rank == 0
                        else None
                    )
                else:
                    assert self.group is not None, "sharded weights are exported by their group"
                    path = sampler_weights.export_full_sharded(
                        policy, export, name, step, owner, self.group, merge_adapter=adapter
                    )
                # Sampling it is sampling the current weights where its tensors are exactly those
                # the run computes with: in the compute dtype, an adapter in fp32 (its master
                # weights), never merged ones (W + BA rounded as one).
                dtype = SERVING_DTYPES[export.dtype]
                exact = dtype == sampler_weights.load_dtype(policy) and (
                    adapter is None or (not merged and dtype == torch.float32)
                )
                self.current = name if exact else None
                return path
            if adapter is None:
                path = sampler_weights.export_full(policy, export, name, step, owner)
            elif merged:
                path = sampler_weights.export_full(policy, export, name, step, owner, merge_adapter=adapter)
            else:
                path = sampler_weights.export_adapter(policy, export, adapter, name, step, owner)
        if adapter is None:
            self.cache.put(name, sampler_weights.snapshot(policy, export, name), owner)
        elif not merged:
            self.cache.put(name, sampler_weights.adapter_snapshot(policy, export, adapter, name), owner)
        else:  # a merged export is loaded from its files when a sample names it
            self.cache.forget(name)
        return path

    def weights(self, model_path: str, owner: str | None) -> SamplerWeights:
        """The saved sampler weights `model_path` that `owner` may read; sharded, only those that
        are the run's current weights (StateNotFound otherwise)."""
        name = sampler_weights.export_name(self.config, model_path)
        if self.policy.sharded is not None:  # only the export of the current weights, which are the same
            if name != self.current:
                raise StateNotFound(SHARDED_EXPORT_SAMPLING)
            checkpoint.open_directory(self.config.sampler_dir, name, checkpoint.SAMPLER_FORMAT, owner)
            return SamplerWeights(self.policy, self.adapter)
        return self.cache.get(name, owner, lambda: sampler_weights.load_export(self.policy, self.config, name, owner))
