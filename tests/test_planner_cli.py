"""``megatrain plan``: its verdict, exit statuses, JSON, suggestions and refusals of bad input."""

from __future__ import annotations

import json

import pytest

from megatrain.cli import main
from megatrain.config import load_config
from megatrain.planning.plan import make_plan, suggestions
from megatrain.planning.schedules import occupancy, rank_actions

# data the cluster holds and this host does not: the vocabulary stands as given
TINY = ["model.vocab_size=512", "data.path=/cluster/data/tiny", "model.dim=64", "model.n_layers=6",
        "model.n_future=2", "data.seq_len=64", "train.batch_size=8", "train.device=cpu"]


def _plan_json(capsys, *args) -> tuple[int, dict]:
    code = main(["plan", "--json", *args])
    return code, json.loads(capsys.readouterr().out)


def test_fits_exits_0_and_reports_every_rank(capsys):
    code, plan = _plan_json(capsys, "--world-size", "4", "--device-memory-gb", "80", *TINY,
                            "parallel.pp=2", "parallel.pp_schedule=gpipe")
    assert code == 0 and plan["fits"] is True
    assert [r["rank"] for r in plan["ranks"]] == [0, 1, 2, 3]  # dp filled in from the world size
    stages = {r["rank"]: r["stage"] for r in plan["ranks"]}
    assert stages == {0: 0, 1: 1, 2: 0, 3: 1}  # mesh (dp, pp, tp): pp is the inner axis here
    heads_rank = plan["ranks"][1]
    assert any(name.startswith("heads") for name in heads_rank["breakdown"])
    assert not any(name.startswith("heads") for name in plan["ranks"][0]["breakdown"])
    for r in plan["ranks"]:
        assert r["peak_bytes"] == sum(r["breakdown"].values()) == r["allocated_peak_bytes"]  # CPU target


def test_does_not_fit_exits_1_and_names_changes_that_would(capsys):
    code = main(["plan", "--world-size", "1", "--device-memory-gb", "0.02", *TINY])  # options first:
    # argparse takes the overrides as one run of positionals
    out = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in out and "changes that would fit" in out
    assert "activation checkpointing" in out or "microbatch" in out


def test_suggested_changes_really_fit():
    cfg = load_config(None, TINY)
    plan = make_plan(cfg, device_memory_gb=0.02, world_size=1)
    assert not plan.fits
    fixes = suggestions(plan)
    assert fixes, "expected at least one single change that fits"
    for fix in fixes:
        assert fix.overrides and all("=" in o for o in fix.overrides), fix  # keys the user can paste
        assert fix.peak_bytes <= plan.device_memory_bytes, fix
        changed = make_plan(load_config(None, [*TINY, *fix.overrides]), device_memory_gb=0.02, world_size=1)
        assert changed.fits and changed.peak_bytes == fix.peak_bytes, fix


def test_json_report_lists_the_suggestions_with_their_keys(capsys):
    code = main(["plan", "--world-size", "1", "--device-memory-gb", "0.02", "--json", *TINY])
    report = json.loads(capsys.readouterr().out)
    assert code == 1 and not report["fits"] and report["suggestions"]
    limit = report["device_memory_bytes"]
    assert all(s["overrides"] and s["peak_bytes"] <= limit for s in report["suggestions"])
    assert main(["plan", "--world-size", "1", "--json", *TINY]) == 0  # control: fits, nothing suggested
    assert json.loads(capsys.readouterr().out)["suggestions"] == []


@pytest.mark.parametrize("args, message", [
    (["parallel.tp=3"], "parallel.tp=3 must divide model.n_heads"),
    (["parallel.dp=4", "--world-size", "6"], "or use 4 processes"),
    (["model.vocab_size=0", "data.path=/nonexistent/ds"], "/nonexistent/ds is not a prepared dataset"),
])
def test_bad_input_exits_2_naming_the_key(capsys, args, message):
    code = main(["plan", *TINY, *args])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err


def test_the_default_config_plans_like_train_resolves_it(capsys, tmp_path):
    """`megatrain train` with no arguments trains on the embedded corpus (vocabulary 4096); `plan`
    of the same config plans that model, without building the corpus."""
    cache = tmp_path / "cache"
    code, plan = _plan_json(capsys, f"data.cache_dir={cache}", "train.device=cpu")
    assert code == 0 and plan["fits"] is True
    assert not cache.exists()  # nothing built
    resolved = make_plan(load_config(None, [f"data.cache_dir={cache}"]), 80, world_size=1)
    assert resolved.cfg.model.vocab_size == 4096


def test_gpu_target_adds_the_cuda_allowance():
    cpu = make_plan(load_config(None, TINY), 80, world_size=1)
    gpu = make_plan(load_config(None, [*TINY, "train.device=cuda", "train.dtype=fp32"]), 80, world_size=1)
    assert gpu.ranks[0].peak_bytes == cpu.ranks[0].peak_bytes  # same dtypes: same allocations
    assert gpu.peak_bytes > cpu.peak_bytes + (1 << 30) - 1  # plus the context and fragmentation


def _most_held(actions) -> dict[int, int]:
    most: dict[int, int] = {}
    for moment in occupancy(actions):
        for stage, n in moment.holding.items():
            most[stage] = max(most.get(stage, 0), n)
    return most


def test_schedules_keep_the_microbatches_they_should_in_flight():
    # GPipe: every microbatch's forward before any backward
    assert _most_held(rank_actions("gpipe", 4, 0, 8, 1)) == {0: 8}
    # 1F1B: pp - rank warm-up forwards, capped by the microbatches
    assert [_most_held(rank_actions("1f1b", 4, r, 8, 1))[r] for r in range(4)] == [4, 3, 2, 1]
    assert _most_held(rank_actions("1f1b", 4, 0, 2, 1)) == {0: 2}
    # torch's own programs: every microbatch runs forward and backward once on each local stage
    for schedule, stages in (("zbv", (0, 3)), ("dualpipev", (0, 3)), ("interleaved_1f1b", (0, 2))):
        actions = rank_actions(schedule, 2, 0, 4, 2)
        for stage in stages:
            forwards = sorted(a.microbatch for a in actions if a.stage == stage and a.kind == "F")
            backwards = sorted(a.microbatch for a in actions if a.stage == stage and a.kind in "BI")
            assert forwards == backwards == [0, 1, 2, 3], (schedule, stage, actions)
    # Negative control: a schedule we do not model is refused, not guessed
    with pytest.raises(ValueError):
        rank_actions("looped_bfs", 2, 0, 4, 1)


def test_more_microbatches_in_flight_cost_more_on_the_first_stage():
    gpipe = make_plan(load_config(None, [*TINY, "parallel.pp=2", "parallel.pp_schedule=gpipe",
                                         "parallel.microbatches=8"]), 80, world_size=2)
    one_f_one_b = make_plan(load_config(None, [*TINY, "parallel.pp=2", "parallel.pp_schedule=1f1b",
                                               "parallel.microbatches=8"]), 80, world_size=2)
    assert gpipe.ranks[0].breakdown["activations: trunk layers"] == \
        4 * one_f_one_b.ranks[0].breakdown["activations: trunk layers"]  # 8 vs 2 in flight


def test_zero_offload_takes_the_optimizer_state_off_the_device():
    base = [*TINY, "parallel.dp_engine=deepspeed", "parallel.zero_stage=2"]
    on_device = make_plan(load_config(None, base), 80, world_size=2).ranks[0].breakdown
    offloaded = make_plan(load_config(None, [*base, "parallel.offload_optimizer=true"]), 80,
                          world_size=2).ranks[0].breakdown
    assert on_device["optimizer: AdamW moments"] > 0 and "deepspeed: fp32 master partition" in on_device
    assert "optimizer: AdamW moments" not in offloaded and "deepspeed: fp32 master partition" not in offloaded


def test_sequential_modules_under_pipelining_plan_the_embeddings_they_are_handed(capsys):
    """The depths' token embeddings travel with the hidden state between stages: each microbatch a
    stage holds keeps D x micro x T x dim float32 of them (here 2 x 4 x 64 x 64 x 4 bytes)."""
    part = "activations: the depths' token embeddings, handed between stages"
    layout = ["--world-size", "2", *TINY, "model.n_layers=4", "model.n_future=3", "parallel.pp=2",
              "parallel.pp_schedule=gpipe"]
    _, sequential = _plan_json(capsys, *layout, "model.mtp_kind=sequential")
    first = sequential["ranks"][0]["breakdown"]
    assert first[part] == 2 * (2 * 4 * 64 * 64 * 4), first  # GPipe: both microbatches held at the peak
    _, parallel = _plan_json(capsys, *layout)
    assert not parallel["ranks"][0]["breakdown"].get(part)
