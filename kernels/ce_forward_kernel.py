"""Forward kernel: matmul fused with an online log-sum-exp over vocabulary blocks.

One program owns BLOCK_N rows and one *vocabulary split* (a contiguous range of V_PER_SPLIT
vocabulary entries). It walks its split in BLOCK_V steps, forming each logits tile in registers
(``logits_tile``), and keeps per row: the running max ``m``, the sum of exponentials relative
to it ``s``, the target logit (0 when the target is not in this split) and the first index of
the max. Nothing logits-sized is ever written: the outputs are [n_splits, N] partials that the
host combines exactly like the tensor-parallel ranks' partials (``vocab_parallel.py``).
Splitting the vocabulary keeps the GPU busy when N / BLOCK_N is below the number of SMs.

With ``STORE_EXP`` (the forward that also forms the gradients, DESIGN.md) each tile's
``exp(z - m)`` is written to a row chunk's buffer E [rows, V] in its dtype, with ``m`` (the running
max it was taken against) written per EXP_GROUP columns to GMAX [rows, V / EXP_GROUP]: the softmax
is then ``e * exp(m - lse)`` once the lse is known, without recomputing the logits. Storing
``exp(z - m)`` in [0, 1] rather than z keeps a uniform relative precision in bf16: a stored bf16
logit near 20 would be off by up to 0.06, i.e. 6% in its probability.
"""

import triton
import triton.language as tl

from megatrain.kernels.autotune_configs import autotune_configs
from megatrain.kernels.logits_tile import logits_tile

# EXP_GROUP columns share one stored running max; it divides every BLOCK_V and the split quantum.
EXP_GROUP = 128


@triton.autotune(configs=autotune_configs(small_tile=True), key=["N", "V", "D", "STORE_EXP"])
@triton.jit
def linear_ce_forward_kernel(
    H, W, B, T,                      # hidden (N, D), weight (V, D), bias (V) or None, targets (N)
    M_OUT, S_OUT, TGT_OUT, ARG_OUT,  # (n_splits, N): max, sum exp(z - max), target logit, argmax
    E, GMAX,                         # STORE_EXP only: (N, V) exp(z - m), (N, V / EXP_GROUP) m
    N, V, D, vocab_start, V_PER_SPLIT,
    stride_hn, stride_hd, stride_wv, stride_wd, stride_en, stride_gn,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
    STORE_EXP: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)  # row blocks vary fastest: concurrent programs share weight tiles
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = offs_n < N
    rows64 = offs_n.to(tl.int64)
    # targets are global vocabulary ids; this weight (shard) starts at vocab_start
    target = tl.load(T + rows64, mask=row_mask, other=-1).to(tl.int64) - vocab_start

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    target_logit = tl.zeros((BLOCK_N,), tl.float32)
    arg = tl.zeros((BLOCK_N,), tl.int64)
    v_lo = split * V_PER_SPLIT
    v_hi = tl.minimum(v_lo + V_PER_SPLIT, V)
    for v0 in range(v_lo, v_hi, BLOCK_V):  # the host makes every split non-empty
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_mask = offs_v < v_hi
        cols64 = offs_v.to(tl.int64)
        z = logits_tile(H, W, B, rows64, row_mask, cols64, col_mask, D,
                        stride_hn, stride_hd, stride_wv, stride_wd,
                        HAS_BIAS, UPCAST, DOT_PRECISION, BLOCK_N, BLOCK_V, BLOCK_K)
        z = tl.where(col_mask[None, :], z, float("-inf"))
        z_max = tl.max(z, 1)
        # first column reaching the tile max (a plain min-reduction: fewer registers than
        # tl.max(..., return_indices=True)); strictly greater keeps an earlier block's tie,
        # so the result is the first max overall, as torch.argmax
        z_arg = tl.min(tl.where(z == z_max[:, None], offs_v[None, :], 2147483647), 1)
        arg = tl.where(z_max > m, z_arg.to(tl.int64), arg)
        m_new = tl.maximum(m, z_max)
        e = tl.exp(z - m_new[:, None])  # in [0, 1]; 0 on masked columns
        s = s * tl.exp(m - m_new) + tl.sum(e, 1)
        m = m_new
        if STORE_EXP:
            tl.store(E + rows64[:, None] * stride_en + cols64[None, :], e.to(E.dtype.element_ty),
                     mask=row_mask[:, None] & col_mask[None, :])
            # one m per GROUP columns of this tile (splits and tiles start on group boundaries);
            # a tile reaching past its split must not write the next split's groups
            offs_g = v0 // GROUP + tl.arange(0, BLOCK_V // GROUP)
            g_mask = row_mask[:, None] & (offs_g * GROUP < v_hi)[None, :]
            tl.store(GMAX + rows64[:, None] * stride_gn + offs_g.to(tl.int64)[None, :],
                     tl.broadcast_to(m_new[:, None], (BLOCK_N, BLOCK_V // GROUP)), mask=g_mask)
        is_target = (cols64[None, :] == target[:, None]) & col_mask[None, :]  # not the next split's
        target_logit += tl.sum(tl.where(is_target, z, 0.0), 1)

    out = split.to(tl.int64) * N + rows64
    tl.store(M_OUT + out, m, mask=row_mask)
    tl.store(S_OUT + out, s, mask=row_mask)
    tl.store(TGT_OUT + out, target_logit, mask=row_mask)
    tl.store(ARG_OUT + out, arg, mask=row_mask)
