"""``megatrain data prepare``: source files or dataset shards -> filtered, deduplicated, tokenized
``.ds`` shards.

The driver lists ``--input`` once (``inputs.list_inputs``) into W/input_files.txt; then the stages
(datatrove ``LocalPipelineExecutor``s; K = ``tasks``; W = ``output_dir/.work``):

1. (K) read source files or JSONL/Parquet shards -> language / length / longest-line / alnum
   filters -> W/filtered -> content hashes
2. (1) exact dedup: find every document whose content appeared earlier in source-path order
3. (K) drop exact duplicates -> W/unique -> MinHash signatures (code-aware regex word tokenizer)
4. (buckets) MinHash buckets     5. (1) MinHash clusters
6. (K) drop near duplicates -> W/final -> split hashes
   then, in this process: val threshold, tokenizer (``bytes`` built, ``bpe`` trained on train docs,
   a tokenizer.json copied)
7. (K) every document -> tokenized into ``train/*.ds`` or ``val/*.ds`` by its split, languages recorded

Outputs do not depend on ``tasks``: tasks read contiguous slices of the sorted file list, dedup keeps
the first occurrence in path order, and a document's split is a function of (seed, id) only.
``manifest.json`` is written last and atomically: a folder with a manifest is a complete dataset; a
prepare that fails on bad input removes what it wrote.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

from megatrain.cli_fields import add_field_arguments, field_values, help_of, option
from megatrain.data.shards import MANIFEST_FORMAT, MANIFEST_NAME, MAX_TOKEN_IDS_KEY, shard_max_token_id
from megatrain.data_pipelines.inputs import DEFAULT_TEXT_KEY
from megatrain.data_pipelines.languages import DEFAULT_LANGUAGES, extensions_for, parse_languages
from megatrain.errors import DataError
from megatrain.files import atomic_write_text, exclusive_lock

TOKENIZER_FILE = "tokenizer.json"
IN_PROGRESS_MARKER = ".prepare-in-progress.json"
WORK_DIR = ".work"
INPUT_LIST = "input_files.txt"  # in WORK_DIR: the driver's list of input files, read by every task
PIPELINE_VERSION = 2  # bump when a change to the pipeline changes its output: invalidates caches

DEFAULT_EXCLUDE_DIRS = ("__pycache__", "site-packages", "dist-packages", "node_modules")
# the stdlib's own test suites are ~60% of its code; leaving them out keeps the default corpus
# small (~730 files, 12 MB) and more like ordinary code
STDLIB_TEST_DIRS = ("test", "tests", "idle_test")
DEFAULT_CORPUS_VOCAB_SIZE = 4096
# how long a process waits for another one building the default corpus (~1 min on 2 cores)
DEFAULT_BUILD_WAIT_S = 3600.0

# names this module may delete when it restarts an unfinished prepare in the same folder; the
# ".tmp" ones are the temporary files of megatrain.files.atomic_write_text, left by a crash mid-write
_OWN_OUTPUTS = (WORK_DIR, "train", "val", "logs", TOKENIZER_FILE, TOKENIZER_FILE + ".tmp",
                MANIFEST_NAME + ".tmp", IN_PROGRESS_MARKER, IN_PROGRESS_MARKER + ".tmp")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """Everything that determines a prepared dataset (``tasks``/``progress`` only change speed).
    The one owner of each setting's default and help text (the CLI's flags are made from them)."""

    source: str
    tokenizer: str = option("bpe", "bpe (trained on the corpus), bytes, or an existing Hugging Face "
                                   "tokenizer.json (or its folder)")
    vocab_size: int = option(32000, "BPE vocabulary size (bytes: 257; a tokenizer file: its own)")
    eos_token: str = option("", "the end-of-document token of a --tokenizer PATH (default: its "
                                "tokenizer_config.json's, else a common one it has: <|endoftext|>, "
                                "</s>, ...)")
    tokenizer_sha256: str = ""  # a tokenizer file's content: a changed file is another dataset
    languages: tuple[str, ...] = option(
        DEFAULT_LANGUAGES, "comma-separated languages to keep, e.g. python,c,cpp,java,javascript,go,rust, "
                           "or all (folders: chosen by file suffix; shards: by a language column, else a "
                           "path column's suffix)")
    text_key: str = option(DEFAULT_TEXT_KEY, "shards: the column holding the text (falling back to text)")
    id_key: str = option("", "shards: the column of document ids (default: none)")
    language_key: str = option("", "shards: the language column (default: language, else lang)")
    keep_metadata: tuple[str, ...] = option((), "shards: comma-separated columns kept on the documents, "
                                                "e.g. path,repo_name,license")
    val_fraction: float = option(0.02, "fraction of documents in the validation split (by a hash of "
                                       "the seed and the document id)")
    seed: int = option(0, "seed of the train/val split")
    min_chars: int = option(32, "drop files shorter than this many characters")
    max_chars: int = option(1_000_000, "drop files longer than this many characters")
    max_line_length: int = option(1000, "drop files with a longer line (minified or generated code)")
    min_alnum_fraction: float = option(0.25, "drop files whose fraction of letters and digits is lower "
                                             "(data blobs, ASCII art)")
    extensions: tuple[str, ...] = option((".py",), "folders: comma-separated file suffixes, e.g. .py,.pyi "
                                                   "(default: those of --languages)")
    exclude_dirs: tuple[str, ...] = DEFAULT_EXCLUDE_DIRS
    minhash_ngrams: int = 5
    minhash_buckets: int = 14
    minhash_hashes_per_bucket: int = 8
    pipeline_version: int = PIPELINE_VERSION

    def validate(self) -> None:
        if self.tokenizer not in ("bpe", "bytes") and not self.tokenizer_sha256:
            raise DataError(f"--tokenizer must be bpe, bytes or a tokenizer.json, got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and not 257 < self.vocab_size <= 2**32:
            raise DataError(
                f"--vocab-size {self.vocab_size} is too small for a BPE tokenizer: it needs 256 byte tokens, "
                "<|endoftext|> and at least one merge. Use --vocab-size 258 or more (e.g. 32000), "
                "or --tokenizer bytes."
            )
        if not 0.0 < self.val_fraction < 1.0:
            raise DataError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.min_chars < 0 or self.max_chars < max(self.min_chars, 1):
            raise DataError(
                f"need 0 <= --min-chars <= --max-chars, got {self.min_chars} and {self.max_chars}"
            )
        if self.max_line_length < 1:
            raise DataError(f"--max-line-length must be >= 1, got {self.max_line_length}")
        if not 0.0 <= self.min_alnum_fraction <= 1.0:
            raise DataError(f"--min-alnum-fraction must be in [0, 1], got {self.min_alnum_fraction}")
        if not self.extensions or not all(e.startswith(".") for e in self.extensions):
            raise DataError(
                f"--extensions must be suffixes starting with '.', e.g. .py; got {self.extensions}"
            )

    def to_json(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self)))  # tuples -> lists, as read back


# ------------------------------------------------------------------------------------------------


def prepare_dataset(input_dir: str | os.PathLike, output_dir: str | os.PathLike, *, tasks: int = 1,
                    progress: bool = True, run_stage=None, **settings) -> dict:
    """Prepare ``input_dir`` (a folder of source files, or JSONL/Parquet shards: see ``inputs``) into
    a megatrain dataset in ``output_dir``; returns the manifest. ``settings``: ``PrepareConfig``'s
    fields, with its defaults (``languages`` may be a comma-separated string; ``extensions``
    default to ``languages``'; ``tokenizer``: bpe, bytes, or the path of a tokenizer.json).
    If ``output_dir`` already holds a completed dataset with the same config, returns its
    manifest without doing any work; a folder holding anything else is never overwritten; an
    unfinished prepare of the same settings there is resumed (its finished tasks kept).
    ``run_stage`` runs one pipeline stage (default: ``stages.run_local_stage`` here; the
    CLI passes megatrain.slurm.data.SlurmStageRunner for ``--executor slurm``)."""
    from megatrain.data_pipelines import vocab

    derived = {"source", "tokenizer_sha256", "pipeline_version"}
    fields = {f.name for f in dataclasses.fields(PrepareConfig)}
    unknown = (set(settings) - fields) | (set(settings) & derived)
    if unknown:
        raise TypeError(f"prepare_dataset() got unknown settings {sorted(unknown)}")
    config = dataclasses.replace(PrepareConfig(source=""), **settings)
    input_spec = str(input_dir)
    if "://" not in input_spec:
        input_spec = str(Path(input_spec).expanduser().resolve())
    output_path = Path(output_dir).expanduser().resolve()
    tokenizer, vocab_size, eos_token, tokenizer_sha256 = config.tokenizer, config.vocab_size, "", ""
    if tokenizer not in ("bpe", "bytes"):  # an existing tokenizer: refuse a bad one before any work
        tokenizer_file = vocab.resolve_tokenizer_file(tokenizer)
        eos_token = vocab.load_tokenizer_file(tokenizer_file, config.eos_token)[1]
        tokenizer, tokenizer_sha256, vocab_size = str(tokenizer_file), vocab.file_sha256(tokenizer_file), 0
    elif tokenizer == "bytes":
        vocab_size = vocab.BYTES_VOCAB_SIZE  # fixed: the flag does not apply
    languages = parse_languages(config.languages)
    config = dataclasses.replace(
        config, source=input_spec, tokenizer=tokenizer, vocab_size=int(vocab_size), eos_token=eos_token,
        tokenizer_sha256=tokenizer_sha256, languages=languages, keep_metadata=tuple(config.keep_metadata),
        val_fraction=float(config.val_fraction), seed=int(config.seed), min_chars=int(config.min_chars),
        max_chars=int(config.max_chars), max_line_length=int(config.max_line_length),
        min_alnum_fraction=float(config.min_alnum_fraction),
        extensions=tuple(settings["extensions"]) if settings.get("extensions") else extensions_for(languages),
        exclude_dirs=tuple(config.exclude_dirs))
    config.validate()
    if tasks < 1:
        raise DataError(f"--tasks must be >= 1, got {tasks}")

    # several processes may prepare the same folder at once (e.g. every rank of a job calling
    # ensure_default_dataset): the first builds, the others wait and then reuse its result
    output_path.parent.mkdir(parents=True, exist_ok=True)
    with exclusive_lock(output_path.parent / f".{output_path.name}.prepare-lock"):
        return _prepare_locked(config, output_path, tasks=tasks, progress=progress, run_stage=run_stage)


def _prepare_locked(config: PrepareConfig, output_path: Path, *, tasks: int, progress: bool,
                    run_stage=None) -> dict:
    cached = _check_output_dir(output_path, config)
    if cached is not None:
        _say_reusing(output_path, progress)
        return cached

    from megatrain.data_pipelines import stages
    from megatrain.data_pipelines.inputs import list_inputs

    inputs = list_inputs(config.source, config.extensions, config.exclude_dirs)  # once, for every task
    created = not output_path.exists()
    _start_or_resume(output_path, config, tasks, inputs, progress)
    started = time.perf_counter()
    from loguru import logger

    if not progress:
        logger.disable("datatrove")
    try:
        manifest = _run_pipeline(config, output_path, inputs, tasks=tasks, progress=progress,
                                 run_stage=run_stage or stages.run_local_stage)
    except DataError:
        # bad input: nothing of this attempt is worth keeping (a crash keeps its work, which the
        # next prepare with the same settings resumes), except the task logs of a stage run
        # elsewhere (SLURM), which its error points to
        _remove_own_outputs(output_path, remove_folder=created, keep_logs=run_stage is not None)
        raise
    finally:
        if not progress:
            logger.enable("datatrove")
    manifest["stats"]["seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(output_path / WORK_DIR, ignore_errors=True)
    # last: the dataset is now complete
    atomic_write_text(output_path / MANIFEST_NAME, json.dumps(manifest, indent=2))
    (output_path / IN_PROGRESS_MARKER).unlink(missing_ok=True)
    if progress:
        print(format_summary(manifest), file=sys.stderr)
    return manifest


_announced_reuse: set[Path] = set()  # one "reusing" line per dataset and process


def _say_reusing(output_path: Path, progress: bool) -> None:
    if progress and output_path not in _announced_reuse:
        _announced_reuse.add(output_path)
        print(f"[data prepare] {output_path} already holds this dataset: reusing it", file=sys.stderr)


def _attempt_record(config: PrepareConfig, tasks: int, inputs) -> dict:
    """What an unfinished prepare must share with this one for its finished tasks to count: the
    settings, the task count (tasks write per-rank files) and the list of input files."""
    import hashlib

    listing = hashlib.sha256("\n".join(inputs.files).encode()).hexdigest()
    return {"config": config.to_json(), "tasks": tasks, "input_root": inputs.root,
            "input_list_sha256": listing}


def unfinished_task_count(output_path: Path) -> int | None:
    """The task count of the unfinished prepare recorded in ``output_path`` (None: none, or its
    record unreadable). ``data prepare`` without --tasks takes it, so that a prepare resumed on a
    machine with another number of CPUs keeps its finished tasks instead of starting over."""
    try:
        tasks = json.loads((output_path / IN_PROGRESS_MARKER).read_text()).get("tasks")
    except (OSError, ValueError, AttributeError):
        return None
    return tasks if isinstance(tasks, int) and tasks >= 1 else None


def _start_or_resume(output_path: Path, config: PrepareConfig, tasks: int, inputs, progress: bool) -> None:
    """Resume an unfinished prepare of the same settings, tasks and input files in ``output_path``
    (its stages' finished tasks are not run again); start any other one over."""
    from megatrain.data_pipelines.inputs import write_file_list

    marker = output_path / IN_PROGRESS_MARKER
    attempt = _attempt_record(config, tasks, inputs)
    if marker.is_file():
        try:
            earlier = json.loads(marker.read_text())
        except ValueError:
            earlier = None
        if earlier == attempt and (output_path / WORK_DIR / INPUT_LIST).is_file():
            if progress:
                print(f"[data prepare] resuming the unfinished prepare in {output_path}: its finished "
                      "tasks are kept", file=sys.stderr)
            return
        if progress:
            what = ("other settings, tasks or input files" if earlier
                    else "an unreadable record of its settings")
            print(f"[data prepare] {output_path} holds an unfinished prepare with {what}: starting over",
                  file=sys.stderr)
        _remove_own_outputs(output_path, remove_folder=False)
    output_path.mkdir(parents=True, exist_ok=True)
    # the marker first (a folder holding it is ours to clean up), complete only once the list is
    atomic_write_text(marker, json.dumps({**attempt, "input_list_sha256": "not written yet"}, indent=2))
    (output_path / WORK_DIR).mkdir(exist_ok=True)
    write_file_list(str(output_path / WORK_DIR / INPUT_LIST), inputs.files)
    atomic_write_text(marker, json.dumps(attempt, indent=2))  # the attempt is now resumable


def default_dataset_dir(cache_dir: str | os.PathLike) -> Path:
    """Where ``ensure_default_dataset`` builds the embedded corpus of this interpreter."""
    name = (f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-bpe{DEFAULT_CORPUS_VOCAB_SIZE}"
            f"-v{PIPELINE_VERSION}")
    return Path(cache_dir).expanduser().resolve() / name


def ensure_default_dataset(cache_dir: str | os.PathLike, *, tasks: int = 1, progress: bool = True,
                           wait_timeout_s: float = DEFAULT_BUILD_WAIT_S) -> Path:
    """The embedded default corpus: this interpreter's stdlib ``.py`` files without its test suites,
    BPE vocab 4096. Built once into ``cache_dir/<name>`` and reused while its manifest matches.
    When many processes (ranks, nodes, jobs) ask at once, one builds and the others wait for its
    manifest, at most ``wait_timeout_s`` (``build_once``)."""
    from megatrain.data_pipelines.build_once import build_once

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    output_dir = default_dataset_dir(cache_dir)
    # An internal cache, not a dataset the user named: building it is news, reusing it is not
    # (generate, eval, export and profile read its tokenizer and would each say "reusing").
    _announced_reuse.add(output_dir)

    def build() -> None:
        prepare_dataset(
            stdlib,
            output_dir,
            tokenizer="bpe",
            vocab_size=DEFAULT_CORPUS_VOCAB_SIZE,
            tasks=tasks,
            exclude_dirs=DEFAULT_EXCLUDE_DIRS + STDLIB_TEST_DIRS,
            progress=progress,
        )

    build_once(output_dir, build, what="the default corpus", timeout_s=wait_timeout_s, progress=progress)
    return output_dir


# ------------------------------------------------------------------------------------------------
# CLI glue (``megatrain data prepare``)
# ------------------------------------------------------------------------------------------------


# flags made from PrepareConfig's scalar fields (its defaults and help texts)
_SCALAR_FLAGS = ["vocab_size", "eos_token", "text_key", "id_key", "language_key", "val_fraction", "seed",
                 "min_chars", "max_chars", "max_line_length", "min_alnum_fraction"]


def add_prepare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    defaults = PrepareConfig(source="")
    parser.add_argument(
        "--input", required=True,
        help="a folder of source files (searched recursively), or JSONL / JSONL.gz / Parquet shards: one "
             "file, a folder of them, or a glob (any fsspec path)",
    )  # fmt: skip
    parser.add_argument("--output", required=True,
                        help="dataset folder to create (absent, empty, or an unfinished prepare to resume)")
    parser.add_argument("--tokenizer", default=defaults.tokenizer, metavar="bpe|bytes|PATH",
                        help=help_of(PrepareConfig, "tokenizer"))
    parser.add_argument("--languages", default=",".join(defaults.languages),
                        help=help_of(PrepareConfig, "languages"))
    parser.add_argument("--keep-metadata", default="", metavar="COLUMNS",
                        help=help_of(PrepareConfig, "keep_metadata"))
    parser.add_argument("--extensions", default="", help=help_of(PrepareConfig, "extensions"))
    add_field_arguments(parser, PrepareConfig, _SCALAR_FLAGS)
    # local default: every CPU this process may use. With one task the Python stages (filters,
    # MinHash) use one core while the tokenizer library spreads over all of them: on 2 cores, 30 MB
    # of code took 31.5 s with --tasks 1 and 22.0 s with --tasks 2 (docs/benchmarks.md)
    parser.add_argument("--tasks", type=int, default=None,
                        help="parallel datatrove tasks (default: an unfinished prepare's own count, "
                             "else locally one per CPU this process may use, with --executor slurm 1). "
                             "Speed only: the dataset is the same; a resumed prepare keeps its "
                             "finished tasks only with the same --tasks")
    parser.add_argument(
        "--exclude-dir", action="append", default=[], metavar="NAME",
        help=f"also skip folders with this name (always skipped: {', '.join(DEFAULT_EXCLUDE_DIRS)}, hidden)",
    )  # fmt: skip
    parser.add_argument("--no-progress", action="store_true",
                        help="quiet: no progress bars or summary (datatrove's logs are always in the "
                             "dataset's logs/ folder only)")
    return parser


def run_prepare(args: argparse.Namespace, run_stage=None) -> dict:
    def items(text: str) -> tuple[str, ...]:
        return tuple(e.strip() for e in text.split(",") if e.strip())

    from megatrain.machine import usable_cpus

    tasks = args.tasks
    if tasks is None:
        tasks = unfinished_task_count(Path(args.output).expanduser()) or (
            1 if getattr(args, "executor", "local") == "slurm" else usable_cpus())
    return prepare_dataset(
        args.input, args.output, tasks=tasks, progress=not args.no_progress, run_stage=run_stage,
        tokenizer=args.tokenizer, languages=args.languages, keep_metadata=items(args.keep_metadata),
        extensions=items(args.extensions) or None,
        exclude_dirs=DEFAULT_EXCLUDE_DIRS + tuple(args.exclude_dir),
        **field_values(args, _SCALAR_FLAGS),
    )


def format_summary(manifest: dict) -> str:
    s = manifest["stats"]
    sp = manifest["splits"]
    lines = [
        f"[data prepare] {manifest['source']} -> {manifest.get('output', '')} in {s.get('seconds', '?')} s",
        f"  files read           {s['files_read']} ({manifest.get('input_kind', 'source files')})",
        f"  dropped non-UTF-8    {s['dropped_non_utf8']}   empty {s['dropped_empty']}   "
        f"other languages {s.get('dropped_other_language', 0)}",
        f"  dropped too short    {s['dropped_too_short']}   too long {s['dropped_too_long']}",
        f"  dropped long lines   {s['dropped_long_lines']}   low alnum {s['dropped_low_alnum']}",
        f"  exact duplicates     {s['exact_duplicates']}   near duplicates {s['near_duplicates']}",
        f"  tokenizer            {manifest['tokenizer']} vocab {manifest['vocab_size']} "
        f"eos {manifest['eos_id']}",
    ]
    for split in ("train", "val"):
        lines.append(
            f"  {split:<5} documents {sp[split]['documents']:>8}   tokens {sp[split]['tokens']:>12}"
            f"   shards {len(sp[split]['files'])}"
        )
    for lang, counts in sorted(manifest.get("languages", {}).items()):
        lines.append(f"  {lang:<14} documents {counts['documents']:>8}   tokens {counts['tokens']:>12}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# internals
# ------------------------------------------------------------------------------------------------


def _config_diff(saved: dict, wanted: dict) -> list[str]:
    keys = sorted(set(saved) | set(wanted))
    return [k for k in keys if saved.get(k) != wanted.get(k)]


def _remove_own_outputs(output_path: Path, remove_folder: bool, keep_logs: bool = False) -> None:
    """Deletes what a prepare wrote; ``keep_logs`` keeps ``logs/`` and the in-progress marker, which
    lets the next prepare in this folder clean it up."""
    kept = ("logs", IN_PROGRESS_MARKER) if keep_logs else ()
    for name in _OWN_OUTPUTS:
        if name in kept:
            continue
        target = output_path / name
        if target.is_dir():
            shutil.rmtree(target, ignore_errors=True)
        else:
            target.unlink(missing_ok=True)
    if remove_folder and output_path.is_dir() and not any(output_path.iterdir()):
        output_path.rmdir()


def _check_output_dir(output_path: Path, config: PrepareConfig) -> dict | None:
    """Returns the cached manifest, or None when the folder may be (re)built; raises otherwise."""
    if not output_path.exists():
        return None
    if not output_path.is_dir():
        raise DataError(f"--output {output_path} exists and is not a folder: choose another --output")
    manifest_path = output_path / MANIFEST_NAME
    wanted = config.to_json()
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            saved = {k: v for k, v in manifest["config"].items() if k not in ("tasks", "progress")}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise DataError(
                f"{manifest_path} is unreadable ({e}); the folder is not a dataset this version can reuse: "
                "delete it or choose another --output"
            ) from e
        diff = _config_diff(saved, wanted)
        if manifest.get("format") == MANIFEST_FORMAT and not diff:
            return manifest
        what = f"settings differ in: {', '.join(diff)}" if diff else f"format {manifest.get('format')!r}"
        raise DataError(
            f"--output {output_path} already holds a different prepared dataset ({what}); refusing to "
            "overwrite it. Choose another --output, or delete that folder to rebuild."
        )
    entries = sorted(p.name for p in output_path.iterdir())
    if not entries:
        return None
    if IN_PROGRESS_MARKER in entries and set(entries) <= set(_OWN_OUTPUTS):
        return None  # an unfinished prepare (crashed or killed): _start_or_resume decides
    raise DataError(
        f"--output {output_path} is not empty and holds no megatrain dataset (found "
        f"{', '.join(entries[:5])}{' ...' if len(entries) > 5 else ''}); refusing to overwrite it. Choose an "
        "empty or new --output folder."
    )


def _val_threshold(hashes, val_fraction: float) -> int:
    """Documents with split hash < threshold go to val. With >= 2 documents each split gets >= 1;
    a single document always goes to train (a dataset must have training data)."""
    import numpy as np

    if len(hashes) == 1:
        return 0
    threshold = int(val_fraction * 2**64)
    if len(hashes) >= 2:
        n_val = int(np.count_nonzero(hashes < np.uint64(threshold)))
        if n_val == 0:
            threshold = int(hashes.min()) + 1  # only the lowest hash
        elif n_val == len(hashes):
            threshold = int(hashes.max())  # all but the highest hash
    return threshold


def _run_pipeline(config: PrepareConfig, out: Path, inputs, *, tasks: int, progress: bool, run_stage) -> dict:
    import numpy as np
    import orjson
    from datatrove.pipeline.dedup import (
        MinhashConfig,
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
    )
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.text import TextNormConfig

    from megatrain.data_pipelines import steps, vocab
    from megatrain.data_pipelines.inputs import SOURCE_FILES
    from megatrain.data_pipelines.readers import ShardReader
    from megatrain.data_pipelines.stages import step_totals

    work = out / WORK_DIR
    logs = out / "logs"
    K = tasks

    def jsonl_writer(folder: str):
        return JsonlWriter(str(work / folder), output_filename="${rank}.jsonl", compression=None)

    # 1. read + quality filters
    paths_file = str(work / INPUT_LIST)
    if inputs.kind == SOURCE_FILES:
        reader = steps.SourceFileReader(
            inputs.root, config.extensions, config.exclude_dirs, progress=progress, paths_file=paths_file,
            languages=config.languages,
        )  # fmt: skip
    else:
        reader = ShardReader(
            inputs.root, paths_file, text_key=config.text_key, id_key=config.id_key,
            keep_metadata=config.keep_metadata, language_key=config.language_key, languages=config.languages,
            progress=progress,
        )  # fmt: skip
    language = steps.LanguageFilter(config.languages)
    length = steps.LengthFilter(config.min_chars, config.max_chars)
    longest_line = steps.LongestLineFilter(config.max_line_length)
    alnum = steps.AlnumFractionFilter(config.min_alnum_fraction)
    hash_writer = steps.ContentHashWriter(str(work / "hashes"))
    st1 = run_stage(
        "1_read_filter",
        [reader, language, length, longest_line, alnum, jsonl_writer("filtered"), hash_writer],
        tasks=K, workers=K, logs=logs,
    )  # fmt: skip

    # 2-3. exact dedup, then MinHash signatures of the unique documents
    run_stage(
        "2_exact_find",
        [steps.ExactDedupFind(str(work / "hashes"), str(work / "exact_remove"), n_tasks=K)],
        tasks=1, workers=1, logs=logs,
    )  # fmt: skip
    minhash = MinhashConfig(
        n_grams=config.minhash_ngrams,
        num_buckets=config.minhash_buckets,
        hashes_per_bucket=config.minhash_hashes_per_bucket,
        # code: keep case and symbols, which carry meaning; whitespace is ignored by the word tokenizer
        norm_config=TextNormConfig(
            lowercase=False, remove_punctuation=False, norm_unicode_diacritics=False, norm_numbers=False
        ),
    )
    exact_filter = steps.ExactDedupFilter(str(work / "exact_remove"))
    st3 = run_stage(
        "3_exact_filter_minhash_sigs",
        [
            steps.RankJsonlReader(str(work / "filtered")),
            exact_filter,
            jsonl_writer("unique"),
            steps.CodeMinhashSignature(
                str(work / "mh_sigs"), config=minhash, language=steps.CodeWordTokenizer()
            ),
        ],
        tasks=K, workers=K, logs=logs,
    )  # fmt: skip

    # 4-5. MinHash buckets and clusters
    run_stage(
        "4_minhash_buckets",
        [MinhashDedupBuckets(str(work / "mh_sigs"), str(work / "mh_buckets"), config=minhash)],
        tasks=minhash.num_buckets, workers=K, logs=logs,
    )  # fmt: skip
    run_stage(
        "5_minhash_cluster",
        [MinhashDedupCluster(str(work / "mh_buckets"), str(work / "mh_remove"), config=minhash)],
        tasks=1, workers=1, logs=logs,
    )  # fmt: skip

    # 6. drop near duplicates; record each survivor's split hash
    near_filter = MinhashDedupFilter(str(work / "mh_remove"))
    st6 = run_stage(
        "6_minhash_filter",
        [
            steps.RankJsonlReader(str(work / "unique")),
            near_filter,
            jsonl_writer("final"),
            steps.SplitHashWriter(str(work / "split"), config.seed),
        ],
        tasks=K, workers=K, logs=logs,
    )  # fmt: skip

    split_hashes = np.concatenate(
        [steps.read_uint64_file(str(work / "split"), f"{r:05d}.splithash") for r in range(K)]
    )
    if len(split_hashes) == 0:
        read = step_totals(st1, reader)
        raise DataError(
            f"no documents of {config.source} survived filtering and dedup ({int(read.get('documents', 0))} "
            f"read from {len(inputs.files)} files, {int(step_totals(st1, language).get('dropped', 0))} of "
            f"them not in --languages {','.join(config.languages)}): check --input and --languages "
            "(or --language-key), or loosen --min-chars, --max-line-length or --min-alnum-fraction"
        )
    val_threshold = _val_threshold(split_hashes, config.val_fraction)

    # tokenizer
    tokenizer_path = out / TOKENIZER_FILE
    eos_token = vocab.EOS_TOKEN
    trained = work / "tokenizer.trained"  # a resumed prepare reuses the BPE tokenizer it trained
    if config.tokenizer == "bpe" and trained.is_file() and tokenizer_path.is_file():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tokenizer_path))
    elif config.tokenizer == "bytes":
        tok = vocab.build_bytes_tokenizer()
    elif config.tokenizer_sha256:  # an existing tokenizer.json, copied as it is
        tokenizer_file = Path(config.tokenizer)
        if vocab.file_sha256(tokenizer_file) != config.tokenizer_sha256:
            raise DataError(f"--tokenizer {tokenizer_file} changed while this prepare ran: run it again")
        tok, eos_token = vocab.load_tokenizer_file(tokenizer_file, config.eos_token)
    else:

        def train_texts():
            for r in range(K):
                path = work / "final" / f"{r:05d}.jsonl"
                if not path.exists():
                    continue
                with open(path, "rb") as f:
                    for line in f:
                        doc = orjson.loads(line)
                        if steps.split_hash(doc["id"], config.seed) >= val_threshold:
                            yield doc["text"]

        if progress:
            print(f"[data prepare] training BPE tokenizer (vocab {config.vocab_size})", file=sys.stderr)
        tok = vocab.train_bpe_tokenizer(train_texts(), config.vocab_size, progress=progress)
    if config.tokenizer_sha256:
        shutil.copyfile(config.tokenizer, tokenizer_path)
    elif not trained.is_file():
        partial = tokenizer_path.with_name(tokenizer_path.name + ".tmp")
        tok.save(str(partial))
        os.replace(partial, tokenizer_path)
        trained.touch()
    eos_id = tok.token_to_id(eos_token)
    vocab_size = vocab.tokenizer_vocab_size(tok)
    token_size = 4 if tok.get_vocab_size() > 2**16 else 2  # datatrove's rule (DocumentTokenizer)
    if vocab_size > 2**16 and token_size == 2:
        raise DataError(f"--tokenizer {config.tokenizer}: token ids reach {vocab_size - 1}, past what uint16 "
                        "shards hold, but its vocabulary counts fewer tokens: remove the gaps in its ids")

    # 7. tokenize each document into its split
    run_stage(
        "7_tokenize",
        [
            steps.RankJsonlReader(str(work / "final")),
            # no shuffling: the loader shuffles windows, and the order stays reproducible
            steps.SplitTokenizer(str(out), str(work / "languages"), tokenizer_path=str(tokenizer_path),
                                 eos_token=eos_token, seed=config.seed, val_threshold=val_threshold),
        ],
        tasks=K, workers=K, logs=logs,
    )  # fmt: skip
    splits = {split: _collect_split(out, split, token_size, work / "languages" / split)
              for split in ("train", "val")}

    r1 = step_totals(st1, reader)
    ln = step_totals(st1, length)
    stats = {
        "files_read": int(r1.get("input_files", 0)),
        "dropped_other_language": int(step_totals(st1, language).get("dropped", 0)),
        "dropped_non_utf8": int(r1.get("dropped_non_utf8", 0)),
        "dropped_empty": int(r1.get("dropped_empty", 0)),
        "dropped_too_short": int(ln.get("dropped_too_short", 0)),
        "dropped_too_long": int(ln.get("dropped_too_long", 0)),
        "dropped_long_lines": int(step_totals(st1, longest_line).get("dropped", 0)),
        "dropped_low_alnum": int(step_totals(st1, alnum).get("dropped", 0)),
        "exact_duplicates": int(step_totals(st3, exact_filter).get("dropped", 0)),
        "near_duplicates": int(step_totals(st6, near_filter).get("dropped", 0)),
    }
    n_docs = splits["train"]["documents"] + splits["val"]["documents"]
    if n_docs != len(split_hashes):
        raise RuntimeError(f"tokenized {n_docs} documents but {len(split_hashes)} survived dedup")

    languages: dict[str, dict[str, int]] = {}
    for entry in splits.values():
        for lang, counts in entry["languages"].items():
            total = languages.setdefault(lang, {"documents": 0, "tokens": 0})
            total["documents"] += counts["documents"]
            total["tokens"] += counts["tokens"]
    return {
        "format": MANIFEST_FORMAT,
        "tokenizer": config.tokenizer,
        "tokenizer_file": TOKENIZER_FILE,
        "vocab_size": vocab_size,
        "eos_id": eos_id,
        "eos_token": eos_token,
        "token_size": token_size,
        "splits": splits,
        "languages": dict(sorted(languages.items())),
        "input_kind": inputs.kind,
        "input_files": len(inputs.files),
        "source": config.source,
        "output": str(out),
        "config": {**config.to_json(), "tasks": tasks},
        "stats": stats,
    }


def _collect_split(out: Path, split: str, token_size: int, languages_dir: Path) -> dict:
    """Lists a split's non-empty ``.ds`` files (deleting empty ones) with token and document counts,
    each file's largest token id (which open_split checks against the tokenizer's vocabulary without
    reading the shards) and documents and tokens per language (from the task's SplitTokenizer
    list, in the same order as the documents of its ``.ds`` file)."""
    import numpy as np

    files, tokens, documents, max_ids = [], 0, 0, []
    per_language: dict[str, dict[str, int]] = {}
    folder = out / split
    for ds in sorted(folder.glob("*.ds")) if folder.is_dir() else []:
        index = ds.with_name(ds.name + ".index")
        n_tokens = ds.stat().st_size // token_size
        if n_tokens == 0:
            ds.unlink()
            index.unlink(missing_ok=True)
            continue
        files.append(f"{split}/{ds.name}")
        tokens += n_tokens
        doc_ends = np.fromfile(index, dtype="<u8")
        documents += len(doc_ends)
        max_ids.append(shard_max_token_id(ds, token_size))
        rank = int(ds.name.split("_")[0])  # datatrove names a task's file "{rank:05d}_unshuffled.ds"
        langs = (languages_dir / f"{rank:05d}.languages").read_text().splitlines()
        if len(langs) != len(doc_ends):
            raise RuntimeError(f"{ds} holds {len(doc_ends)} documents but {len(langs)} languages recorded")
        lengths = np.diff(doc_ends, prepend=np.uint64(0)).astype(np.int64)
        for lang, length in zip(langs, lengths.tolist()):
            entry = per_language.setdefault(lang, {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += length
    return {"files": files, "tokens": tokens, "documents": documents, MAX_TOKEN_IDS_KEY: max_ids,
            "languages": dict(sorted(per_language.items()))}
