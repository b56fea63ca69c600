"""pytest fixtures for a real local SLURM cluster (``slurm/local_cluster.sh``).

Enable with ``pytest_plugins = ["tests.slurm_fixtures"]`` in ``tests/conftest.py``.

``slurm_cluster`` (session scope) starts a 2-node cluster (node1, node2 on this host) so that both
single-node and 2-node jobs run, points ``SLURM_CONF`` at it for the whole session (sbatch, sacct
and submitit read it from the environment) and stops it at the end only if it was not already up.

Without root, or when the Debian packages cannot be installed, the fixture skips with the reason;
set ``MEGATRAIN_SLURM_REQUIRED=1`` (CI) to turn that skip into a failure.

``wait_done(job, timeout)``: the bounded wait for a submitit job that the SLURM tests share.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "slurm" / "local_cluster.sh"
DEFAULT_ROOT = "/tmp/megatrain_slurm"
N_NODES = 2
# local_cluster.sh exits with this (EX_UNAVAILABLE) when the cluster cannot exist on this machine
EX_UNAVAILABLE = 69
STATUS_ALL_UP = 0
START_TIMEOUT_S = 900  # a first start installs ~6 Debian packages
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE",
}


@dataclass(frozen=True)
class SlurmCluster:
    """A running local cluster, as the tests see it."""

    root: Path
    env: dict[str, str]  # os.environ plus SLURM_CONF: pass to subprocess calls of Slurm clients
    nodes: int
    partition: str = "debug"  # the default partition
    second_partition: str = "cpu"  # same nodes, to exercise partition selection
    started_here: bool = field(default=False, compare=False)

    def run(self, *cmd: str, timeout: float = 60) -> str:
        """Run a Slurm client command against this cluster; return its stdout."""
        done = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
        return done.stdout

    def sacct(self, job_id: str, fields: str = "State", duplicates: bool = False) -> list[list[str]]:
        """Accounting rows of the job allocation (no steps); with ``duplicates`` also its requeued runs."""
        args = ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", fields]
        if duplicates:
            args.append("--duplicates")
        return [line.split("|") for line in self.run(*args).splitlines() if line]

    def wait_job(self, job_id: str, timeout: float = 60) -> dict[str, str]:
        """Poll accounting until the job is finished and fully recorded; return its fields.

        A short job can show COMPLETED while its start record (partition, nodes) is still queued
        on the way to slurmdbd, so the partition must be filled in too.
        """
        fields = ("State", "Partition", "NodeList", "ExitCode")
        deadline = time.monotonic() + timeout
        record: dict[str, str] = {}
        while time.monotonic() < deadline:
            rows = self.sacct(job_id, ",".join(fields))
            if rows:
                record = dict(zip(fields, rows[-1]))
                record["State"] = record["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
                if record["State"] in TERMINAL_STATES and record["Partition"]:
                    return record
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished in accounting after {timeout}s: {record}")


def wait_done(job, timeout: float) -> None:
    """Wait for a submitit job to finish: job.result() would block forever on a job that never
    starts, so the wait is bounded and a stuck job is cancelled and reported with its stderr."""
    deadline = time.monotonic() + timeout
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"job {job.job_id} not done after {timeout}s, state {job.state}\n{job.stderr()}")
        time.sleep(0.5)


def _cannot_run(reason: str) -> None:
    if os.environ.get("MEGATRAIN_SLURM_REQUIRED") == "1":
        pytest.fail(f"local SLURM cluster required (MEGATRAIN_SLURM_REQUIRED=1) but {reason}")
    pytest.skip(reason)


def _script(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.fixture(scope="session")
def slurm_cluster():
    if os.geteuid() != 0:
        _cannot_run("the local SLURM cluster needs root (it starts daemons and may apt-get install)")
    root = Path(os.environ.get("MEGATRAIN_SLURM_ROOT", DEFAULT_ROOT))
    env = {**os.environ, "MEGATRAIN_SLURM_ROOT": str(root)}

    # Up already (a developer's cluster, another test session): use it, reshaped to N_NODES if
    # needed, and leave it running afterwards.
    was_up = _script("status", env=env, timeout=60).returncode == STATUS_ALL_UP
    t0 = time.monotonic()
    start = _script("start", "--nodes", str(N_NODES), env=env, timeout=START_TIMEOUT_S)
    if start.returncode == EX_UNAVAILABLE:
        last_line = (start.stderr.strip().splitlines() or ["(no output)"])[-1]
        _cannot_run(f"local SLURM cluster unavailable: {last_line}")
    if start.returncode != 0:
        pytest.fail(f"local_cluster.sh start failed ({start.returncode}):\n{start.stderr[-3000:]}")
    print(f"\n[slurm_cluster] start took {time.monotonic() - t0:.1f}s:\n{start.stderr.rstrip()}")

    slurm_conf = str(root / "etc" / "slurm.conf")
    cluster = SlurmCluster(
        root=root, env={**env, "SLURM_CONF": slurm_conf}, nodes=N_NODES, started_here=not was_up
    )
    # submitit calls sbatch/sacct/scancel with the test process's own environment
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SLURM_CONF", slurm_conf)
        yield cluster

    if cluster.started_here:
        stop = _script("stop", env=env, timeout=180)
        print(f"\n[slurm_cluster] stop:\n{stop.stderr.rstrip()}")
