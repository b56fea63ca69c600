"""Read-only view of one split of a prepared dataset (``megatrain data prepare``).

A dataset folder holds ``manifest.json`` and, per split, datatrove ``.ds`` files: little-endian
uint16 or uint32 token ids (``token_size`` bytes each), documents concatenated with an EOS after
each, plus a ``.ds.index`` of uint64 document-end offsets. Every file is memory-mapped and checked
once here, its token ids included, so the loader's hot path does no validation beyond a cheap
max-id safety net.

Per split, the manifest holds ``files`` (paths relative to the dataset folder, in stream order),
``tokens``, ``documents`` and ``max_token_ids`` (the largest id of each file, in ``files`` order).
``megatrain data prepare`` writes it with the names defined here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from megatrain.errors import DataError

MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "megatrain-shards-v1"
# added within v1: a manifest without it (an older megatrain's) is still read, and its shards are
# scanned instead; an older megatrain ignores it
MAX_TOKEN_IDS_KEY = "max_token_ids"
_PREPARE_HINT = "run `megatrain data prepare --input SOURCE_DIR --output {dir}` to create it"
_RECREATE_HINT = "re-create the dataset with `megatrain data prepare`"


@dataclasses.dataclass(frozen=True)
class Shard:
    path: Path
    tokens: np.ndarray  # memory-mapped, shape (n_tokens,), dtype <u2 or <u4
    max_token_id: int  # checked < the tokenizer's vocabulary size when opened

    @property
    def n_tokens(self) -> int:
        return int(self.tokens.shape[0])


@dataclasses.dataclass(frozen=True)
class ShardSet:
    """The shards of one split, in manifest order, with the tokenizer facts the model needs."""

    dataset_dir: Path
    split: str
    shards: tuple[Shard, ...]
    vocab_size: int
    eos_id: int
    token_size: int
    manifest: dict

    @property
    def total_tokens(self) -> int:
        return sum(s.n_tokens for s in self.shards)

    @property
    def tokenizer_path(self) -> Path:
        return self.dataset_dir / self.manifest.get("tokenizer_file", "tokenizer.json")

    @property
    def fingerprint(self) -> str:
        """Identifies the token stream (files, sizes, vocab): a loader state only resumes on the
        same one. Absolute paths are left out so a dataset folder can be moved."""
        h = hashlib.sha256()
        h.update(f"{self.split}|{self.vocab_size}|{self.eos_id}|{self.token_size}".encode())
        for s in self.shards:
            h.update(f"|{s.path.name}:{s.n_tokens}".encode())
        return h.hexdigest()[:16]


def read_manifest(dataset_dir: str | os.PathLike) -> dict:
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / MANIFEST_NAME
    if not path.is_file():
        hint = _PREPARE_HINT.format(dir=dataset_dir)
        raise DataError(f"{path} not found: {dataset_dir} is not a prepared dataset; {hint}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path} is unreadable ({e}); {_RECREATE_HINT}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise DataError(f"{path} has format {found!r}, expected {MANIFEST_FORMAT!r}; {_RECREATE_HINT}")
    for key in ("vocab_size", "eos_id", "token_size", "splits"):
        if key not in manifest:
            raise DataError(f"{path} lacks the field {key!r}; {_RECREATE_HINT}")
    return manifest


def open_split(dataset_dir: str | os.PathLike, split: str) -> ShardSet:
    """Memory-maps and validates the shards of ``split`` ("train" or "val")."""
    dataset_dir = Path(dataset_dir).expanduser()
    manifest = read_manifest(dataset_dir)
    manifest_path = dataset_dir / MANIFEST_NAME
    if split not in manifest["splits"]:
        raise DataError(f"{manifest_path} has no split {split!r} (it has: {', '.join(manifest['splits'])})")
    token_size = int(manifest["token_size"])
    if token_size not in (2, 4):
        raise DataError(f"{manifest_path}: token_size must be 2 or 4, got {token_size}")
    dtype = token_dtype(token_size)
    vocab_size = int(manifest["vocab_size"])  # the tokenizer's, not the (padded) model.vocab_size

    entry = manifest["splits"][split]
    recorded = entry.get(MAX_TOKEN_IDS_KEY)
    if recorded is not None and (not isinstance(recorded, list) or len(recorded) != len(entry["files"])):
        raise DataError(
            f"{manifest_path}: split {split!r} lists {len(entry['files'])} files but its "
            f"{MAX_TOKEN_IDS_KEY!r} is {recorded!r}; {_RECREATE_HINT}"
        )
    shards = []
    for i, rel in enumerate(entry["files"]):
        path = dataset_dir / rel
        tokens = _open_shard(path, dtype)
        if recorded is not None:
            max_id = int(recorded[i])
        else:
            # prepared by a megatrain that did not record the maximum: one full read of the shard,
            # a one-time cost per open (seconds at most at our dataset sizes)
            max_id = int(tokens.max())
        shards.append(Shard(path, tokens, max_id))
    shard_set = ShardSet(
        dataset_dir=dataset_dir,
        split=split,
        shards=tuple(shards),
        vocab_size=vocab_size,
        eos_id=int(manifest["eos_id"]),
        token_size=token_size,
        manifest=manifest,
    )
    if "tokens" in entry and shard_set.total_tokens != int(entry["tokens"]):
        raise DataError(
            f"split {split!r} of {dataset_dir} has {shard_set.total_tokens} tokens on disk but "
            f"{manifest_path} records {entry['tokens']}: a shard was truncated or replaced; {_RECREATE_HINT}"
        )
    for shard in shard_set.shards:
        _check_token_ids(shard, shard_set)
    return shard_set


def load_tokenizer(shard_set: ShardSet):
    """The dataset's tokenizer (a ``tokenizers.Tokenizer``), checked against its manifest: it loads,
    its ids run up to the manifest's ``vocab_size`` and the end-of-document id is one of its tokens.
    A DataError names the file otherwise, so a damaged tokenizer stops a run at its start rather
    than at the end-of-run sample, after all its steps."""
    from tokenizers import Tokenizer

    from megatrain.data_pipelines.vocab import tokenizer_vocab_size

    path = shard_set.tokenizer_path
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises a plain Exception for every parse error
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise DataError(f"tokenizer {path} of the dataset {shard_set.dataset_dir} cannot be loaded "
                        f"({reason}); restore the file or {_RECREATE_HINT}") from None
    size = tokenizer_vocab_size(tokenizer) if tokenizer.get_vocab(with_added_tokens=True) else 0
    if size != shard_set.vocab_size or tokenizer.id_to_token(shard_set.eos_id) is None:
        raise DataError(f"tokenizer {path} does not match {shard_set.dataset_dir / MANIFEST_NAME}: it has "
                        f"ids 0..{size - 1}, the manifest records vocab_size {shard_set.vocab_size} and "
                        f"end-of-document id {shard_set.eos_id} (the file was replaced after the dataset "
                        f"was prepared); restore it or {_RECREATE_HINT}")
    return tokenizer


def check_tokenizer(shard_set: ShardSet) -> None:
    """``load_tokenizer`` at the start of a run, where the dataset has a tokenizer file (training
    itself reads only token ids) and the ``tokenizers`` library is installed."""
    if not shard_set.tokenizer_path.exists():
        return
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        return
    load_tokenizer(shard_set)


def token_dtype(token_size: int) -> np.dtype:
    return np.dtype("<u2" if token_size == 2 else "<u4")


def shard_max_token_id(path: str | os.PathLike, token_size: int) -> int:
    """The largest token id in the shard file ``path``: what the manifest records per file."""
    return int(_open_shard(Path(path), token_dtype(token_size)).max())


def _check_token_ids(shard: Shard, shard_set: ShardSet) -> None:
    # ids from the tokenizer's size up to a padded model.vocab_size would train silently on rows of
    # the embedding no text maps to, so the bound is the tokenizer's size, never the model's
    vocab_size = shard_set.vocab_size
    if shard.max_token_id >= vocab_size:
        raise DataError(
            f"shard {shard.path} holds token id {shard.max_token_id}, but the dataset's tokenizer "
            f"({shard_set.tokenizer_path}) has {vocab_size} tokens (ids 0..{vocab_size - 1}): the shard is "
            f"corrupt or was tokenized with another tokenizer, and a larger model.vocab_size does not make "
            f"it valid; {_RECREATE_HINT}"
        )


def _open_shard(path: Path, dtype: np.dtype) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"shard {path} listed in the manifest is missing; {_RECREATE_HINT}")
    size = path.stat().st_size
    if size == 0 or size % dtype.itemsize:
        raise DataError(
            f"shard {path} is truncated or corrupt: {size} bytes is not a positive multiple of the token "
            f"size {dtype.itemsize}; {_RECREATE_HINT}"
        )
    n_tokens = size // dtype.itemsize
    index = path.with_name(path.name + ".index")
    if index.is_file():
        index_size = index.stat().st_size
        if index_size == 0 or index_size % 8:
            raise DataError(
                f"shard index {index} is truncated or corrupt ({index_size} bytes); {_RECREATE_HINT}"
            )
        with open(index, "rb") as f:
            f.seek(index_size - 8)
            last_doc_end = int(np.frombuffer(f.read(8), dtype="<u8")[0])
        if last_doc_end != n_tokens:
            raise DataError(
                f"shard {path} is truncated or corrupt: it holds {n_tokens} tokens but its index "
                f"{index.name} ends at {last_doc_end}; {_RECREATE_HINT}"
            )
    return np.memmap(path, dtype=dtype, mode="r", shape=(n_tokens,))
