"""End-to-end tests of the local SLURM cluster: plain sbatch, submitit + torch.distributed on one and
on two (emulated) nodes, and preemption -> requeue -> resume of a Checkpointable job."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from tests.slurm_fixtures import wait_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

submitit = pytest.importorskip("submitit")
cloudpickle = pytest.importorskip("cloudpickle")

# Ship this module's job functions by value: the job's interpreter then needs neither the tests
# package on its path nor the submitting process's working directory.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

JOB_TIMEOUT_S = 90


def _executor(folder: Path, partition: str, **params) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    executor.update_parameters(
        slurm_partition=partition, timeout_min=5, cpus_per_task=1, mem_gb=1,
        slurm_setup=["export OMP_NUM_THREADS=1"], **params,
    )
    return executor


def all_reduce_rank_sum() -> dict:
    """Job body: every task contributes rank + 1 to a gloo all_reduce."""
    import torch
    import torch.distributed as dist

    dist_env = submitit.helpers.TorchDistributedEnvironment()
    # Emulated node names (node1, node2) do not resolve; every node is this host.
    dist_env.master_addr = "127.0.0.1"
    dist_env.export(set_cuda_visible_devices=False)
    dist.init_process_group("gloo")
    total = torch.tensor([float(dist_env.rank + 1)])
    dist.all_reduce(total)
    dist.destroy_process_group()
    return {
        "rank": dist_env.rank,
        "world_size": dist_env.world_size,
        "sum": total.item(),
        "node": os.environ["SLURMD_NODENAME"],
    }


class PreemptibleCounter(submitit.helpers.Checkpointable):
    """Writes a marker per attempt; the first attempt waits to be preempted. The attempt count is
    the state carried across the requeue, through the DelayedSubmission from ``checkpoint``."""

    def __call__(self, marker_dir: str, previous_attempts: int = 0) -> dict:
        attempt = previous_attempts + 1
        (Path(marker_dir) / f"attempt-{attempt}").write_text(os.environ["SLURM_JOB_ID"])
        if attempt == 1:
            time.sleep(240)  # preempted long before this ends
        return {"attempt": attempt, "slurm_restart_count": int(os.environ.get("SLURM_RESTART_COUNT", 0))}

    def checkpoint(self, marker_dir: str, previous_attempts: int = 0):
        return submitit.helpers.DelayedSubmission(self, marker_dir, previous_attempts + 1)


@pytest.mark.parametrize("partition", ["debug", "cpu"])
def test_sbatch_hostname_completes_in_accounting(slurm_cluster, tmp_path, partition):
    out = tmp_path / "hostname.out"
    job_id = slurm_cluster.run(
        "sbatch", "--parsable", "-p", partition, "-o", str(out), "--wrap", "hostname"
    ).strip().split(";")[0]

    record = slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT_S)
    assert (record["State"], record["Partition"]) == ("COMPLETED", partition), record
    assert out.read_text().strip() == os.uname().nodename.split(".")[0]


def test_submitit_two_tasks_all_reduce_on_one_node(slurm_cluster, tmp_path):
    executor = _executor(tmp_path, slurm_cluster.partition, nodes=1, tasks_per_node=2)
    job = executor.submit(all_reduce_rank_sum)
    wait_done(job, JOB_TIMEOUT_S)

    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["sum"] for r in results] == [3.0, 3.0], results  # 1 + 2 on both ranks
    assert [r["world_size"] for r in results] == [2, 2], results
    assert len({r["node"] for r in results}) == 1, results
    record = slurm_cluster.wait_job(job.job_id)
    assert (record["State"], record["Partition"]) == ("COMPLETED", slurm_cluster.partition), record


def test_submitit_all_reduce_across_two_nodes(slurm_cluster, tmp_path):
    executor = _executor(tmp_path, slurm_cluster.partition, nodes=2, tasks_per_node=1)
    job = executor.submit(all_reduce_rank_sum)
    wait_done(job, JOB_TIMEOUT_S)

    results = sorted(job.results(), key=lambda r: r["rank"])
    assert [r["sum"] for r in results] == [3.0, 3.0], results
    assert [r["node"] for r in results] == ["node1", "node2"], results
    record = slurm_cluster.wait_job(job.job_id)
    assert (record["State"], record["NodeList"]) == ("COMPLETED", "node[1-2]"), record


def test_checkpointable_job_is_requeued_and_resumes_with_state(slurm_cluster, tmp_path):
    markers = tmp_path / "markers"
    markers.mkdir()
    executor = _executor(tmp_path / "submitit", slurm_cluster.partition, nodes=1, tasks_per_node=1)
    job = executor.submit(PreemptibleCounter(), str(markers))

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (markers / "attempt-1").exists():
        assert time.monotonic() < deadline, f"first attempt never started: state {job.state}"
        time.sleep(0.5)
    job._interrupt()  # what a preemption does: SIGTERM, then submitit's checkpoint signal
    wait_done(job, timeout=120)

    result = job.result()
    assert result == {"attempt": 2, "slurm_restart_count": 1}, result
    assert sorted(p.name for p in markers.iterdir()) == ["attempt-1", "attempt-2"]
    assert slurm_cluster.wait_job(job.job_id)["State"] == "COMPLETED"
    # accounting keeps one row per run of the job id: the preempted one, then the finished one
    runs = [row[0].split()[0] for row in slurm_cluster.sacct(job.job_id, duplicates=True)]
    assert runs == ["REQUEUED", "COMPLETED"], runs
