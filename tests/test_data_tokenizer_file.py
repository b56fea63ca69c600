"""``megatrain data prepare --tokenizer PATH``: an existing Hugging Face tokenizer.json, built here
with ``tokenizers`` (no downloads), its vocabulary size and EOS taken into the manifest."""

import json
import random

import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatrain.cli import main
from megatrain.data import open_split
from megatrain.data_pipelines import prepare_dataset
from megatrain.errors import DataError
from tests.test_data_prepare import random_module


def train_tokenizer(path, special_tokens, vocab_size=300):
    """A small byte-level BPE saved as tokenizer.json, like a Llama/StarCoder one (specials first)."""
    rng = random.Random(7)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([random_module(rng) for _ in range(20)], trainer=trainer)
    tok.save(str(path))
    return tok


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    rng = random.Random(0)
    texts = {f"m{i}.py": random_module(rng) for i in range(6)}
    texts["m_eos.py"] = random_module(rng) + '\nS = "</s>"  # a literal, not the end of the document\n'
    for name, text in texts.items():
        (root / name).write_text(text)
    return root, texts


def test_existing_tokenizer_gives_vocab_eos_and_exact_tokens(corpus, tmp_path):
    tok = train_tokenizer(tmp_path / "tokenizer.json", ["<unk>", "<s>", "</s>"])
    manifest = prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(tmp_path / "tokenizer.json"),
                               progress=False)
    assert manifest["eos_token"] == "</s>" and manifest["eos_id"] == tok.token_to_id("</s>") == 2
    assert manifest["vocab_size"] == tok.get_vocab_size()
    assert manifest["tokenizer"] == str(tmp_path / "tokenizer.json")
    copied = (tmp_path / "ds" / "tokenizer.json").read_bytes()
    assert copied == (tmp_path / "tokenizer.json").read_bytes()  # used as it is
    shards = [s for split in ("train", "val") for s in open_split(tmp_path / "ds", split).shards]
    stream = np.concatenate([np.asarray(s.tokens, dtype=np.int64) for s in shards])
    docs = np.split(stream, np.flatnonzero(stream == 2) + 1)[:-1]
    assert len(docs) == len(corpus[1])  # one EOS per document: the literal "</s>" stayed text
    assert sorted(tok.decode(d[:-1].tolist()) for d in docs) == sorted(corpus[1].values())


def test_eos_from_flag_or_tokenizer_config(corpus, tmp_path):
    tok = train_tokenizer(tmp_path / "tokenizer.json", ["<pad>", "<|im_end|>", "<|done|>"])
    manifest = prepare_dataset(corpus[0], tmp_path / "a", tokenizer=str(tmp_path), eos_token="<|done|>",
                               progress=False)  # a folder holding tokenizer.json works too
    assert manifest["eos_id"] == tok.token_to_id("<|done|>")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|im_end|>"}}))
    manifest = prepare_dataset(corpus[0], tmp_path / "b", tokenizer=str(tmp_path), progress=False)
    assert manifest["eos_token"] == "<|im_end|>" and manifest["eos_id"] == tok.token_to_id("<|im_end|>")


def test_tokenizer_without_eos_is_refused_with_the_fix(corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(path, ["<pad>"])
    with pytest.raises(DataError, match="no end-of-document token.*--eos-token"):
        prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(path), progress=False)
    assert not (tmp_path / "ds").exists()
    with pytest.raises(DataError, match="--eos-token '<nope>' is not a token"):
        prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(tmp_path / "tokenizer.json"),
                        eos_token="<nope>", progress=False)


def test_tokenizer_file_that_does_not_parse_is_refused(corpus, tmp_path, capsys):
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    with pytest.raises(DataError, match="not a tokenizer.json"):
        prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(bad), progress=False)
    # through the CLI: one line naming the file, exit status 2, no dataset
    code = main(["data", "prepare", "--input", str(corpus[0]), "--output", str(tmp_path / "ds"),
                 "--tokenizer", str(bad), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and str(bad) in err and "Traceback" not in err
    assert not (tmp_path / "ds").exists()
    with pytest.raises(DataError, match="no such file"):
        prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(tmp_path / "missing.json"), progress=False)


def test_changed_tokenizer_file_is_another_dataset(corpus, tmp_path):
    path = tmp_path / "tokenizer.json"
    train_tokenizer(path, ["</s>"])
    prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(path), progress=False)
    train_tokenizer(path, ["</s>"], vocab_size=280)
    with pytest.raises(DataError, match="tokenizer_sha256"):
        prepare_dataset(corpus[0], tmp_path / "ds", tokenizer=str(path), progress=False)
