"""Host side of the Triton fused linear + cross-entropy: launches, the autograd.Function, and the
functional entry point (Liger's layers 2-4; the kernels are ``ce_forward_kernel.py`` and
``ce_backward_kernel.py``). Design and costs: DESIGN.md.

Importing this module defines the kernels: under ``TRITON_INTERPRET=1`` (set before the first
import) they run on CPU tensors in the Triton interpreter, otherwise they compile for CUDA.
"""

import torch
import torch.distributed as dist
import triton

from megatrain.kernels.autocast_off import without_autocast
from megatrain.kernels.autotune_configs import INTERPRET
from megatrain.kernels.ce_backward_kernel import linear_ce_dlogits_kernel
from megatrain.kernels.ce_forward_kernel import linear_ce_forward_kernel
from megatrain.kernels.vocab_parallel import combine_splits, loss_from_partials, row_grads, shard_start

# Backward row-chunk: the dlogits buffer is [DLOGITS_CHUNK_ROWS, V] in the weight's dtype
# (64 MiB at V=32000 bf16). Larger chunks make the grad_weight GEMM (K = chunk rows) more
# compute-bound and round a low-precision grad_weight fewer times; smaller ones save memory.
DLOGITS_CHUNK_ROWS = 1024
_SPLIT_QUANTUM = 256  # vocabulary splits are multiples of the largest GPU BLOCK_V


def _num_sms(device) -> int:
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _dot_precision(dtype) -> str:
    # float32 inputs: match torch's default fp32 matmul (no TF32); bf16/fp16 use tensor cores.
    return "ieee" if dtype == torch.float32 else "tf32"


def _common_args(hidden, weight):
    return dict(stride_hn=hidden.stride(0), stride_hd=hidden.stride(1),
                stride_wv=weight.stride(0), stride_wd=weight.stride(1),
                UPCAST=INTERPRET, DOT_PRECISION=_dot_precision(hidden.dtype))


def forward_statistics(hidden, weight, bias, targets, vocab_start):
    """Per-row (max, sum exp, target logit, first argmax as global id) over this weight's vocab."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    # enough (row block x vocab split) programs for ~2 waves when N alone is too short
    row_blocks = triton.cdiv(n_rows, 64)
    n_splits = max(1, min(triton.cdiv(2 * _num_sms(hidden.device), row_blocks),
                          triton.cdiv(vocab, _SPLIT_QUANTUM)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    n_splits = triton.cdiv(vocab, v_per_split)  # no empty split
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.empty(n_splits, n_rows, **f32)
    s = torch.empty(n_splits, n_rows, **f32)
    target_logit = torch.empty(n_splits, n_rows, **f32)
    arg = torch.empty(n_splits, n_rows, dtype=torch.int64, device=hidden.device)
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), n_splits)  # noqa: E731
    linear_ce_forward_kernel[grid](
        hidden, weight, bias, targets, m, s, target_logit, arg,
        n_rows, vocab, dim, vocab_start, v_per_split,
        HAS_BIAS=bias is not None, **_common_args(hidden, weight))
    m, s, target_logit, arg = combine_splits(m, s, target_logit, arg)
    return m, s, target_logit, arg + vocab_start


def backward_grads(hidden, weight, bias, targets, lse, row_grad, vocab_start, need_h, need_w,
                   need_b):
    """grad_hidden (local shard's part), grad_weight, grad_bias by recomputing logits per chunk."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    chunk_rows = min(DLOGITS_CHUNK_ROWS, n_rows)
    # The interpreter rounds float32 -> bf16 toward zero; the GPU rounds to nearest. Under the
    # interpreter the kernel writes float32 and torch rounds, so the numerics match the GPU's.
    buf_dtype = torch.float32 if INTERPRET else weight.dtype
    dlogits = torch.empty(chunk_rows, vocab, dtype=buf_dtype, device=hidden.device)
    grad_hidden = (torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                   if need_h else None)
    # grad_weight accumulates over row chunks in the weight's own dtype (no float32 [V, D] copy
    # for bf16 weights): one rounding per chunk, fp32 accumulation inside each GEMM.
    grad_weight = (torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
                   if need_w else None)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if need_b else None
    common = _common_args(hidden, weight)
    for start in range(0, n_rows, chunk_rows):
        rows = min(chunk_rows, n_rows - start)
        # the launch below calls grid within this iteration, so the late binding of `rows` was
        # harmless; binding it as a default makes that independent of when triton calls it
        grid = lambda meta, rows=rows: (triton.cdiv(rows, meta["BLOCK_N"]),  # noqa: E731
                                        triton.cdiv(vocab, meta["BLOCK_V"]))
        linear_ce_dlogits_kernel[grid](
            hidden, weight, bias, targets, lse, row_grad, dlogits,
            rows, vocab, dim, vocab_start, start, stride_dn=dlogits.stride(0),
            HAS_BIAS=bias is not None, **common)
        chunk = dlogits[:rows].to(weight.dtype)  # a no-op on GPU
        if need_h:
            torch.mm(chunk, weight, out=grad_hidden[start:start + rows])
        if need_w and start == 0:  # the first chunk writes, the others accumulate
            torch.mm(chunk.t(), hidden[:rows], out=grad_weight)
        elif need_w:
            grad_weight.addmm_(chunk.t(), hidden[start:start + rows])
        if need_b:
            grad_bias += chunk.sum(dim=0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


class _TritonLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, tp_group):
        vocab_start = shard_start(weight.shape[0], tp_group)
        m, s, target_logit, arg = forward_statistics(hidden, weight, bias, targets, vocab_start)
        valid = targets != ignore_index
        loss, lse, n_valid, n_correct = loss_from_partials(m, s, target_logit, arg, targets, valid,
                                                           reduction, tp_group)
        ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, n_valid)
        ctx.reduction, ctx.tp_group, ctx.vocab_start = reduction, tp_group, vocab_start
        ctx.mark_non_differentiable(n_correct)
        return (loss.to(hidden.dtype) if reduction == "none" else loss), n_correct

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss, _grad_n_correct):
        hidden, weight, bias, targets, valid, lse, n_valid = ctx.saved_tensors
        row_grad = row_grads(grad_loss, valid, n_valid, ctx.reduction, torch.float32).contiguous()
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        grad_hidden, grad_weight, grad_bias = backward_grads(
            hidden, weight, bias, targets, lse, row_grad, ctx.vocab_start, need_h, need_w, need_b)
        if need_h and ctx.tp_group is not None:
            dist.all_reduce(grad_hidden, op=dist.ReduceOp.SUM, group=ctx.tp_group)
        if need_b:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None


def linear_cross_entropy_triton(hidden, weight, targets, *, bias=None, ignore_index=-100,
                                reduction="mean", tp_group=None, return_n_correct=False):
    """Triton path of ``fused_linear_cross_entropy`` (same arguments and results)."""
    loss, n_correct = _TritonLinearCrossEntropy.apply(
        hidden, weight, bias, targets.contiguous(), ignore_index, reduction, tp_group)
    return (loss, n_correct) if return_n_correct else loss
