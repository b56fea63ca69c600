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


def agree_flags(flags: list[bool]) -> list[bool]:
    """Each flag, true if it is true on any rank of the job: one tiny all-reduce over the world
    (nothing to do for a single process). Every rank must call it at the same point."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    agreed = all_reduce_host(torch.tensor([int(f) for f in flags]), dist.group.WORLD,
                             op=dist.ReduceOp.MAX)
    return [bool(x) for x in agreed.tolist()]
