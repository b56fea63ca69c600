"""The GPU check's time budget and its report, written as it goes.

A lent GPU is held for minutes, and the command may be killed at its time limit: so every section
of the check runs against one ``Budget`` (a row that would not fit says so instead of starting),
and the ``Report`` rewrites ``report.md`` and ``results.json`` in the output folder after every
row, so a run cut short still returns everything it measured. A section that raises is recorded
with its error and the next one runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import traceback
from pathlib import Path


class Budget:
    """Seconds left until a deadline, and whether a step estimated to take ``need_s`` still fits."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def skip_reason(self, need_s: float) -> str:
        left = max(self.left(), 0)
        return f"skipped: {left:.0f} s of the {self.seconds:.0f} s budget left, needs ~{need_s:.0f} s"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class Report:
    """Markdown sections (in the order first opened) plus a JSON record of the raw numbers."""

    def __init__(self, out_dir: Path | None, title: str, preamble: str):
        self.out_dir = Path(out_dir) if out_dir else None
        self.title, self.preamble = title, preamble
        self.sections: dict[str, str] = {}
        self.results: dict[str, object] = {}
        self.started = time.monotonic()
        self.finished: float | None = None
        if self.out_dir:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def set(self, section: str, text: str, results: object = None) -> None:
        """Replace ``section``'s markdown (and its raw numbers) and rewrite the files."""
        self.sections[section] = text
        if results is not None:
            self.results[section] = results
        self.write()

    @contextlib.contextmanager
    def guarded(self, section: str):
        """Run a section; an exception is recorded in its text (traceback to stdout) instead of
        ending the check."""
        try:
            yield
        except Exception as err:  # noqa: BLE001 - one section's failure must not stop the others
            traceback.print_exc()
            note = f"**failed**: `{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}`"
            previous = self.sections.get(section, "")
            self.set(section, f"{previous}\n\n{note}".strip())
            print(f"[{section}] failed: {type(err).__name__}: {err}", flush=True)

    def finish(self) -> None:
        self.finished = time.monotonic()
        self.write()

    def markdown(self) -> str:
        if self.finished is None:
            timing = f"{time.monotonic() - self.started:.0f} s so far (the run had not finished)."
        else:
            timing = f"{self.finished - self.started:.0f} s in all."
        body = "\n\n".join(self.sections.values())
        return f"### {self.title}\n\n{self.preamble} {timing}\n\n{body}\n"

    def write(self) -> None:
        if not self.out_dir:
            return
        _atomic_write(self.out_dir / "report.md", self.markdown())
        _atomic_write(self.out_dir / "results.json", json.dumps(self.results, indent=1, default=str) + "\n")
