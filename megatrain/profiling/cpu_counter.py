"""Exact live tensor-storage bytes on the CPU, per phase (``LiveBytes``, live_bytes.py).

Why not the resident set size: it counts the Python heap, freed-but-cached pages and the
profiler itself. ``LiveBytes`` counts the bytes of every live tensor storage, whichever thread
frees it. The count starts at zero when the counter starts, so the counter must start before
the model and the optimizer are built; what existed earlier is not counted. Phases, steps and
peaks are kept exactly as on CUDA (cuda_counter.py), with ``LiveBytes`` in place of the caching
allocator's statistics.
"""

from __future__ import annotations

import time

import torch

from megatrain.profiling.cuda_counter import CudaAllocatorCounter
from megatrain.profiling.live_bytes import LiveBytes


class CpuAllocationCounter(CudaAllocatorCounter):
    device = "cpu"

    def __init__(self):
        super().__init__(torch.device("cpu"), snapshot_path=None)
        self._live = LiveBytes()

    def _allocated(self) -> int:
        return self._live.now

    def _max_allocated(self) -> int:
        return self._live.peak

    def _reset_peak(self) -> None:
        self._live.reset_peak()

    def start(self) -> None:
        self._live.__enter__()
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._live.__exit__(None, None, None)
