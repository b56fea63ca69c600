"""FSDP2 data parallelism (dp=2), alone and with TP, and the 3-D dp2·tp2·pp2 layout.

The global batch is split over dp ranks; head_scales are computed over the global batch, and
FSDP sums (not averages) gradients, so every step must equal the single-process trainer's.
"""

import pytest

from tests.marks import needs_split_backward
from tests.parallel_harness import (
    assert_comparison_catches,
    assert_matches,
    batches,
    merged_params,
    parallel_run,
    reference_run,
    run_ranks,
    runtime_error_of,
    tiny_cfg,
)

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("head_type, micro", [("transformer", 1), ("causal", 0)])
def test_fsdp_dp2_matches_single_process(head_type, micro):
    cfg = tiny_cfg(head_type=head_type)
    reference = reference_run(cfg)
    for result in run_ranks(2, parallel_run, cfg, dp=2, tp=1, pp=1, micro=micro):
        assert_matches(reference, result)


def test_fsdp_heads_as_their_own_units_break_the_sequential_heads_node():
    """Why apply_fsdp keeps every head in the root unit: a head wrapped as its own FSDP unit is
    resharded right after its forward *inside* SequentialHeadsLoss, and the node's own CE and
    backward then meet sharded parameters. It fails loudly (it does not silently lose grads)."""
    def heads_as_units(rank, cfg):
        from torch.distributed.fsdp import fully_shard

        import megatrain.parallel.parallelize as pm_module
        from megatrain.parallel.data_parallel import apply_fsdp

        def shard_heads_separately(stage, dp_mesh, **kwargs):
            for i in range(stage.n_future):
                fully_shard(stage.head_module(i), mesh=dp_mesh)
            return apply_fsdp(stage, dp_mesh, **kwargs)
        pm_module.apply_fsdp = shard_heads_separately
        return runtime_error_of(parallel_run, rank, cfg, dp=2, tp=1, pp=1, steps=1)
    out = run_ranks(2, heads_as_units, tiny_cfg(n_future=2))
    assert all("mixed torch.Tensor and DTensor" in o for o in out), out


def test_fsdp_dp2_with_tp2_matches_single_process():
    cfg = tiny_cfg()
    reference = reference_run(cfg)
    results = run_ranks(4, parallel_run, cfg, dp=2, tp=2, pp=1, micro=1,
                        parallel_kwargs={"sequence_parallel": True})
    for result in results:
        assert_matches(reference, result)


@pytest.mark.slow
def test_dp2_tp2_pp2_matches_single_process():
    cfg = tiny_cfg(n_layers=7)
    reference = reference_run(cfg)
    results = run_ranks(8, parallel_run, cfg, dp=2, tp=2, pp=2,
                        parallel_kwargs={"pp_schedule": "1f1b", "microbatches": 2})
    params = merged_params(results)
    assert sorted(params) == sorted(reference["params"])
    for r in results:
        assert_matches(reference, {**r, "params": params, "grads": merged_params(results, "grads")})


@pytest.mark.slow
@needs_split_backward
def test_dp2_pp2_zero_bubble_matches_single_process():
    """FSDP with a zero-bubble schedule: the heads' backward runs as an input pass, then a weight
    pass; their gradient set (shared by the microbatches) must reach the weight pass once."""
    cfg = tiny_cfg(n_layers=8, n_future=2)
    reference = reference_run(cfg, data=batches(cfg, batch=8))
    results = run_ranks(4, parallel_run, cfg, dp=2, tp=1, pp=2, batch=8,
                        parallel_kwargs={"pp_schedule": "zbv", "microbatches": 4})
    params = merged_params(results)
    assert sorted(params) == sorted(reference["params"])
    for r in results:
        assert_matches(reference, {**r, "params": params, "grads": merged_params(results, "grads")})


def _average_instead_of_sum(pm):
    """A wrong gradient scale: what FSDP's default (average over dp) would give."""
    for p in pm.parameters():
        if p.grad is not None:
            p.grad.div_(2)


def test_fsdp_comparison_catches_averaged_gradients():
    # AdamW is scale invariant: the loss moves only through clipping; the gradient norms always catch it.
    cfg = tiny_cfg(n_future=2)
    reference = reference_run(cfg)
    result = run_ranks(2, parallel_run, cfg, dp=2, tp=1, pp=1, corrupt=_average_instead_of_sum)[0]
    assert_comparison_catches(reference, result)
