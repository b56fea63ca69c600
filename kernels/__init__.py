"""Fused kernels. ``fused_linear_cross_entropy`` is the one entry point for every head's loss."""

from megatrain.kernels.torch_reference import linear_cross_entropy_torch

_REDUCTIONS = ("mean", "sum", "none")


def fused_linear_cross_entropy(hidden, weight, targets, *, bias=None, ignore_index=-100,
                               reduction="mean", impl="auto", return_n_correct=False):
    """Cross-entropy of ``hidden [N, D] @ weight[V, D].T`` against ``targets [N]``.

    Never materialises the [N, V] logits. Differentiable w.r.t. hidden, weight and bias.
    ``impl``: "auto" (the fastest available for the device), "torch" (chunked reference).
    With ``return_n_correct=True`` returns ``(loss, n_correct)``, the argmax hits among
    non-ignored rows, computed in the same pass.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if impl not in ("auto", "torch"):
        raise ValueError(f"impl must be 'auto' or 'torch', got {impl!r}")
    return linear_cross_entropy_torch(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                      reduction=reduction, return_n_correct=return_n_correct)
