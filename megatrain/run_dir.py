"""The run directory: its layout, who may write it, its config and what a fresh start may do.

``RunDir`` is the one owner of the names below and of how each file is read and written; every
command (train, resume, profile, generate, eval, export, submit, status) goes through it.

    run.dir/
      .lock                 the training that writes here (run_lock.py owns the record's format)
      config.yaml           the config of the latest start, written once its checkpoint loaded
      config_history.jsonl  every change of the config on a resume, with the step it took effect
      metrics.jsonl, tensorboard/
      checkpoints/step_NNNNNNN/, checkpoints/latest   (checkpoint.py writes them)
      eval/                 `megatrain eval` results
      archive/<label>-<time>/   whatever a fresh start or a rewind moved aside; nothing is deleted
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from megatrain.config import Config, load_saved_config, to_yaml
from megatrain.console import log
from megatrain.errors import ConfigError, UserError
from megatrain.files import append_line, atomic_write_text, disk_full_is_reported
from megatrain.parallel.comm import agree_flags
from megatrain.run_lock import RunLock

CONFIG_FILE = "config.yaml"  # also the name of the config copy inside each checkpoint folder
STEP_DIR = re.compile(r"^step_(\d{7,})$")


class RunDir:
    """A run directory's files, by name; ``path`` is kept as given (absolute once resolved)."""

    HISTORY = "config_history.jsonl"
    METRICS = "metrics.jsonl"
    TENSORBOARD = "tensorboard"
    CHECKPOINTS = "checkpoints"
    LATEST = "latest"
    EVAL = "eval"
    ARCHIVE = "archive"
    # What a fresh start moves aside: everything a training run writes.
    RUN_OUTPUTS = (CHECKPOINTS, METRICS, TENSORBOARD, CONFIG_FILE, HISTORY)
    # What each name must be where it exists (anything else there is not megatrain's: a clear error)
    FILES = {CONFIG_FILE: "config", HISTORY: "config history", METRICS: "metrics"}
    FOLDERS = {CHECKPOINTS: "checkpoints", TENSORBOARD: "TensorBoard", EVAL: "eval results",
               ARCHIVE: "archive"}

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __str__(self) -> str:
        return str(self.path)

    # ---- names ---------------------------------------------------------------------------------
    @property
    def config_path(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def history_path(self) -> Path:
        return self.path / self.HISTORY

    @property
    def metrics_path(self) -> Path:
        return self.path / self.METRICS

    @property
    def tensorboard_dir(self) -> Path:
        return self.path / self.TENSORBOARD

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / self.CHECKPOINTS

    @property
    def latest_path(self) -> Path:
        return self.checkpoints_dir / self.LATEST

    @property
    def eval_dir(self) -> Path:
        return self.path / self.EVAL

    def checkpoint_path(self, step: int) -> Path:
        return self.checkpoints_dir / f"step_{step:07d}"

    @staticmethod
    def step_of(folder: Path) -> int | None:
        """The step of a checkpoint folder's name, or None for any other name."""
        match = STEP_DIR.match(Path(folder).name)
        return int(match.group(1)) if match else None

    # ---- what is there -------------------------------------------------------------------------
    def checkpoint_steps(self) -> list[int]:
        """Steps of the checkpoints, oldest first: every entry named step_N, folder or not (a file
        there is a damaged checkpoint, reported as such when it is tried, never skipped)."""
        folder = self.checkpoints_dir
        if not folder.is_dir():
            return []
        return sorted(s for p in folder.iterdir() if (s := self.step_of(p)) is not None)

    def has_checkpoints(self) -> bool:
        return bool(self.checkpoint_steps())

    def has_history(self) -> bool:
        """Checkpoints or logged steps: what a fresh start would otherwise overwrite."""
        metrics = self.metrics_path
        return self.has_checkpoints() or (metrics.is_file() and metrics.stat().st_size > 0)

    def started_without_checkpoint(self) -> bool:
        """A training started here (config.yaml) and stopped before its first checkpoint: the same
        command restarts it from step 0."""
        return self.config_path.is_file() and not self.has_checkpoints()

    def check_layout(self) -> None:
        """Each of the run dir's names that exists is what megatrain keeps there (a file, or a
        folder), so that nothing fails later with a raw OSError half way through a run."""
        kinds = ((self.FILES, "file", Path.is_file), (self.FOLDERS, "folder", Path.is_dir))
        for names, want, is_kind in kinds:
            for name, what in names.items():
                path = self.path / name
                if path.exists() and not is_kind(path):
                    raise ConfigError(f"run.dir={self.path}: {path} is not a {want}, and megatrain keeps "
                                      f"its {what} {want} there; move it out of the run dir (or use "
                                      f"another run.dir)")

    def latest_name(self) -> str | None:
        """What ``checkpoints/latest`` names (None without a readable pointer)."""
        try:
            return self.latest_path.read_text().strip() or None
        except (OSError, UnicodeDecodeError):
            return None

    # ---- the config ----------------------------------------------------------------------------
    def read_config(self) -> Config:
        """The config of the latest start, as that run trained (``load_saved_config``)."""
        return load_saved_config(self.config_path)

    def saved_config_tree(self) -> dict | None:
        """config.yaml as plain data (None without one): what the next start compares against."""
        if not self.config_path.is_file():
            return None
        return yaml.safe_load(self.config_path.read_text()) or {}

    def write_config(self, cfg: Config) -> None:
        atomic_write_text(self.config_path, to_yaml(cfg))

    def record_config(self, cfg: Config, step: int) -> dict:
        """Write config.yaml (after a successful load) and append what changed since the last
        start to config_history.jsonl with the step it applies from; returns the changes. Each
        file is written whole or not at all (a full disk raises DiskFullError).

        ``model.vocab_size`` 0 means "the dataset's": a start that resolves it (a SLURM job after
        ``submit`` wrote the config) changes nothing."""
        old_tree = self.saved_config_tree()
        old = _flat(old_tree) if old_tree else {}
        new = _flat(yaml.safe_load(to_yaml(cfg)))
        if old.get("model.vocab_size") == 0:
            old["model.vocab_size"] = new.get("model.vocab_size")
        changes = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
                   if old.get(k) != new.get(k)} if old else {}
        if changes:
            self.record_history(step, changes)
        self.write_config(cfg)
        return changes

    def record_history(self, step: int, changes: dict) -> None:
        """Append ``changes`` (key -> [old, new]) to config_history.jsonl as taking effect at ``step``
        (a resume's changed keys, or a scheduled change such as loss.mtp_lambda's)."""
        append_line(self.history_path, json.dumps({"step": step, "time": time.time(), "changes": changes}))

    def check_same_model(self, cfg: Config) -> None:
        """Refuse to continue a run of another model (before anything is written or queued): its
        checkpoints, or the metrics of a start that saved none yet.

        ``model.vocab_size: 0`` means "the dataset's", which the trainer fills in before it writes
        config.yaml, so 0 on either side matches any vocabulary size."""
        saved = self.saved_config_tree()
        if saved is None or not self.has_history():
            return
        old = dict(saved.get("model") or {})
        new = dict(yaml.safe_load(to_yaml(cfg))["model"])
        if 0 in (old.get("vocab_size"), new.get("vocab_size")):
            old.pop("vocab_size", None)
            new.pop("vocab_size", None)
        if old != new:
            differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            raise ConfigError(f"run.dir={self.path} holds a run of a different model "
                              f"(model.{', model.'.join(differing)} differ from {self.config_path}); "
                              f"use a new run.dir or the same model settings to resume")

    # ---- metrics ------------------------------------------------------------------------------
    def cut_metrics(self, step: int, archive_to: Path | None = None) -> MetricsCut:
        """Keep metrics.jsonl's records up to ``step`` (the step a resume continues from). Later
        records move to ``archive_to``/metrics.jsonl when given (a rewind's evidence) or are
        dropped (a crash's steps, about to be logged again); lines that are not records (torn by a
        crash, or edited) are dropped and counted. Atomic: a reader sees the old file or the new."""
        path = self.metrics_path
        if not path.is_file():
            return MetricsCut()
        kept, later, cut = [], [], MetricsCut()
        for line in path.read_text(errors="replace").splitlines():
            record = parse_metrics_line(line)
            if record is None:
                cut.damaged += bool(line.strip())
            elif record["step"] <= step:
                kept.append(line)
                if "loss" in record:
                    cut.train_steps.append(record["step"])
            else:
                later.append(line)
                cut.later_steps.append(record["step"])
        if later and archive_to is not None:
            archive_to.mkdir(parents=True, exist_ok=True)
            atomic_write_text(archive_to / self.METRICS, "".join(line + "\n" for line in later))
            cut.archived = len(later)
        if later or cut.damaged:
            atomic_write_text(path, "".join(line + "\n" for line in kept))
        return cut

    def values_used(self, key: str) -> list:
        """Every value the run has had for the dotted ``key``: config.yaml's and those in its history."""
        values = [_flat(self.saved_config_tree() or {}).get(key)]
        if self.history_path.is_file():
            for line in self.history_path.read_text(errors="replace").splitlines():
                try:
                    values += json.loads(line)["changes"].get(key) or []
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue  # a damaged history line: the other values still count
        return [v for v in values if v is not None]

    # ---- one writer, fresh starts, archives ----------------------------------------------------
    def claim(self, rank: int) -> RunLock | None:
        """Create the folder and take its lock (rank 0); every rank learns whether that worked, so a
        refused start fails on every rank before any other collective instead of hanging."""
        lock, error = None, None
        if rank == 0:
            try:
                lock = self._take_lock()
            except UserError as err:
                error = err
            except Exception as err:  # noqa: BLE001 - e.g. a lock file of another shape: say so everywhere
                error = UserError(f"cannot take run.dir={self.path}: {type(err).__name__}: {err}")
        (failed,) = agree_flags([error is not None])
        if error is not None:
            raise error
        if failed:
            raise UserError(f"rank 0 could not take run.dir={self.path} (its message says why)")
        return lock

    def _take_lock(self) -> RunLock:
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"run.dir={self.path} is a file, not a folder; give a folder path")
        try:
            with disk_full_is_reported(self.path, after="nothing was written"):  # not even the lock fits
                self.path.mkdir(parents=True, exist_ok=True)
                lock = RunLock(self.path)
                lock.acquire()
        except PermissionError as err:
            raise ConfigError(f"run.dir={self.path} is not writable ({err.strerror}); give a "
                              f"folder you can write to") from None
        except OSError as err:
            raise UserError(f"cannot take run.dir={self.path}: {err.strerror or err}") from None
        try:
            self.check_layout()
        except BaseException:
            lock.release()
            raise
        return lock

    def start_fresh(self, overwrite: str, rank: int) -> None:
        """A start that resumes nothing, in a run dir that may hold an earlier run's outputs: refuse
        (``run.overwrite=refuse``) or move them to ``archive/`` (``archive``); never delete them."""
        # one verdict for every rank: rank 0 may already be moving the old run while another looks
        (history,) = agree_flags([self.has_history()])
        if not history:
            return
        if overwrite != "archive":
            raise ConfigError(
                f"run.dir={self.path} holds an earlier run (checkpoints or metrics) and this start would "
                f"not resume it; resume it (checkpoint.resume=true), use a new run.dir, or move the old "
                f"run aside with run.overwrite=archive")
        if rank == 0:
            outputs = [self.path / name for name in self.RUN_OUTPUTS if (self.path / name).exists()]
            log.info(f"moved the earlier run in {self.path} to {self.archive(outputs, 'fresh-start')}")
        if torch.distributed.is_initialized():
            torch.distributed.barrier()

    def new_archive_folder(self, label: str) -> Path:
        """A new ``archive/<label>-<time>[-n]/`` path (not created yet)."""
        base = self.path / self.ARCHIVE / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        target, n = base, 1
        while target.exists():
            n += 1
            target = base.with_name(f"{base.name}-{n}")
        return target

    def archive(self, paths: list[Path], label: str) -> Path:
        """Move ``paths`` (inside the run dir) to ``archive/<label>-<time>/``, keeping their paths
        relative to the run dir; returns that folder."""
        target = self.new_archive_folder(label)
        for path in paths:
            destination = target / path.relative_to(self.path)
            destination.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, destination)
        return target


@dataclass
class MetricsCut:
    """What ``RunDir.cut_metrics`` did."""

    train_steps: list[int] = field(default_factory=list)  # steps of the training records kept
    later_steps: list[int] = field(default_factory=list)  # steps of the records past the step
    archived: int = 0  # records past the step moved to the archive (else they were dropped)
    damaged: int = 0  # lines that were not a record, dropped

    def damage_note(self, path: Path) -> str:
        return (f"{path}: dropped {self.damaged} damaged line(s) (torn by a crash or a full disk, or "
                f"not a metrics record)")


def parse_metrics_line(line: str) -> dict | None:
    """The metrics record on ``line``, or None for a line that is not one (torn by a crash or a
    full disk, or edited): a JSON object whose ``step`` is a non-negative integer."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step")
    return record if type(step) is int and step >= 0 else None


def missing_steps(train_steps: list[int], last_step: int, every: int) -> list[tuple[int, int]]:
    """Stretches ``(first, last)`` of steps up to ``last_step`` that should have a training record
    when one is logged at least every ``every`` steps, and have none."""
    gaps, previous = [], 0
    for step in sorted(set(train_steps)):
        if step - previous > every:
            gaps.append((previous + 1, step - 1))
        previous = step
    if last_step - previous >= every:
        gaps.append((previous + 1, last_step))
    return gaps


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
