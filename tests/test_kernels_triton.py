"""The Triton kernels of ``fused_linear_cross_entropy`` (impl="triton") against a float64 truth.

Where to run: on a CUDA machine the tests run in this process on the GPU. On CPU the kernels run
in the Triton interpreter, which must be switched on (TRITON_INTERPRET=1) *before* the kernels
are defined and which would then also affect every other Triton kernel, and torch.compile's,
in the same process. So on CPU this module, when collected without the variable, contributes a
single test that re-runs this file under the interpreter in a child pytest process; the real
tests here are skipped in the parent. ``TRITON_INTERPRET=1 pytest tests/test_kernels_triton.py``
runs them directly.
"""

import os
import subprocess
import sys

import pytest
import torch

from megatrain.kernels import fused_linear_cross_entropy
from megatrain.kernels import testing as kt
from tests.test_mtp_loss import HEAD_TYPES, assert_bf16_step_matches_fp32, autocast_step, tiny_mtp_case

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUN_HERE = DEVICE == "cuda" or INTERPRET
here = pytest.mark.skipif(not RUN_HERE, reason="runs in the interpreter child process test")
torch.set_num_threads(1)


@pytest.mark.slow
@pytest.mark.skipif(RUN_HERE, reason="the kernels run in this process")
def test_triton_kernels_in_interpreter_child_process():
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        env=env, capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-6000:] + child.stderr[-3000:]


def _run_and_judge(shape, dtype, reduction):
    case = kt.shape_case(shape, dtype, device=DEVICE)
    return kt.run_and_judge(fused_linear_cross_entropy, case, reduction, impl="triton")


@here
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_odd_shape_matches_float64_truth(dtype, reduction):
    _run_and_judge("odd", dtype, reduction)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_kernel_llama_vocab_matches_float64_truth(dtype):
    _run_and_judge("llama_vocab", dtype, "sum")


@here
def test_kernel_equals_torch_reference_in_fp32():
    case = kt.shape_case("odd", torch.float32, device=DEVICE)
    kernel = kt.run(fused_linear_cross_entropy, case, "mean", impl="triton")
    reference = kt.run(fused_linear_cross_entropy, case, "mean", impl="torch")
    for key, err in kt.errors(kernel, reference).items():
        assert err <= 1e-5 * reference[key].abs().max().item(), (key, err)
    assert int(kernel["n_correct"]) == int(reference["n_correct"])


@here
def test_kernel_equals_torch_reference_in_bf16():
    """Both compute float32 logits from bf16 inputs: the same argmax and the same loss up to
    float32 summation order, so the reference is the kernel's oracle in bf16 too."""
    case = kt.shape_case("odd", torch.bfloat16, device=DEVICE)
    kernel = kt.run(fused_linear_cross_entropy, case, "sum", impl="triton")
    reference = kt.run(fused_linear_cross_entropy, case, "sum", impl="torch")
    assert int(kernel["n_correct"]) == int(reference["n_correct"])
    err = kt.errors(kernel, reference)["loss"]
    assert err <= 1e-5 * reference["loss"].abs().item(), (err, reference["loss"])


@here
@pytest.mark.parametrize("reduction", ["sum", "none"])
def test_kernel_under_bf16_autocast_matches_float64_truth(reduction):
    """Called and differentiated inside an autocast region, as in a bf16 training step: the host
    code's GEMMs must not be recast; gradients come back in bf16."""
    def call(*args, **kwargs):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            return fused_linear_cross_entropy(*args, **kwargs)

    case = kt.shape_case("odd", torch.bfloat16, device=DEVICE)
    kt.run_and_judge(call, case, reduction, impl="triton")
    returned = kt.backward_dtypes(call, case, reduction, impl="triton")
    assert set(returned.values()) == {torch.bfloat16}, returned


@here
@pytest.mark.parametrize("head_type", HEAD_TYPES)
def test_bf16_autocast_mtp_step_matches_fp32(tiny_model_cfg, head_type):
    """A training step through the MTP node with the Triton loss under bf16 autocast (every head
    type, two micro-batches) against float32: loss within 1%, gradients close."""
    model, window, targets, scales = tiny_mtp_case(tiny_model_cfg, head_type, 4)
    model, window, targets = model.to(DEVICE), window.to(DEVICE), targets.to(DEVICE)
    fp32 = autocast_step(model, window, targets, scales, impl="triton")
    bf16 = autocast_step(model, window, targets, scales, impl="triton",
                         autocast_dtype=torch.bfloat16, micro=2)
    assert_bf16_step_matches_fp32(bf16, fp32)


@here
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_vocab_splits_and_row_chunks_give_the_same_result(monkeypatch, dtype):
    """Force 4 vocabulary splits in the forward (partials combined on the host) and 3 backward
    row chunks (16, 16, 5 rows: grad_weight accumulated across chunks)."""
    from megatrain.kernels import triton_linear_ce
    monkeypatch.setattr(triton_linear_ce, "_num_sms", lambda device: 64)
    monkeypatch.setattr(triton_linear_ce, "DLOGITS_CHUNK_ROWS", 16)
    _run_and_judge("odd", dtype, "sum")


@here
def test_argmax_tie_counts_the_first_index_as_torch_does():
    case = kt.make_case(37, 48, 1001, torch.float32, device=DEVICE)
    w = case["weight"]
    w[900] = w[7] = 1.0  # two identical rows: exactly equal logits (integers, exact in fp32)
    case["hidden"][0] = 2.0
    for target, hit in ((7, 1), (900, 0)):
        case["targets"][0] = target
        ours = kt.run(fused_linear_cross_entropy, case, "sum", impl="triton")
        true = kt.truth(case, "sum")
        assert int(ours["n_correct"]) == int(true["n_correct"]), (target, hit)


@here
def test_strided_hidden_is_read_through_its_strides():
    case = kt.shape_case("odd", torch.float32, device=DEVICE)
    n, d = case["hidden"].shape
    wide = torch.zeros(n, 2 * d, device=DEVICE)
    wide[:, 1::2] = case["hidden"]
    case["hidden"] = wide[:, 1::2]  # strides (2d, 2)
    result = kt.run(fused_linear_cross_entropy, case, "mean", impl="triton")
    kt.judge(result, case, "mean")


@pytest.mark.slow
@pytest.mark.skipif(RUN_HERE, reason="GPU: the kernels really run; interpreter: the parent does it")
def test_kernels_compile_for_h100_without_a_gpu():
    """The interpreter accepts kernels the GPU compiler rejects: compile every autotune config
    for sm_90 (bf16) in a child process without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    child = subprocess.run([sys.executable, "-m", "megatrain.kernels.compile_check"], env=env,
                           capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stdout[-3000:] + child.stderr[-3000:]
    assert child.stdout.count("shared memory") >= 2, child.stdout
