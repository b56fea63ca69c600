"""One writer per run directory: ``run.dir/.lock``, held for the life of a training run.

Two trainings writing one run directory (a SLURM requeue racing a manual restart, a typo) corrupt
it: each rewrites ``metrics.jsonl``, prunes the other's checkpoints and renames folders under its
feet. ``flock`` cannot prevent that on the shared file systems SLURM clusters use (it may be per
host there), so the lock is a file created with ``O_CREAT | O_EXCL`` (atomic on POSIX and on NFSv3+)
that records its owner::

    {"owner": "<uuid>", "host": "node12", "boot_id": "18f7...", "pid_ns": "pid:[4026531836]",
     "pid": 4242, "pid_start": 81234567, "job_id": "77", "restart": 0,
     "started": 1764622200.0, "heartbeat": 1764622230.0}

All ranks of one job are one writer: rank 0 takes the lock and the others follow its verdict.
A thread refreshes the heartbeat every ``HEARTBEAT_S`` by touching the file's mtime, never by
rewriting it: a read-then-rewrite could land just after another start took the lock over and put
our record back over theirs (it did, under load). The heartbeat a reader sees is the later of the
record's ``heartbeat`` (its creation) and the file's mtime.

A pid means something only in its PID namespace: containers sharing a host name (docker
``--network=host``, Kubernetes ``hostNetwork``, ``unshare --pid``) each number their processes
from 1 and cannot see each other's. So the owner is (host, boot id, PID namespace, pid, the pid's
start time), and its process is looked up only from the same kernel boot and PID namespace; the
start time tells a pid reused by another process from the owner. An owner that cannot be looked
up from here counts as alive until its heartbeat is stale. A lock left behind is taken over only
when its owner is provably gone:
- its process, looked up from the same host, boot and PID namespace, no longer exists (or the
  pid now belongs to a process started at another time);
- its host (same name, another boot id) has restarted since the owner's last heartbeat;
- the same SLURM job id with a lower restart count (SLURM ends every process of a job's previous
  run before it starts the requeued one);
- another SLURM job that ``squeue`` no longer knows or shows as finished;
- a heartbeat older than ``STALE_S`` (the owner's host died or lost the file system: a live
  owner touches it 30 times in that time);
- or the file is empty or not JSON (its creator died between creating and writing it: a live
  owner writes its record in the same call that creates the file) and has not changed for
  ``TORN_GRACE_S``; younger, it may be a start writing it right now.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
import uuid
from pathlib import Path

from megatrain.errors import UserError
from megatrain.process_identity import Liveness, ProcessIdentity, boot_time

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 30 * HEARTBEAT_S
TORN_GRACE_S = HEARTBEAT_S  # an unreadable lock this long unchanged was left by a start that died
TAKEOVER_SETTLE_S = 1.0


class RunDirInUse(UserError):
    """Another training holds the run directory."""


def _job() -> tuple[str | None, int]:
    job_id = os.environ.get("SLURM_JOB_ID")
    return job_id, int(os.environ.get("SLURM_RESTART_COUNT", "0"))


def _slurm_job_finished(job_id: str) -> bool:
    """True only when ``squeue`` answers that the job is gone (unknown, or in no active state);
    without squeue, or when it fails otherwise, nothing is proven."""
    if shutil.which("squeue") is None:
        return False
    try:
        done = subprocess.run(["squeue", "--noheader", "--jobs", job_id, "--format", "%T"],
                              capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if done.returncode != 0:
        return "Invalid job id" in done.stderr
    states = set(done.stdout.split())
    return not states & {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "SUSPENDED", "REQUEUED",
                         "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SIGNALING", "STAGE_OUT",
                         "STOPPED"}


def owner_is_gone(holder: dict, now: float | None = None) -> str | None:
    """Why the lock's owner is provably gone, or None if it may still be running."""
    now = time.time() if now is None else now
    age = now - float(holder.get("heartbeat", 0))
    if holder.get("torn"):
        return (f"the lock file is {holder['torn']} (a start died while creating it) and unchanged "
                f"for {age:.0f} s" if age > TORN_GRACE_S else None)
    owner = ProcessIdentity.from_record(holder)
    liveness, why = owner.liveness()
    if liveness is Liveness.GONE:
        return why
    if liveness is Liveness.UNKNOWN and _host_restarted_since(owner, float(holder.get("heartbeat", 0)), now):
        return f"{owner.host} has restarted since the owner's last heartbeat"
    job_id, restart = _job()
    if job_id is not None and holder.get("job_id") == job_id and int(holder.get("restart", 0)) < restart:
        return f"it was run {holder.get('restart')} of SLURM job {job_id}, which is now on run {restart}"
    other_job = holder.get("job_id")
    if other_job and other_job != job_id and _slurm_job_finished(str(other_job)):
        return f"its SLURM job {other_job} is no longer running"
    if age > STALE_S:
        return f"its heartbeat is {age:.0f} s old (a live owner refreshes it every {HEARTBEAT_S:.0f} s)"
    return None


def _host_restarted_since(owner: ProcessIdentity, heartbeat: float, now: float) -> bool:
    """This host (same name, another boot id) booted after the owner's last heartbeat. Proof only
    once this boot is older than two heartbeats: a live owner on another machine that shares the
    name (a misconfiguration) touches the lock at least once in that time."""
    here = ProcessIdentity.of_this_process()
    booted = boot_time()
    return (owner.host == here.host and None not in (owner.boot_id, here.boot_id, booted)
            and owner.boot_id != here.boot_id and heartbeat < booted and now - booted > 2 * HEARTBEAT_S)


def why_alive(holder: dict) -> str:
    """Why a lock that is not provably abandoned counts as held: what this start saw."""
    if holder.get("torn"):
        return (f"the lock file is {holder['torn']}: a start is writing it right now, or died while "
                f"creating it; it counts as held until unchanged for {TORN_GRACE_S:.0f} s")
    liveness, why = ProcessIdentity.from_record(holder).liveness()
    if liveness is Liveness.UNKNOWN:
        return (f"{why}, so it counts as running until its heartbeat is {STALE_S:.0f} s old "
                f"(every {HEARTBEAT_S:.0f} s a live owner refreshes it)")
    return why


def describe(holder: dict) -> str:
    if holder.get("torn"):
        touched = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["heartbeat"])))
        return f"an {holder['torn']} lock file, last changed {touched}"
    job = f", SLURM job {holder['job_id']}" if holder.get("job_id") else ""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("started", 0))))
    return f"process {holder.get('pid')} on {holder.get('host')}{job}, started {started}"


class RunLock:
    """``with RunLock(run_dir):`` holds the run directory's lock (rank 0 only)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        job_id, restart = _job()
        self.record = {"owner": uuid.uuid4().hex, **ProcessIdentity.of_this_process().as_record(),
                       "job_id": job_id, "restart": restart, "started": time.time()}
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock is removed, then raced for again like a fresh one
            if self._create():
                return self._start_heartbeat()
            holder = self._read()
            if holder is None:  # vanished between our attempt and the read: try again
                continue
            reason = owner_is_gone(holder)
            if reason is None:
                raise RunDirInUse(
                    f"run.dir {self.path.parent} is in use by another training ({describe(holder)}; "
                    f"{why_alive(holder)}; lock {self.path}). Wait for it to finish, stop it, or use "
                    f"another run.dir; if that training is certainly gone, delete {self.path}")
            if self._read() != holder:  # replaced since we judged it: judge the new one
                continue
            print(f"taking over the lock of {self.path.parent}: its owner is gone ({reason})",
                  flush=True)
            self.path.unlink(missing_ok=True)
            if self._create():
                # Two starts that judged the same dead owner may both get here, the later one
                # replacing the earlier one's fresh lock: after a pause only one still owns it.
                time.sleep(TAKEOVER_SETTLE_S)
                now = self._read() or {}
                if now.get("owner") != self.record["owner"]:
                    raise RunDirInUse(f"run.dir {self.path.parent} was taken over by another start "
                                      f"at the same moment ({describe(now)}); this one stops")
                return self._start_heartbeat()
        raise RunDirInUse(f"could not take the lock {self.path}: other starts keep racing for it")

    def _start_heartbeat(self) -> None:
        self._thread = threading.Thread(target=self._heartbeat, name="megatrain-run-lock", daemon=True)
        self._thread.start()

    @property
    def lost(self) -> bool:
        """True once another start took the lock over (this run was presumed gone: suspended
        or stopped for longer than STALE_S): this run must stop writing the run dir."""
        return self._lost.is_set()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        holder = self._read()
        if holder is not None and holder.get("owner") == self.record["owner"]:
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({**self.record, "heartbeat": time.time()}, f)
        except OSError:  # e.g. a full disk: leave no half-written lock to block the next start
            self.path.unlink(missing_ok=True)
            raise
        return True

    def _read(self) -> dict | None:
        try:
            raw = self.path.read_bytes()
            touched = self.path.stat().st_mtime
        except FileNotFoundError:
            return None
        text = raw.decode(errors="replace")
        try:
            holder = json.loads(text)
            if not isinstance(holder, dict) or "pid" not in holder:
                raise ValueError(text[:40])
            heartbeat = max(float(holder.get("heartbeat", 0)), touched)
        except (ValueError, TypeError):
            # torn by a crash (kill -9) between creating and writing it: no owner to ask, only the
            # file's age (TORN_GRACE_S) tells a start writing it now from one that died doing so
            return {"torn": "unreadable" if text.strip() else "empty", "heartbeat": touched}
        return {**holder, "heartbeat": heartbeat}

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            holder = self._read()
            if holder is None or holder.get("owner") != self.record["owner"]:
                self._lost.set()  # taken over (we were presumed gone): never write over the new owner
                return
            try:
                # Touch, not rewrite: if another start replaced the file since the read above,
                # this only makes its (live) owner look fresher; it never restores our record.
                os.utime(self.path)
            except FileNotFoundError:
                self._lost.set()
                return
            except OSError:
                pass  # a file system hiccup must not kill training here; the next beat tries again
