"""Validation: per-head loss and accuracy over held-out windows, in any layout.

The trainer validates every ``train.eval_every`` steps; ``megatrain eval heldout`` runs the same
function on a loaded model (one process), so the two report the same numbers for the same model.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from megatrain.data.mixture import open_training_data, validation_batches
from megatrain.mtp_loss import HeadStats, build_head_targets


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; nothing for None (float32)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def evaluate(engine, val_windows, cfg, device, autocast_dtype, eos_id) -> tuple[list[float], list[float]]:
    """Per-head validation loss and accuracy over ``val_windows`` (the same on every dp rank).
    ``engine`` has ``evaluate(tokens, targets) -> HeadStats`` (a TrainingEngine, or eval's
    one-process engine)."""
    n = cfg.model.n_future
    totals = None
    with autocast(device, autocast_dtype):
        for window in val_windows:
            window = window.to(device)
            targets = build_head_targets(window, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)
            s = engine.evaluate(window[:, :-1], targets)
            totals = s if totals is None else HeadStats(totals.loss_sum + s.loss_sum,
                                                        totals.n_correct + s.n_correct,
                                                        totals.n_valid + s.n_valid)
    valid = totals.n_valid.clamp(min=1)
    return (totals.loss_sum / valid).tolist(), (totals.n_correct / valid).tolist()


def validation_windows(cfg, dataset_dir: Path, local_batch: int) -> list[torch.Tensor] | None:
    """Whole local batches of the val split, so that a pipeline schedule can split them into its
    microbatches; None when validation is off."""
    if not (cfg.train.eval_every and cfg.data.val_batches):
        return None
    windows = validation_batches(open_training_data(cfg.data, dataset_dir, "val"), cfg.data.seq_len,
                                 local_batch, cfg.data.val_batches)
    return [w for w in windows if w.shape[0] == local_batch]
