"""Which parameters a rank holds and how many elements of each, by arithmetic on the config.

This is the planner's own account of how megatrain shards a model; a test builds the real thing
(the model on the meta device, ``parallelize_mtp`` under a fake process group of the full world
size) and checks every rank's bytes against it, so the two cannot drift apart silently.

The rules it encodes, each owned by the module named:
- mesh axes ("dp", "pp", "tp"), tp innermost (parallel/topology.py): global rank
  ``(dp_rank * pp + pp_rank) * tp + tp_rank``;
- stages and their trunk layers (parallel/pipeline_layout.py, imported, not re-derived); the last
  stage holds every head with ``norm`` and ``output``, the first the embedding;
- tensor parallelism (parallel/tensor_parallel.py): wq/wk/wv/w1/w3 and ``output`` split along
  dim 0, wo/w2 along dim 1, the embedding along the vocabulary (dim 0); norms and linear heads
  replicated. DTensor splits like ``torch.chunk``: ceil(n / k) per rank, the tail ranks get less;
- FSDP2 (parallel/data_parallel.py) splits dim 0 of the tp-local tensor the same way over dp and
  allocates every rank's shard padded to the full chunk;
- DeepSpeed ZeRO-3 partitions each parameter's flattened elements over dp, padded likewise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from megatrain.config import Config
from megatrain.model.layout import LayerLayout
from megatrain.parallel.pipeline_layout import (
    balanced_stage_layers,
    local_stage_ids,
    stages_per_rank,
)
from megatrain.parallel.tensor_parallel import tp_split_dim


@dataclass(frozen=True)
class RankCoords:
    rank: int
    dp_rank: int
    pp_rank: int
    tp_rank: int


def rank_coords(rank: int, dp: int, pp: int, tp: int) -> RankCoords:
    """Mesh coordinates of a global rank (axes dp, pp, tp; tp innermost)."""
    if not 0 <= rank < dp * pp * tp:
        raise ValueError(f"rank {rank} outside a world of {dp * pp * tp}")
    return RankCoords(rank, rank // (pp * tp), rank // tp % pp, rank % tp)


def chunk_size(n: int, parts: int, index: int) -> int:
    """Elements ``torch.chunk`` (and so DTensor's Shard) gives part ``index`` of ``n``."""
    full = math.ceil(n / parts)
    return max(0, min(full, n - index * full))


def model_shapes(cfg: Config) -> dict[str, tuple[int, ...]]:
    """Every parameter's full shape, by name: the model built on the meta device (no memory)."""
    from megatrain.model.mtp import MTPTransformer

    with torch.device("meta"):
        model = MTPTransformer(cfg.model, max_seq_len=1)
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def stage_trunk_layers(cfg: Config) -> list[int]:
    """Trunk layers per pipeline stage (all stages, first first)."""
    parallel = cfg.parallel
    n_stages = parallel.pp * stages_per_rank(parallel.pp_schedule, parallel.virtual_stages)
    return list(parallel.stage_layers) or balanced_stage_layers(cfg.model, n_stages)


def stage_of_parameter(name: str, cfg: Config, stage_layers: list[int]) -> int:
    """The pipeline stage that holds parameter ``name``."""
    layout = LayerLayout.of(cfg.model)
    last = len(stage_layers) - 1
    if name.startswith("tok_embeddings."):
        return 0
    if name.startswith("layers."):
        key = name.split(".")[1]
        if key == layout.head1_key:
            return last
        index, bound = int(key), 0
        for stage, count in enumerate(stage_layers):
            bound += count
            if index < bound:
                return stage
    return last  # heads, norm, output


def stages_of_rank(cfg: Config, pp_rank: int) -> list[int]:
    parallel = cfg.parallel
    if parallel.pp == 1:
        return [0]
    return local_stage_ids(pp_rank, parallel.pp, parallel.pp_schedule, parallel.virtual_stages)


def tp_local_shape(name: str, shape: tuple[int, ...], tp: int, tp_rank: int) -> tuple[int, ...]:
    """The shape of ``name`` on one tensor-parallel rank."""
    if tp == 1 or len(shape) == 1 or name.startswith("linear_heads."):
        return shape
    dim = tp_split_dim(name)
    if dim == 0:
        return (chunk_size(shape[0], tp, tp_rank), *shape[1:])
    if dim == 1:
        return (shape[0], chunk_size(shape[1], tp, tp_rank))
    return shape


@dataclass(frozen=True)
class LocalParameter:
    name: str
    stage: int
    full_shape: tuple[int, ...]
    local_numel: int  # elements this rank holds (what ``to_local()`` shows)
    allocated_numel: int  # elements its storage takes (FSDP2 / ZeRO-3 pad every shard to the full chunk)
    gathered_numel: int  # elements of this rank's (tp-local) parameter once dp-gathered for compute


def local_parameters(cfg: Config, rank: int, shapes: dict[str, tuple[int, ...]] | None = None
                     ) -> list[LocalParameter]:
    """What ``rank`` holds of every parameter, in the layout of ``cfg.parallel``."""
    parallel = cfg.parallel
    dp, tp, pp = parallel.dp, parallel.tp, parallel.pp
    coords = rank_coords(rank, dp, pp, tp)
    shapes = shapes if shapes is not None else model_shapes(cfg)
    layers = stage_trunk_layers(cfg)
    mine = set(stages_of_rank(cfg, coords.pp_rank))
    zero3 = parallel.dp_engine == "deepspeed" and parallel.zero_stage == 3
    held = []
    for name, shape in shapes.items():
        stage = stage_of_parameter(name, cfg, layers)
        if stage not in mine:
            continue
        local = tp_local_shape(name, shape, tp, coords.tp_rank)
        gathered = math.prod(local)
        if dp == 1 or parallel.dp_engine == "deepspeed" and not zero3:
            numel = allocated = gathered
        elif zero3:  # flattened, split evenly, padded
            allocated = math.ceil(gathered / dp)
            numel = chunk_size(gathered, dp, coords.dp_rank)
        else:  # FSDP2: dim 0 of the tp-local tensor
            rest = math.prod(local[1:])
            numel = chunk_size(local[0], dp, coords.dp_rank) * rest
            allocated = math.ceil(local[0] / dp) * rest
        held.append(LocalParameter(name, stage, shape, numel, allocated, gathered))
    return held
