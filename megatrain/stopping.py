"""Stopping a training run from outside at a step boundary: Ctrl-C (SIGINT) and SIGTERM.

A signal only sets a flag (its handler runs mid-step, maybe mid-save); the trainer polls the
flag after each step through ``should_stop``, saves a checkpoint of that step and returns, and
``megatrain train`` then says "interrupted" and exits 130. A second signal of the same kind ends
the process at once (the handler restores the default action): the way out of a hung step.
SLURM jobs use their own flags (megatrain.slurm.job), which also decide about requeueing.
"""

from __future__ import annotations

import signal

from megatrain.parallel.comm import agree_flags

EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


class StopOnSignals:
    def __init__(self, signals: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)):
        self.signals = signals
        self.received: int | None = None

    def install(self) -> StopOnSignals:
        for signum in self.signals:
            signal.signal(signum, self._on_signal)
        return self

    def _on_signal(self, signum, frame) -> None:
        self.received = signum
        signal.signal(signum, signal.SIG_DFL)

    def __call__(self, step: int) -> bool:
        """The trainer's ``should_stop``: true on every rank once any rank got a signal."""
        (stop,) = agree_flags([self.received is not None])
        return stop
