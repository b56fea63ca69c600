"""Write token documents as a prepared dataset (the format of ``megatrain data prepare``,
described in ``megatrain/data/shards.py``): per split one ``.ds`` file of uint16 tokens with an EOS
after every document and its ``.ds.index`` of document ends, a ``tokenizer.json`` and, last and
atomically, ``manifest.json``: a folder with a manifest is a complete dataset.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatrain.data.shards import (
    MANIFEST_FORMAT,
    MANIFEST_NAME,
    MAX_TOKEN_IDS_KEY,
    open_split,
    read_manifest,
    token_dtype,
)
from megatrain.errors import DataError
from megatrain.files import atomic_write_text

TOKENIZER_FILE = "tokenizer.json"  # the name `data prepare` gives it; the manifest records it too
SYNTH_KEY = "synth"  # manifest section: the task, its settings and the generator's version
TOKEN_SIZE = 2  # synthetic vocabularies are tiny: uint16 ids
EOS_ID = 0  # every task's vocabulary starts with the EOS


def write_tokenizer(vocabulary: Sequence[str], path: Path) -> None:
    """A word-level HF tokenizer: token i is ``vocabulary[i]``, text is the tokens joined by spaces
    (so ``megatrain generate`` prompts are written that way); ``vocabulary[0]`` is the EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatrain.data_pipelines.vocab import EOS_TOKEN  # the name generate looks the EOS up by

    if vocabulary[EOS_ID] != EOS_TOKEN:
        raise ValueError(f"vocabulary[0] must be {EOS_TOKEN}")
    tok = Tokenizer(models.WordLevel({word: i for i, word in enumerate(vocabulary)}, unk_token=EOS_TOKEN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens([EOS_TOKEN])
    tok.save(str(path))


def _write_split(out: Path, split: str, documents: Sequence[Sequence[int]], eos_id: int) -> dict:
    folder = out / split
    folder.mkdir()
    lengths = np.array([len(doc) + 1 for doc in documents], dtype=np.int64)
    tokens = np.full(int(lengths.sum()), eos_id, dtype=token_dtype(TOKEN_SIZE))
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    for start, doc in zip(starts, documents):
        tokens[start:start + len(doc)] = doc
    name = f"{split}/00000_{split}.ds"
    tokens.tofile(out / name)
    np.cumsum(lengths).astype("<u8").tofile(out / (name + ".index"))
    return {"files": [name], "tokens": int(tokens.size), "documents": len(documents),
            MAX_TOKEN_IDS_KEY: [int(tokens.max())]}


def write_dataset(out: Path, vocabulary: Sequence[str], splits: dict[str, Sequence[Sequence[int]]],
                  settings: dict) -> dict:
    """Write ``splits`` (split -> documents of token ids, without EOS) into the new or empty folder
    ``out``; returns the manifest. ``settings`` (task, examples, seed, ...) go into the manifest."""
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise DataError(f"--output {out} is not empty; give a new folder (or delete this one)")
    write_tokenizer(vocabulary, out / TOKENIZER_FILE)
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": f"synth-{settings['task']}",
        "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": len(vocabulary),
        "eos_id": EOS_ID,
        "token_size": TOKEN_SIZE,
        "splits": {split: _write_split(out, split, docs, EOS_ID) for split, docs in splits.items()},
        "source": f"synth:{settings['task']}",
        "output": str(out),
        "config": settings,
        SYNTH_KEY: settings,
    }
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=2))
    return manifest


def synth_settings(dataset_dir: Path, task: str) -> dict:
    """The generator settings of a synthetic dataset of ``task``; a DataError for any other folder."""
    manifest = read_manifest(dataset_dir)
    settings = manifest.get(SYNTH_KEY)
    if not isinstance(settings, dict) or settings.get("task") != task:
        found = settings.get("task") if isinstance(settings, dict) else manifest.get("tokenizer")
        raise DataError(f"{dataset_dir} is not a `{task}` dataset (it is {found!r}); create one with "
                        f"`megatrain data synth {task} --output DIR`")
    return settings


def read_documents(dataset_dir: Path, split: str) -> list[np.ndarray]:
    """The documents of ``split`` (token ids without the EOS), in order."""
    documents = []
    for shard in open_split(dataset_dir, split).shards:
        ends = np.fromfile(shard.path.with_name(shard.path.name + ".index"), dtype="<u8").astype(np.int64)
        starts = np.concatenate([[0], ends[:-1]])
        documents += [np.asarray(shard.tokens[s:e - 1], dtype=np.int64) for s, e in zip(starts, ends)]
    return documents
