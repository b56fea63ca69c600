"""Deterministic, resumable windows over a ShardSet.

A window is ``seq_len + 1`` consecutive tokens of one shard file; window k of a shard starts at
``k * seq_len``, so neighbouring windows share exactly one boundary token and no window crosses a
file. The model reads inputs ``w[:-1]``; the next-token and further MTP targets come from the same
window, and targets past its end are masked by the loss, not here.

Order: epoch e visits all windows in the permutation ``default_rng([seed, e])``; epochs follow each
other seamlessly, also inside a batch. Optimizer step s consumes the ``global_batch_size`` windows
at positions ``[s*G, (s+1)*G)`` of that endless sequence; data-parallel rank r takes the r-th
contiguous slice of ``G // dp_size``. The state is the global position only, so a run can resume
with another ``dp_size`` and still continue with exactly the next global batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatrain.data.shards import ShardSet
from megatrain.errors import DataError

STATE_FORMAT = "megatrain-window-loader-v1"


class Windows:
    """Global window index -> (shard, start token); windows are numbered shard by shard."""

    def __init__(self, shards: ShardSet, seq_len: int):
        if seq_len < 1:
            raise DataError(f"seq_len must be >= 1, got {seq_len}")
        self.shards = shards
        self.seq_len = seq_len
        per_shard = np.array(
            [(s.n_tokens - 1) // seq_len if s.n_tokens else 0 for s in shards.shards], dtype=np.int64
        )
        self.first = np.concatenate([[0], np.cumsum(per_shard)])  # first global window of each shard
        self.count = int(self.first[-1])
        if self.count == 0:
            longest = max((s.n_tokens for s in shards.shards), default=0)
            raise DataError(
                f"split {shards.split!r} of {shards.dataset_dir} is too small for seq_len {seq_len}: a "
                f"window needs {seq_len + 1} tokens from one shard, the largest shard has {longest} "
                f"({len(shards.shards)} shards, {shards.total_tokens} tokens). Lower seq_len or prepare "
                "more data."
            )

    def gather(self, window_ids: np.ndarray) -> torch.Tensor:
        """(len(window_ids), seq_len + 1) int64 tokens; a token outside the tokenizer's vocabulary
        raises DataError."""
        width = self.seq_len + 1
        shard_ids = np.searchsorted(self.first, window_ids, side="right") - 1
        out = np.empty((len(window_ids), width), dtype=np.int64)
        for row, (w, s) in enumerate(zip(window_ids.tolist(), shard_ids.tolist())):
            start = (w - int(self.first[s])) * self.seq_len
            out[row] = self.shards.shards[s].tokens[start : start + width]
        # open_split checked every shard's ids against the tokenizer's vocabulary (the bound for
        # valid data, whatever model.vocab_size is): this cheap net only catches a shard that
        # changed on disk since
        vocab_size = self.shards.vocab_size
        if out.size and int(out.max()) >= vocab_size:
            row = int(np.argmax(out.max(axis=1) >= vocab_size))
            bad = int(out[row].max())
            raise DataError(
                f"token id {bad} in shard {self.shards.shards[shard_ids[row]].path} is >= the dataset's "
                f"tokenizer vocabulary size {vocab_size} ({self.shards.tokenizer_path}), though the shard "
                "passed that check when it was opened: it was modified since. Re-create the dataset with "
                "`megatrain data prepare`."
            )
        return torch.from_numpy(out)


class EpochOrder:
    """The endless shuffled sequence of ``count`` windows: epoch e is the permutation
    ``default_rng([seed, e])``; ``window_ids(k)`` is the window at absolute positions k."""

    def __init__(self, count: int, seed: int):
        self.count = count
        self.seed = seed
        self._perms: dict[int, np.ndarray] = {}

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:  # a batch spans at most two epochs... unless an epoch is tiny
                self._perms.pop(min(self._perms))
            self._perms[epoch] = np.random.default_rng([self.seed, epoch]).permutation(self.count)
        return self._perms[epoch]

    def window_ids(self, absolute: np.ndarray) -> np.ndarray:
        epochs, positions = np.divmod(absolute, self.count)
        window_ids = np.empty_like(absolute)
        for e in np.unique(epochs).tolist():
            mask = epochs == e
            window_ids[mask] = self._permutation(e)[positions[mask]]
        return window_ids


def checked_loader_args(global_batch_size: int, dp_rank: int, dp_size: int, vocab_size: int | None,
                        tokenizer_vocab: int, tokenizer_path, source: str) -> int:
    """Validate a loader's batch split and the model's vocabulary; returns the vocabulary size
    (default: the tokenizer's). ``source`` names whose tokenizer it is in the message."""
    if global_batch_size < 1 or dp_size < 1 or global_batch_size % dp_size:
        raise DataError(
            f"global_batch_size {global_batch_size} must be a positive multiple of the data-parallel "
            f"size {dp_size}: change the global batch size or the dp degree"
        )
    if not 0 <= dp_rank < dp_size:
        raise DataError(f"dp_rank {dp_rank} is outside [0, {dp_size})")
    vocab = tokenizer_vocab if vocab_size is None else int(vocab_size)
    if vocab < tokenizer_vocab:
        raise DataError(
            f"model.vocab_size {vocab} is smaller than the vocabulary of the {source} tokenizer "
            f"({tokenizer_vocab}, {tokenizer_path}): set model.vocab_size >= {tokenizer_vocab}"
        )
    return vocab


class WindowLoader:
    """Shuffled training batches for one data-parallel rank; see the module docstring."""

    def __init__(
        self,
        shards: ShardSet,
        seq_len: int,
        global_batch_size: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        seed: int = 0,
        vocab_size: int | None = None,
    ):
        """``vocab_size``: the model's (``model.vocab_size``, possibly padded); it must cover the
        tokenizer's vocabulary. Default: the tokenizer's."""
        self.vocab_size = checked_loader_args(global_batch_size, dp_rank, dp_size, vocab_size,
                                              shards.vocab_size, shards.tokenizer_path, "dataset's")
        self.shards = shards
        self.windows = Windows(shards, seq_len)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # windows of the current epoch already consumed (by all ranks together)
        self._order = EpochOrder(self.windows.count, seed)

    @property
    def windows_per_epoch(self) -> int:
        return self.windows.count

    def next_batch(self) -> torch.Tensor:
        """This rank's ``(global_batch_size // dp_size, seq_len + 1)`` int64 tokens of the next step."""
        n = self.windows.count
        base = self.epoch * n + self.position  # absolute index in the endless window sequence
        first = base + self.dp_rank * self.local_batch_size
        absolute = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        window_ids = self._order.window_ids(absolute)
        self.epoch, self.position = divmod(base + self.global_batch_size, n)
        return self.windows.gather(window_ids)

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "fingerprint": self.shards.fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved global position. ``dp_size`` / ``dp_rank`` and the global batch
        size may differ from the saving run; the data (fingerprint), ``seq_len`` and ``seed`` may not."""
        expected = {
            "format": STATE_FORMAT,
            "fingerprint": self.shards.fingerprint,
            "seq_len": self.seq_len,
            "seed": self.seed,
        }
        for field, value in expected.items():
            if state.get(field) != value:
                what = {
                    "fingerprint": f"the dataset split {self.shards.split!r} of {self.shards.dataset_dir} "
                    "differs from the one the checkpoint was trained on (files or token counts changed)",
                    "seq_len": "the sequence length differs from the checkpoint's",
                    "seed": "the data seed differs from the checkpoint's",
                    "format": "the loader state has an unknown format",
                }[field]
                raise DataError(
                    f"cannot resume the data loader: field {field!r} is {value!r} here but "
                    f"{state.get(field)!r} in the checkpoint; {what}. Use the original setting or start a "
                    "fresh run."
                )
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.windows.count:
            raise DataError(
                f"cannot resume the data loader: position {position} is outside this split's epoch"
            )
        self.epoch, self.position = epoch, position


def val_batches(
    shards: ShardSet,
    seq_len: int,
    batch_size: int,
    max_batches: int | None = None,
) -> Iterator[torch.Tensor]:
    """Validation windows in their natural order (shard by shard), the same on every call:
    ``(batch_size, seq_len + 1)`` int64 batches, the last one possibly smaller."""
    if batch_size < 1:
        raise DataError(f"validation batch_size must be >= 1, got {batch_size}")
    windows = Windows(shards, seq_len)
    n_batches = -(-windows.count // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def batches() -> Iterator[torch.Tensor]:  # errors above are raised at the call, not on first next()
        for b in range(n_batches):
            ids = np.arange(b * batch_size, min((b + 1) * batch_size, windows.count), dtype=np.int64)
            yield windows.gather(ids)

    return batches()
