"""Sequential MTP modules (model.mtp_kind=sequential) on every layout the parallel heads run on:
tp2 (with and without sequence parallelism), pp2 under each schedule (the depths' token embeddings
travel from the first stage to the last with the hidden state, and their gradient back), dp2 FSDP,
tp2 x pp2 and dp2 x pp2 with uneven masking, each equal to one process (forked gloo ranks); and a
negative control."""

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
    tiny_cfg,
)

pytestmark = pytest.mark.distributed

# 3 trunk layers (4 stages for V-shaped and interleaved schedules need 3) and D = 2 depths
CFG = dict(n_layers=3, n_future=3, mtp_kind="sequential")


def _merged(results):
    return {**results[0], "params": merged_params(results), "grads": merged_params(results, "grads")}


@pytest.fixture(scope="module")
def reference():
    return reference_run(tiny_cfg(**CFG))


@pytest.mark.parametrize("sequence_parallel", [False, True], ids=["tp2", "tp2_sp"])
def test_tp2_matches_single_process(reference, sequence_parallel):
    results = run_ranks(2, parallel_run, tiny_cfg(**CFG), dp=1, tp=2, pp=1,
                        parallel_kwargs={"sequence_parallel": sequence_parallel})
    for r in results:
        assert_matches(reference, r)


@pytest.mark.parametrize("schedule", ["gpipe", "1f1b", "interleaved_1f1b",
                                      pytest.param("zbv", marks=needs_split_backward),
                                      pytest.param("dualpipev", marks=needs_split_backward)])
def test_pp2_schedule_matches_single_process(schedule, reference):
    results = run_ranks(2, parallel_run, tiny_cfg(**CFG), dp=1, tp=1, pp=2,
                        parallel_kwargs={"pp_schedule": schedule, "microbatches": 4})
    merged = _merged(results)
    assert sorted(merged["params"]) == sorted(reference["params"])  # every parameter, once
    for r in results:
        assert_matches(reference, {**merged, "losses": r["losses"], "grad_norms": r["grad_norms"]})
    # every depth on the last stage; the embedding only on the first (no copy of it)
    holders = {name: [i for i, r in enumerate(results) if name in r["owned"]]
               for name in ("tok_embeddings.weight", "mtp.0.eh_proj.weight", "mtp.1.norm.weight")}
    assert all(len(ranks) == 1 for ranks in holders.values()), holders


def test_fsdp_dp2_and_tp2_pp2_match_single_process(reference):
    fsdp = run_ranks(2, parallel_run, tiny_cfg(**CFG), dp=2, tp=1, pp=1)
    for r in fsdp:
        assert_matches(reference, r)
    results = run_ranks(4, parallel_run, tiny_cfg(**CFG), dp=1, tp=2, pp=2,
                        parallel_kwargs={"pp_schedule": "1f1b", "microbatches": 4})
    merged = _merged(results)
    for r in results:
        assert_matches(reference, {**merged, "losses": r["losses"], "grad_norms": r["grad_norms"]})


def test_uneven_masking_over_data_parallel_ranks_gives_one_processs_gradient(monkeypatch):
    """Each depth's loss is a mean over the tokens it predicts in the *global* batch: ranks whose
    rows hold different numbers of valid targets (here, rows cut short by an EOS under
    cross-document masking) must still produce one process's gradient."""
    import tests.parallel_harness as harness
    from megatrain.mtp_loss import build_head_targets

    cfg = tiny_cfg(**CFG)
    data = batches(cfg)
    for window in data:  # rank 0's rows: an end of document early; rank 1's: none
        window[:2, 3] = 0

    def masked_targets(cfg_, window):
        targets = build_head_targets(window, cfg_.n_future, -100, eos_id=0, mask_cross_document=True)
        counts = (targets != -100).flatten(1).sum(1)
        return targets, harness.head_scales(counts, [1.0] * cfg_.n_future)

    monkeypatch.setattr(harness, "_targets", masked_targets)
    monkeypatch.setattr(harness, "batches", lambda *a, **k: data)
    reference = reference_run(cfg, data=data)
    targets = masked_targets(cfg, data[0])[0]
    per_rank = [int((targets[:, :2] != -100).sum()), int((targets[:, 2:] != -100).sum())]
    assert per_rank[0] < per_rank[1], per_rank  # the ranks really hold different numbers of targets
    for r in run_ranks(2, parallel_run, cfg, dp=2, tp=1, pp=1):
        assert_matches(reference, r)


def test_comparison_catches_a_wrong_depth_embedding_gradient(reference):
    """Negative control: the depths' token-embedding gradient halved on its way back (as a
    pipeline that dropped the microbatches' second half of it would) is caught."""

    def halve_embedding_grad(pm):
        for stage in pm.stages:
            if getattr(stage, "tok_embeddings", None) is not None:
                stage.tok_embeddings.weight.grad.mul_(0.5)

    results = run_ranks(2, parallel_run, tiny_cfg(**CFG), dp=1, tp=1, pp=2, corrupt=halve_embedding_grad,
                        parallel_kwargs={"pp_schedule": "1f1b", "microbatches": 4})
    assert_comparison_catches(reference, _merged(results))
