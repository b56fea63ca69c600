"""Facts about the machine this process runs on."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    """The CPUs this process may use: its affinity (a container's or a SLURM step's share), not the
    host's count, which ``os.cpu_count`` gives."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
