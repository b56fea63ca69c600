"""``submit``: check everything that can be checked on the login node, then queue one ``TrainJob``.

Order matters: every refusal (config, run directory, process layout, partition and sizes) happens
before anything is written or queued. Then the resolved ``config.yaml`` and a code snapshot go into
``run.dir`` and the job is queued through submitit; ``run.dir/jobs.json`` records it.
"""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from megatrain.config import Config
from megatrain.errors import ConfigError, DataError
from megatrain.run_dir import RunDir
from megatrain.slurm import registry
from megatrain.slurm.resources import PartitionInfo, Resources, check_fits, read_partitions
from megatrain.slurm.snapshot import git_revision, write_snapshot
from megatrain.spec import with_absolute_paths

LOG_DIR = "slurm_logs"
CODE_DIR = "code"


@dataclass
class SubmitResult:
    job_id: str | None  # None for a dry run
    run_dir: Path
    resources: Resources
    sbatch_script: str
    log_dir: Path | None = None  # run_dir/slurm_logs/<job id>
    stdout: Path | None = None  # rank 0's logs
    stderr: Path | None = None
    job: object = None  # the submitit job (for tests and callers that wait on it)


def check_run_dir_writable(run_dir: Path, create: bool) -> None:
    if create:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            probe = run_dir / f".write_probe.{os.getpid()}"
            probe.write_text("")
            probe.unlink()
        except OSError as err:
            raise ConfigError(f"run.dir={run_dir} cannot be created or written ({err.strerror}); "
                              f"choose a writable run.dir on a file system the compute nodes share") from None
        return
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run.dir={run_dir} cannot be created or written ({existing} is not a "
                          f"writable directory); choose another run.dir")


# states of a job that may still write into its run directory
ACTIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "REQUEUE_HOLD",
                 "REQUEUE_FED", "RESIZING", "STOPPED"}


def check_no_active_job(run_dir: Path) -> None:
    """Two jobs training into one run directory would overwrite each other's checkpoints."""
    from megatrain.slurm.status import queue_state

    for record in registry.read_jobs(run_dir):
        state = queue_state(str(record["job_id"]))
        if state in ACTIVE_STATES:
            raise ConfigError(f"run.dir={run_dir} already has job {record['job_id']} {state}; wait "
                              f"for it (`megatrain status {run_dir}`), cancel it (scancel "
                              f"{record['job_id']}) or choose another run.dir")


def check_process_layout(cfg: Config, res: Resources) -> None:
    """The processes asked for must match what the trainer will build from the config."""
    layout = (f"--nodes={res.nodes} x {res.ntasks_per_node} task(s) per node = "
              f"{res.world_size} process(es)")
    parallel = cfg.parallel
    from megatrain.parallel.topology import ParallelDims

    try:
        ParallelDims(parallel.dp, parallel.tp, parallel.pp, res.world_size).validate(
            cfg.model, parallel, cfg.train.batch_size, cfg.train.micro_batch_size)
    except ConfigError as err:
        raise ConfigError(f"{layout}: {err}") from None


def warn_missing_data(cfg: Config) -> None:
    if cfg.data.path and not Path(cfg.data.path).exists():
        print(f"megatrain: warning: data.path={cfg.data.path} does not exist on this host; the job "
              f"fails unless the compute nodes see it", file=sys.stderr)


def _setup_lines(snapshot: Path | None) -> list[str]:
    lines = ["export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}"]
    if snapshot is not None:
        lines.insert(0, f"export PYTHONPATH={shlex.quote(str(snapshot))}${{PYTHONPATH:+:$PYTHONPATH}}")
    if os.environ.get("MEGATRAIN_MASTER_ADDR"):
        lines.append(f"export MEGATRAIN_MASTER_ADDR={shlex.quote(os.environ['MEGATRAIN_MASTER_ADDR'])}")
    return lines


def build_executor(res: Resources, partition: PartitionInfo, log_dir: Path, snapshot: Path | None):
    import submitit

    executor = submitit.AutoExecutor(folder=str(log_dir / "%j"), cluster="slurm",
                                     slurm_max_num_timeout=res.max_requeues)
    params = dict(name=res.job_name, nodes=res.nodes, tasks_per_node=res.ntasks_per_node,
                  timeout_min=res.time_min, slurm_partition=partition.name,
                  slurm_signal_delay_s=res.checkpoint_signal_s, slurm_setup=_setup_lines(snapshot),
                  # requeue: a job can requeue itself even where JobRequeue=0 is the default.
                  # chdir: started in a checkout, `python -m` would import megatrain from the
                  # current directory instead of the snapshot on PYTHONPATH.
                  slurm_additional_parameters={"requeue": True, "chdir": str(log_dir.parent)})
    optional = dict(gpus_per_node=res.gpus_per_node or None, cpus_per_task=res.cpus_per_task,
                    mem_gb=res.mem_gb, slurm_account=res.account, slurm_qos=res.qos,
                    slurm_constraint=res.constraint, slurm_exclusive=res.exclusive or None)
    executor.update_parameters(**params, **{k: v for k, v in optional.items() if v is not None})
    return executor


def sbatch_text(executor) -> str:
    """The batch script submitit writes for this executor (its own renderer, so it is exact).

    submitit (1.5) has no public way to render the script without submitting: ``_submit_command``
    writes ``_make_submission_file_text(_submitit_command_str, uid)`` to the job's submission file.
    This is the only use of those private names; tests/test_slurm_launch.py compares the result
    with the file submitit actually submits, so an upgrade that changes either fails there.
    """
    inner = executor._executor  # AutoExecutor -> its SlurmExecutor
    return inner._make_submission_file_text(inner._submitit_command_str, uuid.uuid4().hex)


def check_memory_plan(cfg: Config, res: Resources, device_memory_gb: float) -> None:
    """Refuse a GPU job whose largest rank the planner predicts will not fit in device memory."""
    from megatrain.planning.plan import make_plan, suggestions

    try:
        plan = make_plan(cfg, device_memory_gb, res.world_size)
    except (ConfigError, DataError) as err:  # e.g. the dataset is on the cluster only: say so, do not block
        print(f"megatrain: warning: no memory plan for this job ({err})", file=sys.stderr)
        return
    if plan.fits:
        return
    worst = plan.worst
    fixes = "; ".join(f"{f.change} ({' '.join(f.overrides)}: {f.peak_bytes / 1e9:.1f} GB)"
                      for f in suggestions(plan, res.gpus_per_node))
    raise ConfigError(
        f"megatrain plan predicts {plan.peak_bytes / 1e9:.1f} GB on rank {worst.rank} (pipeline stage "
        f"{'+'.join(map(str, worst.stages))}, at {worst.peak_phase}), more than --device-memory-gb "
        f"{device_memory_gb:g}; " + (f"changes that would fit: {fixes}; " if fixes else "")
        + "see `megatrain plan` with the same arguments, or pass --no-plan-check to submit anyway")


def submit(cfg: Config, res: Resources, *, dry_run: bool = False, command: list[str] | None = None,
           train_fn: Callable | None = None, plan_check: bool = True,
           device_memory_gb: float = 80.0) -> SubmitResult:
    """Validate, then queue ``cfg`` as one SLURM job (or, with ``dry_run``, only render it).

    GPU jobs are checked against the memory planner first (``plan_check``)."""
    res.validate()
    cfg = with_absolute_paths(cfg)  # the job starts in another directory
    run_dir = Path(cfg.run.dir)
    check_run_dir_writable(run_dir, create=False)
    RunDir(run_dir).check_same_model(cfg)
    check_no_active_job(run_dir)
    partition = check_fits(res, read_partitions())
    check_process_layout(cfg, res)
    if plan_check and res.gpus_per_node:
        check_memory_plan(cfg, res, device_memory_gb)
    res = dataclasses.replace(res, partition=partition.name)
    warn_missing_data(cfg)

    log_dir = run_dir / LOG_DIR
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    snapshot = run_dir / CODE_DIR / stamp
    executor = build_executor(res, partition, log_dir, snapshot)
    if dry_run:
        return SubmitResult(None, run_dir, res, sbatch_text(executor))

    check_run_dir_writable(run_dir, create=True)
    if not RunDir(run_dir).has_checkpoints():  # a resumed run keeps its config.yaml (vocabulary resolved)
        RunDir(run_dir).write_config(cfg)
    write_snapshot(snapshot)
    from megatrain.slurm.job import TrainJob

    script = sbatch_text(executor)
    job = executor.submit(TrainJob(cfg, res.max_requeues, res.time_min, res.checkpoint_signal_s, train_fn))
    paths = job.paths
    registry.add_job(run_dir, {
        "job_id": job.job_id, "submitted_at": registry.now_iso(), "state": "SUBMITTED",
        "command": command, "resources": {**res.to_dict(), "partition": partition.name},
        "log_dir": str(paths.folder), "stdout": str(paths.stdout), "stderr": str(paths.stderr),
        "code_snapshot": str(snapshot), **git_revision(),
    })
    return SubmitResult(job.job_id, run_dir, res, script, paths.folder, paths.stdout, paths.stderr, job)
