"""One builder for a shared output, however many processes ask for it at once.

Every rank of every node of a job that trains on the embedded default corpus asks for it at start.
``flock`` does not hold across the nodes of many shared file systems, so the builder is whoever
creates a claim file first with ``O_CREAT | O_EXCL`` (atomic on POSIX and NFSv3+): the run
directory's lock (``megatrain.run_lock.RunLock``), here on ``.<name>.build/.lock`` beside the output.
The others wait for the claim; each then takes it in turn and finds the output finished (``build``
returns at once for a complete output), or takes the claim over when its owner is provably gone
(dead process on this host, finished SLURM job, or a heartbeat older than ``run_lock.STALE_S``), so
a crashed builder does not block them forever.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

from megatrain.errors import DataError
from megatrain.run_lock import RunDirInUse, RunLock, describe

POLL_S = 2.0


def claim_dir(output_dir: Path) -> Path:
    return output_dir.parent / f".{output_dir.name}.build"


def build_once(
    output_dir: Path,
    build: Callable[[], None],
    *,
    what: str,
    timeout_s: float,
    poll_s: float = POLL_S,
    progress: bool = True,
) -> None:
    """Make sure ``output_dir`` holds a finished build (a ``manifest.json``): run ``build`` here if
    no other process is building it, else wait for that one, at most ``timeout_s`` seconds.

    ``build`` is also called when a manifest exists: it must itself return at once for an output
    that is complete and current (``prepare_dataset`` does), and rebuild one that is not."""
    claim = claim_dir(output_dir)
    deadline = time.monotonic() + timeout_s
    announced = False
    while True:
        claim.mkdir(parents=True, exist_ok=True)  # left in place: removing it could race a claimer
        lock = RunLock(claim)
        try:
            lock.acquire()
        except RunDirInUse:
            holder = _read_claim(lock.path)
            if holder is None:
                continue  # released between our two looks: claim again
            if time.monotonic() >= deadline:
                raise DataError(
                    f"waited {timeout_s:.0f} s for {describe(holder)} to build {what} in {output_dir}, and "
                    f"it has not finished. If that process is still working, start again later or point "
                    f"data.path at a prepared dataset; if it is gone, delete {lock.path} and start again"
                ) from None
            if progress and not announced:
                print(f"[data] waiting for {describe(holder)} to build {what} in {output_dir}",
                      file=sys.stderr, flush=True)
                announced = True
            time.sleep(poll_s)
            continue
        try:
            build()
        finally:
            lock.release()
        return


def _read_claim(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return {"host": "?", "pid": "?"}  # being written: someone holds it
