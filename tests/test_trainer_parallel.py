"""The trainer under torchrun: every layout matches one process; checkpoints reshard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.marks import needs_split_backward
from tests.test_trainer import REPO, _overrides

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LAYOUTS = {  # name: (processes, overrides)
    "dp2": (2, ["parallel.dp=2"]),
    "tp2": (2, ["parallel.tp=2"]),
    "pp2_1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "tp2_pp2_sp": (4, ["parallel.tp=2", "parallel.pp=2", "parallel.pp_schedule=gpipe",
                       "parallel.sequence_parallel=true"]),
}


def _base(dataset, run_dir, **extra):
    # Cross-document masking on: data-parallel ranks then hold different numbers of valid targets
    # per head, which the trainer's all-reduced counts must normalise as one process would.
    settings = {"model.n_layers": 5, "model.n_future": 3, "model.n_heads": 4, "train.steps": 4,
                "train.eval_every": 0, "checkpoint.every": 0, "train.micro_batch_size": 2,
                "loss.mask_cross_document": True}
    settings.update(extra)
    return _overrides(dataset, run_dir, **settings)


def _launch(nproc, args, kill_after_step=None):
    """``megatrain train`` on ``nproc`` ranks; SIGKILLed once ``kill_after_step`` is done, if set."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    entry = ["megatrain"] if kill_after_step is None else ["tests.kill_after_step", str(kill_after_step)]
    if nproc == 1:
        cmd = [sys.executable, "-m", *entry, "train", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", *entry, "train", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def _losses(run_dir):
    records = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["head_losses"]) for r in records if "loss" in r]


def _assert_close(got, want, rel):
    assert [s for s, *_ in got] == [s for s, *_ in want]
    for (step, loss, heads), (_, ref_loss, ref_heads) in zip(got, want):
        assert abs(loss - ref_loss) <= rel * abs(ref_loss), (step, loss, ref_loss)
        for h, r in zip(heads, ref_heads):
            assert abs(h - r) <= rel * abs(r), (step, heads, ref_heads)


@pytest.fixture(scope="module")
def single_process_run(dataset, tmp_path_factory):
    run = tmp_path_factory.mktemp("single")
    result = _launch(1, _base(dataset, run))
    assert result.returncode == 0, result.stderr[-3000:]
    return _losses(run)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layout_matches_single_process(layout, dataset, single_process_run, tmp_path):
    nproc, extra = LAYOUTS[layout]
    result = _launch(nproc, _base(dataset, tmp_path / "run") + extra)
    assert result.returncode == 0, result.stderr[-3000:]
    _assert_close(_losses(tmp_path / "run"), single_process_run, rel=1e-6)


def test_bad_layout_is_refused_on_every_rank_before_any_collective(dataset, tmp_path):
    result = _launch(2, _base(dataset, tmp_path / "run") + ["parallel.tp=3"])
    assert result.returncode != 0
    assert result.stderr.count("parallel.dp * parallel.tp * parallel.pp") >= 2, result.stderr[-3000:]
    assert not (tmp_path / "run").exists()


def test_checkpoints_reshard_across_layouts(dataset, tmp_path):
    """tp2*pp2 (killed after step 3) -> dp2 (killed after 5) -> 1 process, vs. one straight run."""
    settings = {"train.steps": 7, "checkpoint.every": 2}
    straight = tmp_path / "straight"
    assert _launch(1, _base(dataset, straight, **settings)).returncode == 0
    run = tmp_path / "resharded"
    args = _base(dataset, run, **settings)
    first = _launch(4, args + ["parallel.tp=2", "parallel.pp=2"], kill_after_step=3)
    assert first.returncode != 0 and (run / "checkpoints/latest").read_text().strip() == "step_0000002"
    # async checkpoints here: step 4's save is published once written (normally before the
    # kill at step 5; if the write is slower, the resume starts from step 2 instead)
    second = _launch(2, args + ["parallel.dp=2", "checkpoint.async_save=true"],
                     kill_after_step=5)
    assert "resumed from" in second.stdout, second.stderr[-3000:]
    assert (run / "checkpoints/latest").read_text().strip() in ("step_0000002", "step_0000004")
    third = _launch(1, args)
    assert third.returncode == 0, third.stderr[-3000:]
    _assert_close(_losses(run), _losses(straight), rel=1e-5)


def test_sequential_modules_reshard_from_tp2_pp2_to_one_process(dataset, tmp_path):
    """The sequential kind (D = 2 depths on the last stage, their token embeddings handed over
    from the first): tp2*pp2 killed after step 3 resumes on one process like one straight run."""
    settings = {"train.steps": 5, "checkpoint.every": 2, "model.mtp_kind": "sequential",
                "model.n_layers": 3}
    straight = tmp_path / "straight"
    assert _launch(1, _base(dataset, straight, **settings)).returncode == 0
    run = tmp_path / "resharded"
    args = _base(dataset, run, **settings)
    first = _launch(4, args + ["parallel.tp=2", "parallel.pp=2"], kill_after_step=3)
    assert first.returncode != 0 and (run / "checkpoints/latest").read_text().strip() == "step_0000002"
    second = _launch(1, args)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    _assert_close(_losses(run), _losses(straight), rel=1e-5)


def test_validation_runs_under_pipeline_parallelism(dataset, single_process_run, tmp_path):
    """Validation through the schedule's forward-only step equals the single-process one."""
    args = ["train.eval_every=2", "data.val_batches=2"]
    ref, run = tmp_path / "ref", tmp_path / "pp"
    assert _launch(1, _base(dataset, ref) + args).returncode == 0
    result = _launch(2, _base(dataset, run) + args + ["parallel.pp=2", "parallel.pp_schedule=gpipe"])
    assert result.returncode == 0, result.stderr[-3000:]

    def evals(path):
        return [json.loads(x)["val_head_losses"] for x in (path / "metrics.jsonl").read_text().splitlines()
                if "val_head_losses" in x]

    got, want = evals(run), evals(ref)
    assert len(got) == len(want) == 2
    for g, w in zip(got, want):
        assert all(abs(a - b) <= 1e-6 * abs(b) for a, b in zip(g, w)), (g, w)


@needs_split_backward
def test_two_stages_per_rank_match_and_their_checkpoints_reshard(dataset, tmp_path):
    """ZB-V and interleaved 1F1B hold 2 stages per rank: losses match one process, and a ZB-V
    checkpoint (two model parts, two optimizers per rank) resumes on one process."""
    settings = {"model.n_layers": 7, "train.steps": 6, "train.micro_batch_size": 1,
                "checkpoint.every": 2}
    ref = tmp_path / "ref"
    assert _launch(1, _base(dataset, ref, **settings)).returncode == 0
    for schedule in ("zbv", "interleaved_1f1b"):
        run = tmp_path / schedule
        result = _launch(2, _base(dataset, run, **settings) + [
            "parallel.pp=2", f"parallel.pp_schedule={schedule}", "parallel.microbatches=4"])
        assert result.returncode == 0, result.stderr[-3000:]
        _assert_close(_losses(run), _losses(ref), rel=1e-6)
    resumed = tmp_path / "zbv_then_single"
    args = _base(dataset, resumed, **settings)
    first = _launch(2, args + ["parallel.pp=2", "parallel.pp_schedule=zbv", "parallel.microbatches=4"],
                    kill_after_step=3)
    assert first.returncode != 0 and (resumed / "checkpoints/latest").read_text().strip() == "step_0000002"
    second = _launch(1, args)
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    _assert_close(_losses(resumed), _losses(ref), rel=1e-5)
