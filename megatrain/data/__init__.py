"""Training data: memory-mapped token shards (``shards``), deterministic window batches (``loader``)
and weighted mixtures of several datasets (``mixture``).

Datasets are created by ``megatrain data prepare`` (``megatrain.data_pipelines``).

The names below load on first use (PEP 562): ``loader`` and ``mixture`` import torch (~2 s of CPU),
and the data-prepare workers, which only need ``shards``' constants, import this package in every
worker process of every pipeline stage.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # what type checkers and editors see
    from megatrain.data.loader import WindowLoader, val_batches
    from megatrain.data.mixture import Mixture, MixtureLoader, mixture_val_batches, open_mixture
    from megatrain.data.shards import Shard, ShardSet, open_split, read_manifest

_EXPORTS = {
    "WindowLoader": "loader", "val_batches": "loader",
    "Mixture": "mixture", "MixtureLoader": "mixture", "mixture_val_batches": "mixture",
    "open_mixture": "mixture",
    "Shard": "shards", "ShardSet": "shards", "open_split": "shards", "read_manifest": "shards",
}  # fmt: skip
_SUBMODULES = ("loader", "mixture", "shards")

__all__ = ["Mixture", "MixtureLoader", "Shard", "ShardSet", "WindowLoader", "mixture_val_batches",
           "open_mixture", "open_split", "read_manifest", "val_batches"]


def __getattr__(name: str):
    if name in _SUBMODULES:  # ``megatrain.data.loader`` after a bare ``import megatrain.data``, as before
        return importlib.import_module(f"{__name__}.{name}")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
