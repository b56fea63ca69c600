"""Training data: memory-mapped token shards (``shards``), deterministic window batches (``loader``)
and weighted mixtures of several datasets (``mixture``).

Datasets are created by ``megatrain data prepare`` (``megatrain.data_pipelines``).
"""

from megatrain.data.loader import WindowLoader, val_batches
from megatrain.data.mixture import Mixture, MixtureLoader, mixture_val_batches, open_mixture
from megatrain.data.shards import Shard, ShardSet, open_split, read_manifest

__all__ = ["Mixture", "MixtureLoader", "Shard", "ShardSet", "WindowLoader", "mixture_val_batches",
           "open_mixture", "open_split", "read_manifest", "val_batches"]
