"""Combining per-row partial softmax statistics: across vocabulary splits of one kernel launch,
and across the ranks of a tensor-parallel group that each hold a vocabulary shard.

A partial over a slice of the vocabulary is, per row: ``m`` the max logit, ``s`` the sum of
``exp(logit - m)``, the target logit (0 when the target lies outside the slice) and the global
index of the first max. Partials combine exactly:

    M = max_r m_r,   S = sum_r s_r * exp(m_r - M),   target = sum_r target_r,
    argmax = min { arg_r : m_r == M }   (the first maximal index, as torch.argmax),

and ``lse = M + log(S)``. Under TP this is three all_reduces of [N] / [2, N] vectors (MAX, SUM,
MIN): never anything [N, V]. Weight shards are contiguous and equal-sized (pad the vocabulary
to a multiple of the TP degree, as Megatron does): rank r holds ids [r * V_local, (r+1) * V_local).
"""

import torch
import torch.distributed as dist

_NO_INDEX = torch.iinfo(torch.int64).max


def shard_start(vocab_local: int, tp_group) -> int:
    """First global vocabulary id held by this rank's weight shard."""
    return 0 if tp_group is None else dist.get_rank(tp_group) * vocab_local


def combine_splits(m, s, target_logit, arg):
    """Combine partials stacked along dim 0 ([n_splits, N] each) into [N] vectors."""
    if m.shape[0] == 1:
        return m[0], s[0], target_logit[0], arg[0]
    m_all = m.max(dim=0).values
    s_all = (s * torch.exp(m - m_all)).sum(dim=0)
    arg_all = torch.where(m == m_all, arg, torch.full_like(arg, _NO_INDEX)).min(dim=0).values
    return m_all, s_all, target_logit.sum(dim=0), arg_all


def all_reduce_partials(m, s, target_logit, arg, tp_group):
    """Combine this rank's [N] partials with the other ranks' of ``tp_group`` (in place safe)."""
    m_all = m.clone()
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=tp_group)
    sums = torch.stack([s * torch.exp(m - m_all), target_logit])  # (2, N)
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=tp_group)
    arg_all = torch.where(m == m_all, arg, torch.full_like(arg, _NO_INDEX))
    dist.all_reduce(arg_all, op=dist.ReduceOp.MIN, group=tp_group)
    return m_all, sums[0], sums[1], arg_all


def loss_from_partials(m, s, target_logit, arg, targets, valid, reduction, tp_group):
    """Loss, lse, n_valid and n_correct from the [N] partials over this weight's vocabulary; with
    ``tp_group`` they are first combined with the other ranks' (full-vocabulary loss everywhere)."""
    if tp_group is not None:
        m, s, target_logit, arg = all_reduce_partials(m, s, target_logit, arg, tp_group)
    lse = m + torch.log(s)
    per_row = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
    loss, n_valid = reduce_loss(per_row, valid, reduction)
    n_correct = ((arg == targets) & valid).sum()
    return loss, lse, n_valid, n_correct


def reduce_loss(per_row, valid, reduction):
    """The per-row losses (zero on ignored rows) reduced as asked; also returns n_valid."""
    n_valid = valid.sum()
    if reduction == "mean":
        return per_row.sum() / n_valid.clamp(min=1), n_valid
    if reduction == "sum":
        return per_row.sum(), n_valid
    return per_row, n_valid


def row_grads(grad_loss, valid, n_valid, reduction, dtype):
    """d loss / d per-row loss: the incoming gradient spread over rows, 0 on ignored rows."""
    if reduction == "mean":
        return valid.to(dtype) * (grad_loss.to(dtype) / n_valid.clamp(min=1))
    return valid.to(dtype) * grad_loss.to(dtype)  # "sum": a scalar; "none": one per row
