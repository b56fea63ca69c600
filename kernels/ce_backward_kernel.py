"""Backward kernel: recompute a logits tile and turn it into d loss / d logits.

One program owns a [BLOCK_N, BLOCK_V] tile of a *row chunk* (rows row_start ..
row_start + n_rows) of a vocabulary slice (the host passes the slice as W, with its first id as
vocab_start, as for a TP shard). It recomputes the tile (``logits_tile``), forms
``(softmax - onehot(target)) * row_grad`` with the known global log-sum-exp, and stores it into
the [rows x vocabulary] tile buffer DL. The host then multiplies that buffer into grad_hidden and
grad_weight with two GEMMs (the "tiles" scheme); see DESIGN.md for why the buffer exists and
what it costs.
"""

import triton
import triton.language as tl

from megatrain.kernels.autotune_configs import autotune_configs
from megatrain.kernels.logits_tile import logits_tile


@triton.autotune(configs=autotune_configs(small_tile=False), key=["n_rows", "V", "D"])
@triton.jit
def linear_ce_dlogits_kernel(
    H, W, B, T, LSE, ROW_GRAD,  # hidden (N, D), weight (V, D), bias (V), targets/lse/row_grad (N)
    DL,                         # (n_rows, V) out: d loss / d logits of this row chunk
    n_rows, V, D, vocab_start, row_start,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_dn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # row blocks vary fastest: concurrent programs share weight tiles
    pid_v = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < n_rows
    local64 = offs_n.to(tl.int64)
    rows64 = row_start + local64          # row_start is int64 on the host side
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_mask = offs_v < V
    cols64 = offs_v.to(tl.int64)

    z = logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D,
                    stride_hn, stride_hd, stride_wv, stride_wd,
                    HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
    lse = tl.load(LSE + rows64, mask=row_mask, other=0.0)
    row_grad = tl.load(ROW_GRAD + rows64, mask=row_mask, other=0.0)   # 0 on ignored rows
    target = tl.load(T + rows64, mask=row_mask, other=-1).to(tl.int64) - vocab_start
    p = tl.exp(z - lse[:, None])
    p = tl.where(cols64[None, :] == target[:, None], p - 1.0, p)
    dl = p * row_grad[:, None]
    tl.store(DL + local64[:, None] * stride_dn + cols64[None, :], dl.to(DL.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])
