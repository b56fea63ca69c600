"""The process topology: one validated ``ParallelDims`` and the device mesh built from it.

Everything about degrees is checked here, before any collective runs, so a bad layout fails on
every rank with the same message naming the ``parallel.*`` / ``model.*`` key and the fix, instead
of hanging in the first all-reduce.

Mesh axes are ("dp", "pp", "tp"), tp innermost: tensor-parallel ranks are adjacent (same node,
fastest links), pipeline neighbours next, data-parallel replicas outermost.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from megatrain.config import ModelConfig
from megatrain.errors import ConfigError
from megatrain.parallel.pipeline_layout import check_pipeline_layout

MESH_AXES = ("dp", "pp", "tp")


@dataclass(frozen=True)
class ParallelDims:
    dp: int
    tp: int
    pp: int
    world_size: int

    def __post_init__(self):
        for key in ("dp", "tp", "pp"):
            if getattr(self, key) < 1:
                raise ConfigError(f"parallel.{key}={getattr(self, key)} must be >= 1")
        if self.dp * self.tp * self.pp != self.world_size:
            raise ConfigError(
                f"parallel.dp * parallel.tp * parallel.pp = {self.dp} * {self.tp} * {self.pp} = "
                f"{self.dp * self.tp * self.pp}, but the layout is for {self.world_size} processes "
                f"(torchrun --nnodes x --nproc-per-node, srun --ntasks, or --nodes x --gpus-per-node "
                f"of submit and plan): change the degrees so that their product is {self.world_size}, "
                f"or use {self.dp * self.tp * self.pp} processes")

    @property
    def tp_enabled(self) -> bool:
        return self.tp > 1

    @property
    def pp_enabled(self) -> bool:
        return self.pp > 1

    @property
    def dp_enabled(self) -> bool:
        return self.dp > 1

    def validate(self, model: ModelConfig, parallel=None, batch_size: int | None = None,
                 micro_batch_size: int = 0) -> list[int]:
        """Check the degrees against the model (and the ``parallel`` section, if given); returns
        the trunk layers per pipeline stage (empty without pipelining)."""
        n_kv = model.n_kv_heads or model.n_heads
        for key, value in (("model.n_heads", model.n_heads), ("model.n_kv_heads", n_kv),
                           ("model.vocab_size", model.vocab_size)):
            if value % self.tp:
                raise ConfigError(
                    f"parallel.tp={self.tp} must divide {key}={value} (each tensor-parallel rank "
                    f"holds an equal slice); pick parallel.tp among the divisors of {value}"
                    + (" or pad model.vocab_size up to a multiple of parallel.tp"
                       if key == "model.vocab_size" else ""))
        if batch_size is not None and batch_size % self.dp:
            raise ConfigError(f"train.batch_size={batch_size} must be a multiple of parallel.dp="
                              f"{self.dp} (each data-parallel rank takes an equal share)")
        if parallel is None:
            return []
        # the choices and ranges of single keys are config.validate's; these are the rules
        # between the degrees and the other parallel keys
        if parallel.dp_engine == "deepspeed":
            if self.tp > 1 or self.pp > 1:
                raise ConfigError(
                    f"parallel.dp_engine=deepspeed supports data parallelism only, got "
                    f"parallel.tp={self.tp}, parallel.pp={self.pp}; use parallel.dp_engine=fsdp "
                    f"(composes with tp and pp) or set parallel.tp=1 and parallel.pp=1")
            if parallel.offload_optimizer and parallel.zero_stage == 1:
                raise ConfigError("parallel.offload_optimizer=true needs parallel.zero_stage=2 or 3 "
                                  "(ZeRO-Offload partitions gradients); raise parallel.zero_stage")
        elif parallel.offload_optimizer:
            raise ConfigError("parallel.offload_optimizer=true is a DeepSpeed option; set "
                              "parallel.dp_engine=deepspeed or parallel.offload_optimizer=false")
        if parallel.sequence_parallel and self.tp == 1:
            raise ConfigError("parallel.sequence_parallel=true needs parallel.tp > 1; "
                              "set parallel.sequence_parallel=false")
        if self.pp > 1:
            local_batch = None if batch_size is None else batch_size // self.dp
            return check_pipeline_layout(model, self.pp, parallel, local_batch, micro_batch_size)
        return []

    def build_mesh(self, device_type: str | None = None) -> DeviceMesh:
        """The (dp, pp, tp) device mesh; needs the process group (``init_distributed``)."""
        device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
        return init_device_mesh(device_type, (self.dp, self.pp, self.tp), mesh_dim_names=MESH_AXES)
