"""Both implementations choose their own precision, so autocast is switched off inside them.

Under autocast the matmuls of the reference would be recast to bf16 behind its back (its float32
statistics and gradient sums would silently become bf16, and in-place ``addmm_`` into a float32
buffer fails on dtypes), and the Triton host code's ``out=`` GEMMs would be recast too. The
backward needs it as much as the forward: the MTP node calls ``autograd.grad`` inside its own
forward, i.e. inside the trainer's autocast region. The inputs' dtypes are the contract: a
caller that wants bf16 tensor-core matmuls passes bf16 hidden and weight (``mtp_loss`` does).
"""

import functools

import torch


def without_autocast(method):
    """Run an ``autograd.Function``'s ``forward(ctx, ...)`` / ``backward(ctx, ...)`` with autocast
    off for CPU and CUDA (whatever the tensors' device, the caller's region is not ours)."""

    @functools.wraps(method)
    def run(ctx, *args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return method(ctx, *args)

    return run
