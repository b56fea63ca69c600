"""Chunked pure-torch linear + cross-entropy: the CPU path and the test oracle.

Logits are formed a chunk of rows at a time, so no [N, V] tensor ever exists: the forward keeps
only the per-row log-sum-exp, and the backward recomputes each chunk's logits to build
grad_hidden and grad_weight. A chunk holds at most ``CHUNK_ELEMENTS`` float32 logits.
"""

import torch

CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 logits per chunk


def _row_chunks(n_rows: int, vocab: int):
    rows = max(1, CHUNK_ELEMENTS // max(vocab, 1))
    for start in range(0, n_rows, rows):
        yield start, min(start + rows, n_rows)


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    # float32 accumulation for float32/bf16/fp16 inputs; float64 stays float64 (test oracle use).
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _chunk_logits(hidden, weight, bias, start, end):
    acc = _acc_dtype(hidden)
    logits = hidden[start:end].to(acc) @ weight.to(acc).t()  # (rows, V)
    if bias is not None:
        logits += bias.to(acc)
    return logits


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction):
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        lse = torch.empty(n_rows, dtype=acc, device=hidden.device)
        target_logit = torch.zeros(n_rows, dtype=acc, device=hidden.device)
        correct = torch.zeros(n_rows, dtype=torch.bool, device=hidden.device)
        valid = targets != ignore_index
        safe_targets = torch.where(valid, targets, torch.zeros_like(targets))
        for start, end in _row_chunks(n_rows, vocab):
            logits = _chunk_logits(hidden, weight, bias, start, end)
            lse[start:end] = torch.logsumexp(logits, dim=-1)
            rows_t = safe_targets[start:end]
            target_logit[start:end] = logits.gather(1, rows_t[:, None]).squeeze(1)
            correct[start:end] = logits.argmax(dim=-1) == rows_t
            del logits
        per_token = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
        n_valid = valid.sum()
        if reduction == "mean":
            loss = per_token.sum() / n_valid.clamp(min=1)
        elif reduction == "sum":
            loss = per_token.sum()
        else:
            loss = per_token
        ctx.save_for_backward(hidden, weight, bias, safe_targets, valid, lse, n_valid)
        ctx.reduction = reduction
        n_correct = (correct & valid).sum()
        ctx.mark_non_differentiable(n_correct)
        return (loss.to(hidden.dtype) if reduction == "none" else loss), n_correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_n_correct):
        hidden, weight, bias, targets, valid, lse, n_valid = ctx.saved_tensors
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        acc = _acc_dtype(hidden)
        # d loss / d logit = softmax - onehot(target), times each row's incoming gradient.
        if ctx.reduction == "mean":
            row_grad = valid.to(acc) * (grad_loss.to(acc) / n_valid.clamp(min=1))
        else:  # "sum": a scalar; "none": one gradient per row
            row_grad = valid.to(acc) * grad_loss.to(acc)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden = torch.zeros_like(hidden, dtype=acc) if need_h else None
        grad_weight = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=hidden.device) if need_b else None
        weight_f = weight.to(acc)
        for start, end in _row_chunks(n_rows, vocab):
            logits = _chunk_logits(hidden, weight, bias, start, end)
            dlogits = torch.exp_(logits.sub_(lse[start:end, None]))  # softmax, in place
            rows = torch.arange(end - start, device=hidden.device)
            dlogits[rows, targets[start:end]] -= 1.0
            dlogits.mul_(row_grad[start:end, None])
            if need_h:
                grad_hidden[start:end] = dlogits @ weight_f
            if need_w:
                grad_weight.addmm_(dlogits.t(), hidden[start:end].to(acc))
            if need_b:
                grad_bias += dlogits.sum(0)
            del logits, dlogits
        return (
            grad_hidden.to(hidden.dtype) if need_h else None,
            grad_weight.to(weight.dtype) if need_w else None,
            grad_bias.to(bias.dtype) if need_b else None,
            None,
            None,
            None,
        )


def linear_cross_entropy_torch(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", return_n_correct=False):
    """Cross-entropy of ``hidden @ weight.T (+ bias)`` against ``targets`` without [N, V] logits.

    Returns the loss, and with ``return_n_correct`` also the number of non-ignored rows whose
    argmax equals the target (a 0-dim int64 tensor from the same pass, for accuracy logging).
    """
    loss, n_correct = _LinearCrossEntropy.apply(hidden, weight, bias, targets, ignore_index, reduction)
    return (loss, n_correct) if return_n_correct else loss
