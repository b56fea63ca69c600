"""The one interface the trainer drives, whichever data-parallel engine holds the model.

Two engines satisfy ``TrainingEngine``: ``ParallelModel`` (runtime.py: FSDP2 composed with tensor
and pipeline parallelism, or one process) and ``DeepSpeedModel`` (deepspeed_engine.py: ZeRO 1/2/3,
data parallelism only). ``build_engine`` is the only place that tells them apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import torch
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh

from megatrain.model.mtp import MTPTransformer, count_parameters
from megatrain.mtp_loss import HeadStats
from megatrain.parallel.deepspeed_engine import parallelize_deepspeed
from megatrain.parallel.parallelize import materialize, parallelize_mtp
from megatrain.parallel.pipeline import MTPStage
from megatrain.spec import RunSpec


class TrainingEngine(Protocol):
    """This rank's model parts, their optimizers, and one training step on them."""

    @property
    def stages(self) -> list[MTPStage]:
        """This rank's model parts (pipeline stages; one when pp=1), with the model's names."""

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        """One per stage; the LR schedule is stepped on each by the trainer."""

    def group(self, axis: str) -> torch.distributed.ProcessGroup | None:
        """The process group of mesh axis ``axis`` ("dp", "pp", "tp"); None for one rank."""

    def forward_backward(self, tokens: torch.Tensor, targets: torch.Tensor, head_scales: torch.Tensor,
                         micro_batch_size: int = 0) -> tuple[float, HeadStats]:
        """Forward and backward of this dp rank's rows; returns the global loss and HeadStats."""

    def optimizer_step(self, loss: float) -> tuple[float, bool]:
        """Clip, apply (unless the loss or the gradient norm is NaN/inf) and zero the gradients;
        returns (gradient norm before clipping, whether the update was applied)."""

    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> HeadStats:
        """Forward only: per-head summed CE, hits and valid targets of the batch."""

    def checkpoint_state(self) -> Stateful:
        """The model and optimizer in the layout-independent checkpoint form (model_state.py)."""

    def parameters_are_finite(self) -> bool:
        """Whether every parameter (on every rank) is finite; the same answer on every rank."""


def build_engine(spec: RunSpec, mesh: DeviceMesh | None, device: torch.device,
                 autocast_dtype: torch.dtype | None,
                 init_weights: Mapping[str, torch.Tensor] | None = None) -> tuple[TrainingEngine, int]:
    """This rank's engine for ``parallel.dp_engine`` and the model's parameter count.

    FSDP/TP/PP build on the meta device, shard, then materialise only this rank's shards (no rank
    ever holds the whole model); DeepSpeed partitions a materialised module itself and builds its
    AdamW inside (deepspeed_engine.py). ``init_weights`` (full tensors by parameter name:
    ``init.path``) replace the initial values, in both engines.
    """
    cfg, dims, max_seq_len = spec.config, spec.dims, spec.max_seq_len
    t, p = cfg.train, cfg.parallel
    common = dict(device=device, local_batch=spec.local_batch,
                  micro_batch_size=t.micro_batch_size, ignore_index=cfg.loss.ignore_index,
                  impl=cfg.loss.impl, compile_blocks=t.compile)
    if p.dp_engine == "deepspeed":
        model = MTPTransformer(cfg.model, max_seq_len=max_seq_len, seed=t.seed).to(device)
        if init_weights is not None:  # before ZeRO partitions the parameters and copies its fp32 master
            model.load_state_dict(init_weights, strict=True)
        engine = parallelize_deepspeed(model, t, p, bf16=autocast_dtype == torch.bfloat16, **common)
        return engine, count_parameters(model)
    with torch.device("meta"):
        model = MTPTransformer(cfg.model, max_seq_len=max_seq_len, seed=t.seed)
    fsdp_dtype = torch.bfloat16 if device.type == "cuda" and dims.dp_enabled else None
    engine = parallelize_mtp(model, dims, mesh, p, param_dtype=fsdp_dtype,
                             stage_layers=list(spec.stage_layers),
                             n_microbatches=spec.pipeline_microbatches, **common)
    materialize(engine.stages, device, t.seed, max_seq_len, init_weights)
    engine.attach_optimizers(t, device.type)
    return engine, count_parameters(model)
