"""The training step on this rank's model parts, for every FSDP2 / TP / PP layout.

``ParallelModel.forward_backward`` runs one optimizer step's forward and backward over this
rank's share of the batch (microbatch loop, or the pipeline schedule) and returns the *global*
loss and head statistics, equal to what the single-process trainer computes for the whole batch;
``optimizer_step`` clips by the global gradient norm and applies AdamW unless a value is NaN/inf.
It satisfies ``TrainingEngine`` (engine.py), as DeepSpeed's ``DeepSpeedModel`` does.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from megatrain.config import TrainConfig
from megatrain.mtp_loss import HeadStats
from megatrain.optim import build_optimizer
from megatrain.parallel.comm import agree_flags, all_reduce_host
from megatrain.parallel.model_state import ModelAndOptimizer
from megatrain.parallel.pipeline import MTPStage
from megatrain.parallel.topology import ParallelDims
from megatrain.profiling.phases import phase, phase_context


@dataclass
class ParallelModel:
    """This rank's model parts (1 stage, or 2+ with interleaved / V-shaped pipelines) and how to run them."""

    stages: list[MTPStage]
    dims: ParallelDims
    mesh: DeviceMesh | None
    schedule: object | None = None
    n_microbatches: int = 1
    optimizers: list[torch.optim.Optimizer] = field(default_factory=list)  # one per stage
    grad_clip: float = 0.0
    _groups: dict = field(default_factory=dict)

    def attach_optimizers(self, train: TrainConfig, device_type: str) -> None:
        """One AdamW per stage (a stage's parameters are its own); ``optimizer_step`` runs them."""
        self.optimizers = [build_optimizer(stage, train, device_type) for stage in self.stages]
        self.grad_clip = train.grad_clip

    def checkpoint_state(self) -> Stateful:
        return ModelAndOptimizer(self.stages, self.optimizers)

    def parameters_are_finite(self) -> bool:
        """Whether every parameter of the whole model is finite (each rank checks its shards)."""
        local = all(bool(torch.isfinite(p.to_local() if isinstance(p, DTensor) else p).all())
                    for p in self.parameters())
        return all_finite_everywhere(local)

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
        (the same on every tp and pp rank of it); ``head_scales`` from mtp_loss.head_scales
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
            for micro_step, start in enumerate(range(0, tokens.shape[0], micro)):
                with phase_context(stage=stage.stage_index, microbatch=micro_step):
                    loss = stage(tokens[start:start + micro],
                                 targets=targets[:, start:start + micro].transpose(0, 1))
                    with phase("trunk.backward"):
                        loss.backward()
                local_loss += loss.detach().double()
        else:
            losses: list[torch.Tensor] = []
            args = (tokens,) if any(s.is_first for s in self.stages) else ()
            self.schedule.step(*args, target=torch.zeros(tokens.shape[0]), losses=losses,
                               return_outputs=False, targets=targets.transpose(0, 1).contiguous())
            for loss in losses:
                local_loss += loss.detach().double()
        for stage in self.stages:
            stage.head_grad_sink.check_settled()
        # only the last pipeline stage holds loss and stats
        return reduce_step_stats(local_loss, self._step_stats(), n, [self.group("pp"), self.group("dp")])

    def _step_stats(self) -> list[HeadStats]:
        """The HeadStats of this step's microbatches, recorded by the last stage's forward.

        On its first step a schedule also runs a shape-inference forward (on uninitialised
        inputs): only the last n_microbatches records of a stage are this step's microbatches.
        """
        keep = self.n_microbatches if self.schedule is not None else 0
        return [s for stage in self.stages if stage.is_last for s in stage.stats[-keep:]]

    def clip_grad_norm_(self, max_norm: float) -> float:
        return clip_grad_norm_(list(self.parameters()), max_norm, self.group("pp"))

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip by the global gradient norm and apply AdamW unless the loss or the norm is NaN/inf;
        zero the gradients either way. Returns (gradient norm before clipping, applied)."""
        with phase("optimizer.step"):
            grad_norm = self.clip_grad_norm_(self.grad_clip)
            finite = math.isfinite(loss) and math.isfinite(grad_norm)
            for optimizer in self.optimizers:
                if finite:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return grad_norm, finite

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
                    self.stages[0](tokens, targets=targets.transpose(0, 1))
                else:
                    args = (tokens,) if any(s.is_first for s in self.stages) else ()
                    self.schedule.eval(*args, target=torch.zeros(tokens.shape[0]), losses=[],
                                       return_outputs=False,
                                       targets=targets.transpose(0, 1).contiguous())
        finally:
            for stage in self.stages:
                stage.train()
        return reduce_step_stats(torch.zeros((), dtype=torch.float64), self._step_stats(), n,
                                 [self.group("pp")])[1]


def all_finite_everywhere(local: bool) -> bool:
    """``local`` agreed over every rank: true only if it is true on all of them."""
    (bad,) = agree_flags([not local])
    return not bad


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

    Gradients sharded alike (same mesh and placements) are reduced together: their per-tensor
    norms are stacked into one DTensor, so each group costs one collective, and the squares stay
    on the device until the single host copy at the end (a ``.cpu()`` per tensor would be a
    device sync per parameter on GPU).
    """
    grads = [p.grad for p in params if p.grad is not None]
    groups: dict = defaultdict(list)
    for g in grads:
        key = (g.device_mesh, g.placements) if isinstance(g, DTensor) else None
        groups[key].append(g)
    squares = []
    for key, members in groups.items():
        norms = torch.stack([torch.linalg.vector_norm(g, 2) for g in members])
        if key is not None:
            norms = norms.full_tensor()  # each tensor's full norm: one collective for the group
        squares.append((norms.double() ** 2).sum().to("cpu"))
    total_sq = torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)
    all_reduce_host(total_sq, pp_group)
    total = total_sq.sqrt().float()
    if max_norm > 0:
        coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))
        for g in grads:
            g.mul_(coef)
    return float(total)
