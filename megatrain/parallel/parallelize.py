"""Apply every parallelism to an MTPTransformer, in one fixed order (torchtitan's parallelize.py).

``parallelize_mtp`` is the one entry point (the model knows nothing of it):

    0. pipeline split   this rank keeps only its stages (MTPStage, original parameter names)
    1. tensor parallel  DTensor plans per block, vocab-parallel embedding and unembedding
    2. activation checkpointing   trunk layers (selective: every other one; full: all)
    3. compile          each transformer block in place (train.compile)
    4. FSDP2            trunk layers as units, heads + norm + unembedding in the root unit

It returns a ``ParallelModel`` (runtime.py), which runs the training step. ``materialize`` then
allocates and initialises only this rank's shards of a model built on the meta device.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, distribute_tensor

from megatrain.config import ParallelConfig
from megatrain.head_grads import HeadGradSink
from megatrain.model.mtp import initial_value
from megatrain.model.transformer import fill_rope_buffers
from megatrain.parallel.data_parallel import apply_fsdp
from megatrain.parallel.pipeline import MTPStage, build_schedule, split_model
from megatrain.parallel.pipeline_layout import (
    SPLIT_BACKWARD,
    local_stage_ids,
    resolve_microbatches,
)
from megatrain.parallel.runtime import ParallelModel
from megatrain.parallel.tensor_parallel import apply_tp
from megatrain.parallel.topology import ParallelDims


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
    modules = [m.block for m in getattr(stage, "mtp", [])]  # the sequential kind's blocks
    for block in list(stage.layers.values()) + list(getattr(stage, "extra_heads", [])) + modules:
        block.compile()


def materialize(stages: list[MTPStage], device: torch.device, seed: int, max_seq_len: int,
                weights: Mapping[str, torch.Tensor] | None = None) -> None:
    """Allocate stages built on the meta device and fill them with the model's initial weights.

    Each rank computes every parameter it holds from the parameter's name (``initial_value``) and
    keeps its shard of it, so no rank ever holds the whole model and every layout starts from
    the single-process weights. Memory: one full parameter at a time, on the CPU.

    ``weights`` (full tensors by parameter name, e.g. an exported model's for ``init.path``)
    replaces the computed values; each rank still keeps only its shards (a memory-mapped
    ``weights`` reads only the parameters this rank holds).
    """
    # Wrappers applied from outside add these to parameter names; the model's names lack them.
    wrappers = ("_checkpoint_wrapped_module.", "_orig_mod.")
    for stage in stages:
        stage.to_empty(device=device)
        with torch.no_grad():
            for name, param in stage.named_parameters():
                for wrapper in wrappers:
                    name = name.replace(wrapper, "")
                full = initial_value(name, param.shape, stage.cfg, seed) if weights is None else weights[name]
                if isinstance(param, DTensor):  # this rank's shard (TP and/or FSDP), no comms
                    shard = distribute_tensor(full, param.device_mesh, param.placements,
                                              src_data_rank=None).to_local()
                    param.to_local().copy_(shard)
                else:
                    param.copy_(full)
            fill_rope_buffers(stage, stage.cfg, max_seq_len)


def head_grad_mode(parallel: ParallelConfig) -> str:
    """Where the heads' parameter gradients go in this layout (a megatrain.head_grads mode):
    straight into .grad in the heads' forward, unless a data-parallel engine must see them
    arrive through autograd (FSDP's reduce-scatter, ZeRO's hooks): then one set shared by the
    step's microbatches."""
    return "shared" if parallel.dp_engine == "deepspeed" or parallel.dp > 1 else "direct"


def head_grad_sink(parallel: ParallelConfig) -> HeadGradSink:
    """The stage's sink; a zero-bubble schedule runs the heads' backward in two passes."""
    split = parallel.pp > 1 and parallel.pp_schedule in SPLIT_BACKWARD
    return HeadGradSink(head_grad_mode(parallel), split_backward=split)


def parallelize_mtp(model: nn.Module, dims: ParallelDims, mesh: DeviceMesh | None,
                parallel: ParallelConfig, *, device: torch.device | None = None,
                local_batch: int | None = None, micro_batch_size: int = 0,
                stage_layers: list[int] | None = None, n_microbatches: int | None = None,
                ignore_index: int = -100, impl: str = "auto",
                param_dtype: torch.dtype | None = None, compile_blocks: bool = False) -> ParallelModel:
    """Turn a freshly initialised MTPTransformer (same seed on every rank) into this rank's parts.

    ``mesh`` is ``dims.build_mesh()`` (None for a single process). ``stage_layers`` and
    ``n_microbatches`` (pipelining) come validated from the run's ``RunSpec``; without them they are
    derived here from ``local_batch`` (train.batch_size / dp) and ``micro_batch_size``, with the
    same checks. ``param_dtype``: FSDP's compute dtype (bf16 on GPU); gradients are reduced in
    float32.
    """
    device = device or torch.device("cpu")
    if stage_layers is None:  # not resolved by the caller: the checks resolve() runs
        batch = None if local_batch is None else local_batch * dims.dp
        stage_layers = dims.validate(model.cfg, parallel, batch, micro_batch_size)
    # 0. Pipeline split: keep only this rank's stages, original parameter names.
    if dims.pp_enabled:
        stage_ids = local_stage_ids(mesh["pp"].get_local_rank(), dims.pp, parallel.pp_schedule,
                                    parallel.virtual_stages)
        stages = split_model(model, stage_layers, stage_ids, ignore_index, impl)
    else:
        stages = split_model(model, [model.layout.n_trunk_layers], [0], ignore_index, impl)
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
        # 5. Where the heads' parameter gradients go.
        stage.head_grad_sink = head_grad_sink(parallel)
    schedule, n_micro = None, 1
    if dims.pp_enabled:
        n_micro = n_microbatches or resolve_microbatches(parallel, dims.pp, local_batch, micro_batch_size)
        schedule = build_schedule(stages, mesh["pp"], parallel.pp_schedule, n_micro, device)
    return ParallelModel(stages, dims, mesh, schedule, n_micro)
