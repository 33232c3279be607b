import pytest
import torch

from cispo.worker import Engine, EngineConfig, load_policy_model

torch.set_num_threads(2)


@pytest.fixture
def engine(tmp_path) -> Engine:
    """A fresh engine on the embedded model; micro-batches small enough that packing happens."""
    return Engine(load_policy_model(), EngineConfig(checkpoint_dir=tmp_path / "ckpt", micro_batch_tokens=64))
