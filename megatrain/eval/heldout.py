"""Per-head loss, accuracy and perplexity on a prepared dataset's val split.

The numbers are the trainer's own: its ``evaluate`` (megatrain/trainer.py) over the val windows of
``val_batches``, with the model's forward-only sequential-heads loss (megatrain/mtp_loss.py). Only
the engine differs: here one process holds the whole loaded model. With the run's batch size and
``data.val_batches`` (the defaults), the windows are the ones the trainer validated on, so the
results equal the ``val_head_losses`` / ``val_head_accuracy`` it logged for that step.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from megatrain.config import Config
from megatrain.data.loader import val_batches
from megatrain.data.shards import open_split
from megatrain.errors import DataError
from megatrain.model.mtp import MTPTransformer
from megatrain.mtp_loss import HeadStats, mtp_loss
from megatrain.validation import evaluate


class OneProcessEngine:
    """The part of the trainer's engine interface ``evaluate`` uses, for a model in one process."""

    def __init__(self, model: MTPTransformer, cfg: Config):
        self.model, self.cfg = model, cfg

    @torch.no_grad()
    def evaluate(self, tokens: torch.Tensor, targets: torch.Tensor) -> HeadStats:
        ones = torch.ones(self.model.n_future)  # only the per-head stats are read, not the total
        _, stats = mtp_loss(self.model, self.model.trunk(tokens), targets, ones, self.cfg.loss.ignore_index,
                            self.cfg.loss.impl)
        return stats


def evaluate_heldout(model: MTPTransformer, cfg: Config, dataset_dir: Path, *, device: torch.device,
                     autocast_dtype: torch.dtype | None, batch_size: int, max_batches: int | None,
                     seq_len: int) -> dict:
    """Per-head results over the val split of ``dataset_dir``: the first ``max_batches`` whole
    batches (the trainer's rule), or every window when ``max_batches`` is None."""
    split = open_split(dataset_dir, "val")
    if split.vocab_size > cfg.model.vocab_size:
        raise DataError(f"the tokenizer of {dataset_dir} has {split.vocab_size} tokens, the model only "
                        f"{cfg.model.vocab_size}: --data must be tokenized like the model's training data")
    windows = list(val_batches(split, seq_len, batch_size, max_batches))
    if max_batches is not None:
        windows = [w for w in windows if w.shape[0] == batch_size]
    if not windows:
        raise DataError(f"the val split of {dataset_dir} holds fewer than {batch_size} windows of "
                        f"{seq_len + 1} tokens: lower --batch-size, or use --batches 0 (every window)")
    losses, accuracy = evaluate(OneProcessEngine(model, cfg), windows, cfg, device, autocast_dtype,
                                split.eos_id)
    n_windows = sum(w.shape[0] for w in windows)
    return {"data": str(dataset_dir), "windows": n_windows, "seq_len": seq_len,
            "tokens": n_windows * seq_len, "head_losses": losses, "head_accuracy": accuracy,
            "table": [{"head": i + 1, "loss": loss, "accuracy": acc, "perplexity": _perplexity(loss)}
                      for i, (loss, acc) in enumerate(zip(losses, accuracy))]}


def _perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else math.inf  # exp overflows a float beyond ~709
