"""The planner's predicted peak of every rank against ``megatrain profile memory``'s measurement.

Issue: for the layouts below the predicted peak of every rank is within 10% of the measured one
(CPU, float32: the profiler counts live tensor bytes exactly). The measurements run once per
module: the single-process layouts in this process, the 2-rank ones in one torchrun launch, the
4-rank one in another (tests/planner_measurements.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatrain.config import load_config
from megatrain.planning.memory_model import plan_layout
from megatrain.spec import resolve
from tests.planner_measurements import COMMON
from tests.test_trainer import REPO

# one worker: the module fixture measures every layout (~90 s), which a second worker would repeat
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("planner_measurements")]
TOLERANCE = 0.10

SINGLE = {
    "n1": ["model.n_layers=5", "model.n_future=1"],
    "n2": ["model.n_layers=6", "model.n_future=2"],
    "n4": ["model.n_layers=6", "model.n_future=4"],
    "n8_linear": ["model.n_layers=4", "model.n_future=8", "model.head_type=linear"],
    "checkpoint_full": ["model.n_layers=6", "model.n_future=2", "parallel.activation_checkpointing=full"],
    "checkpoint_selective": ["model.n_layers=6", "model.n_future=2",
                             "parallel.activation_checkpointing=selective"],
    "sequential_d3": ["model.n_layers=3", "model.n_future=4", "model.mtp_kind=sequential"],
}
TWO_RANKS = {
    "fsdp_dp2": ["model.n_layers=6", "parallel.dp=2"],
    "zero2_dp2": ["model.n_layers=6", "parallel.dp=2", "parallel.dp_engine=deepspeed",
                  "parallel.zero_stage=2"],
    "zero3_dp2": ["model.n_layers=6", "parallel.dp=2", "parallel.dp_engine=deepspeed",
                  "parallel.zero_stage=3"],
    "tp2": ["model.n_layers=6", "parallel.tp=2"],
    "tp2_sp": ["model.n_layers=6", "parallel.tp=2", "parallel.sequence_parallel=true"],
    "pp2_gpipe": ["model.n_layers=7", "model.n_future=2", "parallel.pp=2", "parallel.pp_schedule=gpipe"],
    "pp2_1f1b": ["model.n_layers=7", "model.n_future=2", "parallel.pp=2", "parallel.pp_schedule=1f1b",
                 "parallel.microbatches=4"],
    "pp2_zbv": ["model.n_layers=8", "model.n_future=2", "parallel.pp=2", "parallel.pp_schedule=zbv"],
    "pp2_1f1b_sequential_d3": ["model.n_layers=4", "model.n_future=4", "model.mtp_kind=sequential",
                               "parallel.pp=2", "parallel.pp_schedule=1f1b", "parallel.microbatches=4"],
}
FOUR_RANKS = {
    "tp2_pp2": ["model.n_layers=7", "model.n_future=2", "parallel.tp=2", "parallel.pp=2",
                "parallel.pp_schedule=1f1b"],
}


def _launch(nproc: int, out, dataset, layouts: dict) -> None:
    args = [f"{name}={','.join(overrides)}" for name, overrides in layouts.items()]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "tests" / "planner_measurements.py"), str(out), str(dataset), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def measured(dataset, tmp_path_factory):
    from tests.planner_measurements import main as measure_here

    out = tmp_path_factory.mktemp("planner_measurements")
    measure_here([str(out), str(dataset), *(f"{n}={','.join(o)}" for n, o in SINGLE.items())])
    _launch(2, out, dataset, TWO_RANKS)
    _launch(4, out, dataset, FOUR_RANKS)
    return {name: json.loads((out / f"{name}.json").read_text())
            for name in (*SINGLE, *TWO_RANKS, *FOUR_RANKS)}


def _planned(dataset, overrides) -> list[int]:
    cfg = load_config(None, [*COMMON, f"data.path={dataset}", *overrides])
    return [r.peak_bytes for r in plan_layout(resolve(cfg))]


@pytest.mark.parametrize("name", [*SINGLE, *TWO_RANKS, *FOUR_RANKS])
def test_predicted_peak_of_every_rank_is_within_10_percent_of_the_measured(measured, dataset, name):
    overrides = {**SINGLE, **TWO_RANKS, **FOUR_RANKS}[name]
    planned = _planned(dataset, overrides)
    ranks = measured[name]["ranks"]
    assert len(ranks) == len(planned)
    report = [f"rank {r['rank']}: measured {r['peak_bytes']:,} planned {planned[r['rank']]:,} "
              f"({planned[r['rank']] / r['peak_bytes'] - 1:+.1%})" for r in ranks]
    for r in ranks:
        assert abs(planned[r["rank"]] / r["peak_bytes"] - 1) <= TOLERANCE, "\n".join(report)


def test_the_comparison_catches_a_plan_of_another_layout(measured, dataset):
    """Negative control: planning GPipe where 1F1B ran (other microbatches in flight), or the
    sequential heads' layout for a model with twice the batch, misses by more than 10%."""
    wrong = _planned(dataset, [*TWO_RANKS["pp2_1f1b"][:-2], "parallel.pp_schedule=gpipe",
                               "parallel.microbatches=8", "train.micro_batch_size=1"])
    ranks = measured["pp2_1f1b"]["ranks"]
    assert any(abs(wrong[r["rank"]] / r["peak_bytes"] - 1) > TOLERANCE for r in ranks)
    doubled = _planned(dataset, [*SINGLE["n4"], "train.batch_size=16"])
    assert abs(doubled[0] / measured["n4"]["ranks"][0]["peak_bytes"] - 1) > TOLERANCE
