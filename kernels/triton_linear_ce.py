"""Host side of the Triton fused linear + cross-entropy: launches, the autograd.Function, and the
functional entry point (Liger's layers 2-4; the kernels are ``ce_forward_kernel.py``,
``ce_softmax_grad_kernel.py`` and ``ce_backward_kernel.py``). Design and costs: DESIGN.md.

When a backward will follow and the incoming gradient is a scalar (reduction "sum"/"mean"; the
MTP node's case), the forward forms grad_hidden, grad_weight and grad_bias itself and the
backward only scales them, by whichever of two schemes ``plan_gradients`` finds cheaper within
the working-buffer cap: ``"rows"`` (``forward_with_grads``: row chunks of complete logits rows,
3 GEMM-equivalents, no TP) or ``"tiles"`` (the statistics pass, then ``tile_grads`` over
[rows x vocab] tiles: 4 GEMM-equivalents, but far less grad_weight traffic and rounding at a
large vocabulary). With reduction "none" the forward keeps statistics only and the backward
runs ``tile_grads`` with the per-row incoming gradient.

Importing this module defines the kernels: under ``TRITON_INTERPRET=1`` (set before the first
import) they run on CPU tensors in the Triton interpreter, otherwise they compile for CUDA.
"""

from dataclasses import dataclass

import torch
import torch.distributed as dist
import triton

from megatrain.kernels.autocast_off import without_autocast
from megatrain.kernels.autotune_configs import INTERPRET
from megatrain.kernels.ce_backward_kernel import linear_ce_dlogits_kernel
from megatrain.kernels.ce_forward_kernel import EXP_GROUP, linear_ce_forward_kernel
from megatrain.kernels.ce_scale_kernel import scale_kernel
from megatrain.kernels.ce_softmax_grad_kernel import linear_ce_softmax_grad_kernel
from megatrain.kernels.vocab_parallel import (
    combine_splits,
    loss_from_partials,
    reduce_loss,
    row_grads,
    shard_start,
)

# Every scheme chunks its work so that its working buffers stay within this (``plan_fused_chunks``,
# ``plan_tiles``). Larger chunks make the gradient GEMMs (K = chunk size) more compute-bound and
# round low-precision gradients fewer times; the cap bounds the memory. Costs: DESIGN.md.
FUSED_BUFFER_CAP_BYTES = 16 << 20
# "auto" (the cheaper by ``plan_gradients``'s estimate), or "rows" / "tiles" to force one where
# it applies (benchmarks, tests).
GRADIENT_SCHEME = "auto"
# One byte of memory traffic costs about as much time as this many FLOPs of a bf16 tensor-core
# GEMM on the GPUs we target (H100 / H200: ~989 TFLOP/s dense over 3.35-4.8 TB/s): the cost
# model's exchange rate between a GEMM's FLOPs and the gradient updates' read-modify-write bytes.
RIDGE_FLOPS_PER_BYTE = 200
# A bf16 / fp16 grad_weight accumulated over more row chunks than this is too noisy (each chunk
# rounds it once: ~1% relative error at 64 chunks, ~2% at 300, against ~0.2% for one rounding):
# the "rows" scheme is then not used for low-precision weights.
MAX_LOW_PRECISION_ROUNDINGS = 128
_SPLIT_QUANTUM = 256  # vocabulary splits are multiples of the largest GPU BLOCK_V
_PARTIAL_BYTES = 4 + 4 + 4 + 8  # per (split, row): max, sum of exponentials, target logit, argmax
# Per row of the whole call, the host keeps float32 / int64 / bool vectors beside the chunk
# buffers (statistics, their split partials in the "tiles" pass, lse, row gradients, masks:
# ~40-60 bytes): the plans leave this much of the cap to them, at most half of it.
ROW_VECTOR_BYTES = 64
# the element-wise softmax-gradient kernel's tile (memory-bound: any moderate tile will do; the
# interpreter's cost grows with the number of programs)
_GRAD_TILE = dict(BLOCK_R=64, BLOCK_C=2048) if INTERPRET else dict(BLOCK_R=8, BLOCK_C=1024)


@dataclass(frozen=True)
class FusedPlan:
    """Row chunking of the gradients-in-forward path for one (N, V)."""

    chunk_rows: int    # rows per chunk (the grad_weight GEMMs' K)
    n_chunks: int
    buffer_bytes: int  # chunk buffers: exp buffer, group maxima, split partials, bias sum


def _chunk_budget(cap_bytes: int | None, n_rows: int, has_bias: bool, vocab: int) -> int:
    """What the cap leaves for chunk buffers: minus the per-row vectors (at most half the cap)
    and the float32 bias gradient sum."""
    cap = FUSED_BUFFER_CAP_BYTES if cap_bytes is None else cap_bytes
    return max(cap - n_rows * ROW_VECTOR_BYTES, cap // 2) - (vocab * 4 if has_bias else 0)


def _rows_within(budget: int, bytes_per_row: int) -> int:
    """How many rows of ``bytes_per_row`` fit in ``budget``: a multiple of 8 when at least 8 fit
    (16-byte aligned bf16 GEMM operands), and at least 1."""
    rows = max(1, budget // bytes_per_row)
    return rows - rows % 8 if rows >= 8 else rows


def plan_fused_chunks(n_rows: int, vocab: int, buffer_itemsize: int, *, has_bias: bool = False,
                      cap_bytes: int | None = None) -> FusedPlan:
    """The largest row chunk whose working buffers fit in ``cap_bytes``.

    Per row of a chunk: the [V] buffer of exp(z - m), later d loss / d logits (``buffer_itemsize``
    bytes each: the weight's dtype on the GPU), a float32 running max per EXP_GROUP columns, and
    the forward's per-split partials (at most V / 256 splits). Plus, with a bias, its float32 [V]
    gradient sum; and the cap leaves ``ROW_VECTOR_BYTES`` per row of the call to the host's
    per-row vectors. Chunks are a multiple of 8 rows (16-byte aligned bf16 GEMM operands) when
    at least 8 rows fit; a vocabulary so large that not even one row fits gets 1-row chunks.
    ``cap_bytes`` defaults to ``FUSED_BUFFER_CAP_BYTES`` as it is at call time.
    """
    per_row = (vocab * buffer_itemsize + triton.cdiv(vocab, EXP_GROUP) * 4
               + triton.cdiv(vocab, _SPLIT_QUANTUM) * _PARTIAL_BYTES)
    budget = _chunk_budget(cap_bytes, n_rows, has_bias, vocab)
    rows = min(n_rows, _rows_within(budget, per_row))
    return FusedPlan(chunk_rows=rows, n_chunks=triton.cdiv(n_rows, rows),
                     buffer_bytes=rows * per_row + (vocab * 4 if has_bias else 0))


@dataclass(frozen=True)
class TilePlan:
    """[rows x vocab] tiling of the recomputing gradient pass for one (N, V)."""

    chunk_rows: int    # the grad_weight GEMMs' K
    chunk_vocab: int   # the grad_hidden GEMMs' K
    buffer_bytes: int  # the [chunk_rows, chunk_vocab] dlogits buffer, plus a bias gradient sum


def plan_tiles(n_rows: int, vocab: int, buffer_itemsize: int, *, has_bias: bool = False,
               cap_bytes: int | None = None) -> TilePlan:
    """The dlogits tile within ``cap_bytes`` that least re-reads and re-writes the gradients.

    A [Nc, Vc] tile's GEMMs update grad_hidden[Nc rows] (once per vocabulary chunk: V / Vc
    passes over [N, D]) and grad_weight[Vc rows] (once per row chunk: N / Nc passes over [V, D]);
    for a fixed tile area that traffic, N V D (1/Vc + 1/Nc), is least for a square tile, unless N
    or V is shorter than its side. Vc is a multiple of 256 and Nc of 8 where they are split.
    """
    budget = _chunk_budget(cap_bytes, n_rows, has_bias, vocab)
    area = max(1, budget // buffer_itemsize)  # elements of the tile
    side = max(1, int(area ** 0.5))
    chunk_vocab = vocab
    if vocab > side:  # split the vocabulary: a square tile, or as wide as N short allows
        width = area // min(n_rows, side)  # rounded to the nearest multiple of 256 (rows adapt)
        width = max(_SPLIT_QUANTUM, (width + _SPLIT_QUANTUM // 2) // _SPLIT_QUANTUM * _SPLIT_QUANTUM)
        chunk_vocab = min(vocab, width)
    chunk_rows = min(n_rows, _rows_within(budget, chunk_vocab * buffer_itemsize))
    return TilePlan(chunk_rows, chunk_vocab,
                    chunk_rows * chunk_vocab * buffer_itemsize + (vocab * 4 if has_bias else 0))


def plan_gradients(n_rows: int, vocab: int, dim: int, itemsize: int, *, has_bias: bool = False,
                   tp: bool = False, cap_bytes: int | None = None) -> str:
    """The gradient scheme, "rows" or "tiles", with the smaller estimated time (in FLOPs).

    One GEMM-equivalent is G = 2 N V D FLOPs. A gradient GEMM that re-reads and re-writes its
    output T times costs max(G, T x 2 x output bytes x RIDGE_FLOPS_PER_BYTE) (compute and traffic
    overlap). "rows": logits + grad_hidden + grad_weight(N / C passes over [V, D]) + the
    element-wise pass over E (3 N V bytes). "tiles": statistics + recomputed logits +
    grad_hidden(V / Vc passes over [N, D]) + grad_weight(N / Nc passes). "rows" needs complete
    rows on one rank (no TP) and, for a low-precision weight, at most
    MAX_LOW_PRECISION_ROUNDINGS row chunks.
    """
    if GRADIENT_SCHEME != "auto":
        return "tiles" if tp else GRADIENT_SCHEME
    gemm = 2.0 * n_rows * vocab * dim

    def update(passes, out_elements):
        return max(gemm, passes * 2 * out_elements * itemsize * RIDGE_FLOPS_PER_BYTE)

    rows = plan_fused_chunks(n_rows, vocab, itemsize, has_bias=has_bias, cap_bytes=cap_bytes)
    tiles = plan_tiles(n_rows, vocab, itemsize, has_bias=has_bias, cap_bytes=cap_bytes)
    cost_rows = (2 * gemm + update(rows.n_chunks, vocab * dim)
                 + 3 * n_rows * vocab * itemsize * RIDGE_FLOPS_PER_BYTE)
    cost_tiles = (2 * gemm + update(triton.cdiv(vocab, tiles.chunk_vocab), n_rows * dim)
                  + update(triton.cdiv(n_rows, tiles.chunk_rows), vocab * dim))
    too_noisy = itemsize < 4 and rows.n_chunks > MAX_LOW_PRECISION_ROUNDINGS
    return "rows" if not tp and not too_noisy and cost_rows <= cost_tiles else "tiles"


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


def _vocab_splits(n_rows, vocab, device):
    """(number of splits, vocabulary entries per split): enough (row block x vocab split)
    programs for ~2 waves when N alone is too short; splits are non-empty multiples of 256."""
    row_blocks = triton.cdiv(n_rows, 64)
    n_splits = max(1, min(triton.cdiv(2 * _num_sms(device), row_blocks),
                          triton.cdiv(vocab, _SPLIT_QUANTUM)))
    v_per_split = triton.cdiv(triton.cdiv(vocab, n_splits), _SPLIT_QUANTUM) * _SPLIT_QUANTUM
    return triton.cdiv(vocab, v_per_split), v_per_split


def forward_statistics(hidden, weight, bias, targets, vocab_start, exp_out=None, gmax_out=None):
    """Per-row (max, sum exp, target logit, first argmax as global id) over this weight's vocab.
    With ``exp_out`` [N, V] / ``gmax_out`` [N, V / EXP_GROUP] also stores each tile's exp(z - m)
    and the running max m it is relative to (the gradients-in-forward path)."""
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    n_splits, v_per_split = _vocab_splits(n_rows, vocab, hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    m = torch.empty(n_splits, n_rows, **f32)
    s = torch.empty(n_splits, n_rows, **f32)
    target_logit = torch.empty(n_splits, n_rows, **f32)
    arg = torch.empty(n_splits, n_rows, dtype=torch.int64, device=hidden.device)
    store = exp_out is not None
    grid = lambda meta: (triton.cdiv(n_rows, meta["BLOCK_N"]), n_splits)  # noqa: E731
    linear_ce_forward_kernel[grid](
        hidden, weight, bias, targets, m, s, target_logit, arg, exp_out, gmax_out,
        n_rows, vocab, dim, vocab_start, v_per_split,
        stride_en=exp_out.stride(0) if store else 0, stride_gn=gmax_out.stride(0) if store else 0,
        HAS_BIAS=bias is not None, STORE_EXP=store, GROUP=EXP_GROUP, **_common_args(hidden, weight))
    m, s, target_logit, arg = combine_splits(m, s, target_logit, arg)
    return m, s, target_logit, arg + vocab_start


_SCALE_BLOCK = 4096


def _scale_(grad, scale, use_kernel=not INTERPRET):
    """``grad *= scale`` (a 0-dim float32 tensor on grad's device) with one rounding. A
    low-precision gradient goes through ``scale_kernel`` (float32 factor read on the device).
    The interpreter rounds float32 -> bf16 toward zero where the GPU rounds to nearest, so there
    torch multiplies 16 MiB float32 blocks instead (``use_kernel=False``)."""
    if grad.dtype in (torch.float32, torch.float64):
        return grad.mul_(scale.to(grad.dtype))
    flat = grad.view(-1)  # the gradients formed in the forward are dense
    if use_kernel:
        scale_kernel[(triton.cdiv(flat.numel(), _SCALE_BLOCK),)](
            flat, scale.reshape(1), flat.numel(), BLOCK=_SCALE_BLOCK)
        return grad
    step = FUSED_BUFFER_CAP_BYTES // 4
    for start in range(0, flat.numel(), step):
        block = flat[start:start + step]
        block.copy_(block.float().mul_(scale))
    return grad


def forward_with_grads(hidden, weight, bias, targets, valid, unit_row_grad, needs):
    """Per-row statistics *and* the gradients for a unit incoming gradient, in one pass.

    For each row chunk (``plan_fused_chunks``): the forward kernel forms the chunk's logits tile
    by tile (GEMM 1) and stores exp(z - m); the splits are combined into the chunk's lse; the
    softmax-gradient kernel turns the buffer into d loss / d logits in place; then
    grad_hidden[chunk] = dlogits @ W (GEMM 2, written once) and grad_weight += dlogits.T @
    hidden[chunk] (GEMM 3, accumulated over chunks in the weight's own dtype: one rounding per
    chunk, no float32 [V, D] copy). Returns (m, s, target_logit, arg, grad_h, grad_w, grad_b).
    """
    n_rows, vocab = hidden.shape[0], weight.shape[0]
    need_h, need_w, need_b = needs
    # The interpreter rounds float32 -> bf16 toward zero; the GPU rounds to nearest. Under the
    # interpreter the kernels write float32 and torch rounds where the GPU kernel would.
    buf_dtype = torch.float32 if INTERPRET else weight.dtype
    rounds = buf_dtype != weight.dtype
    plan = plan_fused_chunks(n_rows, vocab, weight.element_size(), has_bias=bias is not None)
    rows = plan.chunk_rows
    dev = hidden.device
    exp_buf = torch.empty(rows, vocab, dtype=buf_dtype, device=dev)
    gmax = torch.empty(rows, triton.cdiv(vocab, EXP_GROUP), dtype=torch.float32, device=dev)
    stats = [torch.empty(n_rows, dtype=torch.float32, device=dev) for _ in range(3)]
    arg = torch.empty(n_rows, dtype=torch.int64, device=dev)
    # dense and row-major whatever the inputs' strides: the GEMMs write row slices of them
    grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
    grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    grad_b = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    for start in range(0, n_rows, rows):
        end = min(start + rows, n_rows)
        h, t, e, g = hidden[start:end], targets[start:end], exp_buf[:end - start], gmax[:end - start]
        chunk_stats = forward_statistics(h, weight, bias, t, 0, e, g)
        for full, part in zip((*stats, arg), chunk_stats):
            full[start:end] = part
        m, s, target_logit = (x[start:end] for x in stats)
        lse = m + torch.log(s)
        if rounds:
            e.copy_(e.to(weight.dtype))
        grid = (triton.cdiv(end - start, _GRAD_TILE["BLOCK_R"]),
                triton.cdiv(vocab, _GRAD_TILE["BLOCK_C"]))
        linear_ce_softmax_grad_kernel[grid](
            e, g, lse, t, target_logit, unit_row_grad[start:end], end - start, vocab, 0,
            e.stride(0), g.stride(0), GROUP=EXP_GROUP, **_GRAD_TILE)
        dlogits = e.to(weight.dtype)  # a no-op on the GPU
        if need_h:
            torch.mm(dlogits, weight, out=grad_h[start:end])
        if need_w and start == 0:  # the first chunk writes, the others accumulate
            torch.mm(dlogits.t(), h, out=grad_w)
        elif need_w:
            grad_w.addmm_(dlogits.t(), h)
        if need_b:
            grad_b += dlogits.sum(dim=0, dtype=torch.float32)
    return (*stats, arg, grad_h, grad_w, grad_b)


def tile_grads(hidden, weight, bias, targets, lse, row_grad, vocab_start, needs):
    """grad_hidden (this shard's part), grad_weight, grad_bias from the known lse, recomputing the
    logits a [rows x vocab] tile at a time (``plan_tiles``).

    Per tile: ``linear_ce_dlogits_kernel`` recomputes the logits and writes d loss / d logits
    into the tile buffer (the weight's dtype on the GPU); cuBLAS adds it into grad_hidden[rows]
    (K = the tile's vocabulary width) and grad_weight[vocab] (K = its rows). Each gradient is
    accumulated in its own dtype (no float32 [V, D] copy for a bf16 weight): fp32 inside each
    GEMM, one rounding per update, V / Vc updates of grad_hidden and N / Nc of grad_weight.
    """
    n_rows, dim = hidden.shape
    vocab = weight.shape[0]
    need_h, need_w, need_b = needs
    plan = plan_tiles(n_rows, vocab, weight.element_size(), has_bias=bias is not None)
    # The interpreter rounds float32 -> bf16 toward zero; the GPU rounds to nearest. Under the
    # interpreter the kernel writes float32 and torch rounds, so the numerics match the GPU's.
    buf_dtype = torch.float32 if INTERPRET else weight.dtype
    dev = hidden.device
    dlogits = torch.empty(plan.chunk_rows, plan.chunk_vocab, dtype=buf_dtype, device=dev)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=dev) if need_h else None
    grad_weight = torch.empty(weight.shape, dtype=weight.dtype, device=dev) if need_w else None
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=dev) if need_b else None
    common = _common_args(hidden, weight)
    for start in range(0, n_rows, plan.chunk_rows):
        rows = min(plan.chunk_rows, n_rows - start)
        h = hidden[start:start + rows]
        for v0 in range(0, vocab, plan.chunk_vocab):
            cols = min(plan.chunk_vocab, vocab - v0)
            w = weight[v0:v0 + cols]  # a vocabulary slice is a weight (shard) starting at v0
            # grid is called within this launch; binding rows/cols as defaults makes that
            # independent of when triton calls it
            grid = lambda meta, rows=rows, cols=cols: (  # noqa: E731
                triton.cdiv(rows, meta["BLOCK_N"]), triton.cdiv(cols, meta["BLOCK_V"]))
            linear_ce_dlogits_kernel[grid](
                hidden, w, None if bias is None else bias[v0:v0 + cols], targets, lse, row_grad,
                dlogits, rows, cols, dim, vocab_start + v0, start, stride_dn=dlogits.stride(0),
                HAS_BIAS=bias is not None, **common)
            tile = dlogits[:rows, :cols].to(weight.dtype)  # a no-op on the GPU
            if need_h and v0 == 0:  # the first update of a gradient writes, the others add
                torch.mm(tile, w, out=grad_hidden[start:start + rows])
            elif need_h:
                grad_hidden[start:start + rows].addmm_(tile, w)
            if need_w and start == 0:
                torch.mm(tile.t(), h, out=grad_weight[v0:v0 + cols])
            elif need_w:
                grad_weight[v0:v0 + cols].addmm_(tile.t(), h)
            if need_b:
                grad_bias[v0:v0 + cols] += tile.sum(dim=0, dtype=torch.float32)
    return grad_hidden, grad_weight, grad_bias


class _TritonLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, hidden, weight, bias, targets, ignore_index, reduction, tp_group,
                grads_wanted):
        vocab_start = shard_start(weight.shape[0], tp_group)
        valid = targets != ignore_index
        needs = ctx.needs_input_grad[:3]
        # With a scalar incoming gradient, d loss / d row is known here up to that scalar (1, or
        # 1 / n_valid), so the gradients are formed now and the backward only scales them.
        scheme = None
        if grads_wanted and reduction != "none":
            scheme = plan_gradients(hidden.shape[0], weight.shape[0], hidden.shape[1],
                                    weight.element_size(), has_bias=bias is not None,
                                    tp=tp_group is not None)
        ctx.grads = None
        if scheme == "rows":
            unit = row_grads(torch.ones((), device=hidden.device), valid, valid.sum(), reduction,
                             torch.float32).contiguous()
            m, s, target_logit, arg, *ctx.grads = forward_with_grads(
                hidden, weight, bias, targets, valid, unit, needs)
            lse = m + torch.log(s)
            per_row = torch.where(valid, lse - target_logit, torch.zeros_like(lse))
            loss, _ = reduce_loss(per_row, valid, reduction)
            n_correct = ((arg == targets) & valid).sum()
        else:
            m, s, target_logit, arg = forward_statistics(hidden, weight, bias, targets,
                                                         vocab_start)
            loss, lse, n_valid, n_correct = loss_from_partials(m, s, target_logit, arg, targets,
                                                               valid, reduction, tp_group)
            if scheme == "tiles":
                unit = row_grads(torch.ones((), device=hidden.device), valid, n_valid, reduction,
                                 torch.float32).contiguous()
                ctx.grads = _tile_grads_summed(hidden, weight, bias, targets, lse, unit,
                                               vocab_start, needs, tp_group)
            else:
                ctx.save_for_backward(hidden, weight, bias, targets, valid, lse, n_valid)
        ctx.reduction, ctx.tp_group, ctx.vocab_start = reduction, tp_group, vocab_start
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.formed_in_forward = scheme is not None
        ctx.mark_non_differentiable(n_correct)
        return (loss.to(hidden.dtype) if reduction == "none" else loss), n_correct

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss, _grad_n_correct):
        if ctx.grads is not None:  # formed in forward for a unit incoming gradient
            grad_hidden, grad_weight, grad_bias = ctx.grads
            ctx.grads = None  # scaled in place, once: release them with this node
            scale = grad_loss.to(torch.float32)
            grad_hidden, grad_weight = (None if g is None else _scale_(g, scale)
                                        for g in (grad_hidden, grad_weight))
            if grad_bias is not None:
                grad_bias = grad_bias.mul_(scale).to(ctx.bias_dtype)
            return grad_hidden, grad_weight, grad_bias, None, None, None, None, None
        if ctx.formed_in_forward:
            raise RuntimeError("fused_linear_cross_entropy (triton) formed its gradients in the "
                               "forward and hands them out once; a second backward through the "
                               "same call (retain_graph=True) is not supported: call it again")
        hidden, weight, bias, targets, valid, lse, n_valid = ctx.saved_tensors
        row_grad = row_grads(grad_loss, valid, n_valid, ctx.reduction, torch.float32).contiguous()
        grad_hidden, grad_weight, grad_bias = _tile_grads_summed(
            hidden, weight, bias, targets, lse, row_grad, ctx.vocab_start,
            ctx.needs_input_grad[:3], ctx.tp_group)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _tile_grads_summed(hidden, weight, bias, targets, lse, row_grad, vocab_start, needs, tp_group):
    """``tile_grads``, with grad_hidden summed over the TP group (hidden is replicated there)."""
    grads = tile_grads(hidden, weight, bias, targets, lse, row_grad, vocab_start, needs)
    if grads[0] is not None and tp_group is not None:
        dist.all_reduce(grads[0], op=dist.ReduceOp.SUM, group=tp_group)
    return grads


def linear_cross_entropy_triton(hidden, weight, targets, *, bias=None, ignore_index=-100,
                                reduction="mean", tp_group=None, return_n_correct=False):
    """Triton path of ``fused_linear_cross_entropy`` (same arguments and results)."""
    # Read grad mode here: inside Function.forward it is always off, and needs_input_grad stays
    # True under a caller's no_grad.
    grads_wanted = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    loss, n_correct = _TritonLinearCrossEntropy.apply(
        hidden, weight, bias, targets.contiguous(), ignore_index, reduction, tp_group,
        grads_wanted)
    return (loss, n_correct) if return_n_correct else loss
