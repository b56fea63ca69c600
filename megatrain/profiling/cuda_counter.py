"""Allocated bytes per phase on a GPU, from the CUDA caching allocator's own statistics.

At each phase entry the allocator's peak statistic is reset, so ``max_memory_allocated`` at the
exit is the peak inside the phase; the rank's peak folds in the peaks between phases as well.
``memory_allocated`` counts the bytes of live tensors (not the allocator's cached blocks), like
the CPU counter. Beside the numbers it keeps the allocator's history and writes
``rank{r}_snapshot.pickle`` (open it in https://pytorch.org/memory_viz) at the end, or at the
moment an allocation fails (out of memory).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import torch

_HISTORY_ENTRIES = 200_000  # allocator events kept for the snapshot


class CudaAllocatorCounter:
    device = "cuda"

    def __init__(self, device: torch.device, snapshot_path: Path):
        self.context: dict = {"stage": None, "microbatch": None, "step": None}
        self.cuda, self.snapshot_path = device, snapshot_path
        self._phases: list[dict] = []
        self._step_peaks: dict[int, int] = {}
        self._points: list[tuple[float, int]] = []

    def _allocated(self) -> int:
        return torch.cuda.memory_allocated(self.cuda) - self._origin

    def _max_allocated(self) -> int:
        return torch.cuda.max_memory_allocated(self.cuda) - self._origin

    def _reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.cuda)

    def _peak_since_reset(self) -> int:
        """The peak since the last reset, and start a new interval."""
        peak = self._max_allocated()
        self._reset_peak()
        step = self.context["step"]
        if step is not None:
            self._step_peaks[step] = max(self._step_peaks.get(step, 0), peak)
        return peak

    def start(self) -> None:
        # Python stacks only: with C++ stacks ("all", the default) the snapshot's symbol lookup
        # (addr2line) has taken minutes per dump in torch's and torchtitan's own reports
        torch.cuda.memory._record_memory_history(stacks="python", max_entries=_HISTORY_ENTRIES)
        torch._C._cuda_attach_out_of_memory_observer(self._dump_on_oom)
        self._origin = torch.cuda.memory_allocated(self.cuda)
        torch.cuda.reset_peak_memory_stats(self.cuda)
        self._t0 = time.perf_counter()

    def stop(self) -> None:
        self._dump_snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)

    def _dump_snapshot(self) -> None:
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(self.snapshot_path))

    def _dump_on_oom(self, device, alloc, device_allocated, device_free) -> None:
        self._dump_snapshot()
        print(f"out of memory on {self.cuda} asking for {alloc} bytes; allocator snapshot written to "
              f"{self.snapshot_path}", flush=True)

    @contextlib.contextmanager
    def phase(self, name: str, head: int | None) -> Iterator[None]:
        self._peak_since_reset()  # the gap since the last phase counts towards the step's peak
        record = {"name": name, "head": head, **self.context, "start_bytes": self._allocated(),
                  "start_s": time.perf_counter() - self._t0}
        try:
            yield
        finally:
            record.update(end_bytes=self._allocated(), peak_bytes=self._peak_since_reset(),
                          end_s=time.perf_counter() - self._t0)
            self._phases.append(record)
            self._points += [(record["start_s"], record["start_bytes"]),
                             ((record["start_s"] + record["end_s"]) / 2, record["peak_bytes"]),
                             (record["end_s"], record["end_bytes"])]

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        self._peak_since_reset()
        self.context["step"] = step
        if step not in self._step_peaks:
            self._step_peaks[step] = self._allocated()
        try:
            yield
        finally:
            self._peak_since_reset()
            self.context["step"] = None

    def result(self, profiled_steps: list[int]) -> dict:
        phases = [p for p in self._phases if p["step"] in profiled_steps]
        origin = phases[0]["start_s"] if phases else 0.0
        for p in phases:
            p["start_s"], p["end_s"] = p["start_s"] - origin, p["end_s"] - origin
        points = [(t - origin, b) for t, b in self._points if t >= origin]
        return {"peak_bytes": max(self._step_peaks[s] for s in profiled_steps), "phases": phases,
                "timeline": {"t_s": [t for t, _ in points], "bytes": [b for _, b in points]}}
