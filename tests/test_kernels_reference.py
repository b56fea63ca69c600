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
