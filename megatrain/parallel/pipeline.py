"""Pipeline parallelism: cut MTPTransformer into stages and run them with torch.distributed.pipelining.

Stage layout (S = pp * stages per rank, stage 0 first):
- stage 0 holds ``tok_embeddings`` and the first trunk layers;
- the LAST stage holds the last trunk layers, every MTP head, ``norm``, ``output`` and the loss:
  its forward returns the 0-dim loss of the sequential-heads node (megatrain.mtp_loss), so the
  heads' logits never cross a pipeline boundary and only one head's logits exist at a time.
- A stage keeps the original parameter names (``layers.7.attention.wq.weight``): unowned entries
  are simply absent from its ``layers`` ModuleDict, so DCP checkpoints reshard between layouts.

Assignment: balanced by estimated cost unless ``parallel.stage_layers`` says otherwise. A trunk
layer costs 1; a head costs one layer (a dim x dim map for head_type=linear) plus its unembedding
(dim * vocab / parameters of a layer); the embedding costs ``EMBEDDING_COST`` (a lookup, no matmul).

The loss of microbatch m is already normalised by the global batch (trainer.head_scales_for), so
the schedules run with ``scale_grads=False``: gradients are summed over microbatches, not averaged.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.pipelining import PipelineStage
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.pipelining.schedules import (Schedule1F1B, ScheduleDualPipeV, ScheduleGPipe,
                                                    ScheduleInterleaved1F1B, ScheduleZBVZeroBubble)

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.model.mtp import MTPHeads
from megatrain.model.transformer import ffn_hidden_dim
from megatrain.mtp_loss import mtp_loss
from megatrain.parallel.tensor_parallel import n_layer_entries
from megatrain.parallel.topology import min_microbatches, stages_per_rank

EMBEDDING_COST = 0.1
SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B,
             "interleaved_1f1b": ScheduleInterleaved1F1B, "zbv": ScheduleZBVZeroBubble,
             "dualpipev": ScheduleDualPipeV}
V_SHAPED = ("zbv", "dualpipev")


# ---- layout --------------------------------------------------------------------------------------
def n_trunk_layers(cfg: ModelConfig) -> int:
    return cfg.n_layers if cfg.head_type == "linear" else cfg.n_layers - cfg.n_future


def stage_costs(cfg: ModelConfig) -> tuple[float, float]:
    """(embedding cost, cost of all heads with their unembedding) in units of one trunk layer."""
    head_dim = cfg.dim // cfg.n_heads
    n_kv = cfg.n_kv_heads or cfg.n_heads
    layer = 2 * cfg.dim * cfg.n_heads * head_dim + 2 * cfg.dim * n_kv * head_dim \
        + 3 * cfg.dim * ffn_hidden_dim(cfg)
    head_body = cfg.dim * cfg.dim / layer if cfg.head_type == "linear" else 1.0
    return EMBEDDING_COST, cfg.n_future * (head_body + cfg.dim * cfg.vocab_size / layer)


def balanced_stage_layers(cfg: ModelConfig, n_stages: int) -> list[int]:
    """Trunk layers per stage minimising the costliest stage (every stage but the last gets >= 1)."""
    n_trunk = n_trunk_layers(cfg)
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
    n_trunk = n_trunk_layers(cfg)
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
    return layers


def local_stage_ids(pp_rank: int, pp: int, schedule: str, virtual_stages: int) -> list[int]:
    """Stage indices this pipeline rank runs: looped (r, r+pp, ...) or V-shaped (r, 2pp-1-r)."""
    if schedule in V_SHAPED:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank(schedule, virtual_stages))]


# ---- the stage module ----------------------------------------------------------------------------
class MTPStage(MTPHeads, nn.Module):
    """One pipeline stage of an MTPTransformer, with the model's parameter names.

    ``forward(x, targets)``: x is tokens (B, T) on the first stage, the hidden state (B, T, D)
    elsewhere; ``targets`` (B, n_future, T) reaches every stage (it sizes RoPE) and is used on
    the last, which returns the summed, scaled MTP loss of the microbatch and appends its
    HeadStats to ``self.stats``. ``head_scales`` is set by the runtime before each step.
    With one stage (pp=1) the same module runs the whole model: FSDP's hooks need ``forward``.
    """

    def __init__(self, model: nn.Module, stage_index: int, n_stages: int, trunk_keys: list[str],
                 ignore_index: int = -100, impl: str = "auto"):
        super().__init__()
        self.cfg = model.cfg
        self.n_future, self.head_type = model.n_future, model.head_type
        self.stage_index, self.n_stages = stage_index, n_stages
        self.is_first, self.is_last = stage_index == 0, stage_index == n_stages - 1
        self.trunk_keys = list(trunk_keys)
        self.ignore_index, self.impl = ignore_index, impl
        self._head1_key = None if model.head_type == "linear" else str(n_layer_entries(model.cfg) - 1)
        if self.is_first:
            self.tok_embeddings = model.tok_embeddings
        owned = self.trunk_keys + ([self._head1_key] if self.is_last and self._head1_key else [])
        self.layers = nn.ModuleDict({k: model.layers[k] for k in owned})
        if self.is_last:
            if model.head_type == "linear":
                self.linear_heads = model.linear_heads
            else:
                self.extra_heads = model.extra_heads
            self.norm, self.output = model.norm, model.output
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.sequence_parallel_mesh: DeviceMesh | None = None  # set by apply_tp(sequence_parallel=True)
        self.head_scales: torch.Tensor | None = None
        self.stats: list = []

    def head_module(self, i: int) -> nn.Module:  # with it, MTPHeads gives the loss's interface
        if self.head_type == "linear":
            return self.linear_heads[i]
        return self.layers[self._head1_key] if i == 0 else self.extra_heads[i - 1]

    def forward(self, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        # The sequence length comes from the targets: under sequence parallelism the hidden state
        # between stages is a sequence shard (B, T/tp, D).
        cos, sin = self.rope(targets.shape[-1])
        h = self.tok_embeddings(x) if self.is_first else x
        for key in self.trunk_keys:
            h = self.layers[key](h, cos, sin)
        if not self.is_last:
            return h
        if self.sequence_parallel_mesh is not None:
            h = gather_sequence(h, self.sequence_parallel_mesh)  # (B, T/tp, D) -> (B, T, D)
        loss, stats = mtp_loss(self, h, targets.transpose(0, 1), self.head_scales,
                               self.ignore_index, self.impl)
        self.stats.append(stats)
        return loss


def gather_sequence(h: torch.Tensor, tp_mesh: DeviceMesh) -> torch.Tensor:
    """All-gather a sequence-parallel activation. Its gradient comes back replicated (the heads'
    and the vocab-parallel CE's input gradients are all-reduced over tp), so the backward is
    just this rank's slice."""
    return DTensor.from_local(h, tp_mesh, [Shard(1)]).redistribute(tp_mesh, [Replicate()]).to_local()


def split_model(model: nn.Module, stage_layers: list[int], stage_ids: list[int],
                ignore_index: int = -100, impl: str = "auto") -> list[MTPStage]:
    """The MTPStage modules for ``stage_ids`` (this rank's), cut by ``stage_layers``.

    Each stage shares no module with another: with several stages per rank the model is copied
    first (modules of other stages are dropped with the copy).
    """
    n_stages = len(stage_layers)
    trunk = [k for k in model.layers.keys()][:n_trunk_layers(model.cfg)]
    bounds = [0]
    for count in stage_layers:
        bounds.append(bounds[-1] + count)
    stages = []
    for n, sid in enumerate(stage_ids):
        source = model if n == len(stage_ids) - 1 else copy.deepcopy(model)
        stages.append(MTPStage(source, sid, n_stages, trunk[bounds[sid]:bounds[sid + 1]],
                               ignore_index, impl))
    return stages


# ---- the schedule --------------------------------------------------------------------------------
def _loss_is_output(output, _target):
    """The last stage already returns the microbatch loss (the sequential-heads node)."""
    return output


def build_schedule(stages: list[MTPStage], pp_mesh: DeviceMesh, schedule: str, n_microbatches: int,
                   device: torch.device):
    group = pp_mesh.get_group()
    pipeline_stages = [PipelineStage(s, s.stage_index, s.n_stages, device, group=group) for s in stages]
    cls = SCHEDULES[schedule]
    if cls in (ScheduleGPipe, Schedule1F1B):
        return cls(pipeline_stages[0], n_microbatches, loss_fn=_loss_is_output, scale_grads=False)
    return cls(pipeline_stages, n_microbatches, loss_fn=_loss_is_output, scale_grads=False)
