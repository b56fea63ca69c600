"""Pipeline layout: how many stages, which trunk layers each holds, and which ranks run them.

Pure arithmetic on the config, checked once up front (``ParallelDims.validate`` calls
``check_pipeline_layout`` before any collective), so a bad layout fails on every rank with a
message naming the ``parallel.*`` key and the fix.

Stage layout (S = pp * stages per rank, stage 0 first): stage 0 holds the embedding and the first
trunk layers; the LAST stage holds the last trunk layers and every MTP head with the shared norm
and unembedding (megatrain/parallel/pipeline.py builds the stages).

Assignment: balanced by estimated cost unless ``parallel.stage_layers`` says otherwise. A trunk
layer costs 1; a head costs one layer (a dim x dim map for head_type=linear) plus its unembedding
(dim * vocab / parameters of a layer); the embedding costs ``EMBEDDING_COST`` (a lookup, no matmul).
"""

from __future__ import annotations

import torch

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model.layout import LayerLayout
from megatrain.model.transformer import ffn_hidden_dim

EMBEDDING_COST = 0.1
V_SHAPED = ("zbv", "dualpipev")
# The zero-bubble schedules, which split a stage's backward into an input pass and a weight pass.
SPLIT_BACKWARD = V_SHAPED
# torch 2.11's weight pass (torch/distributed/pipelining/_backward.py) resumes the backward from
# output 0 of each autograd node only; the sequential-heads node has several outputs, and a
# zbv / dualpipev step fails in it (an `_input_metadata` RuntimeError; the other ranks then report
# gloo's "Pair is not connected"). torch 2.12 resumes from every output (read in its source; 2.13
# is what the suite runs).
SPLIT_BACKWARD_MIN_TORCH = (2, 12)


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of ``version`` (default: the running torch's)."""
    major, minor = (version or torch.__version__).split("+")[0].split(".")[:2]
    return int(major), int(minor)


def split_backward_supported(version: str | None = None) -> bool:
    """Whether this torch runs the zero-bubble schedules on megatrain's stages."""
    return torch_version(version) >= SPLIT_BACKWARD_MIN_TORCH


def stages_per_rank(schedule: str, virtual_stages: int) -> int:
    if schedule in V_SHAPED:
        return 2
    if schedule == "interleaved_1f1b":
        return virtual_stages
    return 1


def min_microbatches(schedule: str, pp: int, n_stages: int) -> int:
    """The fewest microbatches each schedule runs with (torch's own rules, checked up front)."""
    return {"gpipe": 1, "1f1b": pp, "interleaved_1f1b": pp}.get(schedule, n_stages)


def stage_costs(cfg: ModelConfig) -> tuple[float, float]:
    """(embedding cost, cost of all heads with their unembedding) in units of one trunk layer."""
    head_dim = cfg.dim // cfg.n_heads
    n_kv = cfg.n_kv_heads or cfg.n_heads
    layer = 2 * cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * n_kv * head_dim \
        + 3 * cfg.dim * ffn_hidden_dim(cfg)
    layout = LayerLayout.of(cfg)
    # a block head costs a layer; a linear head its dim x dim map; a replicated head nothing but
    # its unembedding (sequential modules: counted here as their projection, like a linear head)
    head_body = 1.0 if layout.heads_are_blocks else 0.0 if layout.replicated else cfg.dim * cfg.dim / layer
    return EMBEDDING_COST, cfg.n_future * (head_body + cfg.dim * cfg.vocab_size / layer)


def balanced_stage_layers(cfg: ModelConfig, n_stages: int) -> list[int]:
    """Trunk layers per stage minimising the costliest stage (every stage but the last gets >= 1)."""
    n_trunk = LayerLayout.of(cfg).n_trunk_layers
    emb, heads = stage_costs(cfg)
    extra = [0.0] * n_stages
    extra[0] += emb
    extra[-1] += heads
    inf = float("inf")
    # best[s][j]: smallest max-stage-cost covering the first j trunk layers with stages 0..s-1
    best = [[inf] * (n_trunk + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n_trunk + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0.0
    for s in range(1, n_stages + 1):
        least = 0 if s == n_stages else 1
        for j in range(n_trunk + 1):
            for i in range(0, j - least + 1):
                if best[s - 1][i] == inf:
                    continue
                cost = max(best[s - 1][i], (j - i) + extra[s - 1])
                if cost < best[s][j] - 1e-9:
                    best[s][j], cut[s][j] = cost, i
    counts, j = [], n_trunk
    for s in range(n_stages, 0, -1):
        i = cut[s][j]
        counts.append(j - i)
        j = i
    return counts[::-1]


def resolve_microbatches(parallel, pp: int, local_batch: int | None, micro_batch_size: int) -> int:
    if parallel.microbatches:
        return parallel.microbatches
    if micro_batch_size and local_batch:
        return max(1, local_batch // micro_batch_size)
    return pp * stages_per_rank(parallel.pp_schedule, parallel.virtual_stages)


def check_pipeline_layout(cfg: ModelConfig, pp: int, parallel, local_batch: int | None = None,
                          micro_batch_size: int = 0) -> list[int]:
    """Validate the pipeline settings once, up front; returns the trunk layers per stage."""
    schedule = parallel.pp_schedule
    if schedule == "interleaved_1f1b" and parallel.virtual_stages < 2:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.virtual_stages >= 2, "
                          f"got {parallel.virtual_stages}; or use parallel.pp_schedule=1f1b")
    n_stages = pp * stages_per_rank(schedule, parallel.virtual_stages)
    n_trunk = LayerLayout.of(cfg).n_trunk_layers
    if n_trunk < n_stages - 1:
        raise ConfigError(
            f"parallel.pp={pp} with parallel.pp_schedule={schedule} makes {n_stages} pipeline stages, "
            f"but the model has only {n_trunk} trunk layers (model.n_layers={cfg.n_layers} minus "
            f"model.n_future={cfg.n_future} heads) and every stage before the last needs at least "
            f"one; raise model.n_layers to >= {n_stages - 1 + (cfg.n_layers - n_trunk)}, lower "
            f"parallel.pp, or use a schedule with one stage per rank (gpipe, 1f1b)")
    layers = list(parallel.stage_layers)
    if layers:
        if (len(layers) != n_stages or sum(layers) != n_trunk or min(layers) < 0
                or min(layers[:-1], default=1) < 1):
            raise ConfigError(
                f"parallel.stage_layers={layers} must list {n_stages} stages (parallel.pp={pp} x "
                f"{n_stages // pp} per rank for {schedule}) whose trunk layers sum to {n_trunk}, "
                f"with at least one layer on every stage but the last; or leave it empty "
                f"(balanced: {balanced_stage_layers(cfg, n_stages)})")
    else:
        layers = balanced_stage_layers(cfg, n_stages)
    n_micro = resolve_microbatches(parallel, pp, local_batch, micro_batch_size)
    need = min_microbatches(schedule, pp, n_stages)
    if n_micro < need:
        raise ConfigError(
            f"parallel.pp_schedule={schedule} with {n_stages} stages on parallel.pp={pp} ranks needs "
            f"at least {need} microbatches, got {n_micro}; set parallel.microbatches >= {need}"
            + (f" (and a multiple of {pp})" if schedule == "interleaved_1f1b" else ""))
    if schedule == "interleaved_1f1b" and n_micro % pp:
        raise ConfigError(f"parallel.pp_schedule=interleaved_1f1b needs parallel.microbatches to be "
                          f"a multiple of parallel.pp={pp}, got {n_micro}")
    if local_batch is not None and local_batch % n_micro:
        raise ConfigError(f"{n_micro} pipeline microbatches must divide the per-rank batch "
                          f"{local_batch} (train.batch_size / parallel.dp); change "
                          f"parallel.microbatches or train.batch_size")
    if schedule in SPLIT_BACKWARD and not split_backward_supported():
        need = ".".join(map(str, SPLIT_BACKWARD_MIN_TORCH))
        raise ConfigError(f"parallel.pp_schedule={schedule} needs torch >= {need} (this is torch "
                          f"{torch.__version__}, whose zero-bubble weight pass cannot run the MTP "
                          f"heads' node); use parallel.pp_schedule=1f1b or interleaved_1f1b, or "
                          f"upgrade torch")
    return layers


def local_stage_ids(pp_rank: int, pp: int, schedule: str, virtual_stages: int) -> list[int]:
    """Stage indices this pipeline rank runs: looped (r, r+pp, ...) or V-shaped (r, 2pp-1-r)."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank(schedule, virtual_stages))]
