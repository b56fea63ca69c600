"""The file-system primitives every writer of shared state uses: an atomic replace, an append
that is whole or absent, a lock, and the one error for a full disk.

``atomic_write_text`` is what keeps readers safe (they see the old file or the new one, never a
part of one); ``append_whole`` keeps a log line whole (a full disk rolls it back instead of
leaving half a line); ``exclusive_lock`` only serialises writers on one host: ``flock`` is advisory
and, on some network file systems, per host, so nothing that must hold across nodes relies on it.
Every write that runs out of space says so the same way: ``disk_full_is_reported`` turns the
``OSError`` into ``DiskFullError`` ("disk full at PATH: ... free").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from megatrain.errors import DiskFullError

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text``: written to ``<path>.tmp`` beside it (same file system),
    flushed to disk, then ``os.replace``d over it, which POSIX makes atomic. A failed write leaves
    ``path`` as it was and no ``.tmp`` behind; a full disk raises ``DiskFullError``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with disk_full_is_reported(path):
        try:
            with open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(path.parent)


def append_whole(fd: int, text: str, path: str | Path) -> None:
    """Append ``text`` to the file open as ``fd`` (``O_APPEND``) completely or not at all: a write
    that fails part way (a full disk) is cut back off before ``DiskFullError`` is raised, so the
    next reader never meets a torn line."""
    data = text.encode()
    end = os.lseek(fd, 0, os.SEEK_END)
    with disk_full_is_reported(path):
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.ftruncate(fd, end)
            raise


def append_line(path: str | Path, text: str) -> None:
    """``append_whole`` of one line to ``path`` (created if missing)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        append_whole(fd, text.rstrip("\n") + "\n", path)
    finally:
        os.close(fd)


def is_out_of_space(err: BaseException) -> bool:
    """``err`` or an exception it was raised from is a full disk (or quota); libraries that wrap
    the OSError (DCP, a writer thread) keep its text, so that counts too."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in OUT_OF_SPACE:
            return True
        if "No space left on device" in str(err) or "Disk quota exceeded" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def readable_size(n_bytes: float) -> str:
    """Bytes in the unit that reads: KB below 1 MB, MB below 1 GB, else GB."""
    for unit, scale in (("GB", 2**30), ("MB", 2**20)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 2**10:.0f} KB"


def disk_full(path: str | Path, need_bytes: int | None = None, after: str = "") -> DiskFullError:
    """The one error for a write that ran out of space at ``path``: what is free there, what was
    needed (if known), ``after`` (what is intact), and how to go on."""
    path = Path(path)
    probe = next((p for p in (path, *path.parents) if p.exists()), Path("/"))
    free = readable_size(shutil.disk_usage(probe).free)
    need = f", and this write needs about {readable_size(need_bytes)}" if need_bytes else ""
    after = after or "nothing was left half-written"
    return DiskFullError(f"disk full at {path}: {free} free{need}; {after}. Free space and run the same "
                         f"command again (a training resumes from its newest checkpoint)")


@contextlib.contextmanager
def disk_full_is_reported(path: str | Path, need_bytes: int | None = None, after: str = "") -> Iterator[None]:
    """Run the body; a full disk (``is_out_of_space``) becomes ``disk_full(path, ...)``."""
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if not is_out_of_space(err):
            raise
        raise disk_full(path, need_bytes, after) from None


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable (the directory entry, not just the file's data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive_lock(lock_path: str | Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``lock_path`` (created if missing) for the ``with`` body."""
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
