"""Atomic, resharding-friendly checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``run.dir/checkpoints``::

    step_0000050/      one DCP checkpoint (model, optimizer, scheduler, data loader, RNG, step;
                       the model and optimizer in the layout-independent form of
                       megatrain.parallel.model_state, whatever the engine)
    step_0000100/
    latest             the name of the newest complete checkpoint

A save writes into ``step_N.tmp``, renames it to ``step_N`` and only then replaces ``latest``
(``os.replace`` is atomic), so a crash at any point leaves ``latest`` on a complete checkpoint.
Leftover ``*.tmp`` folders are removed at the next start. DCP is used even on one process so
that the parallel trainer can load a checkpoint into any other layout.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.errors import CheckpointError
from megatrain.files import atomic_write_text, fsync_dir
from megatrain.parallel.comm import all_reduce_host

STEP_DIR = re.compile(r"^step_(\d{7,})$")


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns on every call without a process group; one process is a normal run here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
        yield


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class RNGState(Stateful):
    """This rank's torch RNG states (CPU and, if present, CUDA), keyed by rank."""

    def state_dict(self):
        state = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return {f"rank{_rank()}": state}

    def load_state_dict(self, state):
        mine = state.get(f"rank{_rank()}")
        if mine is None:  # resumed on more ranks than saved: nothing to restore for this one
            return
        torch.set_rng_state(mine["cpu"])
        if "cuda" in mine and torch.cuda.is_available():
            torch.cuda.set_rng_state(mine["cuda"])


class CheckpointManager:
    """Saves and finds checkpoints of one run directory.

    With ``async_save`` a save only stages the state (a copy in host memory) and the files are
    written by a background thread on a process group of its own, used by that thread alone
    (collectives from two threads on one group can be ordered differently on each rank). The rename to
    ``step_N`` and the ``latest`` pointer follow once every rank's writes are done: at the next
    save or at ``finish()``, so ``latest`` never names a checkpoint still being written.
    """

    def __init__(self, run_dir: str | Path, keep: int, async_save: bool = False):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.async_save = async_save
        self._group = None
        self._pending = None  # (future, step) of an async save not yet finalised

    def prepare(self) -> None:
        """Create the folder and drop partial saves left by a crash."""
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise CheckpointError(f"cannot create {self.root}: {err}; choose a writable run.dir") from None
            for leftover in self.root.glob("*.tmp"):
                shutil.rmtree(leftover, ignore_errors=True)
        if self.async_save and dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")  # collective: every rank calls prepare
        _barrier()

    def latest(self) -> Path | None:
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / ".metadata").is_file():
            raise CheckpointError(f"{pointer} names {path.name}, which is missing or incomplete; "
                                  f"point it at a complete step_* folder or remove it to start fresh")
        return path

    def save(self, state: dict, step: int) -> None:
        self.finish()  # one save in flight at a time
        tmp = self._tmp(step)
        if _rank() == 0 and tmp.exists():
            shutil.rmtree(tmp)
        _barrier()
        with _quiet_single_process():
            if self.async_save:
                self._pending = (dcp.async_save(state, checkpoint_id=str(tmp),
                                                process_group=self._group), step)
            else:
                dcp.save(state, checkpoint_id=str(tmp))
        if not self.async_save:
            self._publish(step)

    def poll(self) -> None:
        """Publish an async save as soon as every rank has written it (call once per step)."""
        if self._pending is None:
            return
        done = torch.tensor([int(self._pending[0].done())])
        if dist.is_initialized():
            # On the default group, from the main thread at the same point on every rank: the
            # checkpoint group belongs to the writer threads, and a second thread's collective on
            # it could interleave differently on each rank and deadlock.
            all_reduce_host(done, dist.group.WORLD, op=dist.ReduceOp.MIN)
        if done.item():
            self.finish()

    def finish(self) -> None:
        """Wait for an async save in flight and publish it as ``latest``."""
        if self._pending is None:
            return
        future, step = self._pending
        self._pending = None
        future.result()
        self._publish(step)

    def _tmp(self, step: int) -> Path:
        return self.root / f"step_{step:07d}.tmp"

    def _publish(self, step: int) -> None:
        """Every rank has written step's files: rename the folder, then move ``latest``."""
        _barrier()  # main-thread agreement on the default group (see poll)
        name = f"step_{step:07d}"
        final = self.root / name
        if _rank() == 0:
            if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
                shutil.rmtree(final)
            os.replace(self._tmp(step), final)
            fsync_dir(self.root)
            atomic_write_text(self.root / "latest", name + "\n")
            self._prune()
        _barrier()

    def load(self, state: dict, path: Path) -> None:
        """Load ``state`` (name -> Stateful) from ``path``; every key must be in the checkpoint.

        The one exception is a rank's RNG entry: a run resumed on more ranks than it was saved
        with has no RNG state for the new ranks, and they keep their fresh seeds.
        """
        flat = {name: obj.state_dict() for name, obj in state.items()}
        saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        for name, obj in state.items():
            if isinstance(obj, RNGState):
                flat[name] = {k: v for k, v in flat[name].items()
                              if any(key.startswith(f"{name}.{k}.") for key in saved)}
        try:
            with _quiet_single_process():
                dcp.load(flat, checkpoint_id=str(path))
        # DCP wraps rank failures in CheckpointException, which derives from BaseException.
        except (Exception, CheckpointException) as err:
            cause = str(err).strip().splitlines()[-1]
            raise CheckpointError(f"cannot load checkpoint {path}: {cause}. If the model config "
                                  f"changed, start a new run.dir") from err
        for name, obj in state.items():
            obj.load_state_dict(flat[name])

    def _prune(self) -> None:
        steps = sorted(p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name))
        for old in steps[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)

