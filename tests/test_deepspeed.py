"""DeepSpeed ZeRO 1/2/3 at dp=2 equals the single-process trainer; its checkpoints reshard.

Two levels: forked gloo ranks driving ``DeepSpeedModel`` directly against the harness's
single-process reference (the ZeRO-stage x n_future x head-type matrix, offload, the negative
controls), and the trainer under torchrun (end to end, checkpoints, resume). ZeRO-3 runs at the
harness level use ``stage3_param_persistence_threshold=0``: the tiny test model's parameters are
all below DeepSpeed's default threshold (1e5 elements) and would otherwise never be partitioned.

DeepSpeed JIT-builds a shared-memory comm op on its first CPU run (~25 s on 2 cores), cached in
``TORCH_EXTENSIONS_DIR`` (here the repository's ignored ``.cache/``), so CI pays it once.
"""

import os

import pytest
import torch

from tests.test_trainer import REPO

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
import deepspeed  # noqa: E402,F401  installed by install.sh: a broken install fails, not skips

from megatrain.config import ParallelConfig  # noqa: E402
from megatrain.errors import ConfigError  # noqa: E402
from megatrain.parallel import ParallelDims  # noqa: E402
from tests.parallel_harness import (  # noqa: E402
    BATCH,
    STEPS,
    _targets,
    _train_cfg,
    assert_comparison_catches,
    assert_matches,
    batches,
    build_model,
    reference_run,
    run_ranks,
    runtime_error_of,
    tiny_cfg,
)
from tests.test_trainer_parallel import _assert_close, _base, _launch, _losses  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

PARTITION_EVERYTHING = {"zero_optimization": {"stage3_param_persistence_threshold": 0}}


# ---- harness level: DeepSpeedModel on forked ranks ----------------------------------------------
def deepspeed_run(rank, cfg, *, zero_stage, micro=0, offload=False, grad_reduction="sum", steps=STEPS,
                  checkpoint_dir=None, resume_from=None, activation_checkpointing="none"):
    """One rank of the harness's training run through DeepSpeed ZeRO (dp = world size).

    Keyword-only after ``cfg``, like ``parallel_run``. ``checkpoint_dir``: save after step 2
    (megatrain's DCP layout). ``resume_from``: load that checkpoint into a fresh engine first and
    run the remaining steps.
    """
    import torch.distributed.checkpoint as dcp
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

    from megatrain.parallel.deepspeed_engine import parallelize_deepspeed
    dp = torch.distributed.get_world_size()
    parallel = ParallelConfig(dp=dp, dp_engine="deepspeed", zero_stage=zero_stage,
                              offload_optimizer=offload,
                              activation_checkpointing=activation_checkpointing)
    dsm = parallelize_deepspeed(build_model(cfg), _train_cfg(steps), parallel,
                                device=torch.device("cpu"), local_batch=BATCH // dp,
                                micro_batch_size=micro, impl="torch",
                                extra_config=PARTITION_EVERYTHING if zero_stage == 3 else None)
    if grad_reduction == "mean":  # negative control: keep DeepSpeed's dp-mean of gradients
        dsm.grad_scale = 1.0
    first = 0
    if resume_from is not None:
        state = {"model_optim": dsm.checkpoint_state()}
        flat = {k: v.state_dict() for k, v in state.items()}
        dcp.load(flat, checkpoint_id=str(resume_from))
        state["model_optim"].load_state_dict(flat["model_optim"])
        first = 2
    share = BATCH // dp
    losses, grad_norms, grads = [], [], None
    for step, window in enumerate(batches(cfg, steps)):
        if step < first:
            continue
        targets, scales = _targets(cfg, window)  # scales over the GLOBAL batch
        rows = slice(rank * share, (rank + 1) * share)
        loss, _ = dsm.forward_backward(window[rows, :-1], targets[:, rows], scales, micro)
        if grads is None:  # the first step's, gathered from ZeRO's partitions before the step
            grads = {name: safe_get_full_grad(p).clone() for name, p in dsm.named_parameters()}
        norm, applied = dsm.optimizer_step(loss)
        assert applied
        losses.append(loss)
        grad_norms.append(norm)
        if checkpoint_dir is not None and step == 1:
            dcp.save({"model_optim": dsm.checkpoint_state()}, checkpoint_id=str(checkpoint_dir))
    params = {name: safe_get_full_fp32_param(p).clone() for name, p in dsm.named_parameters()}
    return {"losses": losses, "grad_norms": grad_norms, "params": params, "grads": grads}


MATRIX = {  # name: (zero stage, model overrides, micro batch size, offload, activation ckpt)
    "zero1_n4_transformer_micro1": (1, {"n_future": 4}, 1, False, "none"),
    "zero2_n1_transformer": (2, {"n_future": 1}, 0, False, "none"),
    "zero3_n4_causal_micro1": (3, {"n_future": 4, "head_type": "causal"}, 1, False, "none"),
    "zero3_n1_transformer": (3, {"n_future": 1}, 0, False, "none"),
    "zero2_n4_causal_offload": (2, {"n_future": 4, "head_type": "causal"}, 0, True, "none"),
    "zero3_n2_anticausal_offload": (3, {"n_future": 2, "head_type": "anticausal"}, 0, True, "none"),
    "zero3_n2_linear_full_checkpointing": (3, {"n_future": 2, "head_type": "linear"}, 0, False, "full"),
    "zero2_sequential_d2_micro1": (2, {"n_future": 3, "n_layers": 3, "mtp_kind": "sequential"}, 1, False,
                                   "none"),
}


@pytest.mark.parametrize("name", list(MATRIX))
def test_zero_dp2_matches_single_process(name):
    zero_stage, model, micro, offload, checkpointing = MATRIX[name]
    cfg = tiny_cfg(**model)
    reference = reference_run(cfg, micro=micro)
    results = run_ranks(2, deepspeed_run, cfg, zero_stage=zero_stage, micro=micro, offload=offload,
                        activation_checkpointing=checkpointing)
    for result in results:
        assert_matches(reference, result)


def test_averaged_gradients_are_caught():
    """Negative control: DeepSpeed's default dp-mean of gradients (no loss * dp) halves every
    gradient. AdamW hides most of that from the parameters; the first gradient norm is exactly
    half (later steps drift, clipping included)."""
    cfg = tiny_cfg(n_future=2)
    reference = reference_run(cfg)
    result = run_ranks(2, deepspeed_run, cfg, zero_stage=2, grad_reduction="mean")[0]
    assert_comparison_catches(reference, result)
    ratio = reference["grad_norms"][0] / result["grad_norms"][0]  # same weights at step 1
    assert abs(ratio - 2.0) < 1e-5, ratio


def test_zero3_needs_the_loss_parameters_gathered_for_the_whole_stage():
    """Why build_deepspeed_model registers the heads', norm's and unembedding's parameters as
    external parameters of the stage under ZeRO-3: without it SequentialHeadsLoss records their
    partitioned (empty) shapes and fails loudly (it does not silently lose gradients)."""
    def without_external_parameters(rank, cfg):
        import megatrain.parallel.deepspeed_engine as engine_module
        engine_module.keep_gathered_for_the_loss = lambda _deepspeed, _stage: None
        return runtime_error_of(deepspeed_run, rank, cfg, zero_stage=3, steps=1)
    out = run_ranks(2, without_external_parameters, tiny_cfg(n_future=2))
    assert all("invalid gradient" in o for o in out), out


def test_zero3_checkpoint_resumes_exactly(tmp_path):
    """Save after step 2 (partitioned ZeRO-3, megatrain's DCP layout), load into fresh engines,
    and the remaining steps equal those of the uninterrupted run."""
    cfg = tiny_cfg(n_future=2, head_type="causal")
    straight = run_ranks(2, deepspeed_run, cfg, zero_stage=3, checkpoint_dir=tmp_path / "ckpt")[0]
    resumed = run_ranks(2, deepspeed_run, cfg, zero_stage=3, resume_from=tmp_path / "ckpt")[0]
    assert resumed["losses"] == straight["losses"][2:]
    assert resumed["grad_norms"] == straight["grad_norms"][2:]
    for name, p in straight["params"].items():
        assert torch.equal(resumed["params"][name], p), name


# ---- configuration errors (no processes) ---------------------------------------------------------
@pytest.mark.parametrize("parallel, message", [
    (ParallelConfig(dp=1, tp=2, dp_engine="deepspeed"), "supports data parallelism only"),
    (ParallelConfig(dp=1, pp=2, dp_engine="deepspeed"), "supports data parallelism only"),
    (ParallelConfig(dp=2, dp_engine="deepspeed", zero_stage=1, offload_optimizer=True),
     "needs parallel.zero_stage=2 or 3"),
    (ParallelConfig(dp=2, offload_optimizer=True), "is a DeepSpeed option"),
])
def test_unsupported_combinations_are_refused(parallel, message):
    dims = ParallelDims(parallel.dp, parallel.tp, parallel.pp, parallel.dp * parallel.tp * parallel.pp)
    with pytest.raises(ConfigError, match=message):
        dims.validate(tiny_cfg(), parallel)


def test_a_zero_stage_out_of_range_is_refused_where_every_range_is_checked():
    from megatrain.config import load_config

    with pytest.raises(ConfigError, match=r"parallel.zero_stage=4 is out of range: it must be in \[1, 3\]"):
        load_config(None, ["parallel.dp_engine=deepspeed", "parallel.zero_stage=4"])


# ---- the trainer under torchrun ------------------------------------------------------------------
DEEPSPEED = ["parallel.dp=2", "parallel.dp_engine=deepspeed"]


def _checkpoint(run_dir):
    """The latest checkpoint's model and optimizer entries, read without a process group."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    root = run_dir / "checkpoints"
    state = {}
    latest = root / (root / "latest").read_text().strip()
    _load_state_dict(state, storage_reader=FileSystemReader(str(latest)),
                     planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state["model_optim"]


def test_trainer_zero3_matches_single_process_checkpoint_included(dataset, tmp_path):
    """ZeRO-3 (causal heads, n_future=4, eval on) vs one process: losses, validation, and the
    final checkpoints: same keys, parameters and AdamW state (the DCP layout is shared)."""
    settings = {"model.head_type": "causal", "model.n_future": 4, "train.eval_every": 2}
    single, zero3 = tmp_path / "single", tmp_path / "zero3"
    assert _launch(1, _base(dataset, single, **settings)).returncode == 0
    result = _launch(2, _base(dataset, zero3, **settings) + DEEPSPEED + ["parallel.zero_stage=3"])
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_close(_losses(zero3), _losses(single), rel=1e-6)
    want, got = _checkpoint(single), _checkpoint(zero3)
    for section, tol in (("model", 1e-4), ("optimizer", 1e-6)):
        assert got[section].keys() == want[section].keys()
        for key, value in want[section].items():
            if torch.is_tensor(value):
                err = (got[section][key].float() - value.float()).abs().max().item()
                assert err <= tol, (key, err)
            else:
                assert got[section][key] == value, (key, got[section][key], value)


def test_trainer_deepspeed_resumes_and_reshards(dataset, tmp_path):
    """ZeRO-2 (killed after step 3) -> ZeRO-2 resumes its own checkpoint (killed after 5) ->
    one process finishes, vs. one straight run."""
    settings = {"train.steps": 7, "checkpoint.every": 2}
    straight = tmp_path / "straight"
    assert _launch(1, _base(dataset, straight, **settings)).returncode == 0
    run = tmp_path / "resharded"
    args = _base(dataset, run, **settings)
    zero2 = args + DEEPSPEED + ["parallel.zero_stage=2"]
    first = _launch(2, zero2, kill_after_step=3)
    assert first.returncode != 0 and (run / "checkpoints/latest").read_text().strip() == "step_0000002"
    second = _launch(2, zero2, kill_after_step=5)
    assert "resumed from" in second.stdout, second.stderr[-3000:]
    assert (run / "checkpoints/latest").read_text().strip() == "step_0000004"
    third = _launch(1, args)
    assert third.returncode == 0, third.stderr[-3000:]
    _assert_close(_losses(run), _losses(straight), rel=1e-5)
