"""Softmax-gradient kernel: turn a row chunk's stored ``exp(z - m)`` into d loss / d logits, in place.

The forward kernel with ``STORE_EXP`` leaves, for a chunk of rows, E [rows, V] = ``exp(z - m)``
(m the running max of the row's vocabulary split when the tile was formed, one per EXP_GROUP
columns in GMAX). Once the host has combined the splits into the row's log-sum-exp, this kernel
rewrites E as ``(softmax - onehot(target)) * row_grad``, where ``softmax = e * exp(m - lse)``.
The target column uses the exactly known target logit, ``exp(target_logit - lse) - 1``, rather
than the stored (rounded) ``e``. Element-wise and memory-bound: no logits are recomputed. The host
then multiplies the chunk into grad_hidden and grad_weight (DESIGN.md).
"""

import triton
import triton.language as tl


@triton.jit
def linear_ce_softmax_grad_kernel(
    E, GMAX,                         # (rows, V) in/out; (rows, V / GROUP) running max per group
    LSE, T, TGT_LOGIT, ROW_GRAD,     # (rows,) each: lse, global target id, target logit, d loss/d row
    n_rows, V, vocab_start,
    stride_en, stride_gn,
    GROUP: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    row_mask = offs_r < n_rows
    mask = row_mask[:, None] & (offs_c < V)[None, :]
    rows64 = offs_r.to(tl.int64)
    cols64 = offs_c.to(tl.int64)
    lse = tl.load(LSE + rows64, mask=row_mask, other=0.0)
    row_grad = tl.load(ROW_GRAD + rows64, mask=row_mask, other=0.0)   # 0 on ignored rows
    target = tl.load(T + rows64, mask=row_mask, other=-1).to(tl.int64) - vocab_start
    p_target = tl.exp(tl.load(TGT_LOGIT + rows64, mask=row_mask, other=0.0) - lse)
    e_ptrs = E + rows64[:, None] * stride_en + cols64[None, :]
    e = tl.load(e_ptrs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(GMAX + rows64[:, None] * stride_gn + (cols64 // GROUP)[None, :], mask=mask,
                other=0.0)
    p = e * tl.exp(m - lse[:, None])
    p = tl.where(cols64[None, :] == target[:, None], p_target[:, None] - 1.0, p)
    tl.store(e_ptrs, (p * row_grad[:, None]).to(E.dtype.element_ty), mask=mask)
