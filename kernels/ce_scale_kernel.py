"""Scale kernel: ``grad *= scale`` in place, with the factor read from device memory in float32.

The gradients formed in the forward are multiplied by the incoming gradient in the backward.
For a bf16 gradient, torch's ``grad.mul_(scale)`` with a 0-dim CUDA float32 ``scale`` computes
in the tensor's dtype and so rounds the factor to bf16 first (a bias of up to 2^-9 on the whole
gradient); reading it as a Python float would stall the host. This kernel reads it from its
pointer, multiplies in float32 and rounds once: one pass of 4 bytes per bf16 element.
"""

import triton
import triton.language as tl


@triton.jit
def scale_kernel(G, SCALE, n_elements, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(G + offs, (g * tl.load(SCALE)).to(G.dtype.element_ty), mask=mask)
