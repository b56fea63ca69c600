"""Atomic, resharding-friendly checkpoints through torch.distributed.checkpoint (DCP).

Layout under ``run.dir/checkpoints`` (the names are ``RunDir``'s)::

    step_0000050/      one DCP checkpoint (model, optimizer, scheduler, data loader, RNG, step;
                       the model and optimizer in the layout-independent form of
                       megatrain.parallel.model_state, whatever the engine)
    step_0000100/
    latest             the name of the newest complete checkpoint

A save writes into ``step_N.tmp``, adds the run's config and the checksums of every file, renames
it to ``step_N`` and only then replaces ``latest`` (``os.replace`` is atomic), so a crash at any
point leaves ``latest`` on a complete checkpoint. A folder leaves the name ``step_N`` the same way,
whole: pruning (or replacing) renames it to ``step_N.deleting`` before deleting it, so a reader
(generate, eval, export) that lists ``step_N`` finds a complete checkpoint or none, never half of
one. Leftover ``*.tmp`` and ``*.deleting`` folders are removed at the next start. A resume verifies
the checksums and falls back to the newest intact checkpoint; nothing is deleted but checkpoints
older than the ``keep`` newest. DCP is used even on one process so that the parallel trainer can
load a checkpoint into any other layout.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.checkpoint_integrity import CHECKSUMS, checksums_text, problem_of, unverified_warning
from megatrain.checkpoint_pins import unless_pinned, write_pin_file
from megatrain.console import log
from megatrain.errors import CheckpointError, DiskFullError
from megatrain.files import atomic_write_text, disk_full, disk_full_is_reported, fsync_dir, is_out_of_space
from megatrain.parallel.comm import agree_flags, all_reduce_host
from megatrain.run_dir import CONFIG_FILE, RunDir


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


@contextlib.contextmanager
def quiet_single_process():
    """DCP warns on every call without a process group; one process is a normal run here. It
    also logs a traceback to the root logger when a checkpoint's metadata cannot be read (damaged,
    or the folder pruned while a reader loads it), before failing: the caller reports that failure
    itself, in one line, so those records are dropped."""
    root = logging.getLogger()
    root.addFilter(_drop_metadata_tracebacks)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable")
            yield
    finally:
        root.removeFilter(_drop_metadata_tracebacks)


def _drop_metadata_tracebacks(record: logging.LogRecord) -> bool:
    return not (record.name == "root" and "torch/distributed/checkpoint" in record.pathname.replace("\\", "/")
                and "metadata is not found" in record.getMessage())


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


DELETING = ".deleting"  # suffix of a folder on its way out (pruned or replaced)
__all__ = ["CheckpointManager", "DiskFullError", "RNGState", "quiet_single_process"]


class CheckpointManager:
    """Saves, verifies and finds the checkpoints of one run directory.

    With ``async_save`` a save only stages the state (a copy in host memory) and the files are
    written by a background thread on a process group of its own, used by that thread alone
    (collectives from two threads on one group can be ordered differently on each rank). The
    rename to ``step_N`` and the ``latest`` pointer follow once every rank's writes are done: at
    the next save or at ``finish()``, so ``latest`` never names a checkpoint still being written.

    ``config_text`` (the run's config as YAML) is stored in every checkpoint beside its checksums
    (checkpoint_integrity.py), so a checkpoint says what it was saved with.
    """

    def __init__(self, run_dir: RunDir | str | Path, keep: int, async_save: bool = False,
                 config_text: str | None = None):
        self.run_dir = run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)
        self.root = self.run_dir.checkpoints_dir
        self.keep = keep
        self.async_save = async_save
        self.config_text = config_text
        self._group = None
        self._pending = None  # (future, step) of an async save not yet finalised

    def prepare(self) -> None:
        """Create the folder and drop partial saves left by a crash (before anything is written:
        a full disk may be what interrupted them)."""
        if _rank() == 0:
            try:
                with disk_full_is_reported(self.root, after="nothing was written"):
                    self.root.mkdir(parents=True, exist_ok=True)
            except DiskFullError:
                raise
            except OSError as err:
                raise CheckpointError(f"cannot create {self.root}: {err}; choose a writable "
                                      f"run.dir") from None
            for leftover in [*self.root.glob("*.tmp"), *self.root.glob(f"*{DELETING}")]:
                _remove(leftover)
        if self.async_save and dist.is_initialized() and self._group is None:
            self._group = dist.new_group(backend="gloo")  # collective: every rank calls prepare
        _barrier()

    # ---- finding checkpoints ----------------------------------------------------------------------
    def steps(self) -> list[int]:
        """Steps of the complete-looking checkpoint folders, oldest first."""
        return self.run_dir.checkpoint_steps()

    def candidates(self, step: int = 0, asked_as: str = "step") -> list[int]:
        """The checkpoints to try, newest first; only ``step``'s when one is asked for (under the
        name ``asked_as``, for the error if it does not exist)."""
        steps = self.steps()
        if not step:
            return sorted(steps, reverse=True)
        if step not in steps:
            raise CheckpointError(f"{asked_as}={step}: there is no checkpoint of that step in "
                                  f"{self.root} (there are: {', '.join(map(str, steps)) or 'none'})")
        return [step]

    def path_of(self, step: int) -> Path:
        return self.run_dir.checkpoint_path(step)

    def latest(self) -> Path | None:
        """The checkpoint ``latest`` names (None without one); a damaged pointer is reported and
        ignored, since the step folders themselves say which checkpoints exist."""
        pointer = self.run_dir.latest_path
        if not pointer.is_file():
            return None
        name = self.run_dir.latest_name() or ""
        if RunDir.step_of(Path(name)) is None:
            _say(f"warning: {pointer} is damaged (it should name a step_* folder); ignoring it")
            return None
        return self.root / name

    def resume(self, state: dict, load_step: int = 0) -> Path | None:
        """Load the newest intact checkpoint into ``state`` (or the one of ``load_step``).

        Checkpoints are tried newest first; one that fails verification or loading is reported by
        name and the next older one is tried. Checkpoints newer than the one loaded (damaged ones,
        or later ones when rewinding to ``load_step``) are moved to ``run.dir/archive/``, never
        deleted, and ``latest`` then names the loaded one. Returns it, or None if there is none.
        """
        candidates = self.candidates(load_step, asked_as="checkpoint.load_step")
        if not load_step:
            self.latest()  # only to report a damaged pointer: the folders say what exists
        failures = []
        for step in candidates:
            path = self.path_of(step)
            problem = problem_of(path)
            if problem is None:
                try:
                    self.load(state, path)
                except CheckpointError as err:
                    problem = str(err)
            if problem is None:
                # each unusable one said once, now that it is known what was loaded instead
                for name, why in failures:
                    _say(f"warning: checkpoint {self.root / name} is not usable ({why}); resuming from "
                         f"the older {path.name}")
                if (warning := unverified_warning(path)) is not None:
                    _say(warning, file=sys.stderr)
                self._make_latest(step, archive_label="rewind" if load_step else "damaged")
                return path
            failures.append((path.name, problem))
        if failures:  # said once, in the error
            raise CheckpointError(
                "no intact checkpoint to resume from in " + str(self.root) + ": "
                + "; ".join(f"{name}: {why}" for name, why in failures)
                + ". Restore one from a backup, or start fresh (checkpoint.resume=false with "
                  "run.overwrite=archive moves this run aside)")
        return None

    def _make_latest(self, step: int, archive_label: str) -> None:
        """Archive the checkpoints newer than ``step``, with the metrics of the steps after it
        (a rewind's evidence, or a damaged checkpoint's), and point ``latest`` at it."""
        def archive_newer_and_point():
            with disk_full_is_reported(self.run_dir.path, after="no checkpoint or metrics record was lost"):
                move_newer_and_point()

        def move_newer_and_point():
            newer = [self.path_of(s) for s in self.steps() if s > step]
            target = self.run_dir.archive(newer, archive_label) if newer else None
            if target is None and archive_label == "rewind":  # a rewind keeps later metrics even so
                target = self.run_dir.new_archive_folder(archive_label)
            moved = [p.name for p in newer]
            if target is not None:
                cut = self.run_dir.cut_metrics(step, archive_to=target)
                if cut.archived:
                    moved.append(f"the metrics of steps {min(cut.later_steps)}-{max(cut.later_steps)} "
                                 f"({cut.archived} records)")
                if cut.damaged:
                    _say(cut.damage_note(self.run_dir.metrics_path))
            if moved:
                _say(f"moved {', '.join(moved)} to {target}")
            if (self.latest() or Path()).name != self.path_of(step).name:
                atomic_write_text(self.run_dir.latest_path, self.path_of(step).name + "\n")
        _on_rank_0(archive_newer_and_point, f"make {self.path_of(step).name} the latest checkpoint")

    # ---- saving ----------------------------------------------------------------------------------
    def save(self, state: dict, step: int) -> None:
        self.finish()  # one save in flight at a time
        tmp = self._tmp(step)
        with self._disk_full_is_reported(tmp):
            if _rank() == 0 and tmp.exists():
                shutil.rmtree(tmp)
            _barrier()
            with quiet_single_process():
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
        with self._disk_full_is_reported(self._tmp(step)):
            future.result()
            self._publish(step)

    def _tmp(self, step: int) -> Path:
        final = self.path_of(step)
        return final.with_name(final.name + ".tmp")

    def _publish(self, step: int) -> None:
        """Every rank has written step's files: add the config and checksums, rename the folder,
        then move ``latest``."""
        _barrier()  # main-thread agreement on the default group (see poll)
        tmp, final = self._tmp(step), self.path_of(step)
        def add_config_and_pin_file():
            if self.config_text is not None:
                atomic_write_text(tmp / CONFIG_FILE, self.config_text)
            write_pin_file(tmp)
        _on_rank_0(add_config_and_pin_file, f"write the config and pin file into {tmp}")
        manifest = checksums_text(tmp)  # collective: every rank hashes a share
        _on_rank_0(lambda: self._rename_and_point(tmp, final, manifest), f"publish {final}")

    def _rename_and_point(self, tmp: Path, final: Path, manifest: str) -> None:
        atomic_write_text(tmp / CHECKSUMS, manifest)
        if final.exists() or final.is_symlink():  # re-saving a step (e.g. after a resume): replace it whole
            _remove(final)
        os.replace(tmp, final)
        fsync_dir(self.root)
        atomic_write_text(self.run_dir.latest_path, final.name + "\n")
        self._prune(keep_also=final)

    @contextlib.contextmanager
    def _disk_full_is_reported(self, tmp: Path):
        """Turn a write that ran out of space into one clear error, leaving no partial folder.

        DCP does not always surface ENOSPC as such (torch's writer can fail with "unexpected pos
        704 vs 598" instead), so the free space is checked too when a save fails.
        """
        try:
            yield
        except DiskFullError:
            raise
        except (Exception, CheckpointException) as err:
            usage = shutil.disk_usage(self.root)
            need = _folder_bytes(self.path_of(max(self.steps(), default=0)))
            if not (is_out_of_space(err) or usage.free < max(need, 64 << 20)):
                raise
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self._pending = None
            raise disk_full(self.root, need or None,
                            after="the previous checkpoint is intact (lowering checkpoint.keep frees "
                                  "space too)") from None

    # ---- loading ---------------------------------------------------------------------------------
    def load(self, state: dict, path: Path) -> None:
        """Load ``state`` (name -> Stateful) from ``path``; every key must be in the checkpoint.

        The one exception is a rank's RNG entry: a run resumed on more ranks than it was saved
        with has no RNG state for the new ranks, and they keep their fresh seeds; a checkpoint
        saved without CUDA has no CUDA generator state for a resume on a machine with one.
        """
        flat = {name: obj.state_dict() for name, obj in state.items()}
        try:
            saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
            for name, obj in state.items():
                if isinstance(obj, RNGState):  # only the ranks and generators the saver had
                    flat[name] = {k: {g: t for g, t in v.items() if f"{name}.{k}.{g}" in saved}
                                  for k, v in flat[name].items()
                                  if any(key.startswith(f"{name}.{k}.") for key in saved)}
            with quiet_single_process():
                dcp.load(flat, checkpoint_id=str(path))
        # DCP wraps rank failures in CheckpointException, which derives from BaseException; a
        # damaged .metadata fails to unpickle with any of several exception types.
        except (Exception, CheckpointException) as err:
            lines = str(err).strip().splitlines() or [type(err).__name__]
            raise CheckpointError(f"cannot load checkpoint {path}: {lines[-1]}") from err
        for name, obj in state.items():
            obj.load_state_dict(flat[name])

    def _prune(self, keep_also: Path) -> None:
        """Keep the ``keep`` newest checkpoints; never the one just written or ``latest``'s, nor
        one a reader pins (generate, eval, export): a later save removes that one."""
        protected = {keep_also.name, (self.latest() or Path()).name}
        steps = [self.path_of(s) for s in self.steps()]
        for old in steps[:-self.keep]:
            if old.name not in protected:
                try:
                    with unless_pinned(old) as free:
                        if free:
                            _remove(old)
                except OSError as err:  # the new checkpoint is published: a leftover is no failure
                    _say(f"warning: could not remove the old checkpoint {old} ({err}); delete it by hand")


def _on_rank_0(action, what: str) -> None:
    """Run a file-system action on rank 0 and let every rank learn whether it failed, so that a
    failure there (a full disk, say) is raised on every rank instead of leaving the others waiting
    in their next collective."""
    error = None
    if _rank() == 0:
        try:
            action()
        except Exception as err:  # noqa: BLE001 - re-raised below, after the agreement
            error = err
    (failed,) = agree_flags([error is not None])
    if error is not None:
        raise error
    if failed:
        raise CheckpointError(f"rank 0 could not {what} (its output says why)")


def _folder_bytes(folder: Path) -> int:
    if not folder.is_dir():
        return 0
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def _remove(path: Path) -> None:
    """Delete a checkpoint folder (or whatever holds its name): first renamed out of the step_N
    names, so a reader never finds it half deleted; a file in its place goes the same way."""
    doomed = path if path.name.endswith(DELETING) else path.with_name(path.name + DELETING)
    if doomed != path:
        try:
            os.replace(path, doomed)
        except FileNotFoundError:
            return
        except OSError:  # e.g. a folder of that name left by an earlier crash: clear it, then retry
            _remove(doomed)
            os.replace(path, doomed)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        doomed.unlink(missing_ok=True)


def _say(message: str, file=None) -> None:
    """Rank 0's line: on stdout, or stderr when ``file`` is sys.stderr (a warning)."""
    (log.warning if file is sys.stderr else log.info)(message)
