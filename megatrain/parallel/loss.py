"""Reductions of the MTP loss's statistics across parallel axes.

The vocabulary-parallel cross-entropy itself needs no hook here: ``megatrain.mtp_loss._head_ce``
runs each head's CE on the local shard of a DTensor ``output.weight`` with ``tp_group=``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def reduce_head_stats(stats, group=None):
    """Sum per-head stats (loss_sum, n_correct, n_valid) over ``group`` (dp, or pp from the last
    stage): every rank then logs the global per-head losses and accuracies."""
    packed = torch.stack([stats.loss_sum.double(), stats.n_correct.double(), stats.n_valid.double()])
    if group is not None and dist.is_initialized():
        dist.all_reduce(packed, group=group)
    return type(stats)(packed[0], packed[1].round().long(), packed[2].round().long())
