"""``megatrain data prepare`` on a tiny corpus that has one file for every filter and dedup case."""

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from datatrove.data import Document
from tokenizers import Tokenizer

from megatrain.data import WindowLoader, open_split
from megatrain.data_pipelines import ensure_default_dataset, prepare_dataset
from megatrain.data_pipelines import prepare as prepare_module
from megatrain.data_pipelines.prepare import DEFAULT_CORPUS_VOCAB_SIZE, default_dataset_dir
from megatrain.data_pipelines.steps import (
    AlnumFractionFilter,
    CodeMinhashSignature,
    CodeWordTokenizer,
    LengthFilter,
    LongestLineFilter,
    SourceFileReader,
    text_batches,
)
from megatrain.data_pipelines.vocab import build_bytes_tokenizer, encode_text
from megatrain.errors import DataError

REPO = Path(__file__).resolve().parent.parent


def random_module(rng: random.Random, n_funcs: int = 6) -> str:
    """Plausible, unique Python: random identifiers make every file's shingles distinct."""

    def ident():
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(4, 9)))

    lines = [f"import {ident()}", ""]
    for _ in range(n_funcs):
        a, b, c = ident(), ident(), ident()
        lines += [
            f"def {ident()}({a}, {b}):",
            f"    {c} = {a} * {rng.randint(2, 99)} + {b}",
            f"    for {ident()} in range({rng.randint(2, 9)}):",
            f"        {c} += {a} - {ident()}({b})",
            f"    return {c}",
            "",
        ]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Returns (folder, {relative path: text} of the files that must survive)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    kept = {f"good_{i}.py": random_module(rng) for i in range(8)}
    kept["special.py"] = random_module(rng) + '\nEOT = "<|endoftext|>"  # a literal, not the EOS token\n'
    for rel, text in kept.items():
        (root / rel).write_text(text)
    (root / "sub").mkdir()
    (root / "sub" / "copy_of_good_0.py").write_text(kept["good_0.py"])  # exact duplicate
    near = kept["good_1.py"].replace("return", "return  ", 1).replace("import", "import os\nimport", 1)
    (root / "sub" / "near_good_1.py").write_text(near)  # near duplicate
    (root / "latin1.py").write_bytes("# caf\xe9 = 'na\xefve'\n".encode("latin-1") * 5)  # not UTF-8
    (root / "minified.py").write_text("x = [" + ", ".join(["1"] * 600) + "]\n")  # one 1800-char line
    (root / "blob.py").write_text("#" * 70 + "\n" + "= [] {} () ... ;; ** ==\n" * 10)  # low alnum
    (root / "tiny.py").write_text("x = 1\n")  # too short
    (root / "empty.py").write_text("")
    (root / "notes.txt").write_text("not a .py file " * 10)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text(random_module(rng))  # skipped folder
    return root, kept


def split_documents(dataset_dir, split, eos_id):
    """Token lists of the documents of one split (without their EOS), in stream order."""
    shards = open_split(dataset_dir, split)
    stream = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in shards.shards])
    ends = np.flatnonzero(stream == eos_id)
    assert ends[-1] == len(stream) - 1, "every document ends with EOS"
    return [doc[:-1].tolist() for doc in np.split(stream, ends + 1)[:-1]]


@pytest.fixture(scope="module")
def bytes_dataset(corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("bytes_ds")
    manifest = prepare_dataset(corpus[0], out, tokenizer="bytes", tasks=1, progress=False)
    return out, manifest


# ---- steps on their own ------------------------------------------------------------------------


def test_reader_one_document_per_file_and_non_utf8_dropped(corpus):
    reader = SourceFileReader(str(corpus[0]), progress=False)
    docs = {d.id: d for d in reader.run()}
    assert "good_0.py" in docs and "sub/near_good_1.py" in docs
    assert docs["good_0.py"].metadata["path"] == "good_0.py"
    assert docs["good_0.py"].text == corpus[1]["good_0.py"]
    assert "latin1.py" not in docs and "empty.py" not in docs and "notes.txt" not in docs
    assert "__pycache__/cached.py" not in docs
    assert reader.stats["dropped_non_utf8"].total == 1
    assert reader.stats["input_files"].total == len(docs) + 2


def test_filters_each_reject_their_case():
    doc = lambda text: Document(text=text, id="x.py")  # noqa: E731
    code = "def f(x):\n    return x + 1\n"
    assert LengthFilter(10, 100).filter(doc(code)) is True
    assert LengthFilter(100, 1000).filter(doc(code)) == (False, "too_short")
    assert LengthFilter(1, 10).filter(doc(code)) == (False, "too_long")
    assert LongestLineFilter(80).filter(doc(code)) is True
    assert LongestLineFilter(80).filter(doc(code + "y = '" + "a" * 100 + "'\n")) is False
    assert AlnumFractionFilter(0.25).filter(doc(code)) is True
    assert AlnumFractionFilter(0.25).filter(doc("#" * 50 + "\n" + "{}[]();" * 20)) is False


def test_bytes_tokenizer_round_trip_and_ids():
    tok = build_bytes_tokenizer()
    text = "héllo\x00\t<|endoftext|> wörld 😀\n"
    ids = encode_text(tok, text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    assert tok.get_vocab_size() == 257 and tok.token_to_id("<|endoftext|>") == 256


# ---- the whole pipeline ------------------------------------------------------------------------


def test_prepare_keeps_exactly_the_good_files_and_counts_every_drop(corpus, bytes_dataset):
    out, manifest = bytes_dataset
    assert manifest["format"] == "megatrain-shards-v1"
    assert (manifest["tokenizer"], manifest["vocab_size"], manifest["eos_id"], manifest["token_size"]) == (
        "bytes", 257, 256, 2,
    )  # fmt: skip
    stats = manifest["stats"]
    assert stats["dropped_non_utf8"] == 1
    assert stats["dropped_empty"] == 1
    assert stats["dropped_too_short"] == 1
    assert stats["dropped_long_lines"] == 1
    assert stats["dropped_low_alnum"] == 1
    assert stats["exact_duplicates"] == 1
    assert stats["near_duplicates"] == 1
    texts = sorted(
        bytes(doc).decode("utf-8")
        for split in ("train", "val")
        for doc in split_documents(out, split, manifest["eos_id"])
    )
    assert texts == sorted(corpus[1].values())  # dedup kept the first copy in path order
    splits = manifest["splits"]
    assert splits["val"]["documents"] >= 1 and splits["train"]["documents"] >= 1
    assert splits["train"]["documents"] + splits["val"]["documents"] == len(corpus[1])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for split in ("train", "val"):
        assert open_split(out, split).total_tokens == splits[split]["tokens"]


def test_manifest_records_each_shards_largest_token_id(bytes_dataset):
    out, manifest = bytes_dataset
    for split in ("train", "val"):
        entry = manifest["splits"][split]
        on_disk = [int(np.fromfile(out / rel, dtype="<u2").max()) for rel in entry["files"]]
        assert entry["max_token_ids"] == on_disk, split
        # every document ends with EOS, the bytes tokenizer's largest id
        assert on_disk == [manifest["eos_id"]] * len(on_disk) == [manifest["vocab_size"] - 1] * len(on_disk)
        assert [s.max_token_id for s in open_split(out, split).shards] == on_disk


def test_loader_windows_come_from_the_prepared_token_stream(bytes_dataset):
    out, manifest = bytes_dataset
    shards = open_split(out, "train")
    windows = set()
    for shard in shards.shards:
        tokens = np.asarray(shard.tokens).tolist()
        windows |= {tuple(tokens[k * 16 : k * 16 + 17]) for k in range((len(tokens) - 1) // 16)}
    batch = WindowLoader(shards, 16, 4, seed=0).next_batch()
    assert all(tuple(row) in windows for row in batch.tolist())


def test_split_and_streams_do_not_depend_on_tasks(corpus, bytes_dataset, tmp_path):
    out1, manifest1 = bytes_dataset
    manifest2 = prepare_dataset(corpus[0], tmp_path / "ds", tokenizer="bytes", tasks=2, progress=False)
    assert manifest2["stats"] | {"seconds": 0} == manifest1["stats"] | {"seconds": 0}
    for split in ("train", "val"):
        assert split_documents(out1, split, 256) == split_documents(tmp_path / "ds", split, 256), split


def test_fast_minhash_signatures_equal_datatroves_own(tmp_path):
    from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
    from datatrove.utils.text import TextNormConfig

    config = MinhashConfig(n_grams=5, num_buckets=14, hashes_per_bucket=8, norm_config=TextNormConfig(
        lowercase=False, remove_punctuation=False, norm_unicode_diacritics=False, norm_numbers=False))
    ours = CodeMinhashSignature(str(tmp_path / "a"), config=config, language=CodeWordTokenizer())
    theirs = MinhashDedupSignature(str(tmp_path / "b"), config=config, language=CodeWordTokenizer())
    real = Path(prepare_module.__file__).read_text()  # realistic: a 700-line Python file
    texts = [
        real,
        real * 3,  # every shingle repeated: more than one 512-row block, unique shingles
        "def f(x):\n\treturn x\u00a0+ 1  # caf\u00e9 \u2028 \u03bb\n",  # non-ASCII word and space
        "a b c d e",  # exactly one 5-gram
        "  x = 1\n\n\t y = 2\r\n",  # whitespace the simplification would collapse
    ]
    for text in texts:
        shingles = ours.get_shingles(text)
        np.testing.assert_array_equal(shingles, theirs.get_shingles(text))
        assert ours.get_signature(shingles) == theirs.get_signature(shingles)
    assert ours.get_shingles("a b c d").size == 0 == theirs.get_shingles("a b c d").size  # too short
    # negative control: in a short text one changed word moves the signature
    def signature(text):
        return ours.get_signature(ours.get_shingles(text))

    assert signature("a b c d e f") != signature("a b c d e g")
    # another hash function: datatrove's, called per shingle (the fast path maps xxh64 directly)
    from datatrove.utils.hashing import HashConfig

    sha1 = MinhashConfig(n_grams=5, hash_config=HashConfig(hash_fc="sha1"), norm_config=config.norm_config)
    ours_sha1 = CodeMinhashSignature(str(tmp_path / "d"), config=sha1, language=CodeWordTokenizer())
    theirs_sha1 = MinhashDedupSignature(str(tmp_path / "e"), config=sha1, language=CodeWordTokenizer())
    np.testing.assert_array_equal(ours_sha1.get_shingles(real), theirs_sha1.get_shingles(real))
    assert not np.array_equal(ours_sha1.get_shingles(real), ours.get_shingles(real))
    # other normalisations take datatrove's own path
    lowercase = MinhashConfig(n_grams=5, norm_config=TextNormConfig(lowercase=True))
    assert not CodeMinhashSignature(str(tmp_path / "c"), lowercase, CodeWordTokenizer())._whitespace_only


def test_pipeline_steps_import_without_torch():
    # every worker of every stage imports them when the forkserver did not preload them: torch
    # alone is ~2 s of CPU per worker
    code = ("import sys, megatrain.data_pipelines.steps, megatrain.data_pipelines.readers; "
            "assert 'torch' not in sys.modules, 'torch'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


@pytest.mark.slow  # a fresh interpreter and a tasks=2 prepare: ~5-10 s
def test_a_script_main_is_imported_once_not_in_every_worker(corpus, bytes_dataset, tmp_path):
    """multiprocess re-runs a script ``__main__`` (like the ``megatrain`` console script, whose
    ``megatrain.cli`` costs ~5 s of CPU) in every worker it starts: what the script imported is
    preloaded in the forkserver, so it loads twice in all (script, forkserver), not once per
    worker of every stage. The dataset is the tasks=1 one."""
    modules = tmp_path / "modules"  # on PYTHONPATH, like an installed package such as megatrain
    modules.mkdir()
    (modules / "counted.py").write_text(
        "import os\nwith open(os.environ['IMPORT_LOG'], 'a') as f:\n    f.write(f'{os.getpid()}\\n')\n"
    )
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent("""
        import sys

        import counted  # noqa: F401

        from megatrain.data_pipelines import prepare_dataset

        if __name__ == "__main__":
            prepare_dataset(sys.argv[1], sys.argv[2], tokenizer="bytes", tasks=2, progress=False)
    """))
    log, out = tmp_path / "imports.log", tmp_path / "ds"
    path = os.pathsep.join(filter(None, [str(modules), os.environ.get("PYTHONPATH")]))
    subprocess.run([sys.executable, str(script), str(corpus[0]), str(out)], check=True, timeout=600,
                   env={**os.environ, "IMPORT_LOG": str(log), "PYTHONPATH": path})
    assert len(log.read_text().split()) == 2, log.read_text()
    for split in ("train", "val"):
        assert split_documents(bytes_dataset[0], split, 256) == split_documents(out, split, 256), split


def test_tokenize_batches_are_bounded_by_documents_and_characters():
    docs = [Document(text="x" * n, id=str(i)) for i, n in enumerate([3, 4, 2, 20, 1, 1, 1, 1])]
    sizes = [[len(d.text) for d in b] for b in text_batches(iter(docs), max_documents=3, max_chars=8)]
    # a document longer than the limit is a batch of its own; nothing lost, order kept
    assert sizes == [[3, 4], [2], [20], [1, 1, 1], [1]]
    assert [d for b in text_batches(iter(docs), 3, 8) for d in b] == docs
    assert list(text_batches(iter([]), 3, 8)) == []


def test_bpe_keeps_literal_endoftext_as_text(corpus, tmp_path):
    manifest = prepare_dataset(corpus[0], tmp_path / "bpe", tokenizer="bpe", vocab_size=400, progress=False)
    tok = Tokenizer.from_file(str(tmp_path / "bpe" / "tokenizer.json"))
    eos = manifest["eos_id"]
    assert eos == tok.token_to_id("<|endoftext|>")
    assert manifest["vocab_size"] == tok.get_vocab_size() <= 400
    docs = [d for split in ("train", "val") for d in split_documents(tmp_path / "bpe", split, eos)]
    # exactly one EOS per document, at its end: the literal in special.py was encoded as text
    assert len(docs) == len(corpus[1])
    assert all(eos not in d for d in docs)
    assert sorted(tok.decode(d) for d in docs) == sorted(corpus[1].values())


# ---- manifest, caching and refusing to overwrite -------------------------------------------------


def test_completed_dataset_is_reused_without_work(corpus, bytes_dataset, monkeypatch):
    out, manifest = bytes_dataset

    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline ran again")

    monkeypatch.setattr(prepare_module, "_run_pipeline", no_work)
    again = prepare_dataset(corpus[0], out, tokenizer="bytes", tasks=3, progress=False)  # tasks: speed only
    assert again == manifest


def test_completed_dataset_with_other_settings_is_not_overwritten(corpus, bytes_dataset):
    out, _ = bytes_dataset
    with pytest.raises(DataError, match="seed"):
        prepare_dataset(corpus[0], out, tokenizer="bytes", seed=1, progress=False)


def test_foreign_output_folder_is_not_overwritten(corpus, tmp_path):
    (tmp_path / "my_thesis.tex").write_text("precious")
    with pytest.raises(DataError, match="not empty"):
        prepare_dataset(corpus[0], tmp_path, tokenizer="bytes", progress=False)
    assert (tmp_path / "my_thesis.tex").read_text() == "precious"


def test_crash_leaves_no_manifest_and_rerun_completes(corpus, tmp_path, monkeypatch):
    out = tmp_path / "ds"

    def crash():
        raise RuntimeError("simulated crash")

    monkeypatch.setattr("megatrain.data_pipelines.vocab.build_bytes_tokenizer", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_dataset(corpus[0], out, tokenizer="bytes", progress=False)
    assert not (out / "manifest.json").exists()
    with pytest.raises(DataError, match="manifest.json"):
        open_split(out, "train")
    monkeypatch.undo()
    # restarts the unfinished one
    manifest = prepare_dataset(corpus[0], out, tokenizer="bytes", progress=False)
    assert (out / "manifest.json").exists() and manifest["splits"]["train"]["documents"] > 0


def test_bad_inputs_are_reported(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare_dataset(tmp_path / "nope", tmp_path / "out", progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files ending in .py"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="--vocab-size"):
        prepare_dataset(tmp_path / "empty", tmp_path / "out", tokenizer="bpe", vocab_size=257, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_default_dataset_is_built_once_and_then_reused(default_corpus_cache, monkeypatch):
    path = default_dataset_dir(default_corpus_cache)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["splits"]["train"]["tokens"] > 1_000_000 and manifest["splits"]["val"]["documents"] > 0
    assert manifest["vocab_size"] == DEFAULT_CORPUS_VOCAB_SIZE

    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline ran again")

    monkeypatch.setattr(prepare_module, "_run_pipeline", no_work)
    assert ensure_default_dataset(default_corpus_cache, progress=False) == path


def test_pipeline_and_loader_agree_on_the_manifest_format():
    from megatrain.data import shards

    # the pipeline writes the manifest the loader reads: both take its name and format from shards
    assert (prepare_module.MANIFEST_FORMAT, prepare_module.MANIFEST_NAME) == (
        shards.MANIFEST_FORMAT, shards.MANIFEST_NAME,
    )  # fmt: skip


def test_a_single_document_always_goes_to_train():
    import numpy as np

    from megatrain.data_pipelines.prepare import _val_threshold

    one = np.array([2**63], dtype=np.uint64)
    assert _val_threshold(one, val_fraction=0.99) == 0  # nothing is below 0: all train
    two = np.array([1, 2**63], dtype=np.uint64)
    assert 1 < _val_threshold(two, val_fraction=0.99) <= 2**63  # one each


def _prepare_cli(*args, kill_at: str | None = None) -> subprocess.CompletedProcess:
    command = ["-m", "tests.kill_in_prepare", kill_at] if kill_at else ["-m", "megatrain", "data", "prepare"]
    return subprocess.run([sys.executable, *command, *args], cwd=REPO, capture_output=True, text=True)


def _stage_logs(out) -> dict[str, float]:
    """Each finished task's completion file and its modification time (one file per task run)."""
    return {str(p.relative_to(out / "logs")): p.stat().st_mtime_ns
            for p in (out / "logs").glob("*/completions/*")}


@pytest.mark.slow
def test_a_killed_prepare_resumes_its_finished_tasks_and_ends_with_the_same_dataset(corpus, tmp_path):
    out, reference = tmp_path / "ds", tmp_path / "reference"
    args = ["--input", str(corpus[0]), "--tokenizer", "bpe", "--vocab-size", "300", "--tasks", "2"]
    killed = _prepare_cli(*args, "--output", str(out), kill_at="5_minhash_cluster")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (out / "manifest.json").exists()
    first = _stage_logs(out)
    finished = {"1_read_filter", "2_exact_find", "3_exact_filter_minhash_sigs", "4_minhash_buckets"}
    assert {k.split("/")[0] for k in first} == finished
    # resumed, killed again with the BPE tokenizer trained and saved, before tokenizing
    killed = _prepare_cli(*args, "--output", str(out), kill_at="7_tokenize")
    assert killed.returncode == -signal.SIGKILL and "resuming" in killed.stderr, killed.stderr
    second = _stage_logs(out)
    assert {k: second[k] for k in first} == first  # stages 1-4 were not run again
    tokenizer = (out / "tokenizer.json").stat().st_mtime_ns
    done = _prepare_cli(*args, "--output", str(out))
    assert done.returncode == 0 and "resuming" in done.stderr, done.stderr
    assert (out / "tokenizer.json").stat().st_mtime_ns == tokenizer  # not trained again
    assert {k: v for k, v in _stage_logs(out).items() if k in second} == second
    expected = prepare_dataset(corpus[0], reference, tokenizer="bpe", vocab_size=300, progress=False)  # whole
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stats"] | {"seconds": 0} == expected["stats"] | {"seconds": 0}
    assert (out / "tokenizer.json").read_bytes() == (reference / "tokenizer.json").read_bytes()
    for split in ("train", "val"):
        assert (split_documents(out, split, manifest["eos_id"])
                == split_documents(reference, split, expected["eos_id"]))


def test_an_unfinished_prepare_with_other_settings_starts_over(corpus, tmp_path):
    out = tmp_path / "ds"
    args = ["--input", str(corpus[0]), "--tokenizer", "bytes", "--output", str(out)]
    assert _prepare_cli(*args, kill_at="3_exact_filter_minhash_sigs").returncode == -signal.SIGKILL
    before = _stage_logs(out)
    assert before
    done = _prepare_cli(*args, "--seed", "1")  # another split: nothing of the first attempt holds
    assert done.returncode == 0 and "starting over" in done.stderr, done.stderr
    after = _stage_logs(out)
    assert all(after[k] != v for k, v in before.items())  # every task ran again
    assert json.loads((out / "manifest.json").read_text())["config"]["seed"] == 1
