"""FSDP2 (``fully_shard``) over the dp axis, composable with TP (2-D params) and PP (per stage).

Units: every trunk layer is its own FSDP unit (all-gathered just before it runs, resharded after
forward). Everything else on a stage - the embedding, every MTP head, ``norm`` and ``output`` -
stays in the stage's root unit with ``reshard_after_forward=False``. This is deliberate, see
PARALLEL.md ("FSDP2 and the sequential-heads node"): ``mtp_loss`` collects the head parameters
inside the root's forward, when the root unit is unsharded, so the parameters it hands to
``SequentialHeadsLoss`` are FSDP's *unsharded* parameters - exactly the tensors the heads' forward
uses. The node's backward returns their gradients, autograd accumulates them into the unsharded
``.grad``, and FSDP's end-of-backward reduce-scatter of the root unit shards them like any other.
A head wrapped as its own unit would be unsharded only inside its own forward, i.e. inside the
node, after the parameter list was taken: its gradients would land on nothing (the sharded
parameters are not in the node's graph) and be silently lost.

Gradients are SUMMED over dp (divide factor 1): the loss is already normalised by the global
batch's valid targets (mtp_loss.head_scales), so each rank's gradient is its share of the sum.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard


def apply_fsdp(stage: nn.Module, dp_mesh: DeviceMesh, param_dtype: torch.dtype | None = None,
               reduce_dtype: torch.dtype = torch.float32, reshard_after_forward: bool = True) -> nn.Module:
    """Shard one MTPStage (its trunk layers as units, the rest as the root unit) over ``dp_mesh``."""
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for key in stage.trunk_keys:
        fully_shard(stage.layers[key], mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    # Root unit: embedding, heads, norm, output. Kept unsharded from forward to backward so the
    # sequential-heads node's parameter gradients land on the parameters its forward used.
    fully_shard(stage, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=False)
    for module in stage.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            # plain SUM reductions (a divide factor alone asks for PREMUL_SUM, which gloo lacks;
            # with a factor of 1 there is nothing to pre- or post-multiply anyway)
            module.set_force_sum_reduction_for_comms(True)
    return stage
