"""Load a trained MTP model into one process for inference, whatever layout it was trained with.

A run directory's checkpoints hold the model in a layout-independent form (parameter names of the
whole model, full tensors; megatrain.parallel.model_state), so tp/pp/FSDP/ZeRO checkpoints all
load here alike. Only the model's section is read: optimizer state stays on disk. An exported
folder in Meta's format (inference/meta_format.py) loads with ``load_exported``.

A run directory may be read while a training writes it: a checkpoint folder appears under its
``step_N`` name only when complete and leaves it whole (checkpoint.py), and a reader pins the one
it checks and reads, so that the training's pruning passes over it (checkpoint_pins.py). Only in
the moment between choosing a checkpoint and pinning it can it be pruned: ``read_checkpoint`` then
reads the newest one at that time; what it reports is always a CheckpointError, never a raw OSError.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from megatrain.checkpoint import CheckpointManager, quiet_single_process
from megatrain.checkpoint_integrity import problem_of, unverified_warning
from megatrain.checkpoint_pins import pinned
from megatrain.config import Config, load_saved_config, validate
from megatrain.errors import CheckpointError, ConfigError, UserError
from megatrain.inference.meta_format import PARAMS_FILE, WEIGHTS_FILE, read_meta
from megatrain.model.mtp import MTPTransformer
from megatrain.model.transformer import fill_rope_buffers
from megatrain.run_dir import CONFIG_FILE, RunDir
from megatrain.spec import trained_length

MODEL_KEY = ("model_optim", "model")  # where the trainer's checkpoint keeps the model's tensors
EXPORT_CONTEXT = 4096  # RoPE positions of a model loaded from an export (no training length recorded)
# A read that loses its checkpoint to pruning starts over on the newest one: a large checkpoint's
# read may overlap two saves of a training with a small checkpoint.every, so more than once.
READ_ATTEMPTS = 3
T = TypeVar("T")


def checkpoint_folder(run_dir: str | Path, step: int | None = None) -> Path:
    """The checkpoint of ``step``, or the newest intact one, of a run directory. Damaged newer
    ones skipped and a checkpoint without checksums are said on stderr; one pruned while it was
    checked is not damaged: the listing is then read again (once)."""
    if not Path(run_dir).is_dir():
        raise CheckpointError(f"{run_dir} does not exist (or is not a folder); give the run.dir of a "
                              f"training run that saved a checkpoint")
    manager = CheckpointManager(Path(run_dir), keep=1)
    for attempt in (1, 2):
        if not manager.steps():
            raise CheckpointError(f"{run_dir} holds no checkpoint (no checkpoints/step_* folder); "
                                  f"give the run.dir of a training run that saved one")
        problems, pruned = [], False
        for candidate in manager.candidates(step or 0, asked_as="--checkpoint"):
            folder = manager.path_of(candidate)
            try:
                with pinned(folder):
                    problem = problem_of(folder)
            except FileNotFoundError:
                problem = "it was pruned while it was checked"
            if problem is None:
                for skipped in problems:
                    print(f"warning: checkpoint {skipped}; reading the older {folder.name}", file=sys.stderr)
                if (warning := unverified_warning(folder)) is not None:
                    print(warning, file=sys.stderr)
                return folder
            pruned = not folder.exists() and attempt == 1
            if pruned:  # by a training writing this run dir: what is the newest now?
                break
            problems.append(f"{folder.name} is not usable: {problem}")
        if not pruned:
            break
    raise CheckpointError(f"no intact checkpoint in {run_dir}: {'; '.join(problems)}")


def read_checkpoint(run_dir: str | Path, step: int | None, read: Callable[[Path], T],
                    folder: Path | None = None) -> tuple[Path, T]:
    """``read(folder)`` of ``folder`` (default: ``checkpoint_folder(run_dir, step)``) and its
    result. A training writing the run dir keeps only its ``checkpoint.keep`` newest checkpoints:
    if the folder was pruned while it was read, the newest one at that time is read instead (with
    ``step`` given, its absence is the error), up to ``READ_ATTEMPTS`` reads in all."""
    folder = folder or checkpoint_folder(run_dir, step)
    for attempt in range(1, READ_ATTEMPTS + 1):
        try:
            with pinned(folder):  # against the pruning of a training writing the run dir
                return folder, read(folder)
        except (OSError, UserError) as err:  # a file gone: an OSError, or "config.yaml does not exist"
            if folder.is_dir() or attempt == READ_ATTEMPTS:
                raise _as_user_error(err, folder) from err
        folder = checkpoint_folder(run_dir, step)
    raise AssertionError("unreachable")


def _as_user_error(err: Exception, folder: Path) -> UserError:
    if isinstance(err, UserError):
        return err
    return CheckpointError(f"cannot read checkpoint {folder}: {err}")


def config_of(folder: Path) -> Config:
    """The config a checkpoint was saved with (older checkpoints: the run directory's)."""
    for path in (folder / CONFIG_FILE, RunDir(folder.parent.parent).config_path):
        if path.is_file():
            return load_saved_config(path)
    raise CheckpointError(f"no config.yaml in {folder} or its run directory; cannot rebuild the model")


def build_for_inference(cfg: Config, max_seq_len: int | None = None,
                        device: str | torch.device = "cpu") -> MTPTransformer:
    """An MTPTransformer of ``cfg``'s shape with uninitialised weights (to be loaded) and RoPE
    tables for ``max_seq_len`` positions (default: the training length)."""
    max_seq_len = max_seq_len or trained_length(cfg)
    with torch.device("meta"):  # no random init of weights that are about to be overwritten
        model = MTPTransformer(cfg.model, max_seq_len=max_seq_len, seed=cfg.train.seed)
    model.to_empty(device=device)
    fill_rope_buffers(model, cfg.model, max_seq_len)
    return model


def load_model(run_dir: str | Path, step: int | None = None, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32,
               max_seq_len: int | None = None) -> tuple[MTPTransformer, Config]:
    """The model of a run directory's checkpoint (newest intact, or ``step``), in eval mode."""
    return read_checkpoint(run_dir, step, lambda folder: load_checkpoint(
        folder, device=device, dtype=dtype, max_seq_len=max_seq_len))[1]


def load_checkpoint(folder: Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                    max_seq_len: int | None = None) -> tuple[MTPTransformer, Config]:
    """``load_model`` of one checkpoint folder (from ``checkpoint_folder``: already verified)."""
    cfg = config_of(folder)
    model = build_for_inference(cfg, max_seq_len, device)
    state = {name: torch.empty_like(p, device="cpu") for name, p in model.state_dict().items()}
    try:
        with quiet_single_process():
            dcp.load({MODEL_KEY[0]: {MODEL_KEY[1]: state}}, checkpoint_id=str(folder))
    # any DCP failure is "cannot load", with its cause; DCP wraps a failure (a file gone) in
    # CheckpointException, which derives from BaseException
    except (Exception, CheckpointException) as err:  # noqa: BLE001
        lines = str(err).strip().splitlines() or [type(err).__name__]
        raise CheckpointError(f"cannot load the model from {folder}: {lines[-1]}") from err
    model.load_state_dict(state, strict=True)
    return model.to(dtype).eval(), cfg


def load_exported(path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                  max_seq_len: int | None = None) -> tuple[MTPTransformer, Config]:
    """The model of a Meta-format folder (``megatrain export --format meta``, or Meta's own release),
    in eval mode, with the Config its params.json describes (``data.seq_len`` = ``model.max_seq_len``,
    every other key at its default).

    params.json does not record a context length: RoPE tables cover ``max_seq_len`` positions,
    default ``EXPORT_CONTEXT`` (Llama 2's).
    """
    state, model_cfg = read_meta(path)
    model_cfg.max_seq_len = max_seq_len or EXPORT_CONTEXT
    cfg = Config(model=model_cfg)
    cfg.data.seq_len = model_cfg.max_seq_len  # no training length either: the context is the length
    try:
        validate(cfg)
    except ConfigError as err:  # the keys are params.json's, not a config file's
        raise CheckpointError(f"{Path(path) / PARAMS_FILE} describes an impossible model: {err}") from None
    model = build_for_inference(cfg, device=device)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:  # names missing, extra or misshapen parameters
        raise CheckpointError(f"{Path(path) / WEIGHTS_FILE} does not match its {PARAMS_FILE}: "
                              f"{str(err).strip().splitlines()[1].strip()}") from None
    return model.to(dtype).eval(), cfg
