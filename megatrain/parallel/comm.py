"""Reductions of small host-side values (loss sums, counts, norms, flags) across a group."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_host(tensor: torch.Tensor, group, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """All-reduce a small CPU tensor in place over ``group`` and return it.

    ``group=None`` means a one-rank axis: nothing to reduce (torch.distributed itself would read
    None as the whole world). NCCL reduces only device tensors, so there the value makes a round
    trip through the current GPU; gloo reduces the CPU tensor directly.
    """
    if group is None:
        return tensor
    if dist.get_backend(group) == "nccl":
        on_device = tensor.to(torch.cuda.current_device())
        dist.all_reduce(on_device, op=op, group=group)
        tensor.copy_(on_device.cpu())
    else:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor
