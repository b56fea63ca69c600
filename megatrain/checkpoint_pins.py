"""Readers pin the checkpoint they read; a training's pruning passes over a pinned one.

A training keeps only its ``checkpoint.keep`` newest checkpoints and deletes the older ones at each
save, while generate, eval and export in other processes may be reading one of them. Retrying with
the newest one is not enough when a read takes longer than a few training steps (a big model, a
loaded machine): every retry can lose the race again. So a reader holds a shared ``flock`` on the
folder's ``PIN_FILE`` while it checks and loads it, and the pruning training takes an exclusive
lock *without waiting* before it renames a folder away: a pinned folder stays until a later save
prunes it. The training never waits for a reader.

flock is advisory and not every file system honours it everywhere (Linux NFS clients emulate it
with POSIX byte-range locks, which hold across hosts on NFSv4; some file systems refuse it with
ENOLCK). Where it does not hold, a reader still never sees half a folder, since pruning renames a
folder out of the ``step_N`` names before deleting it, and it reads the newest one instead.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

PIN_FILE = ".readers"  # empty; written into every checkpoint before its checksums


def write_pin_file(folder: Path) -> None:
    (folder / PIN_FILE).touch()


@contextlib.contextmanager
def pinned(folder: Path) -> Iterator[None]:
    """Hold ``folder`` against pruning for the ``with`` body. Raises FileNotFoundError when the
    folder was pruned before the pin took (the caller reads the newest one instead). A folder
    without a pin file (saved by a megatrain older than pins) or on a file system without flock
    is read unpinned."""
    path = folder / PIN_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        if not folder.is_dir():
            raise
        fd = None
    try:
        if fd is not None and _flock(fd, fcntl.LOCK_SH) is not None:
            # Between our open and our lock the pruner may have locked, renamed the folder away and
            # let go: then the path no longer leads to the file we hold (os.stat raises, or finds
            # another file if the step was saved again).
            held, now = os.fstat(fd), os.stat(path)
            if (held.st_dev, held.st_ino) != (now.st_dev, now.st_ino):
                raise FileNotFoundError(f"{folder} was replaced while it was pinned")
        yield
    finally:
        if fd is not None:
            os.close(fd)


@contextlib.contextmanager
def unless_pinned(folder: Path) -> Iterator[bool]:
    """For the pruner: True, with the folder locked against new pins for the ``with`` body, when no
    reader pins it; False when one does. Never waits."""
    try:
        fd = os.open(folder / PIN_FILE, os.O_RDWR)  # read-write: NFS grants exclusive locks only so
    except OSError:  # no pin file (an older save), or not ours to open: nobody can pin it either
        yield True
        return
    try:
        yield _flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB) is not False
    finally:
        os.close(fd)


def _flock(fd: int, how: int) -> bool | None:
    """True when locked, False when another holds the lock (``LOCK_NB``), None where the file
    system refuses flock (ENOLCK, EOPNOTSUPP): then nobody can pin, and everyone goes on unpinned."""
    try:
        fcntl.flock(fd, how)
    except BlockingIOError:
        return False
    except OSError:
        return None
    return True
