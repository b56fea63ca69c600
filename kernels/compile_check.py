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
from megatrain.kernels.ce_forward_kernel import EXP_GROUP, linear_ce_forward_kernel
from megatrain.kernels.ce_scale_kernel import scale_kernel
from megatrain.kernels.ce_softmax_grad_kernel import linear_ce_softmax_grad_kernel
from megatrain.kernels.triton_linear_ce import _GRAD_TILE, _SCALE_BLOCK

_INT64_ARGS = {"row_start"}
_UNIT_STRIDES = {"stride_hd": 1, "stride_wd": 1}
# the forward is compiled in both variants: statistics only, and storing exp(z - m) for the
# gradients-in-forward path
_VARIANTS = {linear_ce_forward_kernel: [dict(STORE_EXP=False), dict(STORE_EXP=True)],
             linear_ce_dlogits_kernel: [{}]}


def _pointer_types(dtype):
    data = f"*{dtype}"
    return {
        linear_ce_forward_kernel: dict(H=data, W=data, B=data, T="*i64", M_OUT="*fp32",
                                       S_OUT="*fp32", TGT_OUT="*fp32", ARG_OUT="*i64", E=data,
                                       GMAX="*fp32"),
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

    def build(kernel, pointers, constants, num_warps, num_stages):
        signature = {name: "constexpr" if name in constants else
                     pointers.get(name, "i64" if name in _INT64_ARGS else "i32")
                     for name in kernel.fn.arg_names}
        aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(kernel.fn.arg_names)
                   if signature[name] != "constexpr"}
        return triton.compile(
            ASTSource(kernel.fn, signature, constexprs=constants, attrs=aligned), target=target,
            options=dict(num_warps=num_warps, num_stages=num_stages))

    for kernel, pointers in _pointer_types(dtype).items():
        for variant in _VARIANTS[kernel]:
            for config in kernel.configs[:max_configs]:
                constants = dict(config.kwargs, HAS_BIAS=has_bias, UPCAST=False,
                                 DOT_PRECISION="ieee" if dtype == "fp32" else "tf32",
                                 GROUP=EXP_GROUP, **variant, **_UNIT_STRIDES)
                if kernel is linear_ce_dlogits_kernel:
                    del constants["GROUP"]
                compiled = build(kernel, pointers, constants, config.num_warps, config.num_stages)
                name = kernel.fn.__name__ + ("+exp" if variant.get("STORE_EXP") else "")
                results.append((name, config, compiled.metadata.shared))
    # the element-wise kernels: not autotuned, one fixed tile each
    for kernel, pointers, constants in (
            (linear_ce_softmax_grad_kernel,
             dict(E=f"*{dtype}", GMAX="*fp32", LSE="*fp32", T="*i64", TGT_LOGIT="*fp32",
                  ROW_GRAD="*fp32"), dict(GROUP=EXP_GROUP, **_GRAD_TILE)),
            (scale_kernel, dict(G=f"*{dtype}", SCALE="*fp32"), dict(BLOCK=_SCALE_BLOCK))):
        plain = type("Plain", (), {"fn": kernel})  # build() reads .fn
        compiled = build(plain, pointers, constants, 4, 1)
        results.append((kernel.__name__, constants, compiled.metadata.shared))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--arch", type=int, default=90)
    args = parser.parse_args()
    for name, config, shared in compile_all(args.dtype, args.arch):
        print(f"{name:28s} {config}  shared memory {shared / 1024:.0f} KiB")
