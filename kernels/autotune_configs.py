"""The autotune configs (tile sizes, warps, pipeline stages) of the forward and backward kernels.

``INTERPRET`` is read when this module is first imported, and the kernels are defined with the
configs chosen then: ``TRITON_INTERPRET=1`` must be set before that.
"""

import os

import triton

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Both kernels try these; the autotuner times each per key (rows, V, D) and keeps the fastest.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_N": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_N": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
]
# The forward also keeps per-row state in registers (online max, sum of exponentials, argmax):
# compiled for sm_90 in bf16, ptxas spills registers in 3 of the 5 configs above for the forward
# and in none for the backward, so only the forward also tries this small tile, which does not.
_SMALL_TILE = triton.Config({"BLOCK_N": 64, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4,
                            num_stages=4)

# Under the interpreter, autotune with more than one config fails, and the run time grows with
# programs x loop steps: one config with big blocks keeps the CPU tests fast.
_INTERPRETER_CONFIG = triton.Config({"BLOCK_N": 64, "BLOCK_V": 512, "BLOCK_K": 128})


def autotune_configs(*, small_tile: bool) -> list:
    """One kernel's ``triton.autotune`` configs; ``small_tile`` adds the 64 x 128 tile on the GPU."""
    if INTERPRET:
        return [_INTERPRETER_CONFIG]
    return (_GPU_CONFIGS + [_SMALL_TILE]) if small_tile else list(_GPU_CONFIGS)
