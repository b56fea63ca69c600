"""Chunked pure-torch linear + cross-entropy: the CPU path and the test oracle.

Same signature and semantics as the Triton path (``impl="torch"``). Logits are formed a chunk of
rows at a time, so no [N, V] tensor ever exists: the forward keeps only per-row statistics
(log-sum-exp, target logit, argmax), and the backward recomputes each chunk's logits to build
grad_hidden and grad_weight. Without a TP group and when gradients are wanted, the forward
builds them in the same pass instead (no recompute) and the backward only scales them. A chunk
holds at most ``CHUNK_ELEMENTS`` logits.

Precision: bf16/fp16 inputs are computed in float32, as the Triton kernel computes them (its
tensor-core dots multiply bf16 exactly and accumulate in float32): float32 logits, log-sum-exp,
softmax, d loss / d logits and gradient sums, one rounding to the inputs' dtype at the end. So
the reference stays the kernel's oracle in bf16 too (same argmax, same loss to float32 rounding).
A low-precision weight is never copied whole to float32: each GEMM that reads it takes it in
vocabulary blocks of ``CHUNK_ELEMENTS``, cast one at a time (``_weight_blocks``; a float32
weight is used as it is). grad_weight is summed over row chunks in a float32 [V, D] buffer, the
output's precision before its one rounding: a chunk is only ~131 rows at V = 32000, far too many
steps for a bf16 running sum. Autocast is off inside (``autocast_off.py``).

With ``tp_group`` the weight (and bias) is this rank's vocabulary shard; the per-row partials
are combined across the group (``vocab_parallel.py``) and grad_hidden is summed across it.
"""

import torch
import torch.distributed as dist

from megatrain.kernels.autocast_off import without_autocast
from megatrain.kernels.vocab_parallel import loss_from_partials, row_grads, shard_start

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 logits per chunk (and of weight per cast block)


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _acc_dtype(hidden, weight) -> torch.dtype:
    # float32 for float32/bf16/fp16 inputs; float64 stays float64 (test oracle use).
    either64 = torch.float64 in (hidden.dtype, weight.dtype)
    return torch.float64 if either64 else torch.float32


def _weight_blocks(weight, acc):
    """(vocabulary slice, that block of the weight in ``acc``): the whole weight when it is in
    ``acc`` already, else blocks of at most ``CHUNK_ELEMENTS`` cast one at a time."""
    if weight.dtype == acc:
        yield slice(None), weight
        return
    rows = max(1, CHUNK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], rows):
        yield slice(start, start + rows), weight[start:start + rows].to(acc)


def _chunk_logits(hidden, weight, bias, start, end, acc):
    h = hidden[start:end].to(acc)
    if weight.dtype == acc:
        logits = h @ weight.t()  # (rows, V_local)
    else:
        logits = torch.empty(end - start, weight.shape[0], dtype=acc, device=h.device)
        for cols, w in _weight_blocks(weight, acc):
            logits[:, cols] = h @ w.t()
    if bias is not None:
        logits += bias.to(acc)
    return logits


def _local_targets(targets, valid, vocab_start, vocab_local):
    """Shard-local target ids (0 where not in this shard) and whether each row's target is here."""
    local = targets - vocab_start
    here = valid & (local >= 0) & (local < vocab_local)
    return torch.where(here, local, torch.zeros_like(local)), here


def _softmax_grad_(probs, local_t, here, row_grad):
    """d loss / d logits of a chunk, in place over its softmax: (softmax - onehot(target)) times
    the row's incoming gradient; the one-hot only on rows whose target is in this shard."""
    rows = torch.arange(probs.shape[0], device=probs.device)
    probs[rows, local_t] -= here.to(probs.dtype)
    return probs.mul_(row_grad[:, None])


class _GradBuffers:
    """grad_hidden / grad_weight / grad_bias accumulated chunk by chunk in ``acc`` precision (in
    the forward pass when the gradients are formed there, else in the backward). The buffers stay
    in ``acc`` until the incoming gradient has scaled them (and, under TP, grad_hidden has been
    summed over the group): the inputs' dtype is reached by one final rounding."""

    def __init__(self, hidden, weight, bias, acc, needs):
        need_h, need_w, need_b = needs
        self.hidden = torch.zeros_like(hidden, dtype=acc) if need_h else None
        self.weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        self.bias = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if need_b else None

    def add_chunk(self, dlogits, hidden, weight, start, end):
        if self.hidden is not None:
            grad = None
            for cols, w in _weight_blocks(weight, dlogits.dtype):
                part = dlogits[:, cols] @ w  # (rows, V_block) @ (V_block, D)
                grad = part if grad is None else grad.add_(part)
            self.hidden[start:end] = grad
        if self.weight is not None:
            self.weight.addmm_(dlogits.t(), hidden[start:end].to(dlogits.dtype))
        if self.bias is not None:
            self.bias += dlogits.sum(0)

    def results(self, hidden, weight, bias, grad_loss=None):
        """The gradients in the inputs' dtypes (None where not wanted), times ``grad_loss`` if given."""
        def out(buf, like):
            if buf is None:
                return None
            if grad_loss is not None:
                buf.mul_(grad_loss.to(buf.dtype))
            return buf.to(like.dtype)
        return out(self.hidden, hidden), out(self.weight, weight), out(self.bias, bias)


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, tp_group, grads_wanted):
        n_rows, vocab_local = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden, weight)
        vocab_start = shard_start(vocab_local, tp_group)
        valid = targets != ignore_index
        local_t, here = _local_targets(targets, valid, vocab_start, vocab_local)
        row_max = torch.empty(n_rows, dtype=acc, device=hidden.device)
        sum_exp = torch.empty(n_rows, dtype=acc, device=hidden.device)
        target_logit = torch.empty(n_rows, dtype=acc, device=hidden.device)
        arg = torch.empty(n_rows, dtype=torch.int64, device=hidden.device)
        # Without a TP group each chunk holds whole rows, so when a backward will follow the
        # gradients are formed in this same pass (3 matmuls instead of 4: no recompute); they are
        # kept for a row gradient of 1 (sum) or 1/n_valid (mean) and scaled in backward.
        eager = tp_group is None and reduction != "none" and grads_wanted
        if eager:
            grads = _GradBuffers(hidden, weight, bias, acc, ctx.needs_input_grad[:3])
            unit = valid.to(acc) / (valid.sum().clamp(min=1) if reduction == "mean" else 1)
        for start, end in _row_chunks(n_rows, vocab_local):
            logits = _chunk_logits(hidden, weight, bias, start, end, acc)
            target_logit[start:end] = logits.gather(1, local_t[start:end, None]).squeeze(1)
            chunk_max, chunk_arg = logits.max(dim=-1)
            row_max[start:end] = chunk_max
            arg[start:end] = chunk_arg + vocab_start
            exp = logits.sub_(chunk_max[:, None]).exp_()  # in place: logits are gone from here
            sum_exp[start:end] = exp.sum(dim=-1)
            if eager:
                dlogits = _softmax_grad_(exp.div_(sum_exp[start:end, None]), local_t[start:end],
                                         here[start:end], unit[start:end])
                grads.add_chunk(dlogits, hidden, weight, start, end)
            del logits, exp
        target_logit = torch.where(here, target_logit, torch.zeros_like(target_logit))
        loss, lse, n_valid, n_correct = loss_from_partials(row_max, sum_exp, target_logit, arg,
                                                           targets, valid, reduction, tp_group)
        ctx.save_for_backward(hidden, weight, bias, local_t, here, valid, lse, n_valid)
        ctx.reduction, ctx.tp_group = reduction, tp_group
        ctx.eager_grads = grads if eager else None
        ctx.mark_non_differentiable(n_correct)
        return (loss.to(hidden.dtype) if reduction == "none" else loss), n_correct

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss, _grad_n_correct):
        hidden, weight, bias, local_t, here, valid, lse, n_valid = ctx.saved_tensors
        if ctx.eager_grads is not None:  # formed in forward for a unit incoming gradient
            # Hand the buffers over: kept on ctx they would live as long as the graph does.
            eager, ctx.eager_grads = ctx.eager_grads, None
            return (*eager.results(hidden, weight, bias, grad_loss), None, None, None, None, None)
        n_rows, vocab_local = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden, weight)
        row_grad = row_grads(grad_loss, valid, n_valid, ctx.reduction, acc)
        grads = _GradBuffers(hidden, weight, bias, acc, ctx.needs_input_grad[:3])
        for start, end in _row_chunks(n_rows, vocab_local):
            logits = _chunk_logits(hidden, weight, bias, start, end, acc)
            softmax = torch.exp_(logits.sub_(lse[start:end, None]))  # in place
            dlogits = _softmax_grad_(softmax, local_t[start:end], here[start:end],
                                     row_grad[start:end])
            grads.add_chunk(dlogits, hidden, weight, start, end)
            del logits, softmax, dlogits
        if grads.hidden is not None and ctx.tp_group is not None:
            # hidden is replicated across the group: its gradient sums every shard's part
            dist.all_reduce(grads.hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        return (*grads.results(hidden, weight, bias), None, None, None, None, None)


def linear_cross_entropy_torch(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", tp_group=None, return_n_correct=False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without [N, V] logits.

    Returns the loss, and with ``return_n_correct`` also the number of non-ignored rows whose
    argmax equals the target (a 0-dim int64 tensor from the same pass, for accuracy logging).
    """
    # Read grad mode here: inside Function.forward it is always off, and needs_input_grad stays
    # True under a caller's no_grad.
    grads_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, n_correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index,
                                                reduction, tp_group, grads_wanted)
    return (loss, n_correct) if return_n_correct else loss
