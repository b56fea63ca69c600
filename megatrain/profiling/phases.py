"""Named phases of a training step, for the memory profiler.

The training code marks what it is doing with ``phase("head2.backward", head=2)`` and, where the
pipeline schedule or the gradient-accumulation loop knows it, ``phase_context(stage=...,
microbatch=...)``. Both cost one global lookup and nothing else unless a recorder is active in this
process (``megatrain profile memory`` activates one around its steps), so they stay in the real
training code permanently.

Phase names: ``trunk.forward``, ``head{i}.forward``, ``head{i}.loss``, ``head{i}.backward`` (i
1-based), ``trunk.backward``, ``optimizer.step``. Phases do not nest: the last pipeline stage's
``trunk.forward`` ends before its heads' phases begin.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

_NOTHING = contextlib.nullcontext()  # reusable: entering it does nothing


class PhaseRecorder(Protocol):
    """What records phases: the CPU allocation counter or the CUDA allocator's statistics."""

    context: dict  # stage / microbatch / step of the phases being entered now

    def phase(self, name: str, head: int | None) -> contextlib.AbstractContextManager: ...


_active: PhaseRecorder | None = None


def phase(name: str, *, head: int | None = None) -> contextlib.AbstractContextManager:
    """A context manager marking one phase of the step; a no-op unless a recorder is active."""
    recorder = _active
    if recorder is None:
        return _NOTHING
    return recorder.phase(name, head)


@contextlib.contextmanager
def _set_context(recorder: PhaseRecorder, values: dict) -> Iterator[None]:
    saved = dict(recorder.context)
    recorder.context.update(values)
    try:
        yield
    finally:
        recorder.context.clear()
        recorder.context.update(saved)


def phase_context(*, stage: int | None = None, microbatch: int | None = None
                  ) -> contextlib.AbstractContextManager:
    """The pipeline stage and microbatch (or gradient-accumulation micro-step) of the phases
    entered inside; a no-op unless a recorder is active."""
    recorder = _active
    if recorder is None:
        return _NOTHING
    return _set_context(recorder, {"stage": stage, "microbatch": microbatch})


@contextlib.contextmanager
def recording(recorder: PhaseRecorder) -> Iterator[PhaseRecorder]:
    """Make ``recorder`` the one ``phase`` reports to, in this process, for the block."""
    global _active
    if _active is not None:
        raise RuntimeError("a phase recorder is already active in this process")
    _active = recorder
    try:
        yield recorder
    finally:
        _active = None
