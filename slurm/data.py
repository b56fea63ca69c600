"""Data preparation stages on SLURM (datatrove's ``SlurmPipelineExecutor``).

The data pipeline (``megatrain.data_pipelines``) is a sequence of datatrove stages, each a list of
pipeline steps run as ``tasks`` parallel tasks, with a little driver code between some of them. Two
ways to run such stages on SLURM:

- ``SlurmStageRunner``: a drop-in for a local "run this stage" function. Each call queues the stage
  as one array job and waits for it, so driver code between stages keeps running where it is (the
  login node, or a small job). Returns the stage's summed statistics; a failed task raises a
  ``DataError`` naming the stage, the SLURM state and the log folder.
- ``launch_stage_chain``: queues every stage at once, each depending on the previous one
  (``afterok``), and returns their job ids without waiting: for pipelines with no driver code
  between stages.

Neither builds stages: the data pipeline (``megatrain.data_pipelines``) hands them in; a stage's
statistics are read back by the pipeline's own ``stages.load_stats``.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from megatrain.cli_fields import add_field_arguments, field_values, option
from megatrain.errors import DataError


@dataclass
class SlurmDataOptions:
    """sbatch settings shared by every stage (``megatrain data prepare --executor slurm ...``); the
    one owner of their defaults and help texts (the flags are made from them)."""

    partition: str
    time_min: int = option(240, "time limit per task in minutes", flag="--time")
    cpus_per_task: int = option(1, "CPUs of each task")
    mem_per_cpu_gb: int = option(2, "memory per CPU in GB")
    # "" = no --qos line (datatrove's default "normal" does not exist everywhere)
    qos: str = option("", "SLURM quality of service (default: none, the cluster's)")
    account: str | None = option(None, "SLURM account to charge (default: your default account)")
    workers: int = -1  # array tasks running at once; -1 = no limit
    job_name_prefix: str = "megatrain-data"

    def time_str(self) -> str:
        return f"{self.time_min // 60:02d}:{self.time_min % 60:02d}:00"


@dataclass
class Stage:
    """One datatrove stage: its steps, how many tasks, where its logs and stats go."""

    name: str
    pipeline: list
    tasks: int
    logging_dir: str


def _venv_activate() -> str | None:
    """The job must find this interpreter's ``launch_pickled_pipeline``: activate our venv."""
    activate = Path(sys.prefix) / "bin" / "activate"
    return str(activate) if sys.prefix != sys.base_prefix and activate.is_file() else None


def make_executor(stage: Stage, options: SlurmDataOptions, depends=None):
    from datatrove.executor import SlurmPipelineExecutor

    sbatch_args = {"account": options.account} if options.account else {}
    return SlurmPipelineExecutor(
        stage.pipeline, tasks=stage.tasks, time=options.time_str(), partition=options.partition,
        cpus_per_task=options.cpus_per_task, mem_per_cpu_gb=options.mem_per_cpu_gb,
        workers=options.workers, job_name=f"{options.job_name_prefix}-{stage.name}", qos=options.qos,
        venv_path=_venv_activate(), sbatch_args=sbatch_args, depends=depends,
        logging_dir=stage.logging_dir, slurm_logs_folder=str(Path(stage.logging_dir) / "slurm_logs"),
        skip_completed=True, mail_type="NONE")


def _in_queue(job_id: str) -> bool:
    """Any task of the array still pending or running (squeue forgets finished jobs)."""
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i"], capture_output=True, text=True,
                          timeout=60)
    return done.returncode == 0 and bool(done.stdout.strip())


def _task_states(job_id: str) -> str:
    done = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"],
                          capture_output=True, text=True, timeout=60)
    rows = [line.replace("|", " ") for line in done.stdout.splitlines() if line.strip()]
    return ", ".join(rows) or "no accounting record"


def _incomplete(logging_dir: str, tasks: int) -> list[int]:
    completions = Path(logging_dir) / "completions"
    return [r for r in range(tasks) if not (completions / f"{r:05d}").is_file()]


def cancel_dependents(job_id: str) -> list[str]:
    """Cancel pending jobs waiting on ``job_id`` (the next stages, datatrove's merge_stats job):
    after a failure their ``afterok`` can never be met and they would sit in the queue forever."""
    done = subprocess.run(["squeue", "-h", "-t", "PD", "-o", "%i|%E"], capture_output=True, text=True,
                          timeout=60)
    pending = [line.split("|", 1) for line in done.stdout.splitlines() if "|" in line]
    cancelled, frontier = [], [job_id]
    while frontier:  # dependents of dependents too: stage 3 waits on stage 2 waits on stage 1
        parent = frontier.pop()
        for jid, depends in pending:
            array_id = jid.split("_")[0]
            if array_id not in cancelled and re.search(rf":{parent}(?:_\*|_\d+)?(?:\(|,|$)", depends):
                cancelled.append(array_id)
                frontier.append(array_id)
    if cancelled:
        subprocess.run(["scancel", *cancelled], capture_output=True, timeout=60)
    return cancelled


def wait_for_stage(job_id: str, what: str, logging_dir: str, tasks: int, poll_s: float = 2.0,
                   timeout_s: float | None = None) -> None:
    """Wait until every task of the stage is done. Success is datatrove's own record (one
    ``completions/<rank>`` file per finished task), not accounting: sacct lists an array's tasks
    only as they start, so "every listed task COMPLETED" can be true while some never ran."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while _incomplete(logging_dir, tasks):
        if not _in_queue(job_id):
            time.sleep(poll_s)  # a task's files may trail its exit on a network file system
            missing = _incomplete(logging_dir, tasks)
            if not missing:
                return
            cancel_dependents(job_id)
            raise DataError(f"{what} failed on SLURM: task(s) {', '.join(map(str, missing[:10]))} "
                            f"did not complete (job {job_id}: {_task_states(job_id)}); task logs in "
                            f"{logging_dir}/logs, SLURM output in {logging_dir}/slurm_logs")
        if deadline is not None and time.monotonic() > deadline:
            raise DataError(f"{what} (SLURM job {job_id}) not finished after {timeout_s:.0f} s; "
                            f"logs in {logging_dir}")
        time.sleep(poll_s)


class SlurmStageRunner:
    """Run one stage at a time on SLURM and wait for it; same shape as a local stage runner:
    ``runner(name, pipeline, tasks=K, workers=W, logs=Path)`` -> the stage's statistics
    (``stages.load_stats``)."""

    def __init__(self, options: SlurmDataOptions, poll_s: float = 2.0, timeout_s: float | None = None):
        if shutil.which("sbatch") is None:
            raise DataError("--executor slurm: sbatch not found; run on a SLURM login node")
        self.options, self.poll_s, self.timeout_s = options, poll_s, timeout_s
        self.job_ids: dict[str, str] = {}

    def __call__(self, name: str, pipeline: list, *, tasks: int, workers: int = -1, logs: Path):
        from megatrain.data_pipelines.stages import load_stats

        stage = Stage(name, pipeline, tasks, str(Path(logs) / name))
        executor = make_executor(stage, self.options)
        executor.run()  # not inside an array task: this queues the stage
        if executor.job_id == -1:  # every task completed in an earlier attempt
            return load_stats(stage.logging_dir, tasks)
        self.job_ids[name] = str(executor.job_id)
        wait_for_stage(str(executor.job_id), f"data stage {name}", stage.logging_dir, tasks,
                       self.poll_s, self.timeout_s)
        return load_stats(stage.logging_dir, tasks)


def launch_stage_chain(stages: Sequence[Stage], options: SlurmDataOptions) -> list[str]:
    """Queue every stage now, each after the previous one succeeded; return their job ids."""
    if shutil.which("sbatch") is None:
        raise DataError("--executor slurm: sbatch not found; run on a SLURM login node")
    executors, previous = [], None
    for stage in stages:
        previous = make_executor(stage, options, depends=previous)
        executors.append(previous)
    executors[-1].run()  # launches its dependencies first
    return [str(e.job_id) for e in executors]


_SBATCH_FLAGS = ["time_min", "cpus_per_task", "mem_per_cpu_gb", "qos", "account"]


def add_slurm_data_arguments(parser: argparse.ArgumentParser) -> None:
    """``--executor local|slurm`` and the sbatch flags, for ``megatrain data prepare``."""
    group = parser.add_argument_group("SLURM (with --executor slurm)")
    group.add_argument("--executor", choices=("local", "slurm"), default="local",
                       help="run the stages here (local) or as SLURM array jobs")
    group.add_argument("--partition", help="SLURM partition for the stages")
    add_field_arguments(group, SlurmDataOptions, _SBATCH_FLAGS, dest_prefix="slurm_")


def options_from_args(args: argparse.Namespace) -> SlurmDataOptions:
    if not args.partition:
        raise DataError("--executor slurm needs --partition")
    values = field_values(args, _SBATCH_FLAGS, dest_prefix="slurm_")
    return SlurmDataOptions(partition=args.partition, **values)
