"""Custom datatrove pipeline steps for ``megatrain data prepare``.

They live in an importable module (not in a function or ``__main__``) because datatrove's
``LocalPipelineExecutor`` ships the pipeline to forkserver workers with dill, which pickles classes
by reference.

Determinism across task counts: every per-task step works on a *contiguous* slice of the sorted
source file list (datatrove's own readers deal files round-robin). Concatenating the task outputs in
rank order therefore reproduces the single-task document order, so "first occurrence" in the dedup
steps and the final token stream do not depend on ``tasks``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re

import numpy as np
import xxhash
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike, get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import MinhashDedupSignature
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.utils.hashes.xxhash import xxhash64
from datatrove.utils.tokenization import PipelineStepWithTokenizer
from datatrove.utils.typeshelper import StatHints
from datatrove.utils.word_tokenizers import WordTokenizer
from tqdm import tqdm

from megatrain.data_pipelines.inputs import read_file_list
from megatrain.data_pipelines.languages import DEFAULT_LANGUAGES, keeps, language_of_path
from megatrain.data_pipelines.prepare import DEFAULT_EXCLUDE_DIRS
from megatrain.data_pipelines.vocab import EOS_TOKEN

# ------------------------------------------------------------------------------------------------
# Source files
# ------------------------------------------------------------------------------------------------


def list_source_files(
    input_dir: str, extensions: tuple[str, ...], exclude_dirs: tuple[str, ...]
) -> list[str]:
    """Sorted relative (posix) paths of the files under ``input_dir`` ending in one of ``extensions``.

    A directory is skipped when its name is in ``exclude_dirs`` or starts with a dot.
    """
    exclude = set(exclude_dirs)
    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs[:] = [d for d in dirs if d not in exclude and not d.startswith(".")]
        rel_root = os.path.relpath(root, input_dir)
        for name in files:
            if name.endswith(extensions):
                rel = name if rel_root == "." else os.path.join(rel_root, name)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def contiguous_shard(items: list, rank: int, world_size: int) -> list:
    """The ``rank``-th of ``world_size`` contiguous, nearly equal slices of ``items``."""
    n = len(items)
    return items[rank * n // world_size : (rank + 1) * n // world_size]


class SourceFileReader(BaseDiskReader):
    """One Document per source file: ``id`` = path relative to the input folder.

    Files that are not valid UTF-8 are dropped and counted as ``dropped_non_utf8``; empty files
    as ``dropped_empty``.
    """

    name = "📂 source files"

    def __init__(
        self,
        data_folder: DataFolderLike,
        extensions: tuple[str, ...] = (".py",),
        exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS,
        progress: bool = True,
        paths_file: str | None = None,
        languages: tuple[str, ...] = DEFAULT_LANGUAGES,
    ):
        """``paths_file``: the driver's list of files (``inputs.write_file_list``); without it the
        reader lists the folder itself."""
        super().__init__(data_folder, file_progress=progress)
        self.extensions = tuple(extensions)
        self.exclude_dirs = tuple(exclude_dirs)
        self.files_list = paths_file
        self.languages = tuple(languages)

    def read_file(self, filepath: str) -> DocumentsPipeline:
        with self.data_folder.open(filepath, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            self.stat_update("dropped_non_utf8")
            return
        if not text:
            self.stat_update("dropped_empty")
            return
        language = language_of_path(filepath, self.languages)
        yield Document(text=text, id=filepath, metadata={"path": filepath, "language": language})

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        if self.files_list:
            files = read_file_list(self.files_list)
        else:
            files = list_source_files(self.data_folder.path, self.extensions, self.exclude_dirs)
        shard = contiguous_shard(files, rank, world_size)
        desc = f"reading files (task {rank})"
        for filepath in tqdm(shard, desc=desc, unit="file", disable=not self.file_progress):
            self.stat_update("input_files")
            for doc in self.read_file(filepath):
                self.stat_update("documents")
                self.update_doc_stats(doc)
                yield doc


class RankJsonlReader(JsonlReader):
    """Reads back exactly the ``{rank:05d}.jsonl`` file that the same task wrote in an earlier stage.

    The dedup stages identify documents by (task, index in task), so every stage must see the
    same documents in the same order per task.
    """

    name = "🐿 rank jsonl"

    def __init__(self, data_folder: DataFolderLike):
        super().__init__(data_folder, compression=None)

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        if data:
            yield from data
        filename = f"{rank:05d}.jsonl"
        if not self.data_folder.isfile(filename):
            return  # this task had no documents left
        yield from self.read_file(filename)


# ------------------------------------------------------------------------------------------------
# Quality filters
# ------------------------------------------------------------------------------------------------


class LengthFilter(BaseFilter):
    """Keeps files with ``min_chars <= len(text) <= max_chars``."""

    name = "📏 length"

    def __init__(self, min_chars: int, max_chars: int):
        super().__init__()
        self.min_chars = min_chars
        self.max_chars = max_chars

    def filter(self, doc: Document) -> bool | tuple[bool, str]:
        if len(doc.text) < self.min_chars:
            return False, "too_short"
        if len(doc.text) > self.max_chars:
            return False, "too_long"
        return True


class LongestLineFilter(BaseFilter):
    """Drops files with a line longer than ``max_line_length`` characters (minified or generated code)."""

    name = "📐 longest line"

    def __init__(self, max_line_length: int):
        super().__init__()
        self.max_line_length = max_line_length

    def filter(self, doc: Document) -> bool:
        return max(map(len, doc.text.splitlines()), default=0) <= self.max_line_length


class AlnumFractionFilter(BaseFilter):
    """Drops files whose fraction of alphanumeric characters is below ``min_alnum_fraction`` (data blobs)."""

    name = "🔤 alnum fraction"

    def __init__(self, min_alnum_fraction: float):
        super().__init__()
        self.min_alnum_fraction = min_alnum_fraction

    def filter(self, doc: Document) -> bool:
        n_alnum = sum(ch.isalnum() for ch in doc.text)
        return n_alnum >= self.min_alnum_fraction * len(doc.text)


class LanguageFilter(BaseFilter):
    """Keeps the documents of the selected ``--languages`` (``metadata["language"]``, set by the readers)."""

    name = "🌐 language"

    def __init__(self, languages: tuple[str, ...]):
        super().__init__()
        self.languages = tuple(languages)

    def filter(self, doc: Document) -> bool:
        return keeps(self.languages, doc.metadata.get("language", ""))


# ------------------------------------------------------------------------------------------------
# Exact dedup: content hash per document, first occurrence in source-path order wins.
# (datatrove's ExactDedup keeps the lowest per-task index, which depends on the task count.)
# ------------------------------------------------------------------------------------------------


def write_uint64_file(folder: DataFolderLike, filename: str, values) -> None:
    """The per-task hash files (``.hashes``, ``.splithash``): one little-endian uint64 per document,
    in stream order."""
    with get_datafolder(folder).open(filename, "wb") as f:
        f.write(np.asarray(values, dtype="<u8").tobytes())


def read_uint64_file(folder: DataFolderLike, filename: str) -> np.ndarray:
    with get_datafolder(folder).open(filename, "rb") as f:
        return np.frombuffer(f.read(), dtype="<u8")


def content_hash(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")


class ContentHashWriter(PipelineStep):
    """Sink: writes one uint64 content hash per document to ``{rank:05d}.hashes``, in stream order."""

    type = "🫂 - DEDUP"
    name = "#️⃣ exact dedup: hashes"

    def __init__(self, output_folder: DataFolderLike):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        hashes = []
        for doc in data:
            with self.track_time():
                hashes.append(content_hash(doc.text))
            self.stat_update(StatHints.total)
        write_uint64_file(self.output_folder, f"{rank:05d}.hashes", hashes)
        return
        yield  # a generator that yields nothing, like the other sinks


class ExactDedupFind(PipelineStep):
    """Single task: reads every task's hashes and writes ``{rank:05d}.remove`` (uint32 indices) for
    all documents whose content already appeared earlier in (task, index) order."""

    type = "🫂 - DEDUP"
    name = "#️⃣ exact dedup: find"

    def __init__(self, hashes_folder: DataFolderLike, output_folder: DataFolderLike, n_tasks: int):
        super().__init__()
        self.hashes_folder = get_datafolder(hashes_folder)
        self.output_folder = get_datafolder(output_folder)
        self.n_tasks = n_tasks

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        assert world_size == 1, "exact dedup find runs as a single task"
        per_task = [read_uint64_file(self.hashes_folder, f"{t:05d}.hashes") for t in range(self.n_tasks)]
        all_hashes = np.concatenate(per_task) if per_task else np.zeros(0, dtype="<u8")
        # np.unique returns the first index of each value: that is the global first occurrence
        _, first = np.unique(all_hashes, return_index=True)
        keep = np.zeros(len(all_hashes), dtype=bool)
        keep[first] = True
        start = 0
        for task, hashes in enumerate(per_task):
            removed = np.flatnonzero(~keep[start : start + len(hashes)]).astype("<u4")
            start += len(hashes)
            self.stat_update("duplicates", value=len(removed))
            with self.output_folder.open(f"{task:05d}.remove", "wb") as f:
                f.write(removed.tobytes())
        return
        yield


class ExactDedupFilter(PipelineStep):
    """Drops the documents listed in this task's ``.remove`` file (indices in stream order)."""

    type = "🫂 - DEDUP"
    name = "#️⃣ exact dedup: filter"

    def __init__(self, remove_folder: DataFolderLike):
        super().__init__()
        self.remove_folder = get_datafolder(remove_folder)

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        with self.remove_folder.open(f"{rank:05d}.remove", "rb") as f:
            to_remove = set(np.frombuffer(f.read(), dtype="<u4").tolist())
        for idx, doc in enumerate(data):
            self.stat_update(StatHints.total)
            if idx in to_remove:
                self.stat_update(StatHints.dropped)
                continue
            self.stat_update(StatHints.forwarded)
            yield doc


# ------------------------------------------------------------------------------------------------
# MinHash word tokenizer for source code
# ------------------------------------------------------------------------------------------------

# identifiers/numbers, or a single non-space symbol: operators and brackets count as words in code
_CODE_WORD = re.compile(r"\w+|[^\w\s]")


class CodeWordTokenizer(WordTokenizer):
    """Regex word tokenizer for MinHash shingles on code (datatrove's default is spaCy English)."""

    def __init__(self):
        super().__init__("code")

    def word_tokenize(self, text: str) -> list[str]:
        return _CODE_WORD.findall(text)

    def sent_tokenize(self, text: str) -> list[str]:
        return text.splitlines()

    def span_tokenize(self, text: str) -> list[tuple[int, int]]:
        return [m.span() for m in re.finditer(r"[^\n]+", text)]


# The Mersenne prime datatrove's permutations reduce by: (a * shingle + b) mod 2^64, then mod P.
_MERSENNE_61 = np.uint64((1 << 61) - 1)
_SIGNATURE_ROWS = 512  # shingles per block: the block's (rows x hashes) uint64 temporaries stay in cache


class CodeMinhashSignature(MinhashDedupSignature):
    """datatrove's MinHash signatures, the same values, computed in about half the time.

    Three changes, none of which changes a signature: the text is not "simplified" when the only
    normalisation asked for is whitespace (the code word tokenizer never returns whitespace, so
    collapsing it changes no word); each document's shingles are made unique first (a minimum over a
    set is the minimum over the multiset; code repeats about a fifth of its 5-grams); and ``mod P``
    is two shifts and adds (P = 2^61 - 1 is a Mersenne prime) in cache-sized blocks instead of a
    64-bit division over a (shingles x hashes) array. On 5 MB of stdlib code the signature step took
    0.45-0.55 s instead of 0.97 s. tests/test_data_prepare.py checks equality with datatrove's own.
    """

    def __init__(self, output_folder: DataFolderLike, config, language: WordTokenizer):
        super().__init__(output_folder, config=config, language=language)
        norm = config.norm_config  # every flag datatrove has, so that a new one is not missed
        self._whitespace_only = not any(getattr(norm, f.name) for f in dataclasses.fields(norm)
                                        if f.name != "norm_whitespace")
        if config.hash_config.precision != 64:
            raise ValueError("CodeMinhashSignature computes 64-bit signatures only")

    def get_shingles(self, text: str) -> np.ndarray:
        if not (self._whitespace_only and isinstance(self.word_tokenizer, CodeWordTokenizer)):
            return super().get_shingles(text)
        words = self.word_tokenizer.word_tokenize(text)
        n = self.config.n_grams
        grams = map(" ".join, zip(*(words[i:] for i in range(n))))
        # map over C functions, no Python frame per shingle: a document has one shingle per word,
        # and a frame per shingle (generator + datatrove's one-line xxhash64 wrapper) was two thirds
        # of this stage's time at 30 MB. The wrapper returns xxh64_intdigest's value unchanged.
        hash_one = xxhash.xxh64_intdigest if self._hash_func is xxhash64 else self._hash_func
        shingles = np.fromiter(map(hash_one, grams), dtype=np.uint64, count=max(len(words) - n + 1, 0))
        return shingles.reshape((-1, 1))

    def get_signature(self, shingles: np.ndarray) -> list[list[int]]:
        a, b = self.parameters
        unique = np.unique(shingles.ravel())
        best = np.full(a.shape[1], np.iinfo(np.uint64).max, dtype=np.uint64)
        x = np.empty((_SIGNATURE_ROWS, a.shape[1]), dtype=np.uint64)
        r = np.empty_like(x)
        for start in range(0, unique.size, _SIGNATURE_ROWS):
            rows = unique[start : start + _SIGNATURE_ROWS, None]
            xv, rv = x[: len(rows)], r[: len(rows)]
            np.multiply(rows, a, out=xv)
            xv += b  # wraps at 2^64, as datatrove's expression does
            np.bitwise_and(xv, _MERSENNE_61, out=rv)
            xv >>= np.uint64(61)
            rv += xv  # x mod P, or that plus P (rv <= P + 7)
            np.subtract(rv, _MERSENNE_61, out=xv)  # wraps to a huge value where rv < P
            np.minimum(rv, xv, out=rv)
            np.minimum(best, rv.min(axis=0), out=best)
        return [bucket.tolist() for bucket in np.split(best, self.config.num_buckets)]


# ------------------------------------------------------------------------------------------------
# Train/validation split
# ------------------------------------------------------------------------------------------------


def split_hash(doc_id: str, seed: int) -> int:
    """A uint64 derived from (seed, document id) only: the split never depends on task layout."""
    digest = hashlib.blake2b(f"{seed}\0{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SplitHashWriter(PipelineStep):
    """Sink: writes the split hash of each surviving document to ``{rank:05d}.splithash``."""

    type = "🔀 - SPLIT"
    name = "split hashes"

    def __init__(self, output_folder: DataFolderLike, seed: int):
        super().__init__()
        self.output_folder = get_datafolder(output_folder)
        self.seed = seed

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        hashes = [split_hash(doc.id, self.seed) for doc in data]
        write_uint64_file(self.output_folder, f"{rank:05d}.splithash", hashes)
        return
        yield


# ------------------------------------------------------------------------------------------------
# Tokenization
# ------------------------------------------------------------------------------------------------


# Documents per encode_batch call: datatrove's DocumentTokenizer's default. The tokenizers library
# spreads a batch over its threads; with 1000-document batches a batch holding one very long file
# keeps one thread busy while the others wait (and spin), which made this stage about 8% slower in
# wall and CPU time than 10000 on 30 MB of stdlib code (3 interleaved repetitions each).
TOKENIZE_BATCH = 10_000
# ... and at most this many characters: a batch's encodings cost ~100 bytes per token (each token's
# string, offsets and masks), so 10000 documents of a corpus of large files would hold gigabytes
# per worker. Measured on 30 MB of stdlib code (2468 files, one process): peak RSS 813 MB with the
# whole corpus in one batch, 494 MB with 16M-character batches, 273 MB with 4M; time per token the
# same within this machine's ±10%.
TOKENIZE_BATCH_CHARS = 8_000_000


def text_batches(data: DocumentsPipeline, max_documents: int, max_chars: int):
    """Lists of consecutive documents, each list at most ``max_documents`` long and, unless one
    document alone is longer, at most ``max_chars`` characters of text."""
    batch, chars = [], 0
    for doc in data:
        if batch and (len(batch) == max_documents or chars + len(doc.text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


class SplitTokenizer(PipelineStepWithTokenizer):
    """Sink: tokenizes each document once, into its split's shard (``val`` iff ``split_hash(id, seed)
    < val_threshold``): ``<output>/<split>/{rank:05d}_unshuffled.ds`` (+ ``.index``), written with
    datatrove's TokenizedFile like its DocumentTokenizer does, and the documents' languages in the
    same order to ``<languages>/<split>/{rank:05d}.languages``, from which the driver counts
    documents and tokens per language without reading the shards again.

    One pass for both splits: the split is per document, so a stage per split would read and
    filter every document twice. Special-token parsing is off for the text
    (``encode_special_tokens`` is not saved in tokenizer.json, so it is set on the loaded object):
    a literal ``<|endoftext|>`` in a source file stays text; the EOS the post-processor appends
    after each document is unaffected.
    """

    type = "🔢 - TOKENIZER"
    name = "✍️ tokenize by split"

    def __init__(self, output_folder: DataFolderLike, languages_folder: DataFolderLike, *,
                 tokenizer_path: str, eos_token: str, seed: int, val_threshold: int,
                 batch_size: int = TOKENIZE_BATCH, batch_chars: int = TOKENIZE_BATCH_CHARS):
        super().__init__(tokenizer_path, eos_token)
        self.output_folder = get_datafolder(output_folder)
        self.languages_folder = get_datafolder(languages_folder)
        self.seed = seed
        self.val_threshold = val_threshold
        self.batch_size = batch_size
        self.batch_chars = batch_chars

    @property
    def literal_tokenizer(self):
        tok = self.tokenizer  # datatrove's cached loader, with the EOS post-processor
        tok.encode_special_tokens = True
        return tok

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from datatrove.pipeline.tokens.tokenizer import TokenizedFile

        tokenizer = self.literal_tokenizer
        files, languages = {}, {"train": [], "val": []}
        for split in languages:
            files[split] = TokenizedFile(self.output_folder, f"{split}/{rank:05d}_unshuffled.ds",
                                         token_size=self.token_size)
        for batch in text_batches(data, self.batch_size, self.batch_chars):
            with self.track_time(unit="batch"):
                # the same ids as encode_batch (and datatrove's DocumentTokenizer), without the
                # character offsets it computes for every token: 15-25% less time per token on
                # 30 MB of stdlib code (three interleaved in-process repetitions)
                encoded = tokenizer.encode_batch_fast([doc.text for doc in batch])
                for doc, enc in zip(batch, encoded):
                    split = "val" if split_hash(doc.id, self.seed) < self.val_threshold else "train"
                    files[split].write(enc.ids, None)
                    languages[split].append(doc.metadata.get("language", "unknown"))
                    self.stat_update(f"{split}_tokens", value=len(enc.ids))
        for split, file in files.items():
            file.close()
            with self.languages_folder.open(f"{split}/{rank:05d}.languages", "w") as f:
                f.writelines(lang + "\n" for lang in languages[split])
        return
        yield


__all__ = [
    "EOS_TOKEN",
    "AlnumFractionFilter",
    "CodeWordTokenizer",
    "ContentHashWriter",
    "ExactDedupFilter",
    "ExactDedupFind",
    "LanguageFilter",
    "LengthFilter",
    "LongestLineFilter",
    "RankJsonlReader",
    "SourceFileReader",
    "SplitHashWriter",
    "SplitTokenizer",
    "text_batches",
    "contiguous_shard",
    "list_source_files",
    "split_hash",
]
