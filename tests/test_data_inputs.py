"""``megatrain data prepare --input``: JSONL, JSONL.gz and Parquet shards (a file, a folder, a glob),
their columns, many languages, and the driver's single listing of the input files."""

import gzip
import json
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatrain.data import open_split
from megatrain.data_pipelines import prepare as prepare_module
from megatrain.data_pipelines import prepare_dataset, stages
from megatrain.data_pipelines.inputs import DATASET_SHARDS, SOURCE_FILES, list_inputs
from megatrain.data_pipelines.languages import extensions_for, language_of_path, normalize_language
from megatrain.errors import DataError
from tests.test_data_prepare import random_module

LANGS = ["Python", "C++", "Go"]


def records(n: int, seed: int = 0, text_key: str = "content") -> list[dict]:
    rng = random.Random(seed)
    return [
        {text_key: random_module(rng), "lang": LANGS[i % 3], "path": f"repo{i}/file{i}", "repo_name": f"r{i}",
         "license": "mit", "hexsha": f"sha{i:04d}"}
        for i in range(n)
    ]  # fmt: skip


def write_jsonl(path, rows, gz=False):
    opener = gzip.open if gz else open
    with opener(path, "wt") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def write_parquet(path, rows):
    pq.write_table(pa.Table.from_pylist(rows), path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A folder with one shard of each format; returns (folder, all rows in listing order)."""
    root = tmp_path_factory.mktemp("shards")
    rows = records(18)
    write_jsonl(root / "a.jsonl", rows[:6])
    (root / "part").mkdir()
    write_jsonl(root / "part" / "b.jsonl.gz", rows[6:12], gz=True)
    write_parquet(root / "part" / "c.parquet", rows[12:])
    (root / "README.py").write_text("print('not data')\n" * 5)  # a folder of shards ignores the rest
    return root, rows


def documents(out, manifest):
    """Every document's text, over both splits."""
    eos = manifest["eos_id"]
    texts = []
    for split in ("train", "val"):
        stream = np.concatenate([np.asarray(s.tokens) for s in open_split(out, split).shards])
        for doc in np.split(stream, np.flatnonzero(stream == eos) + 1)[:-1]:
            texts.append(bytes(doc[:-1].astype(np.uint8).tolist()).decode())
    return sorted(texts)


@pytest.fixture(scope="module")
def all_languages(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds") / "all"
    manifest = prepare_dataset(shards[0], out, tokenizer="bytes", languages="python,cpp,go", progress=False)
    return out, manifest


# ---- listing ----------------------------------------------------------------------------------


def test_a_folder_of_shards_a_file_and_a_glob_are_listed(shards):
    root = shards[0]
    listed = list_inputs(str(root), (".py",), ())
    assert listed.kind == DATASET_SHARDS
    assert listed.files == ("a.jsonl", "part/b.jsonl.gz", "part/c.parquet")
    one = list_inputs(str(root / "part" / "c.parquet"), (".py",), ())
    assert (one.kind, one.root, one.files) == (DATASET_SHARDS, str(root / "part"), ("c.parquet",))
    glob = list_inputs(str(root / "part" / "*.jsonl.gz"), (".py",), ())
    assert (glob.root, glob.files) == (str(root / "part"), ("b.jsonl.gz",))
    assert list_inputs(str(root), (".py",), ()).kind != SOURCE_FILES  # the README.py is no reason


def test_inputs_that_name_nothing_are_refused(shards, tmp_path):
    with pytest.raises(DataError, match="matches no"):
        list_inputs(str(shards[0] / "*.csv"), (".py",), ())
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="not a dataset shard"):
        list_inputs(str(tmp_path / "notes.txt"), (".py",), ())
    with pytest.raises(DataError, match="does not exist"):
        list_inputs(str(tmp_path / "nope"), (".py",), ())


def test_languages_map_suffixes_and_dataset_spellings():
    assert normalize_language("C++") == "cpp" and normalize_language(" Python ") == "python"
    assert normalize_language("C#") == "csharp" and normalize_language("JavaScript") == "javascript"
    assert language_of_path("src/x.rs", ("python",)) == "rust"
    assert language_of_path("x.weird", ("python",)) == "python"  # one language selected: it
    assert language_of_path("x.weird", ("c", "python")) == "unknown"
    assert ".py" in extensions_for(("python",)) and ".hpp" in extensions_for(("cpp",))
    with pytest.raises(DataError, match="--extensions"):
        extensions_for(("klingon",))


# ---- the whole pipeline on shards --------------------------------------------------------------


def test_every_shard_format_is_read_and_counted_per_language(shards, all_languages):
    out, manifest = all_languages
    rows = shards[1]
    assert documents(out, manifest) == sorted(r["content"] for r in rows)
    assert manifest["input_kind"] == DATASET_SHARDS and manifest["stats"]["files_read"] == 3
    langs = manifest["languages"]
    assert set(langs) == {"python", "cpp", "go"}
    assert all(langs[lang]["documents"] == 6 for lang in langs)
    tokens = {lang: sum(len(r["content"].encode()) + 1 for r in rows if normalize_language(r["lang"]) == lang)
              for lang in langs}  # bytes tokenizer: one token per byte, plus the EOS
    assert {lang: langs[lang]["tokens"] for lang in langs} == tokens
    split_sum = sum(e["tokens"] for s in manifest["splits"].values() for e in s["languages"].values())
    assert split_sum == manifest["splits"]["train"]["tokens"] + manifest["splits"]["val"]["tokens"]
    summary = prepare_module.format_summary(manifest)
    assert "cpp" in summary and "go" in summary


def test_languages_select_documents_from_the_language_column(shards, all_languages, tmp_path):
    # --languages left at its default: python
    manifest = prepare_dataset(shards[0], tmp_path / "py", tokenizer="bytes", progress=False)
    assert set(manifest["languages"]) == {"python"}
    assert manifest["stats"]["dropped_other_language"] == 12
    python_texts = sorted(r["content"] for r in shards[1] if r["lang"] == "Python")
    assert documents(tmp_path / "py", manifest) == python_texts


@pytest.mark.slow  # two-task pipelines start worker processes: ~6-16 s on 2 busy cores
def test_shard_outputs_do_not_depend_on_tasks(shards, all_languages, tmp_path):
    out1, manifest1 = all_languages
    manifest2 = prepare_dataset(shards[0], tmp_path / "k2", tokenizer="bytes", languages="python,cpp,go",
                                tasks=2, progress=False)
    assert manifest2["languages"] == manifest1["languages"]
    for split in ("train", "val"):
        a = np.concatenate([np.asarray(s.tokens) for s in open_split(out1, split).shards])
        b = np.concatenate([np.asarray(s.tokens) for s in open_split(tmp_path / "k2", split).shards])
        assert np.array_equal(a, b), split


def test_text_key_falls_back_to_text_and_id_key_and_metadata_are_used(tmp_path):
    from megatrain.data_pipelines.readers import ShardReader

    rows = records(4, seed=1, text_key="text")
    write_jsonl(tmp_path / "t.jsonl", rows)
    (tmp_path / "list.txt").write_text("t.jsonl\n")
    reader = ShardReader(str(tmp_path), str(tmp_path / "list.txt"), id_key="hexsha",
                         keep_metadata=("repo_name", "license"), languages=("all",))
    docs = list(reader.run())
    assert [d.text for d in docs] == [r["text"] for r in rows]  # no "content": "text" it is
    assert [d.id for d in docs] == [r["hexsha"] for r in rows]
    assert docs[1].metadata == {"repo_name": "r1", "license": "mit", "language": "cpp"}
    default_ids = [d.id for d in ShardReader(str(tmp_path), str(tmp_path / "list.txt")).run()]
    assert default_ids == [f"t.jsonl/{i}" for i in range(4)]


def test_folders_of_many_languages_are_read_by_suffix(tmp_path):
    rng = random.Random(3)
    src = tmp_path / "src"
    src.mkdir()
    for i, suffix in enumerate([".py", ".c", ".go", ".rs", ".py"]):
        (src / f"f{i}{suffix}").write_text(random_module(rng))
    manifest = prepare_dataset(src, tmp_path / "out", tokenizer="bytes", languages="python,c,go",
                               progress=False)
    assert {k: v["documents"] for k, v in manifest["languages"].items()} == {"c": 1, "go": 1, "python": 2}
    assert manifest["stats"]["files_read"] == 4  # the .rs file was never listed


def test_the_driver_lists_the_input_once_for_every_task(shards, tmp_path, monkeypatch):
    """A file that appears after the listing is not read by any task (and none is read twice)."""
    src = tmp_path / "src"
    src.mkdir()
    rng = random.Random(5)
    for i in range(4):
        (src / f"f{i}.py").write_text(random_module(rng))
    late = random_module(rng)
    real_run_stage = stages.run_local_stage

    def run_stage(name, pipeline, **kwargs):
        if name.startswith("1_"):
            (src / "late.py").write_text(late)  # the tree changes under the running pipeline
        return real_run_stage(name, pipeline, **kwargs)

    monkeypatch.setattr(stages, "run_local_stage", run_stage)
    manifest = prepare_dataset(src, tmp_path / "out", tokenizer="bytes", tasks=2, progress=False)
    assert manifest["stats"]["files_read"] == 4
    assert late not in documents(tmp_path / "out", manifest)
    # negative control: the same tree, listed after the change, does include it
    monkeypatch.undo()
    again = prepare_dataset(src, tmp_path / "out2", tokenizer="bytes", progress=False)
    assert again["stats"]["files_read"] == 5 and late in documents(tmp_path / "out2", again)
