"""``megatrain status RUN_DIR``: the run's jobs (from jobs.json), their states and restarts (from
``sacct``), the training progress (metrics.jsonl, checkpoints/latest) and, for a job that failed,
its exit code, error and log path."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict, dataclass, field
from pathlib import Path

from megatrain.errors import UserError
from megatrain.run_dir import RunDir
from megatrain.slurm import registry

FAILED_STATES = {"FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE",
                 "CANCELLED", "PREEMPTED"}
SACCT_FIELDS = ("JobIDRaw", "State", "ExitCode", "Elapsed", "NodeList")


@dataclass
class JobStatus:
    job_id: str
    state: str  # from sacct (squeue, then jobs.json, when accounting has no answer)
    exit_code: str = ""  # "code:signal" as sacct prints it
    runs: list[str] = field(default_factory=list)  # state of every run of this job id, oldest first
    elapsed: str = ""
    nodes: str = ""
    submitted_at: str = ""
    command: list[str] | None = None
    stdout: str = ""
    stderr: str = ""
    error: str = ""  # why it failed: the job's own report, else the last line of its error log
    last_event: dict | None = None

    @property
    def restarts(self) -> int:
        return max(0, len(self.runs) - 1)

    @property
    def failed(self) -> bool:
        return self.state in FAILED_STATES


@dataclass
class RunStatus:
    run_dir: str
    step: int | None
    total_steps: int | None
    latest_checkpoint: str | None
    jobs: list[JobStatus]
    accounting_error: str = ""  # why sacct gave no answer (states then come from squeue/jobs.json)


def _sacct(job_ids: list[str]) -> tuple[dict[str, list[dict[str, str]]], str]:
    """Rows per job id, one per run (requeues included), oldest first; and why sacct failed, if it did."""
    if shutil.which("sacct") is None:
        return {}, "sacct not found"
    done = subprocess.run(["sacct", "-n", "-X", "-P", "--duplicates", "-j", ",".join(job_ids),
                           "-o", ",".join(SACCT_FIELDS)], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        reason = " ".join(done.stderr.split())[:300]
        return {}, f"sacct failed: {reason}"
    rows: dict[str, list[dict[str, str]]] = {}
    for line in done.stdout.splitlines():
        if line.strip():
            row = dict(zip(SACCT_FIELDS, line.split("|")))
            rows.setdefault(row["JobIDRaw"], []).append(row)
    return rows, ""


def queue_state(job_id: str) -> str | None:
    """The job's state while slurmctld still knows it (squeue), else None."""
    if shutil.which("squeue") is None:
        return None
    done = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _tail(path: Path, n_bytes: int = 65536) -> str:
    with open(path, "rb") as f:
        f.seek(0, 2)
        f.seek(max(0, f.tell() - n_bytes))
        return f.read().decode(errors="replace")


def last_step(run_dir: Path) -> int | None:
    metrics = RunDir(run_dir).metrics_path
    if not metrics.is_file():
        return None
    for line in reversed(_tail(metrics).splitlines()):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue
    return None


def _error_line(stderr: Path) -> str:
    """The last line of a Python traceback (or of whatever the log ends with)."""
    if not stderr.is_file():
        return ""
    lines = [x.strip() for x in _tail(stderr).splitlines() if x.strip()]
    tracebacks = [x for x in lines if not x.startswith(("File ", "^", "Traceback", "srun:", "slurmstepd:"))
                  and ("Error" in x or "Exception" in x or "Exhausted" in x)]
    return (tracebacks or lines or [""])[-1][:500]


def collect(run_dir: str | Path) -> RunStatus:
    run_dir = Path(run_dir).expanduser().absolute()
    records = registry.read_jobs(run_dir)
    if not records:
        raise UserError(f"{run_dir} has no {registry.JOBS_FILE}: no job was submitted for this run "
                        f"directory with `megatrain submit`")
    accounting, accounting_error = _sacct([r["job_id"] for r in records])
    jobs = []
    for record in records:
        job_id = record["job_id"]
        rows = accounting.get(job_id, [])
        events = record.get("events", [])
        job = JobStatus(job_id, state=record.get("state", "UNKNOWN"),
                        submitted_at=record.get("submitted_at", ""), command=record.get("command"),
                        stdout=record.get("stdout", ""), stderr=record.get("stderr", ""),
                        last_event=events[-1] if events else None)
        if rows:
            final = rows[-1]
            job.state = final["State"].split()[0]  # "CANCELLED by 0" -> "CANCELLED"
            job.exit_code, job.elapsed, job.nodes = final["ExitCode"], final["Elapsed"], final["NodeList"]
            job.runs = [r["State"].split()[0] for r in rows]
        else:
            job.state = queue_state(job_id) or job.state
        if job.failed:
            reported = [e.get("error") for e in events if e.get("event") == "failed" and e.get("error")]
            job.error = reported[-1] if reported else _error_line(Path(job.stderr))
        jobs.append(job)

    saved = RunDir(run_dir).saved_config_tree() or {}
    total = (saved.get("train") or {}).get("steps")
    latest = RunDir(run_dir).latest_name()
    return RunStatus(str(run_dir), last_step(run_dir), total, latest, jobs, accounting_error)


def format_status(status: RunStatus) -> str:
    lines = [f"run dir {status.run_dir}"]
    step = "no step logged yet" if status.step is None else f"step {status.step}"
    if status.total_steps is not None:
        step += f" of {status.total_steps}" if status.step is not None else f" ({status.total_steps} to run)"
    lines.append(f"progress: {step}; latest checkpoint {status.latest_checkpoint or '(none)'}")
    if status.accounting_error:
        lines.append(f"accounting unavailable ({status.accounting_error}): states from squeue or jobs.json")
    for job in status.jobs:
        if job.runs:
            runs = f"{len(job.runs)} run(s), {job.restarts} restart(s)"
        else:
            runs = "runs unknown" if status.accounting_error else "not in accounting yet"
        head = f"job {job.job_id}  {job.state}"
        if job.exit_code:
            head += f"  exit {job.exit_code}"
        head += f"  {runs}"
        if job.elapsed:
            head += f"  elapsed {job.elapsed}"
        if job.nodes and job.nodes != "None assigned":
            head += f"  nodes {job.nodes}"
        lines.append(head)
        if job.submitted_at:
            command = f"  ({' '.join(job.command)})" if job.command else ""
            lines.append(f"  submitted {job.submitted_at}{command}")
        if job.last_event:
            e = job.last_event
            detail = ", ".join(f"{k} {e[k]}" for k in ("step", "reason", "restart") if k in e)
            lines.append(f"  last event: {e['event']} at {e['time']}" + (f" ({detail})" if detail else ""))
        if job.failed:
            if job.error:
                lines.append(f"  error: {job.error}")
            lines.append(f"  log: {job.stderr}")
        else:
            lines.append(f"  logs: {job.stdout}")
            lines.append(f"        {job.stderr}")
    return "\n".join(lines)


def to_json(status: RunStatus) -> str:
    out = asdict(status)
    for job, raw in zip(status.jobs, out["jobs"]):
        raw["restarts"] = job.restarts
        raw["failed"] = job.failed
    return json.dumps(out, indent=1)
