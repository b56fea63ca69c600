import os

# One thread per process: the CI machine has 2 cores and multi-process tests oversubscribe fast.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# torch.compile's cache inside the repo's ignored .cache/, shared by tests and their subprocesses.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(os.path.dirname(os.path.dirname(__file__)), ".cache", "inductor"))

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
