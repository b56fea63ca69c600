"""``run.dir/jobs.json``: every SLURM job submitted for a run directory and what happened to it.

Written by ``megatrain submit`` (one record per job) and by rank 0 of the running job (events:
started, requeued, stopped, completed, failed). Every write is read-modify-write under
``megatrain.files.exclusive_lock``, then ``atomic_write_text``: readers never see a half-written
file.

    {"jobs": [{"job_id": "42", "submitted_at": "...", "command": [...], "state": "SUBMITTED",
               "resources": {...}, "log_dir": "...", "code_snapshot": "...",
               "events": [{"time": "...", "event": "started", "restart": 0, "step": 0, ...}]}]}
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

from megatrain.files import atomic_write_text, exclusive_lock

JOBS_FILE = "jobs.json"
LOCK_FILE = f".{JOBS_FILE}.lock"  # beside it in run.dir


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def read_jobs(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("jobs", [])


def _write(run_dir: Path, jobs: list[dict]) -> None:
    atomic_write_text(run_dir / JOBS_FILE, json.dumps({"jobs": jobs}, indent=1) + "\n")


def add_job(run_dir: str | Path, record: dict) -> None:
    run_dir = Path(run_dir)
    with exclusive_lock(run_dir / LOCK_FILE):
        jobs = read_jobs(run_dir)
        jobs.append({"events": [], **record})
        _write(run_dir, jobs)


def add_event(run_dir: str | Path, job_id: str, event: str, state: str | None = None, **fields) -> None:
    """Append an event to job ``job_id`` (creating a bare record if the submitter wrote none)."""
    run_dir = Path(run_dir)
    with exclusive_lock(run_dir / LOCK_FILE):
        jobs = read_jobs(run_dir)
        record = next((j for j in jobs if j.get("job_id") == job_id), None)
        if record is None:
            record = {"job_id": job_id, "events": []}
            jobs.append(record)
        record.setdefault("events", []).append({"time": now_iso(), "event": event, **fields})
        if state:
            record["state"] = state
        _write(run_dir, jobs)
