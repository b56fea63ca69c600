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


SOURCE = '''
def function_{i}(values, scale={i}):
    """Return the scaled sum of values number {i}."""
    total = 0
    for index, value in enumerate(values):
        if index % 2 == 0:
            total += value * scale
        else:
            total -= value // (scale + 1)
    return total


class Widget{i}:
    def __init__(self, name):
        self.name = name
        self.items = [n * {i} for n in range(10)]

    def describe(self):
        return f"{{self.name}} has {{len(self.items)}} items"
'''


@pytest.fixture(scope="session")
def default_corpus_cache(tmp_path_factory):
    """A data.cache_dir holding the embedded default corpus, built once per test session (~30 s):
    the default run's test trains on it, the data tests check it."""
    from megatrain.data_pipelines.prepare import ensure_default_dataset

    cache = tmp_path_factory.mktemp("default_corpus_cache")
    ensure_default_dataset(cache, progress=False)
    return cache


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """A tiny byte-level dataset (60 generated modules), prepared once per test session."""
    from megatrain.data_pipelines.prepare import prepare_dataset

    root = tmp_path_factory.mktemp("corpus")
    src = root / "src"
    src.mkdir()
    for i in range(60):
        (src / f"module_{i}.py").write_text(SOURCE.format(i=i) * (1 + i % 3))
    out = root / "shards"
    prepare_dataset(src, out, tokenizer="bytes", tasks=1, val_fraction=0.1, progress=False)
    return out


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (pytest.ini runs two workers), every test that needs the local SLURM
    cluster runs on the same worker: they share one slurmctld and its nodes (slurm_fixtures), which
    a second worker would start again over the first's."""
    for item in items:
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
