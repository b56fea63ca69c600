import os

# One thread per process: the CI machine has 2 cores and multi-process tests oversubscribe fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

pytest_plugins = ["tests.slurm_fixtures"]

torch.set_num_threads(1)


@pytest.fixture
def tiny_model_cfg():
    from megatrain.config import ModelConfig

    def make(**overrides):
        base = dict(n_layers=4, n_future=3, dim=32, n_heads=4, n_kv_heads=2, vocab_size=97,
                    multiple_of=16)
        base.update(overrides)
        return ModelConfig(**base)

    return make
