"""Compile the Triton kernels for a GPU target without a GPU (frontend, MLIR passes, PTX,
ptxas): catches what the interpreter lets through (e.g. ``tl.dot`` shapes or dtypes the GPU
compiler rejects) on a CPU-only machine.

    python -m megatrain.kernels.compile_check            # every GPU autotune config, sm_90, bf16

Must run without TRITON_INTERPRET (the kernels must be real JIT functions). Arguments are
specialised as the JIT does for aligned training shapes (contiguous rows: unit strides become
constants; pointers and the other integers divisible by 16), which is what lets the K loop be
software-pipelined (multi-buffered shared memory, visible in the printed size).
"""

import argparse

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from megatrain.kernels.autotune_configs import INTERPRET
from megatrain.kernels.ce_backward_kernel import linear_ce_dlogits_kernel
from megatrain.kernels.ce_forward_kernel import linear_ce_forward_kernel

_INT64_ARGS = {"row_start"}
_UNIT_STRIDES = {"stride_hd": 1, "stride_wd": 1}


def _pointer_types(dtype):
    data = f"*{dtype}"
    return {
        linear_ce_forward_kernel: dict(H=data, W=data, B=data, T="*i64", M_OUT="*fp32",
                                       S_OUT="*fp32", TGT_OUT="*fp32", ARG_OUT="*i64"),
        linear_ce_dlogits_kernel: dict(H=data, W=data, B=data, T="*i64", LSE="*fp32",
                                       ROW_GRAD="*fp32", DL=data),
    }


def compile_all(dtype="bf16", arch=90, has_bias=True, max_configs=None):
    """Compile each kernel for every autotune config; returns (name, config, shared bytes)."""
    if INTERPRET:
        raise RuntimeError("compile_check needs TRITON_INTERPRET unset: the kernels are "
                           "interpreter functions in this process")
    target = GPUTarget("cuda", arch, 32)
    results = []
    for kernel, pointers in _pointer_types(dtype).items():
        for config in kernel.configs[:max_configs]:
            constants = dict(config.kwargs, HAS_BIAS=has_bias, UPCAST=False,
                             DOT_PRECISION="ieee" if dtype == "fp32" else "tf32", **_UNIT_STRIDES)
            signature = {name: "constexpr" if name in constants else
                         pointers.get(name, "i64" if name in _INT64_ARGS else "i32")
                         for name in kernel.fn.arg_names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.fn.arg_names)
                       if signature[name] != "constexpr"}
            compiled = triton.compile(
                ASTSource(kernel.fn, signature, constexprs=constants, attrs=aligned), target=target,
                options=dict(num_warps=config.num_warps, num_stages=config.num_stages))
            results.append((kernel.fn.__name__, config, compiled.metadata.shared))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for name, config, shared in compile_all(args.dtype, args.arch):
        print(f"{name:28s} {config}  shared memory {shared / 1024:.0f} KiB")
