"""Data preparation stages as SLURM array jobs (datatrove's SlurmPipelineExecutor) on the local
cluster: dependency order, stats, and a failing stage reported with its logs."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatrain.errors import DataError

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

pytest.importorskip("datatrove")
REPO = Path(__file__).resolve().parents[1]

from megatrain.slurm.data import SlurmDataOptions, SlurmStageRunner, Stage, launch_stage_chain, wait_for_stage  # noqa: E402


@pytest.fixture(autouse=True)
def importable_tests(monkeypatch):
    """dill pickles these steps by reference to this module: the jobs (which inherit the submitting
    environment) must be able to import it."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))


def _writer(folder: str):
    def write_rank(data, rank, world_size):
        Path(folder, f"part_{rank}").write_text(f"{rank}/{world_size}")
        return data
    return write_rank


def _joiner(folder: str, expected_parts: int):
    def join_parts(data, rank, world_size):
        parts = sorted(Path(folder).glob("part_*"))
        assert len(parts) == expected_parts, f"ran before its dependency: {parts}"
        Path(folder, "joined").write_text(",".join(p.read_text() for p in parts))
        return data
    return join_parts


def _failing(data, rank, world_size):
    raise ValueError(f"task {rank} fails on purpose")


def test_stage_chain_runs_each_stage_after_the_previous_one(slurm_cluster, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    options = SlurmDataOptions(partition=slurm_cluster.second_partition, time_min=5, mem_per_cpu_gb=1)
    stages = [Stage("write", [_writer(str(out))], 2, str(tmp_path / "logs" / "write")),
              Stage("join", [_joiner(str(out), 2)], 1, str(tmp_path / "logs" / "join"))]
    job_ids = launch_stage_chain(stages, options)
    assert len(set(job_ids)) == 2, job_ids
    for job_id, stage in zip(job_ids, stages):
        wait_for_stage(job_id, stage.name, stage.logging_dir, stage.tasks, poll_s=1, timeout_s=180)
    assert (out / "joined").read_text() == "0/2,1/2"


def test_stage_runner_waits_for_each_stage_and_reports_a_failed_one_with_its_logs(slurm_cluster, tmp_path):
    runner = SlurmStageRunner(SlurmDataOptions(partition=slurm_cluster.partition, time_min=5,
                                               mem_per_cpu_gb=1), poll_s=1, timeout_s=180)
    logs = tmp_path / "logs"
    out = tmp_path / "out"
    out.mkdir()
    stats = runner("write", [_writer(str(out))], tasks=2, logs=logs)
    assert sorted(p.name for p in out.iterdir()) == ["part_0", "part_1"]
    assert isinstance(stats, dict) and "write" in runner.job_ids  # per step: metric totals
    with pytest.raises(DataError, match=rf"data stage boom failed on SLURM: task\(s\) 0 did not complete "
                                        rf"\(job \d+: [^)]*\); task logs in {logs}/boom/logs"):
        runner("boom", [_failing], tasks=1, logs=logs)
    assert "fails on purpose" in "".join(p.read_text() for p in (logs / "boom" / "logs").glob("task_*.log"))
    # datatrove's merge_stats job waits on the failed stage: cancelled, not left pending forever
    waiting = slurm_cluster.run("squeue", "-h", "-t", "PD", "-o", "%E")
    assert f":{runner.job_ids['boom']}_" not in waiting, waiting


def test_prepare_dataset_with_every_stage_on_slurm_equals_a_local_prepare(slurm_cluster, tmp_path,
                                                                           monkeypatch):
    """The data pipeline's own stages through SlurmStageRunner (standing in for the hook
    ``megatrain data prepare --executor slurm`` will use): same dataset as a local prepare."""
    import megatrain.data_pipelines.prepare as prepare
    import megatrain.data_pipelines.stages as stages

    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"module_{i}.py").write_text(f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * (2 + i))
    local = prepare.prepare_dataset(src, tmp_path / "local", tokenizer="bytes", tasks=2, progress=False)
    runner = SlurmStageRunner(SlurmDataOptions(partition=slurm_cluster.partition, time_min=5,
                                               mem_per_cpu_gb=1), poll_s=1, timeout_s=180)
    monkeypatch.setattr(stages, "run_local_stage", runner)
    on_slurm = prepare.prepare_dataset(src, tmp_path / "slurm", tokenizer="bytes", tasks=2, progress=False)
    assert len(runner.job_ids) == 7, runner.job_ids  # every stage of prepare, one array job each
    for key in ("splits", "vocab_size", "eos_id"):
        assert on_slurm[key] == local[key], key
    assert {k: v for k, v in on_slurm["stats"].items() if k != "seconds"} == {
        k: v for k, v in local["stats"].items() if k != "seconds"}
    for split in ("train", "val"):
        for a in sorted((tmp_path / "local" / split).iterdir()):
            assert a.read_bytes() == (tmp_path / "slurm" / split / a.name).read_bytes(), a.name
