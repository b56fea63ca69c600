"""What a run says to its user, in one place: the ``megatrain`` logger, printed by rank 0 only.

Every process of a job runs the same code; without a filter each line would appear once per rank.
Code logs with ``log.info`` (stdout) or ``log.warning`` (stderr) and never checks the rank itself;
``setup_console`` (idempotent; run when this module is imported) installs the handlers and the
rank filter once. A record logged with ``extra={"all_ranks": True}`` is printed by every rank. The
handlers write to whatever ``sys.stdout``/``sys.stderr`` are when a line is printed (pytest's
capture, a SLURM log redirection), not to the streams of the moment they were installed."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("megatrain")


def current_rank() -> int:
    """This process's global rank: the process group's, else the launcher's RANK, else 0."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


class _RankZero(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return getattr(record, "all_ranks", False) or current_rank() == 0


class _CurrentStream(logging.StreamHandler):
    """A StreamHandler bound to ``sys.<name>`` as it is at each emit."""

    def __init__(self, name: str):
        self._stream_name = name
        super().__init__()

    @property
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ sets it; the property decides
        pass


class _Below(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def setup_console() -> None:
    """INFO lines to stdout, WARNING and above to stderr, rank 0 only; once per process."""
    if getattr(log, "_megatrain_console", False):
        return
    out, err = _CurrentStream("stdout"), _CurrentStream("stderr")
    out.addFilter(_Below(logging.WARNING))
    err.setLevel(logging.WARNING)
    for handler in (out, err):
        handler.addFilter(_RankZero())
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False  # the root logger (e.g. a library's basicConfig) would print it again
    log._megatrain_console = True


# Installed on import: checkpoints, run dirs and the trainer report through ``log`` whoever calls
# them (the CLI, a SLURM job, a script, a test), and a logger without handlers drops INFO lines.
setup_console()
