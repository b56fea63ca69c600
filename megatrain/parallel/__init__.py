"""Parallelism applied from outside the model: topology, TP, PP, FSDP2, DeepSpeed (see PARALLEL.md)."""

from megatrain.config import ParallelConfig
from megatrain.parallel.parallelize import materialize, parallelize_mtp
from megatrain.parallel.process_group import dist_env, init_distributed, shutdown_distributed
from megatrain.parallel.runtime import ParallelModel, clip_grad_norm_
from megatrain.parallel.topology import ParallelDims

__all__ = ["ParallelConfig", "ParallelDims", "ParallelModel", "clip_grad_norm_", "dist_env",
           "init_distributed", "materialize", "parallelize_mtp", "shutdown_distributed"]
