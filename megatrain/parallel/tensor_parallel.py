"""Tensor parallelism for MTPTransformer with DTensor (Megatron-style, applied from outside).

Plan (per rank of the tp axis):
- ``tok_embeddings``: vocabulary-parallel embedding (RowwiseParallel: each rank looks up its own
  id range, the partial results are summed).
- every TransformerBlock, trunk and heads alike: wq/wk/wv/w1/w3 column-parallel (a slice of the
  attention heads / SwiGLU units per rank), wo/w2 row-parallel (partial sums all-reduced).
  Attention views with -1 heads, so the local head count falls out of the shard shape.
- ``output``: column-parallel, i.e. vocabulary-sharded [V/tp, D]. Training never calls it: each
  MTP head's CE runs on the local shard with the tp group (megatrain.mtp_loss). A plain
  ``model(tokens)`` (generation) gathers full logits. Replicated heads' own unembeddings
  (``extra_outputs.k``, head_type=replicated) are vocabulary-sharded the same way.
- ``linear_heads`` (head_type=linear) are dim x dim maps run on the replicated residual: they stay
  replicated (plain tensors), their gradients are identical on every tp rank.
- sequential MTP modules (``mtp.k``): the block as any block; ``eh_proj`` (2*dim -> dim) row-parallel
  from its replicated input (each rank multiplies its slice of the concatenated features, the
  partial sums are all-reduced), so its weight is split like ``wo``; the three norms replicated.

Sequence parallelism (``sequence_parallel=True``) shards the trunk's residual stream and norms
along the sequence. The heads always run on the full, replicated sequence: the last stage
all-gathers the trunk output before the loss (MTPStage.forward), because every head and the
vocab-parallel CE read the whole sequence (and ``head_forward`` sizes RoPE from the input's length).
"""

from __future__ import annotations

from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)


def block_plan(sequence_parallel: bool) -> dict:
    """The TP plan of one TransformerBlock. With SP its input and output are sequence shards."""
    if not sequence_parallel:
        return {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(),
        }
    return {
        "attention_norm": SequenceParallel(),
        # attention(x, cos, sin): gather the sequence before the projections; RoPE tables stay plain
        "attention": PrepareModuleInput(input_layouts=(Shard(1), None, None),
                                        desired_input_layouts=(Replicate(), None, None)),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=Shard(1)),  # reduce-scatter, not all-reduce
        "ffn_norm": SequenceParallel(),
        "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=Shard(1)),
    }


def block_weight_split_dims() -> dict[str, int]:
    """The dim along which ``block_plan`` splits each block weight, by parameter-name suffix:
    0 for column-parallel (the output features), 1 for row-parallel."""
    return {f"{name}.weight": 0 if isinstance(style, ColwiseParallel) else 1
            for name, style in block_plan(sequence_parallel=False).items()
            if isinstance(style, (ColwiseParallel, RowwiseParallel))}


_BLOCK_SPLIT_DIMS = block_weight_split_dims()


def tp_split_dim(name: str) -> int | None:
    """The dim ``apply_tp`` splits parameter ``name`` along (None: replicated). The planner's
    account of the shards reads this, not a copy of the plan."""
    if name.startswith(("tok_embeddings.", "output.", "extra_outputs.")):
        return 0  # vocabulary-parallel
    if name.startswith("mtp.") and name.endswith(".eh_proj.weight"):
        return 1  # row-parallel, from its replicated input
    return _BLOCK_SPLIT_DIMS.get(".".join(name.split(".")[-3:]))  # e.g. attention.wq.weight


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> nn.Module:
    """Shard ``model`` (an MTPStage: one pipeline stage, or the whole model when pp=1) in place.

    Modules a stage does not own are skipped. A bare MTPTransformer works without sequence
    parallelism (its ``trunk()`` would hand sequence shards to the heads).
    """
    if getattr(model, "tok_embeddings", None) is not None:
        parallelize_module(model.tok_embeddings, tp_mesh, RowwiseParallel(
            input_layouts=Replicate(), output_layouts=Shard(1) if sequence_parallel else Replicate()))
    for key in model.layout.trunk_keys:
        if key in model.layers:
            parallelize_module(model.layers[key], tp_mesh, block_plan(sequence_parallel))
    if not model.holds_heads:
        return model
    if sequence_parallel:
        # The heads read the whole sequence: the last stage gathers the trunk output once.
        model.sequence_parallel_mesh = tp_mesh
    if model.layout.heads_are_blocks:
        for i in range(model.n_future):
            parallelize_module(model.head_module(i), tp_mesh, block_plan(sequence_parallel=False))
    for module in getattr(model, "mtp", []):  # the sequential kind's modules
        parallelize_module(module.block, tp_mesh, block_plan(sequence_parallel=False))
        parallelize_module(module.eh_proj, tp_mesh, RowwiseParallel(input_layouts=Replicate()))
    for path in ["output", *model.layout.extra_unembedding_paths]:
        parallelize_module(model.get_submodule(path), tp_mesh, ColwiseParallel(output_layouts=Replicate()))
    return model
