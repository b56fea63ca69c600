"""Fused kernels. ``fused_linear_cross_entropy`` is the one entry point for every head's loss."""

import importlib.util
import os
import warnings

from megatrain.kernels.torch_reference import linear_cross_entropy_torch

_REDUCTIONS = ("mean", "sum", "none")
_IMPLS = ("auto", "triton", "torch")


def _triton_impl():
    """The Triton path, imported on first use (so TRITON_INTERPRET can be set before it)."""
    from megatrain.kernels.triton_linear_ce import linear_cross_entropy_triton
    return linear_cross_entropy_triton


def _triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def _major_minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int("".join(c for c in minor if c.isdigit()) or 0)


def interpreter_problem() -> str | None:
    """Why the Triton interpreter cannot run here, or None.

    Triton 3.6's interpreter (the lent GPU machines' version) converts a loop bound with
    ``int(array)``; numpy 2.4 made that an error for the 1-element arrays it holds, and every
    kernel with a runtime loop bound fails ("only 0-dimensional arrays can be converted to Python
    scalars"). Triton 3.7 squeezes the array first. Compiled (GPU) kernels are unaffected."""
    import numpy
    import triton

    if _major_minor(triton.__version__) < (3, 7) and _major_minor(numpy.__version__) >= (2, 4):
        return (f"the Triton {triton.__version__} interpreter fails with numpy {numpy.__version__} "
                f"(numpy >= 2.4 refuses the int() of a 1-element array that it takes of loop bounds); "
                f"install numpy<2.4 or triton>=3.7 to run the kernels on CPU, or use impl='torch'")
    return None


def _check_inputs(hidden, weight, targets, bias):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, D] and weight [V, D], got {tuple(hidden.shape)} "
                         f"and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"expected targets [N={hidden.shape[0]}], got {tuple(targets.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"expected bias [V={weight.shape[0]}], got {tuple(bias.shape)}")


def _resolve_impl(impl, hidden, weight):
    if impl == "torch":
        return "torch"
    if impl == "auto":
        if hidden.device.type != "cuda":
            return "torch"
        if not _triton_available():
            warnings.warn("fused_linear_cross_entropy: triton is not installed; using the "
                          "chunked torch path on CUDA (slower)", stacklevel=3)
            return "torch"
    if hidden.dtype != weight.dtype:
        raise ValueError(f"impl='triton' needs hidden and weight of one dtype, got {hidden.dtype} "
                         f"and {weight.dtype}")
    if hidden.device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "impl='triton' on CPU tensors runs only in the Triton interpreter: set "
                "TRITON_INTERPRET=1 before megatrain's Triton kernels are first imported, or use "
                "impl='torch' (the chunked reference), or CUDA tensors")
        problem = interpreter_problem()
        if problem:
            raise RuntimeError(f"impl='triton' on CPU tensors: {problem}")
    return "triton"


def fused_linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", tp_group=None, impl="auto",
                               return_n_correct=False):
    """Cross-entropy of ``hidden [N, D] @ weight[V, D].T (+ bias[V])`` against ``targets [N]``.

    Never materialises the [N, V] logits. Differentiable w.r.t. hidden, weight and bias. When
    gradients are wanted (grad mode on, an input requiring grad) and ``reduction`` is "sum" or
    "mean", the gradients are formed during this call and the backward only scales them by the
    incoming gradient (torch: without TP; triton: also under TP); see kernels/DESIGN.md.
    ``reduction``: "mean" (over non-ignored rows; float32), "sum" (float32) or "none" (per row,
    in hidden's dtype, 0 on ignored rows).
    ``tp_group``: vocabulary-parallel mode: ``weight``/``bias`` are this rank's contiguous,
    equal-sized shard (rank r holds ids [r*V_local, (r+1)*V_local)), ``targets`` are global ids
    and ``hidden`` is replicated over the group. The loss is the full-vocabulary loss on every
    rank; grad_hidden is summed over the group, grad_weight/grad_bias stay local.
    ``impl``: "auto" (Triton on CUDA tensors, the chunked torch reference elsewhere), "triton"
    (on CPU tensors only under TRITON_INTERPRET=1), "torch".
    With ``return_n_correct=True`` returns ``(loss, n_correct)``: the non-ignored rows whose
    (first) argmax equals the target, a 0-dim int64 tensor computed in the same pass.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    _check_inputs(hidden, weight, targets, bias)
    run = (_triton_impl() if _resolve_impl(impl, hidden, weight) == "triton"
           else linear_cross_entropy_torch)
    return run(hidden, weight, targets, bias=bias, ignore_index=ignore_index, reduction=reduction,
               tp_group=tp_group, return_n_correct=return_n_correct)
