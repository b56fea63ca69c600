"""Bad input to ``megatrain data prepare``: each a DataError naming the file and the fix, and a failed
prepare leaves nothing that ``train`` would accept."""

import gzip

import pytest

from megatrain.cli import main
from megatrain.data import open_split
from megatrain.data_pipelines import prepare_dataset
from megatrain.errors import DataError
from tests.test_data_inputs import records, write_jsonl, write_parquet


def refused(input_path, out, match, **kwargs):
    with pytest.raises(DataError, match=match) as err:
        prepare_dataset(input_path, out, tokenizer="bytes", languages="all", progress=False, **kwargs)
    assert not out.exists(), "a failed prepare must remove the folder it created"
    return str(err.value)


def test_missing_text_column_names_the_file_and_text_key(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "def f(): pass\n" * 5, "lang": "Python"}])
    message = refused(tmp_path / "a.jsonl", tmp_path / "out", "--text-key")
    assert "a.jsonl" in message and "'content' or 'text'" in message and "body" in message
    write_parquet(tmp_path / "b.parquet", [{"body": "x = 1\n" * 20}])
    message = refused(tmp_path / "b.parquet", tmp_path / "out", "--text-key")
    assert "b.parquet" in message and "body" in message
    # the column is there under another name: naming it works (negative control)
    manifest = prepare_dataset(tmp_path / "b.parquet", tmp_path / "ok", tokenizer="bytes", text_key="body",
                               languages="all", min_chars=1, progress=False)
    assert manifest["splits"]["train"]["documents"] == 1


def test_truncated_shards_are_named(tmp_path):
    rows = records(6)
    write_parquet(tmp_path / "p.parquet", rows)
    data = (tmp_path / "p.parquet").read_bytes()
    (tmp_path / "p.parquet").write_bytes(data[: len(data) // 2])
    assert "p.parquet" in refused(tmp_path / "p.parquet", tmp_path / "out", "truncated or corrupt")

    write_jsonl(tmp_path / "j.jsonl", rows)
    text = (tmp_path / "j.jsonl").read_text()
    (tmp_path / "j.jsonl").write_text(text[: len(text) - 40])  # the last line cut short
    message = refused(tmp_path / "j.jsonl", tmp_path / "out", "line 6 is not valid JSON")
    assert "j.jsonl" in message

    write_jsonl(tmp_path / "g.jsonl.gz", rows, gz=True)
    data = (tmp_path / "g.jsonl.gz").read_bytes()
    (tmp_path / "g.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    assert "g.jsonl.gz" in refused(tmp_path / "g.jsonl.gz", tmp_path / "out", "truncated or corrupt")
    with gzip.open(tmp_path / "g.jsonl.gz", "rb") as f, pytest.raises(EOFError):
        f.read()  # the file really is cut (the reader did not just fail for another reason)


def test_empty_result_after_filtering_says_what_was_read(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"content": "x = 1\n", "lang": "Python"}] * 3)
    message = refused(tmp_path / "a.jsonl", tmp_path / "out", "no documents .* survived")
    assert "3 read from 1 files" in message and "--min-chars" in message
    write_jsonl(tmp_path / "b.jsonl", records(3))
    with pytest.raises(DataError, match="3 read from 1 files, 3 of them not in --languages rust"):
        prepare_dataset(tmp_path / "b.jsonl", tmp_path / "out", tokenizer="bytes", languages="rust",
                        progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_prepare_into_an_existing_folder_leaves_no_dataset(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [{"body": "def f(): pass\n" * 5}])
    out = tmp_path / "out"
    out.mkdir()  # the user made it: it stays, empty
    code = main(["data", "prepare", "--input", str(tmp_path / "a.jsonl"), "--output", str(out),
                 "--tokenizer", "bytes", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "a.jsonl" in err and "--text-key" in err and "Traceback" not in err
    assert out.is_dir() and list(out.iterdir()) == []
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_split(out, "train")


def test_a_stage_run_elsewhere_keeps_its_logs_and_the_next_prepare_cleans_up(tmp_path):
    """With a stage runner such as SLURM's, the task logs its error points to stay; the folder is
    still no dataset, and a prepare of good input into it starts over."""
    from megatrain.data_pipelines import stages

    write_jsonl(tmp_path / "a.jsonl", [{"body": "def f(): pass\n" * 5}])
    out = tmp_path / "out"
    with pytest.raises(DataError, match="--text-key"):
        prepare_dataset(tmp_path / "a.jsonl", out, tokenizer="bytes", progress=False,
                        run_stage=stages.run_local_stage)
    assert sorted(p.name for p in out.iterdir()) == [".prepare-in-progress.json", "logs"]
    with pytest.raises(DataError, match="not a prepared dataset"):
        open_split(out, "train")
    write_jsonl(tmp_path / "b.jsonl", records(4))
    manifest = prepare_dataset(tmp_path / "b.jsonl", out, tokenizer="bytes", languages="all", progress=False)
    assert manifest["splits"]["train"]["documents"] >= 1
