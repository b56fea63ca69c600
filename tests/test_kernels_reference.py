"""The chunked torch reference of ``fused_linear_cross_entropy`` (impl="torch") against a float64
truth, the shared judging rule's negative control, and the API's boundary errors.

Errors are judged as in apple/ml-cross-entropy: at most 2x the error plain torch makes computing
in the same low precision (``megatrain.kernels.testing.judge``).
"""

import os

import pytest
import torch

from megatrain.kernels import fused_linear_cross_entropy
from megatrain.kernels import testing as kt

torch.set_num_threads(1)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(kt.SHAPES))
def test_torch_reference_matches_float64_truth(shape, dtype, reduction):
    case = kt.shape_case(shape, dtype)
    kt.run_and_judge(fused_linear_cross_entropy, case, reduction, impl="torch")


def _under_autocast(dtype=torch.bfloat16):
    """``fused_linear_cross_entropy`` called, and differentiated, inside a CPU autocast region, as
    the MTP node calls it in a bf16 training step."""
    def call(*args, **kwargs):
        with torch.autocast("cpu", dtype=dtype):
            return fused_linear_cross_entropy(*args, **kwargs)
    return call


# every reduction on the odd shape ("sum"/"mean": gradients formed in the forward, "none": in the
# backward); the realistic vocabulary once (its float64 truth is the slow part)
@pytest.mark.parametrize("shape, reduction", [("odd", "mean"), ("odd", "sum"), ("odd", "none"),
                                              ("llama_vocab", "sum")])
def test_bf16_under_autocast_matches_float64_truth(shape, reduction):
    """bf16 hidden and weight inside autocast (the training step's call): error vs the float64
    truth within the judge's bound of torch's own bf16 error, n_correct exact (float32 logits),
    gradients in the inputs' dtype."""
    case = kt.shape_case(shape, torch.bfloat16)
    kt.run_and_judge(_under_autocast(), case, reduction, impl="torch")
    returned = kt.backward_dtypes(_under_autocast(), case, reduction, impl="torch")
    assert set(returned.values()) == {torch.bfloat16}, returned


def test_backward_dtype_check_catches_a_float32_gradient(monkeypatch):
    """Negative control: a backward that hands back its float32 buffers is seen as such (while
    ``.grad`` would show bf16, cast by autograd)."""
    from megatrain.kernels import torch_reference

    def float32_results(self, hidden, weight, bias, grad_loss=None):
        return self.hidden, self.weight, self.bias

    monkeypatch.setattr(torch_reference._GradBuffers, "results", float32_results)
    case = kt.shape_case("odd", torch.bfloat16)
    returned = kt.backward_dtypes(fused_linear_cross_entropy, case, "sum", impl="torch")
    assert set(returned.values()) == {torch.float32}, returned


def test_autocast_around_the_call_changes_nothing():
    """Autocast is off inside: float32 inputs give bit-identical results inside a bf16 region."""
    case = kt.shape_case("odd", torch.float32)
    plain = kt.run(fused_linear_cross_entropy, case, "mean", impl="torch")
    wrapped = kt.run(_under_autocast(), case, "mean", impl="torch")
    for key, value in plain.items():
        assert torch.equal(wrapped[key], value), f"{key} changed under autocast"


def test_autocast_comparison_catches_a_leaking_region():
    """Negative control: the same comparison sees autocast change plain torch (F.linear runs in
    bf16 inside the region), so bit-identity above is not vacuous."""
    case = kt.shape_case("odd", torch.float32)

    def plain_torch(*args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return kt._eager(*args, **kwargs)

    eager, leaked = kt.run(kt._eager, case, "mean"), kt.run(plain_torch, case, "mean")
    assert not torch.equal(eager["loss"], leaked["loss"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_many_row_chunks_and_weight_blocks_give_the_same_result(monkeypatch, dtype):
    """Shrink the chunk budget so that the 37 rows come in 10 chunks of at most 4 and a bf16
    weight is cast to float32 in 12 vocabulary blocks of at most 85 (never the whole weight at
    once): still within the judge's bounds, n_correct exact."""
    from megatrain.kernels import torch_reference
    monkeypatch.setattr(torch_reference, "CHUNK_ELEMENTS", 4096)
    case = kt.shape_case("odd", dtype)
    for reduction in ("sum", "none"):  # "sum": gradients formed in the forward; "none": backward
        kt.run_and_judge(fused_linear_cross_entropy, case, reduction, impl="torch")


def test_all_rows_ignored_gives_zero_loss_and_grads():
    case = kt.make_case(8, 16, 50, torch.float32, frac_ignored=1.1)
    result = kt.run(fused_linear_cross_entropy, case, "mean", impl="torch")
    assert result["loss"].item() == 0.0 and int(result["n_correct"]) == 0
    assert result["grad_hidden"].abs().max() == 0 and result["grad_weight"].abs().max() == 0


@pytest.mark.parametrize("wrong", ["mean_over_all_rows", "scale_1e-3", "grad_ignores_upstream"])
def test_judge_detects_a_wrong_implementation(wrong):
    """Negative control: the comparison used above must reject near-miss implementations."""
    case = kt.make_case(37, 48, 1001, torch.float32, bias=True)

    def broken(hidden, weight, targets, **kw):
        reduction = kw["reduction"]
        if wrong == "grad_ignores_upstream":  # a loss whose gradient drops the 0.7 upstream scale
            loss, nc = fused_linear_cross_entropy(hidden, weight, targets, **kw)
            return loss.detach() + (loss - loss.detach()) / 0.7, nc
        kw["reduction"] = "sum" if wrong == "mean_over_all_rows" else reduction
        loss, nc = fused_linear_cross_entropy(hidden, weight, targets, **kw)
        if wrong == "mean_over_all_rows":
            return loss / targets.numel(), nc
        return loss * (1 + 1e-3), nc

    result = kt.run(broken, case, "mean", impl="torch")
    with pytest.raises(AssertionError, match="exceeds"):
        kt.judge(result, case, "mean")


def test_public_api_rejects_bad_arguments():
    case = kt.make_case(4, 8, 16, torch.float32)
    h, w, t = case["hidden"], case["weight"], case["targets"]
    with pytest.raises(ValueError, match="reduction"):
        fused_linear_cross_entropy(h, w, t, reduction="avg")
    with pytest.raises(ValueError, match="impl"):
        fused_linear_cross_entropy(h, w, t, impl="cuda")
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(h, w.t(), t)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="interpreter is on")
def test_triton_on_cpu_without_interpreter_says_how_to_enable_it():
    case = kt.make_case(4, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["targets"], impl="triton")


def test_triton_interpreter_that_cannot_run_says_which_versions_to_install(monkeypatch):
    """Triton 3.6 (the lent GPU machines') with numpy >= 2.4 fails inside every kernel; the call
    says so up front instead (a version pair that works is let through)."""
    import numpy
    import triton

    from megatrain.kernels import interpreter_problem

    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    assert "numpy<2.4 or triton>=3.7" in interpreter_problem()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    case = kt.make_case(4, 8, 16, torch.float32)
    with pytest.raises(RuntimeError, match="Triton 3.6.0 interpreter fails with numpy 2.4.6"):
        fused_linear_cross_entropy(case["hidden"], case["weight"], case["targets"], impl="triton")
    monkeypatch.setattr(numpy, "__version__", "2.3.5")
    assert interpreter_problem() is None
    monkeypatch.setattr(numpy, "__version__", "2.4.6")
    monkeypatch.setattr(triton, "__version__", "3.7.0")
    assert interpreter_problem() is None
