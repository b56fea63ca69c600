"""The one building block the fused linear + cross-entropy kernels share: a [BLOCK_N, BLOCK_V]
tile of ``hidden @ weight.T (+ bias)`` accumulated in float32 over the model dim in BLOCK_K steps.

Not a kernel (a ``@triton.jit`` helper inlined into the forward and the backward kernels).
Row and vocabulary offsets arrive as int64 so ``row * stride`` cannot overflow when N*D or V*D
exceeds 2^31; the model-dim offset stays int32 (it is < D).
"""

import triton
import triton.language as tl


@triton.jit
def logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D,
                stride_hn, stride_hd, stride_wv, stride_wd,
                HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    h_rows = H + rows64[:, None] * stride_hn       # (BLOCK_N, 1) row starts of hidden
    w_cols = W + cols64[None, :] * stride_wv       # (1, BLOCK_V) row starts of weight, as columns
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < D
        h = tl.load(h_rows + offs_k[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_N, BLOCK_K)
        w = tl.load(w_cols + offs_k[:, None] * stride_wd,
                    mask=k_mask[:, None] & col_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_V)
        if UPCAST:  # the interpreter computes bf16 arithmetic wrongly: go to float32 at once
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(B + cols64, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    return acc
