"""Tensor parallelism (tp=2, forked gloo ranks) equals the single-process trainer step.

Each case trains 5 AdamW steps (clip 1.0) on the same data from the same seed; losses, gradient
norms and every gathered parameter are compared (parallel_harness.assert_matches).
"""

import pytest

from tests.parallel_harness import (
    assert_comparison_catches,
    assert_matches,
    merged_params,
    parallel_run,
    reference_run,
    run_ranks,
    tiny_cfg,
)

pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("n_future, head_type, sequence_parallel", [
    (1, "transformer", False),
    (4, "transformer", False),
    (4, "causal", False),
    (4, "linear", False),
    (4, "transformer", True),
    (4, "anticausal", True),
    (4, "replicated", True),
])
def test_tp2_matches_single_process(n_future, head_type, sequence_parallel):
    cfg = tiny_cfg(n_future=n_future, head_type=head_type)
    reference = reference_run(cfg)
    results = run_ranks(2, parallel_run, cfg, dp=1, tp=2, pp=1,
                        parallel_kwargs={"sequence_parallel": sequence_parallel})
    for result in results:
        assert_matches(reference, result)
    assert results[0]["losses"] == results[1]["losses"]


def _drop_one_vocab_shard_grad(pm):
    """A wrong gradient: tp rank 1's shard of the unembedding gets no gradient."""
    weight = pm.stages[0].output.weight
    if weight.device_mesh.get_local_rank() == 1:
        weight.grad.to_local().zero_()


def test_tp2_comparison_catches_a_wrong_shard_gradient():
    cfg = tiny_cfg(n_future=2)
    reference = reference_run(cfg)
    result = run_ranks(2, parallel_run, cfg, dp=1, tp=2, pp=1, corrupt=_drop_one_vocab_shard_grad)[0]
    assert_comparison_catches(reference, result)


def test_tp_shards_are_local_and_vocab_parallel():
    """Parameters really are split: the local unembedding shard is [V/tp, D]."""
    def shapes(rank, cfg):
        from megatrain.parallel import ParallelConfig, ParallelDims, parallelize_mtp
        from tests.parallel_harness import build_model
        dims = ParallelDims(1, 2, 1, 2)
        pm = parallelize_mtp(build_model(cfg), dims, dims.build_mesh("cpu"), ParallelConfig(tp=2))
        stage = pm.stages[0]
        return {"output": tuple(stage.output.weight.to_local().shape),
                "embedding": tuple(stage.tok_embeddings.weight.to_local().shape),
                "wq": tuple(stage.layers["0"].attention.wq.weight.to_local().shape),
                "head_w2": tuple(stage.extra_heads[0].feed_forward.w2.weight.to_local().shape)}
    cfg = tiny_cfg()
    got = run_ranks(2, shapes, cfg)[0]
    hidden = 96  # ffn_hidden_dim for dim=32, multiple_of=16
    assert got == {"output": (48, 32), "embedding": (48, 32), "wq": (16, 32), "head_w2": (32, hidden // 2)}


def test_replicated_unembeddings_on_tp2_pp2_and_fsdp_dp2_match_single_process():
    """head_type=replicated: every head's own unembedding on the last stage, vocabulary-sharded
    under tp like ``output``; FSDP2 shards them like the rest of the root unit."""
    cfg = tiny_cfg(n_layers=3, n_future=3, head_type="replicated")
    reference = reference_run(cfg)
    results = run_ranks(4, parallel_run, cfg, dp=1, tp=2, pp=2,
                        parallel_kwargs={"pp_schedule": "1f1b", "microbatches": 4})
    merged = {**results[0], "params": merged_params(results), "grads": merged_params(results, "grads")}
    assert {"extra_outputs.0.weight", "extra_outputs.1.weight"} <= set(merged["params"])
    last_stage = [r for r in results if "extra_outputs.1.weight" in r["owned"]]
    assert len(last_stage) == 2 and all("output.weight" in r["owned"] for r in last_stage)  # two tp ranks
    for r in results:
        assert_matches(reference, {**merged, "losses": r["losses"], "grad_norms": r["grad_norms"]})
    for r in run_ranks(2, parallel_run, cfg, dp=2, tp=1, pp=1):
        assert_matches(reference, r)
