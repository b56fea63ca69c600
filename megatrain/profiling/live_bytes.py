"""Exact bytes of live tensor storage, counted at the operator level.

``LiveBytes`` is a TorchDispatchMode: every operator that returns a tensor on a new storage adds
that storage's bytes, and a finalizer on the storage subtracts them when it dies, on whatever
thread drops the last reference. Why not the torch profiler's allocation events: the profiler
only sees frees on threads it follows, and gloo's worker threads free the tensors of
asynchronous collectives (tensor parallelism's, the pipeline's sends); a tensor-parallel rank
then looked 4-12 MB heavier on every step, differently from run to run.

Storages resized in place (FSDP2 frees and re-allocates its all-gather buffers with
``UntypedStorage.resize_``, which no dispatch mode sees) are followed by wrapping that method
while a counter is active. Storage Python objects are preserved for as long as their C++ storage
lives, so the finalizer fires exactly when the memory is released.

The same counter runs on fake tensors (``FakeTensorMode``), where it measures what a step would
allocate without allocating it: the planner's traces (megatrain/planning/trace.py) use it.
"""

from __future__ import annotations

import threading
import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, is_traceable_wrapper_subclass
from torch.utils._pytree import tree_flatten

_resize_lock = threading.Lock()
_active_counters: list[LiveBytes] = []
_original_resize = torch.UntypedStorage.resize_


def _counting_resize(storage, size):
    old = storage.nbytes()
    result = _original_resize(storage, size)
    for counter in list(_active_counters):
        counter._resized(storage, old)
    return result


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created (or resized) while active that are still alive, and their peak.

    ``timeline``: record (seconds, bytes) at every change, for plots.
    """

    def __init__(self, timeline: bool = False):
        super().__init__()
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()
        self.now = 0
        self.peak = 0
        self.points: list[tuple[float, int]] | None = [] if timeline else None
        self._t0 = time.perf_counter()

    def reset_peak(self) -> int:
        """Start a new peak interval; returns the bytes live now."""
        self.peak = self.now
        return self.now

    def __enter__(self):
        with _resize_lock:
            if not _active_counters:
                torch.UntypedStorage.resize_ = _counting_resize
            _active_counters.append(self)
        return super().__enter__()

    def __exit__(self, *exc):
        with _resize_lock:
            _active_counters.remove(self)
            if not _active_counters:
                torch.UntypedStorage.resize_ = _original_resize
        return super().__exit__(*exc)

    def _changed(self, delta: int) -> None:
        with self._lock:
            self.now += delta
            self.peak = max(self.peak, self.now)
            if self.points is not None:
                self.points.append((time.perf_counter() - self._t0, self.now))

    def _track(self, storage) -> None:
        key = storage._cdata  # the C++ StorageImpl: one per allocation, whatever views share it
        if key in self._sizes:
            return
        size = storage.nbytes()
        self._sizes[key] = size
        weakref.finalize(storage, self._free, key)
        self._changed(size)

    def _free(self, key: int) -> None:
        size = self._sizes.pop(key, 0)
        if size:
            self._changed(-size)

    def _resized(self, storage, old: int) -> None:
        key, new = storage._cdata, storage.nbytes()
        if key in self._sizes:
            self._sizes[key] = new
            self._changed(new - old)
        elif new:  # first seen here (allocated empty before the counter, or by a resize)
            self._track(storage)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # An output on an input's storage (a view, ``detach``, an in-place op, a no-op ``to``) is
        # no allocation; counting it would count parameters and inputs made before the counter.
        inputs = {s._cdata for t in tree_flatten((args, kwargs))[0] for s in _storages(t)}
        for item in tree_flatten(out)[0]:
            for storage in _storages(item):
                if storage._cdata not in inputs:
                    self._track(storage)
        return out


def _storages(item) -> list:
    """The storages behind a tensor: a wrapper subclass's (DTensor's) are its inner tensors'."""
    if not isinstance(item, torch.Tensor):
        return []
    if is_traceable_wrapper_subclass(item):
        names, _ = item.__tensor_flatten__()
        return [s for name in names for s in _storages(getattr(item, name))]
    return [item.untyped_storage()]
