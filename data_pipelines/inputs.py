"""What ``--input`` names, listed once by the driver.

``--input`` is a folder of source files, or dataset shards: one ``.jsonl`` / ``.jsonl.gz`` /
``.parquet`` file, a folder of them (searched recursively) or a glob. Any fsspec path datatrove
accepts works. The driver lists the files here, once, sorted, and writes the list into the work
folder; every task reads its contiguous slice of that list, so a source tree that changes while the
pipeline runs cannot make a task read a file twice or miss one.
"""

from __future__ import annotations

import dataclasses
import os

from megatrain.errors import DataError

DEFAULT_TEXT_KEY = "content"  # the text column of The Stack and StarCoderData; "text" is the fallback
SOURCE_FILES = "source files"
DATASET_SHARDS = "dataset shards"
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
SHARD_SUFFIXES = JSONL_SUFFIXES + PARQUET_SUFFIXES
_GLOB_CHARS = "*?["


@dataclasses.dataclass(frozen=True)
class InputFiles:
    kind: str  # SOURCE_FILES or DATASET_SHARDS
    root: str  # the folder ``files`` are relative to (a local path or an fsspec URL)
    files: tuple[str, ...]  # sorted, posix, relative to root


def shard_format(path: str) -> str:
    """``jsonl`` or ``parquet``, from a shard's name."""
    return "parquet" if path.endswith(PARQUET_SUFFIXES) else "jsonl"


def list_inputs(spec: str, extensions: tuple[str, ...], exclude_dirs: tuple[str, ...]) -> InputFiles:
    """The files ``--input`` names; a DataError (naming ``spec`` and the fix) when there are none."""
    from fsspec.core import url_to_fs

    remote = "://" in spec
    fs, path = url_to_fs(spec if remote else os.path.abspath(os.path.expanduser(spec)))

    def root_of(folder: str) -> str:
        return fs.unstrip_protocol(folder) if remote else folder

    if any(ch in path for ch in _GLOB_CHARS):
        base = path[: min(path.find(ch) for ch in _GLOB_CHARS if ch in path)].rsplit("/", 1)[0] or "/"
        matched = sorted(p for p in fs.glob(path) if p.endswith(SHARD_SUFFIXES) and fs.isfile(p))
        if not matched:
            raise DataError(
                f"--input {spec}: the glob matches no {'/'.join(SHARD_SUFFIXES)} file; check the pattern"
            )
        return InputFiles(DATASET_SHARDS, root_of(base), tuple(_relative(p, base) for p in matched))
    if fs.isfile(path):
        if not path.endswith(SHARD_SUFFIXES):
            raise DataError(
                f"--input {spec} is a file but not a dataset shard ({', '.join(SHARD_SUFFIXES)}): pass "
                "such a file, a folder of them, a glob, or a folder of source files"
            )
        base, name = path.rsplit("/", 1)
        return InputFiles(DATASET_SHARDS, root_of(base or "/"), (name,))
    if not fs.isdir(path):
        raise DataError(f"input folder {spec} does not exist (or is not a folder): check --input")

    shards, sources = [], []
    exclude = set(exclude_dirs)
    for folder, dirs, files in fs.walk(path, topdown=True):
        dirs[:] = sorted(d for d in dirs if d not in exclude and not d.startswith("."))
        for name in files:
            full = f"{folder.rstrip('/')}/{name}"
            if name.endswith(SHARD_SUFFIXES):
                shards.append(_relative(full, path))
            elif name.endswith(extensions):
                sources.append(_relative(full, path))
    if shards:  # a folder of shards (it may also hold a README.py or scripts: not the data)
        return InputFiles(DATASET_SHARDS, root_of(path), tuple(sorted(shards)))
    if not sources:
        raise DataError(
            f"input folder {spec} has no files ending in {', '.join(extensions)} (skipping folders "
            f"{', '.join(exclude_dirs)} and hidden ones) and no dataset shards "
            f"({', '.join(SHARD_SUFFIXES)}): check --input, --languages and --extensions"
        )
    return InputFiles(SOURCE_FILES, root_of(path), tuple(sorted(sources)))


def write_file_list(path: str, files: tuple[str, ...]) -> None:
    """The driver's list, one path per line, for the tasks (``read_file_list``)."""
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(name + "\n" for name in files)


def read_file_list(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _relative(full: str, base: str) -> str:
    base = base.rstrip("/")
    return full[len(base) + 1 :] if full.startswith(base + "/") else full
