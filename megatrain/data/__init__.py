"""Training data: memory-mapped token shards (``shards``) and deterministic window batches (``loader``).

Datasets are created by ``megatrain data prepare`` (``megatrain.data_pipelines``).
"""

from megatrain.data.loader import WindowLoader, val_batches
from megatrain.data.shards import Shard, ShardSet, open_split, read_manifest

__all__ = ["Shard", "ShardSet", "WindowLoader", "open_split", "read_manifest", "val_batches"]
