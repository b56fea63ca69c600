"""Apply every parallelism to an MTPTransformer, in one fixed order, and run a training step.

``parallelize`` is the one entry point (torchtitan style: the model knows nothing of it):

    0. pipeline split   this rank keeps only its stages (MTPStage, original parameter names)
    1. tensor parallel  DTensor plans per block, vocab-parallel embedding and unembedding
    2. activation checkpointing   trunk layers (selective: every other one; full: all)
    3. compile          each transformer block in place (train.compile)
    4. FSDP2            trunk layers as units, heads + norm + unembedding in the root unit

``ParallelModel.forward_backward`` runs one optimizer step's forward and backward over this
rank's share of the batch (microbatch loop, or the pipeline schedule) and returns the *global*
loss and head statistics, equal to what the single-process trainer computes for the whole batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from megatrain.model.mtp import initial_value
from megatrain.model.transformer import rope_tables
from megatrain.mtp_loss import HeadStats
from megatrain.parallel.comm import all_reduce_host
from megatrain.config import ParallelConfig
from megatrain.parallel.data_parallel import apply_fsdp
from megatrain.parallel.pipeline import (MTPStage, build_schedule, check_pipeline_layout,
                                         local_stage_ids, n_trunk_layers, resolve_microbatches,
                                         split_model)
from megatrain.parallel.tensor_parallel import apply_tp
from megatrain.parallel.topology import ParallelDims


@dataclass
class ParallelModel:
    """This rank's model parts (1 stage, or 2+ with interleaved / V-shaped pipelines) and how to run them."""

    stages: list[MTPStage]
    dims: ParallelDims
    mesh: DeviceMesh | None
    schedule: object | None = None
    n_microbatches: int = 1
    fsdp: bool = False
    _groups: dict = field(default_factory=dict)

    # ---- parameters ------------------------------------------------------------------------------
    def parameters(self):
        seen = set()
        for stage in self.stages:
            for p in stage.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    yield p

    def named_parameters(self):
        for stage in self.stages:
            yield from stage.named_parameters()

    def group(self, axis: str):
        """The process group of one mesh axis, or None when that axis has one rank."""
        if self.mesh is None or self.mesh[axis].size() == 1:
            return None
        if axis not in self._groups:
            self._groups[axis] = self.mesh[axis].get_group()
        return self._groups[axis]

    # ---- one step --------------------------------------------------------------------------------
    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor, head_scales: torch.Tensor,
                         micro_batch_size: int = 0) -> tuple[float, HeadStats]:
        """Forward + backward of this rank's batch share; gradients accumulate into ``.grad``.

        ``tokens`` (B_local, T) and ``targets`` (n_future, B_local, T) are this dp rank's rows
        (the same on every tp and pp rank of it); ``head_scales`` from trainer.head_scales_for
        over the *global* batch. Returns the global summed loss and global HeadStats.
        """
        n = self.stages[0].n_future
        for stage in self.stages:
            stage.head_scales = head_scales.float()
            stage.stats = []
        local_loss = torch.zeros((), dtype=torch.float64)
        if self.schedule is None:
            stage = self.stages[0]
            micro = micro_batch_size or tokens.shape[0]
            for start in range(0, tokens.shape[0], micro):
                loss = stage(tokens[start:start + micro], targets[:, start:start + micro].transpose(0, 1))
                loss.backward()
                local_loss += loss.detach().double()
        else:
            losses: list[torch.Tensor] = []
            args = (tokens,) if any(s.is_first for s in self.stages) else ()
            self.schedule.step(*args, target=torch.zeros(tokens.shape[0]), losses=losses,
                               return_outputs=False, targets=targets.transpose(0, 1).contiguous())
            for loss in losses:
                local_loss += loss.detach().double()
        # On its first step a schedule also runs a shape-inference forward (on uninitialised
        # inputs): only the last n_microbatches records of a stage are this step's microbatches.
        keep = self.n_microbatches if self.schedule is not None else None
        stats = [s for stage in self.stages if stage.is_last for s in stage.stats[-keep if keep else 0:]]
        # only the last pipeline stage holds loss and stats
        return reduce_step_stats(local_loss, stats, n, [self.group("pp"), self.group("dp")])

    def clip_grad_norm_(self, max_norm: float) -> float:
        return clip_grad_norm_(list(self.parameters()), max_norm, self.group("pp"))

    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> HeadStats:
        """Forward only, no gradients: per-head summed CE, hits and valid targets of this batch.

        Every data-parallel rank evaluates the same windows, so only the pipeline axis (where
        the last stage holds the stats) is reduced. Under a pipeline the batch is split into the
        schedule's microbatches, like a training step.
        """
        n = self.stages[0].n_future
        for stage in self.stages:
            stage.head_scales, stage.stats = torch.ones(n), []
            stage.eval()
        try:
            with torch.no_grad():
                if self.schedule is None:
                    self.stages[0](tokens, targets.transpose(0, 1))
                else:
                    args = (tokens,) if any(s.is_first for s in self.stages) else ()
                    self.schedule.eval(*args, target=torch.zeros(tokens.shape[0]), losses=[],
                                       return_outputs=False,
                                       targets=targets.transpose(0, 1).contiguous())
        finally:
            for stage in self.stages:
                stage.train()
        keep = self.n_microbatches if self.schedule is not None else None
        stats = [s for stage in self.stages if stage.is_last for s in stage.stats[-keep if keep else 0:]]
        return reduce_step_stats(torch.zeros((), dtype=torch.float64), stats, n, [self.group("pp")])[1]


def reduce_step_stats(local_loss: torch.Tensor, stats: list[HeadStats], n_future: int,
                      groups: list) -> tuple[float, HeadStats]:
    """Sum this rank's loss and micro-batch HeadStats, then over each group (None: one rank)."""
    packed = torch.zeros(4, n_future, dtype=torch.float64)
    packed[0, 0] = local_loss
    for s in stats:
        packed[1] += s.loss_sum
        packed[2] += s.n_correct.double()
        packed[3] += s.n_valid.double()
    for group in groups:
        all_reduce_host(packed, group)
    return float(packed[0, 0]), HeadStats(packed[1], packed[2].round().long(), packed[3].round().long())


def clip_grad_norm_(params: list[torch.Tensor], max_norm: float, pp_group=None) -> float:
    """Global gradient norm over DTensor (TP/FSDP-sharded) and plain (replicated) gradients.

    A DTensor's norm is reduced over the axes it is sharded on (``full_tensor``); a plain gradient
    is replicated, so each rank counts it once. Pipeline stages hold disjoint parameters: their
    squared norms are summed over ``pp_group``. Clips like torch.nn.utils.clip_grad_norm_
    (coefficient max_norm / (norm + 1e-6), at most 1) when ``max_norm > 0``.
    """
    grads = [p.grad for p in params if p.grad is not None]
    squares = torch.zeros((), dtype=torch.float64)
    for g in grads:
        norm = torch.linalg.vector_norm(g, 2)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares += norm.double().cpu() ** 2
    all_reduce_host(squares, pp_group)
    total = squares.sqrt().float()
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
    return float(total)


def apply_activation_checkpointing(stage: MTPStage, mode: str) -> None:
    """Recompute trunk layers in backward (heads already run one at a time in the loss node).

    Parameter names gain ``_checkpoint_wrapped_module.``; the wrapper's state-dict hooks strip it,
    so checkpoints keep the plain names.
    """
    if mode == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
    for n, key in enumerate(stage.trunk_keys):
        if mode == "full" or n % 2 == 0:
            stage.layers[key] = checkpoint_wrapper(stage.layers[key], preserve_rng_state=False)


def apply_compile(stage: MTPStage) -> None:
    """Compile every transformer block (trunk layers and heads) in place, one at a time.

    Per block, torchtitan style: the blocks share one compiled graph (same code, same shapes),
    parameter names stay unchanged, and the sequential-heads node - a custom autograd.Function
    calling autograd.grad inside its forward - stays eager around the compiled heads.
    """
    for block in list(stage.layers.values()) + list(getattr(stage, "extra_heads", [])):
        block.compile()


def materialize(stages: list[MTPStage], device: torch.device, seed: int, max_seq_len: int) -> None:
    """Allocate stages built on the meta device and fill them with the model's initial weights.

    Each rank computes every parameter it holds from the parameter's name (``initial_value``) and
    keeps its shard of it, so no rank ever holds the whole model and every layout starts from
    the single-process weights. Memory: one full parameter at a time, on the CPU.
    """
    # Wrappers applied from outside add these to parameter names; the model's names lack them.
    wrappers = ("_checkpoint_wrapped_module.", "_orig_mod.")
    for stage in stages:
        stage.to_empty(device=device)
        with torch.no_grad():
            for name, param in stage.named_parameters():
                for wrapper in wrappers:
                    name = name.replace(wrapper, "")
                full = initial_value(name, param.shape, stage.cfg, seed)
                if isinstance(param, DTensor):  # this rank's shard (TP and/or FSDP), no comms
                    shard = distribute_tensor(full, param.device_mesh, param.placements,
                                              src_data_rank=None).to_local()
                    param.to_local().copy_(shard)
                else:
                    param.copy_(full)
            cos, sin = rope_tables(stage.cfg.dim // stage.cfg.n_heads, max_seq_len, stage.cfg.rope_theta)
            stage.rope_cos.copy_(cos)
            stage.rope_sin.copy_(sin)


def parallelize(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None,
                parallel: ParallelConfig, *, device: torch.device | None = None,
                local_batch: int | None = None, micro_batch_size: int = 0,
                ignore_index: int = -100, impl: str = "auto",
                param_dtype: torch.dtype | None = None, compile_blocks: bool = False) -> ParallelModel:
    """Turn a freshly initialised MTPTransformer (same seed on every rank) into this rank's parts.

    ``mesh`` is ``dims.build_mesh()`` (None for a single process). ``local_batch`` is
    train.batch_size / dp (needed to derive pipeline microbatches). ``param_dtype``: FSDP's
    compute dtype (bf16 on GPU); gradients are reduced in float32.
    """
    device = device or torch.device("cpu")
    dims.validate(model.cfg, parallel)
    # 0. Pipeline split: keep only this rank's stages, original parameter names.
    if dims.pp_enabled:
        stage_layers = check_pipeline_layout(model.cfg, dims.pp, parallel, local_batch, micro_batch_size)
        stage_ids = local_stage_ids(mesh["pp"].get_local_rank(), dims.pp, parallel.pp_schedule,
                                    parallel.virtual_stages)
        stages = split_model(model, stage_layers, stage_ids, ignore_index, impl)
    else:
        stages = split_model(model, [n_trunk_layers(model.cfg)], [0], ignore_index, impl)
    for stage in stages:
        # 1. Tensor parallelism (vocab-parallel embedding/unembedding, per-block plans).
        if dims.tp_enabled:
            apply_tp(stage, mesh["tp"], parallel.sequence_parallel)
        # 2. Activation checkpointing of trunk layers.
        apply_activation_checkpointing(stage, parallel.activation_checkpointing)
        # 3. torch.compile, per block (config validation refuses it with sequence parallelism,
        #    where per-block compiled backward fails in torch 2.13).
        if compile_blocks:
            apply_compile(stage)
        # 4. FSDP2 over dp: trunk layers as units, heads/norm/unembedding in the root unit.
        if dims.dp_enabled:
            apply_fsdp(stage, mesh["dp"], param_dtype=param_dtype,
                       reshard_after_forward=not dims.pp_enabled)
    schedule, n_micro = None, 1
    if dims.pp_enabled:
        n_micro = resolve_microbatches(parallel, dims.pp, local_batch, micro_batch_size)
        schedule = build_schedule(stages, mesh["pp"], parallel.pp_schedule, n_micro, device)
    return ParallelModel(stages, dims, mesh, schedule, n_micro, fsdp=dims.dp_enabled)
