"""The run directory: its layout, who may write it, its config and what a fresh start may do.

    run.dir/
      .lock                 the training that writes here (run_lock.py)
      config.yaml           the config of the latest start, written once its checkpoint loaded
      config_history.jsonl  every change of the config on a resume, with the step it took effect
      metrics.jsonl, tensorboard/
      checkpoints/step_NNNNNNN/, checkpoints/latest   (checkpoint.py)
      archive/<label>-<time>/   whatever a fresh start or a rewind moved aside; nothing is deleted
"""

from __future__ import annotations

import errno
import json
import os
import re
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from megatrain.config import Config, to_yaml
from megatrain.errors import ConfigError, UserError
from megatrain.files import atomic_write_text
from megatrain.parallel.comm import agree_flags
from megatrain.run_lock import RunLock

STEP_DIR = re.compile(r"^step_(\d{7,})$")
HISTORY = "config_history.jsonl"
# What a fresh start moves aside: everything a training run writes.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml", HISTORY)


def has_checkpoints(run_dir: Path) -> bool:
    folder = run_dir / "checkpoints"
    return folder.is_dir() and any(p.is_dir() and STEP_DIR.match(p.name) for p in folder.iterdir())


def has_history(run_dir: Path) -> bool:
    """Checkpoints or logged steps: what a fresh start would otherwise overwrite."""
    metrics = run_dir / "metrics.jsonl"
    return has_checkpoints(run_dir) or (metrics.is_file() and metrics.stat().st_size > 0)


def claim(run_dir: Path, rank: int) -> RunLock | None:
    """Create ``run_dir`` and take its lock (rank 0); every rank learns whether that worked, so a
    refused start fails on every rank before any other collective instead of hanging."""
    lock, error = None, None
    if rank == 0:
        try:
            if run_dir.exists() and not run_dir.is_dir():
                raise ConfigError(f"run.dir={run_dir} is a file, not a folder; give a folder path")
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
                lock = RunLock(run_dir)
                lock.acquire()
            except PermissionError as err:
                raise ConfigError(f"run.dir={run_dir} is not writable ({err.strerror}); give a "
                                  f"folder you can write to") from None
            except OSError as err:  # e.g. ENOSPC: not even the lock file fits
                raise UserError(f"cannot take run.dir={run_dir}: {err.strerror}"
                                + ("; the disk is full: free space and run the same command again"
                                   if err.errno == errno.ENOSPC else "")) from None
        except UserError as err:
            error = err
        except Exception as err:  # noqa: BLE001 - e.g. a lock file of another shape: say so everywhere
            error = UserError(f"cannot take run.dir={run_dir}: {type(err).__name__}: {err}")
    (failed,) = agree_flags([error is not None])
    if error is not None:
        raise error
    if failed:
        raise UserError(f"rank 0 could not take run.dir={run_dir} (its message says why)")
    return lock


def start_fresh(run_dir: Path, overwrite: str, rank: int) -> None:
    """A start that resumes nothing, in a run dir that may hold an earlier run's outputs: refuse
    (``run.overwrite=refuse``) or move them to ``archive/`` (``archive``); never delete them."""
    # one verdict for every rank: rank 0 may already be moving the old run while another looks
    (history,) = agree_flags([has_history(run_dir)])
    if not history:
        return
    if overwrite != "archive":
        raise ConfigError(
            f"run.dir={run_dir} holds an earlier run (checkpoints or metrics) and this start would "
            f"not resume it; resume it (checkpoint.resume=true), use a new run.dir, or move the old "
            f"run aside with run.overwrite=archive")
    if rank == 0:
        target = archive(run_dir, [run_dir / name for name in RUN_OUTPUTS if (run_dir / name).exists()],
                         "fresh-start")
        print(f"moved the earlier run in {run_dir} to {target}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def archive(run_dir: Path, paths: list[Path], label: str) -> Path:
    """Move ``paths`` (inside ``run_dir``) to ``run_dir/archive/<label>-<time>/``, keeping their
    paths relative to ``run_dir``; returns that folder."""
    base = run_dir / "archive" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    target, n = base, 1
    while target.exists():
        n += 1
        target = base.with_name(f"{base.name}-{n}")
    for path in paths:
        destination = target / path.relative_to(run_dir)
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, destination)
    return target


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume checkpoints of another model (before anything is written or queued).

    ``model.vocab_size: 0`` means "the dataset's", which the trainer fills in before it writes
    config.yaml, so 0 on either side matches any vocabulary size (the trainer compares again once
    it has resolved the value).
    """
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not has_checkpoints(run_dir):
        return
    old = OmegaConf.to_container(OmegaConf.load(saved).get("model", {}))
    new = OmegaConf.to_container(OmegaConf.structured(cfg).model)
    if 0 in (old.get("vocab_size"), new.get("vocab_size")):
        old.pop("vocab_size", None)
        new.pop("vocab_size", None)
    if old != new:
        differing = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise ConfigError(f"run.dir={run_dir} holds checkpoints of a different model "
                          f"(model.{', model.'.join(differing)} differ from {saved}); use a new "
                          f"run.dir or the same model settings to resume")


def write_config(run_dir: Path, cfg: Config) -> None:
    atomic_write_text(run_dir / "config.yaml", to_yaml(cfg))


def record_config(run_dir: Path, cfg: Config, step: int) -> dict:
    """Write ``config.yaml`` (after a successful load) and append what changed since the last
    start to ``config_history.jsonl`` with the step it applies from; returns the changes."""
    saved = run_dir / "config.yaml"
    old = _flat(OmegaConf.to_container(OmegaConf.load(saved))) if saved.is_file() else {}
    new = _flat(OmegaConf.to_container(OmegaConf.structured(cfg)))
    changes = {k: [old.get(k), new.get(k)] for k in sorted(old.keys() | new.keys())
               if old.get(k) != new.get(k)} if old else {}
    if changes:
        with open(run_dir / HISTORY, "a") as f:
            f.write(json.dumps({"step": step, "time": time.time(), "changes": changes}) + "\n")
    write_config(run_dir, cfg)
    return changes


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
