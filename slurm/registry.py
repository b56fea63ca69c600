"""``run.dir/jobs.json``: every SLURM job submitted for a run directory and what happened to it.

Written by ``megatrain submit`` (one record per job) and by rank 0 of the running job (events:
started, requeued, stopped, completed, failed). Every write is read-modify-write under an
advisory lock, then ``os.replace`` of a temporary file: readers never see a half-written file.

    {"jobs": [{"job_id": "42", "submitted_at": "...", "command": [...], "state": "SUBMITTED",
               "resources": {...}, "log_dir": "...", "code_snapshot": "...",
               "events": [{"time": "...", "event": "started", "restart": 0, "step": 0, ...}]}]}
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

JOBS_FILE = "jobs.json"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@contextlib.contextmanager
def _locked(run_dir: Path) -> Iterator[None]:
    # Advisory only (flock is per host on some network file systems); the atomic replace below is
    # what keeps readers safe, the lock just stops two local writers from losing each other's update.
    with open(run_dir / f".{JOBS_FILE}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_jobs(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / JOBS_FILE
    if not path.is_file():
        return []
    return json.loads(path.read_text()).get("jobs", [])


def _write(run_dir: Path, jobs: list[dict]) -> None:
    tmp = run_dir / f"{JOBS_FILE}.tmp.{os.getpid()}"
    tmp.write_text(json.dumps({"jobs": jobs}, indent=1) + "\n")
    os.replace(tmp, run_dir / JOBS_FILE)


def add_job(run_dir: str | Path, record: dict) -> None:
    run_dir = Path(run_dir)
    with _locked(run_dir):
        jobs = read_jobs(run_dir)
        jobs.append({"events": [], **record})
        _write(run_dir, jobs)


def add_event(run_dir: str | Path, job_id: str, event: str, state: str | None = None, **fields) -> None:
    """Append an event to job ``job_id`` (creating a bare record if the submitter wrote none)."""
    run_dir = Path(run_dir)
    with _locked(run_dir):
        jobs = read_jobs(run_dir)
        record = next((j for j in jobs if j.get("job_id") == job_id), None)
        if record is None:
            record = {"job_id": job_id, "events": []}
            jobs.append(record)
        record.setdefault("events", []).append({"time": now_iso(), "event": event, **fields})
        if state:
            record["state"] = state
        _write(run_dir, jobs)
