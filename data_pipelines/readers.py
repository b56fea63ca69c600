"""Reading dataset shards (JSONL, JSONL.gz, Parquet) into Documents, with datatrove's readers.

``ShardReader`` is the pipeline's first step for ``--input`` shards: each task takes its contiguous
slice of the driver's file list (``inputs.read_file_list``) and reads every file with datatrove's
``JsonlReader`` or ``ParquetReader``, made strict: where datatrove logs a warning and skips
(a line that is not JSON, a truncated gzip stream) or reads every column, these raise a DataError
naming the file and the fix, and read only the columns that are kept.

A record becomes a Document with ``text`` from ``text_key`` (``content`` falls back to ``text``),
``id`` from ``id_key`` (default: ``<file>/<row>``, stable whatever the task count), and metadata
holding the ``keep_metadata`` columns and ``language`` (normalized from the language column, else
from a path column's suffix).
"""

from __future__ import annotations

import gzip
import zlib

from datatrove.data import Document, DocumentsPipeline
from datatrove.io import DataFolderLike
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.readers.jsonl import JsonlReader
from datatrove.pipeline.readers.parquet import ParquetReader

from megatrain.data_pipelines.inputs import DEFAULT_TEXT_KEY, read_file_list, shard_format
from megatrain.data_pipelines.languages import language_of_path, normalize_language
from megatrain.errors import DataError

FALLBACK_TEXT_KEY = "text"  # most other exports
LANGUAGE_KEYS = ("language", "lang")  # tried in this order when --language-key is not given
PATH_KEYS = ("path", "max_stars_repo_path", "filepath", "file_name")  # for a language from the suffix
_FIX_TEXT_KEY = "pass --text-key naming the column that holds the file's text"


class _RecordToDocument:
    """The adapter both shard readers share (it replaces datatrove's default one)."""

    text_keys: tuple[str, ...]
    id_key: str
    keep_metadata: tuple[str, ...]
    language_key: str
    languages: tuple[str, ...]

    def _configure(self, text_key, id_key, keep_metadata, language_key, languages):
        self.text_keys = (text_key, FALLBACK_TEXT_KEY) if text_key == DEFAULT_TEXT_KEY else (text_key,)
        self.id_key = id_key
        self.keep_metadata = tuple(keep_metadata)
        self.language_key = language_key
        self.languages = tuple(languages)

    def wanted_columns(self, available: list[str]) -> list[str]:
        text = next((k for k in self.text_keys if k in available), None)
        if text is None:
            raise DataError(
                f"has no column {' or '.join(map(repr, self.text_keys))} (its columns: "
                f"{', '.join(available)}): {_FIX_TEXT_KEY}"
            )
        extra = [self.id_key, self.language_key, *LANGUAGE_KEYS, *PATH_KEYS, *self.keep_metadata]
        return [text] + [k for k in dict.fromkeys(extra) if k and k in available and k != text]

    def _default_adapter(self, data: dict, path: str, id_in_file: int | str) -> dict:
        text_key = next((k for k in self.text_keys if k in data), None)
        if text_key is None:
            raise DataError(
                f"{path}: record {id_in_file} has no field {' or '.join(map(repr, self.text_keys))} "
                f"(its fields: {', '.join(data)}): {_FIX_TEXT_KEY}"
            )
        if self.id_key:
            if data.get(self.id_key) is None:
                raise DataError(
                    f"{path}: record {id_in_file} has no field {self.id_key!r} (--id-key): name a field "
                    "every record has, or leave --id-key out (ids are then <file>/<row>)"
                )
            doc_id = str(data[self.id_key])
        else:
            doc_id = f"{path}/{id_in_file}"
        metadata = {k: data[k] for k in self.keep_metadata if k in data}
        metadata["language"] = self._language(data)
        return {"text": data[text_key] or "", "id": doc_id, "media": [], "metadata": metadata}

    def _language(self, data: dict) -> str:
        keys = (self.language_key,) if self.language_key else LANGUAGE_KEYS
        for key in keys:
            if data.get(key):
                return normalize_language(data[key])
        for key in PATH_KEYS:
            if isinstance(data.get(key), str):
                return language_of_path(data[key], self.languages)
        return language_of_path("", self.languages)  # no hint at all: the one selected language, if one

    def get_document_from_dict(self, data: dict, source_file: str, id_in_file: int | str) -> Document:
        # datatrove's drops an empty text with a warning about text_key; here the text column was
        # found, so the caller counts the empty document as such
        return Document(**self._default_adapter(data, source_file, id_in_file))


class StrictJsonlReader(_RecordToDocument, JsonlReader):
    name = "🐿 jsonl (strict)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import orjson

        line_no = 0
        try:
            with self.data_folder.open(filepath, "r", compression=self.compression) as f:
                for line_no, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    with self.track_time():
                        try:
                            record = orjson.loads(line)
                        except orjson.JSONDecodeError as e:
                            raise DataError(
                                f"{filepath}: line {line_no} is not valid JSON ({e}); the shard is truncated "
                                "or corrupt: re-export it, or remove it from --input"
                            ) from None
                        if not isinstance(record, dict):
                            raise DataError(
                                f"{filepath}: line {line_no} is a JSON {type(record).__name__}, not an "
                                "object with a text field: JSONL input needs one object per line"
                            )
                        document = self.get_document_from_dict(record, filepath, line_no - 1)
                    yield document
        except (EOFError, gzip.BadGzipFile, zlib.error, UnicodeDecodeError) as e:
            raise DataError(
                f"{filepath} cannot be read after line {line_no} ({type(e).__name__}: {e}); the shard is "
                "truncated or corrupt: re-export it, or remove it from --input"
            ) from None


class ColumnParquetReader(_RecordToDocument, ParquetReader):
    name = "📒 parquet (columns kept)"

    def read_file(self, filepath: str) -> DocumentsPipeline:
        import pyarrow as pa
        import pyarrow.parquet as pq

        row = 0
        try:
            with self.data_folder.open(filepath, "rb") as f, pq.ParquetFile(f) as pqf:
                try:
                    columns = self.wanted_columns(pqf.schema_arrow.names)
                except DataError as e:
                    raise DataError(f"{filepath} {e}") from None
                for batch in pqf.iter_batches(batch_size=self.batch_size, columns=columns):
                    with self.track_time("batch"):
                        documents = []
                        for record in batch.to_pylist():
                            documents.append(self.get_document_from_dict(record, filepath, row))
                            row += 1
                    yield from documents
        except (pa.ArrowException, OSError, EOFError) as e:
            raise DataError(
                f"{filepath} is not a readable Parquet file (after row {row}: {e}); the shard is "
                "truncated or corrupt: re-export it, or remove it from --input"
            ) from None


class ShardReader(PipelineStep):
    """Reads this task's contiguous slice of the listed shards, each with the reader for its format."""

    type = "📖 - READER"
    name = "📚 dataset shards"

    def __init__(
        self,
        data_folder: DataFolderLike,
        paths_file: str,
        *,
        text_key: str = DEFAULT_TEXT_KEY,
        id_key: str = "",
        keep_metadata: tuple[str, ...] = (),
        language_key: str = "",
        languages: tuple[str, ...] = ("python",),
        progress: bool = False,
    ):
        super().__init__()
        options = dict(text_key=text_key, id_key="", add_file_path=False, file_progress=False)
        self.jsonl = StrictJsonlReader(data_folder, **options)
        options.pop("add_file_path")  # ParquetReader has no such option
        self.parquet = ColumnParquetReader(data_folder, **options)
        for reader in (self.jsonl, self.parquet):
            reader._configure(text_key, id_key, keep_metadata, language_key, languages)
        self.paths_file = paths_file
        self.progress = progress

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from tqdm import tqdm

        from megatrain.data_pipelines.steps import contiguous_shard

        if data:
            yield from data
        shard = contiguous_shard(read_file_list(self.paths_file), rank, world_size)
        desc = f"reading shards (task {rank})"
        for filepath in tqdm(shard, desc=desc, unit="file", disable=not self.progress):
            self.stat_update("input_files")
            reader = self.parquet if shard_format(filepath) == "parquet" else self.jsonl
            for doc in reader.read_file(filepath):
                if not doc.text:
                    self.stat_update("dropped_empty")
                    continue
                self.stat_update("documents")
                self.update_doc_stats(doc)
                yield doc
