"""Chunked pure-torch linear + cross-entropy: the CPU path and the test oracle.

Same signature and semantics as the Triton path (``impl="torch"``). Logits are formed a chunk of
rows at a time, so no [N, V] tensor ever exists: the forward keeps only per-row statistics
(log-sum-exp, target logit, argmax), and the backward recomputes each chunk's logits to build
grad_hidden and grad_weight. A chunk holds at most ``CHUNK_ELEMENTS`` logits.

With ``tp_group`` the weight (and bias) is this rank's vocabulary shard; the per-row partials
are combined across the group (``vocab_parallel.py``) and grad_hidden is summed across it.
"""

import torch
import torch.distributed as dist

from megatrain.kernels.vocab_parallel import (all_reduce_partials, reduce_loss, row_grads,
                                              shard_start)

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 logits per chunk


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 accumulation for float32/bf16/fp16 inputs; float64 stays float64 (test oracle use).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_logits(hidden, weight_acc, bias, start, end):
    logits = hidden[start:end].to(weight_acc.dtype) @ weight_acc.t()  # (rows, V_local)
    if bias is not None:
        logits += bias.to(weight_acc.dtype)
    return logits


def _local_targets(targets, valid, vocab_start, vocab_local):
    """Shard-local target ids (0 where not in this shard) and whether each row's target is here."""
    local = targets - vocab_start
    here = valid & (local >= 0) & (local < vocab_local)
    return torch.where(here, local, torch.zeros_like(local)), here


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, tp_group):
        n_rows, vocab_local = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        vocab_start = shard_start(vocab_local, tp_group)
        valid = targets != ignore_index
        local_t, here = _local_targets(targets, valid, vocab_start, vocab_local)
        row_max = torch.empty(n_rows, dtype=acc, device=hidden.device)
        sum_exp = torch.empty(n_rows, dtype=acc, device=hidden.device)
        target_logit = torch.empty(n_rows, dtype=acc, device=hidden.device)
        arg = torch.empty(n_rows, dtype=torch.int64, device=hidden.device)
        weight_acc = weight.to(acc)
        for start, end in _row_chunks(n_rows, vocab_local):
            logits = _chunk_logits(hidden, weight_acc, bias, start, end)
            target_logit[start:end] = logits.gather(1, local_t[start:end, None]).squeeze(1)
            chunk_max, chunk_arg = logits.max(dim=-1)
            row_max[start:end] = chunk_max
            arg[start:end] = chunk_arg + vocab_start
            sum_exp[start:end] = logits.sub_(chunk_max[:, None]).exp_().sum(dim=-1)
            del logits
        target_logit = torch.where(here, target_logit, torch.zeros_like(target_logit))
        if tp_group is not None:
            row_max, sum_exp, target_logit, arg = all_reduce_partials(
                row_max, sum_exp, target_logit, arg, tp_group)
        lse = row_max + torch.log(sum_exp)
        per_row = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        loss, n_valid = reduce_loss(per_row, valid, reduction)
        n_correct = ((arg == targets) & valid).sum()
        ctx.save_for_backward(hidden, weight, bias, local_t, here, valid, lse, n_valid)
        ctx.reduction, ctx.tp_group = reduction, tp_group
        ctx.mark_non_differentiable(n_correct)
        return (loss.to(hidden.dtype) if reduction == "none" else loss), n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_n_correct):
        hidden, weight, bias, local_t, here, valid, lse, n_valid = ctx.saved_tensors
        n_rows, vocab_local = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        row_grad = row_grads(grad_loss, valid, n_valid, ctx.reduction, acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_bias = torch.zeros(vocab_local, dtype=acc, device=hidden.device) if need_b else None
        weight_acc = weight.to(acc)
        for start, end in _row_chunks(n_rows, vocab_local):
            logits = _chunk_logits(hidden, weight_acc, bias, start, end)
            # d loss / d logit = (softmax - onehot(target)) * the row's incoming gradient
            dlogits = torch.exp_(logits.sub_(lse[start:end, None]))  # softmax, in place
            rows = torch.arange(end - start, device=hidden.device)
            dlogits[rows, local_t[start:end]] -= here[start:end].to(acc)
            dlogits.mul_(row_grad[start:end, None])
            if need_h:
                grad_hidden[start:end] = dlogits @ weight_acc
            if need_w:
                grad_weight.addmm_(dlogits.t(), hidden[start:end].to(acc))
            if need_b:
                grad_bias += dlogits.sum(0)
            del logits, dlogits
        if need_h and ctx.tp_group is not None:
            # hidden is replicated across the group: its gradient sums every shard's part
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return (
            grad_hidden.to(hidden.dtype) if need_h else None,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None,
            None, None, None, None,
        )


def linear_cross_entropy_torch(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", tp_group=None, return_n_correct=False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without [N, V] logits.

    Returns the loss, and with ``return_n_correct`` also the number of non-ignored rows whose
    argmax equals the target (a 0-dim int64 tensor from the same pass, for accuracy logging).
    """
    loss, n_correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index,
                                                reduction, tp_group)
    return (loss, n_correct) if return_n_correct else loss
