"""Training on several prepared datasets at once, with weights (``data.mixture``).

Which source each window comes from: the endless window sequence is cut into blocks of
``MIX_BLOCK`` positions; each block holds exactly ``round(weight * MIX_BLOCK)`` positions of each
source (largest remainders, so they add up), in the order of the permutation
``default_rng([seed, MIX_STREAM, block])``. Proportions are therefore exact per block, the order
depends only on the seed, and how many windows each source has given up to global position p is a
function of p alone. Source s's k-th window is position k of its own ``EpochOrder`` (epoch after
epoch, as ``WindowLoader`` does for one dataset).

The loader's state is the global position (plus what must match to resume: each source's data
fingerprint, the weights, ``seq_len`` and ``seed``), so a resume continues every source exactly and
may change the number of data-parallel ranks, as with one dataset.

The sources must share a tokenizer (the same vocabulary, merges and end-of-document id): tokens of
one would mean other text under the other's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from megatrain.data.loader import EpochOrder, WindowLoader, Windows, checked_loader_args, val_batches
from megatrain.data.shards import ShardSet, check_tokenizer, open_split
from megatrain.errors import DataError

STATE_FORMAT = "megatrain-mixture-loader-v1"
MIX_BLOCK = 4096
MIX_STREAM = 0x6D6978  # separates the source order's random stream from the windows' ("mix")
_TOKENIZER_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens")


def tokenizer_fingerprint(path: Path) -> str:
    """What decides how text becomes ids in a tokenizer.json (not its formatting or decoder)."""
    try:
        parsed = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"tokenizer {path} is unreadable ({e}); re-create its dataset with "
                        "`megatrain data prepare`") from None
    canonical = json.dumps({k: parsed.get(k) for k in _TOKENIZER_PARTS}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Mixture:
    """One split of several datasets with their weights (normalised to sum to 1)."""

    sources: tuple[ShardSet, ...]
    weights: tuple[float, ...]

    @property
    def vocab_size(self) -> int:
        return self.sources[0].vocab_size

    @property
    def eos_id(self) -> int:
        return self.sources[0].eos_id

    @property
    def tokenizer_path(self) -> Path:
        return self.sources[0].tokenizer_path


def open_mixture(paths: list[str | Path], weights: list[float], split: str) -> Mixture:
    """Opens ``split`` of every dataset and checks that they share one tokenizer."""
    if not paths or len(paths) != len(weights):
        raise DataError(f"data.mixture needs one weight per dataset; got {len(paths)} paths, {len(weights)} "
                        "weights")
    if any(not w > 0 for w in weights):
        raise DataError(f"data.mixture weights must be > 0, got {list(weights)}: drop a source instead of "
                        "giving it weight 0")
    sources = tuple(open_split(p, split) for p in paths)
    first = sources[0]
    first_fp = tokenizer_fingerprint(first.tokenizer_path)
    for other in sources[1:]:
        differs = [what for what, a, b in (("vocabulary size", first.vocab_size, other.vocab_size),
                                            ("end-of-document id", first.eos_id, other.eos_id))
                   if a != b]
        if not differs and tokenizer_fingerprint(other.tokenizer_path) != first_fp:
            differs = ["vocabulary or merges"]
        if differs:
            raise DataError(
                f"data.mixture: {other.dataset_dir} and {first.dataset_dir} were prepared with different "
                f"tokenizers ({', '.join(differs)} differ: {other.tokenizer_path} vs "
                f"{first.tokenizer_path}); a mixture needs one tokenizer. Prepare every source with the "
                f"same --tokenizer PATH (e.g. --tokenizer {first.tokenizer_path}), or --tokenizer bytes"
            )
    total = float(sum(weights))
    return Mixture(sources, tuple(float(w) / total for w in weights))


def block_counts(weights: tuple[float, ...], block: int = MIX_BLOCK) -> np.ndarray:
    """Positions per source in a block: ``weight * block`` rounded by largest remainders."""
    exact = np.asarray(weights, dtype=np.float64) * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    if (counts == 0).any():
        raise DataError(f"data.mixture weights {list(weights)}: a source would get no window in "
                        f"{block}; raise its weight above 1/{block}")
    return counts


class _SourceSchedule:
    """Position -> (source, index of that window within the source's own sequence)."""

    def __init__(self, weights: tuple[float, ...], seed: int):
        self.counts = block_counts(weights)
        self.seed = seed
        self._blocks: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Sources of block b's positions, and how many earlier positions of the block share each one's
        source."""
        if b not in self._blocks:
            if len(self._blocks) >= 4:
                self._blocks.pop(min(self._blocks))
            order = np.repeat(np.arange(len(self.counts)), self.counts)
            sources = np.random.default_rng([self.seed, MIX_STREAM, b]).permutation(order)
            rank_in_source = np.empty(MIX_BLOCK, dtype=np.int64)
            for s in range(len(self.counts)):
                mask = sources == s
                rank_in_source[mask] = np.arange(int(mask.sum()))
            self._blocks[b] = (sources, rank_in_source)
        return self._blocks[b]

    def lookup(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        blocks, offsets = np.divmod(positions, MIX_BLOCK)
        sources = np.empty_like(positions)
        indices = np.empty_like(positions)
        for b in np.unique(blocks).tolist():
            mask = blocks == b
            block_sources, rank_in_source = self._block(b)
            sources[mask] = block_sources[offsets[mask]]
            indices[mask] = b * self.counts[sources[mask]] + rank_in_source[offsets[mask]]
        return sources, indices


class MixtureLoader:
    """Shuffled training batches over a Mixture for one data-parallel rank; the same interface and
    batch layout as ``WindowLoader`` (see the module docstring for the order)."""

    def __init__(self, mixture: Mixture, seq_len: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0, vocab_size: int | None = None):
        self.vocab_size = checked_loader_args(global_batch_size, dp_rank, dp_size, vocab_size,
                                              mixture.vocab_size, mixture.tokenizer_path, "mixture's")
        self.mixture = mixture
        self.windows = [Windows(s, seq_len) for s in mixture.sources]
        self.orders = [EpochOrder(w.count, seed) for w in self.windows]
        self.schedule = _SourceSchedule(mixture.weights, seed)
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.position = 0  # windows consumed by all ranks together, over all sources

    def sources_of(self, positions: np.ndarray) -> np.ndarray:
        """Which source each absolute position draws from (for tests and inspection)."""
        return self.schedule.lookup(np.asarray(positions, dtype=np.int64))[0]

    def next_batch(self) -> torch.Tensor:
        """This rank's ``(global_batch_size // dp_size, seq_len + 1)`` int64 tokens of the next step."""
        first = self.position + self.dp_rank * self.local_batch_size
        positions = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        sources, indices = self.schedule.lookup(positions)
        out = torch.empty((self.local_batch_size, self.seq_len + 1), dtype=torch.int64)
        for s in np.unique(sources).tolist():
            rows = np.flatnonzero(sources == s)
            out[torch.from_numpy(rows)] = self.windows[s].gather(self.orders[s].window_ids(indices[rows]))
        self.position += self.global_batch_size
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            yield self.next_batch()

    def _identity(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "seed": self.seed,
            "seq_len": self.seq_len,
            # a JSON string: the checkpoint stores it whatever the number of sources
            "sources": json.dumps([[s.fingerprint, round(w, 12)]
                                   for s, w in zip(self.mixture.sources, self.mixture.weights)]),
        }

    def state_dict(self) -> dict:
        return {**self._identity(), "position": self.position, "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved global position; the sources (their data and weights, in order),
        ``seq_len`` and ``seed`` must be the saving run's, the dp layout and batch size may differ."""
        why = {
            "format": "the loader state is not a mixture's (was the checkpoint trained on data.path?)",
            "sources": "data.mixture differs from the checkpoint's: other datasets, data or weights",
            "seq_len": "the sequence length differs from the checkpoint's",
            "seed": "the data seed differs from the checkpoint's",
        }
        for field, value in self._identity().items():
            if state.get(field) != value:
                raise DataError(
                    f"cannot resume the data loader: field {field!r} differs from the checkpoint's; "
                    f"{why[field]}. Use the original setting or start a fresh run."
                )
        position = int(state["position"])
        if position < 0:
            raise DataError(f"cannot resume the data loader: position {position} is negative")
        self.position = position


def mixture_val_batches(mixture: Mixture, seq_len: int, batch_size: int,
                        max_batches: int | None = None) -> Iterator[torch.Tensor]:
    """Validation windows drawn from the sources in proportion (schedule of seed 0), each source's
    in natural order, the same on every call; stops after every val window was used once."""
    if batch_size < 1:
        raise DataError(f"validation batch_size must be >= 1, got {batch_size}")
    windows = [Windows(s, seq_len) for s in mixture.sources]
    schedule = _SourceSchedule(mixture.weights, seed=0)
    total = sum(w.count for w in windows)
    n_batches = -(-total // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)

    def batches() -> Iterator[torch.Tensor]:
        for b in range(n_batches):
            positions = np.arange(b * batch_size, min((b + 1) * batch_size, total), dtype=np.int64)
            sources, indices = schedule.lookup(positions)
            out = torch.empty((len(positions), seq_len + 1), dtype=torch.int64)
            for s in np.unique(sources).tolist():
                rows = np.flatnonzero(sources == s)
                out[torch.from_numpy(rows)] = windows[s].gather(indices[rows] % windows[s].count)
            yield out

    return batches()


# ---- what the trainer calls: one dataset (data.path) or a mixture, the same way ------------------


def open_training_data(data, dataset_dir: Path, split: str) -> ShardSet | Mixture:
    """``split`` of ``data.mixture``'s datasets when it has any, else of ``dataset_dir``
    (``data`` is the config's DataConfig)."""
    if data.mixture:
        return open_mixture([s.path for s in data.mixture], [s.weight for s in data.mixture], split)
    return open_split(dataset_dir, split)


def check_tokenizers(train_data: ShardSet | Mixture) -> None:
    """Every source's tokenizer loads and matches its manifest (``check_tokenizer``): at the start
    of a run, beside the shard checks ``open_split`` made."""
    for source in train_data.sources if isinstance(train_data, Mixture) else (train_data,):
        check_tokenizer(source)


def make_loader(train_data: ShardSet | Mixture, *args, **kwargs) -> WindowLoader | MixtureLoader:
    """``WindowLoader``'s arguments; a MixtureLoader for a Mixture."""
    return (MixtureLoader if isinstance(train_data, Mixture) else WindowLoader)(train_data, *args, **kwargs)


def validation_batches(val_data: ShardSet | Mixture, *args, **kwargs) -> Iterator[torch.Tensor]:
    """``val_batches``' arguments; mixture_val_batches for a Mixture."""
    return (mixture_val_batches if isinstance(val_data, Mixture) else val_batches)(val_data, *args, **kwargs)
