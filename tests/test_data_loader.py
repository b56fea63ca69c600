"""WindowLoader / open_split on small synthetic datasets written straight to disk (no datatrove)."""

import json

import numpy as np
import pytest
import torch

from megatrain.data import WindowLoader, open_split, val_batches
from megatrain.data.shards import MANIFEST_FORMAT, MAX_TOKEN_IDS_KEY
from megatrain.errors import DataError

VOCAB = 1000
SEQ_LEN = 8


def write_dataset(root, shards, vocab_size=VOCAB, token_size=2, split="train", record_max_ids=True):
    """Writes ``shards`` (lists of token arrays = documents) in the prepare output layout;
    ``record_max_ids=False`` writes the manifest of a megatrain that did not record the maxima."""
    (root / split).mkdir(parents=True, exist_ok=True)
    files, total, max_ids = [], 0, []
    dtype = "<u2" if token_size == 2 else "<u4"
    for i, docs in enumerate(shards):
        tokens = np.concatenate(docs).astype(dtype)
        name = f"{split}/{i:05d}_unshuffled.ds"
        (root / name).write_bytes(tokens.tobytes())
        ends = np.cumsum([len(d) for d in docs]).astype("<u8")
        (root / (name + ".index")).write_bytes(ends.tobytes())
        files.append(name)
        total += len(tokens)
        max_ids.append(int(tokens.max()))
    entry = {"files": files, "tokens": total, "documents": sum(map(len, shards))}
    if record_max_ids:
        entry[MAX_TOKEN_IDS_KEY] = max_ids
    manifest = {
        "format": MANIFEST_FORMAT,
        "tokenizer": "bytes",
        "tokenizer_file": "tokenizer.json",
        "vocab_size": vocab_size,
        "eos_id": vocab_size - 1,
        "token_size": token_size,
        "splits": {split: entry},
        "source": "synthetic",
        "config": {},
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


@pytest.fixture
def dataset(tmp_path):
    rng = np.random.default_rng(0)
    # three shards of different lengths (41 tokens = exactly 5 windows; 30 -> 3 windows, 2 spare tokens)
    shards = [
        [rng.integers(0, VOCAB - 1, n) for n in (20, 21)],
        [rng.integers(0, VOCAB - 1, 30)],
        [rng.integers(0, VOCAB - 1, n) for n in (10, 10, 13)],
    ]
    return write_dataset(tmp_path, shards)


def expected_windows(shard_set, seq_len=SEQ_LEN):
    out = []
    for shard in shard_set.shards:
        tokens = np.asarray(shard.tokens, dtype=np.int64)
        for k in range((len(tokens) - 1) // seq_len):
            out.append(tuple(tokens[k * seq_len : k * seq_len + seq_len + 1].tolist()))
    return out


def rows(batch):
    return [tuple(r) for r in batch.tolist()]


def test_open_split_reports_tokens_vocab_eos(dataset):
    shards = open_split(dataset, "train")
    assert shards.total_tokens == 41 + 30 + 33
    assert (shards.vocab_size, shards.eos_id, shards.token_size) == (VOCAB, VOCAB - 1, 2)
    assert shards.shards[0].tokens.dtype == np.dtype("<u2")


def test_one_epoch_of_windows_is_exactly_the_token_stream_windows(dataset):
    shards = open_split(dataset, "train")
    expected = expected_windows(shards)
    assert len(expected) == 5 + 3 + 4
    loader = WindowLoader(shards, SEQ_LEN, global_batch_size=4, seed=3)
    assert loader.windows_per_epoch == len(expected)
    seen = []
    for _ in range(3):
        batch = loader.next_batch()
        assert batch.dtype == torch.int64 and batch.shape == (4, SEQ_LEN + 1)
        seen += rows(batch)
    assert sorted(seen) == sorted(expected)
    assert seen != expected  # shuffled


def test_same_seed_same_batches_other_seed_differs(dataset):
    shards = open_split(dataset, "train")
    a, b, c = (WindowLoader(shards, SEQ_LEN, 4, seed=s) for s in (7, 7, 8))
    batches_a = [a.next_batch() for _ in range(5)]
    batches_b = [b.next_batch() for _ in range(5)]
    batches_c = [c.next_batch() for _ in range(5)]
    assert all(torch.equal(x, y) for x, y in zip(batches_a, batches_b))
    assert not all(torch.equal(x, y) for x, y in zip(batches_a, batches_c))


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_are_disjoint_slices_of_the_global_batch(dataset, dp_size):
    shards = open_split(dataset, "train")
    full = WindowLoader(shards, SEQ_LEN, 8, seed=1)
    ranks = [WindowLoader(shards, SEQ_LEN, 8, dp_rank=r, dp_size=dp_size, seed=1) for r in range(dp_size)]
    for step in range(4):  # 32 windows: crosses two epoch boundaries (12 windows per epoch)
        global_batch = full.next_batch()
        parts = [loader.next_batch() for loader in ranks]
        assert all(p.shape == (8 // dp_size, SEQ_LEN + 1) for p in parts)
        assert torch.equal(torch.cat(parts), global_batch), f"step {step}"


def test_global_batch_not_divisible_by_dp_size_is_rejected(dataset):
    with pytest.raises(DataError, match="multiple of the data-parallel size"):
        WindowLoader(open_split(dataset, "train"), SEQ_LEN, 6, dp_rank=0, dp_size=4)


@pytest.mark.parametrize("resume_dp_size", [1, 2])
def test_resume_from_state_dict_gives_exactly_the_next_global_batch(dataset, resume_dp_size):
    shards = open_split(dataset, "train")
    ref = WindowLoader(shards, SEQ_LEN, 4, dp_size=1, seed=5)
    first = WindowLoader(shards, SEQ_LEN, 4, dp_size=1, seed=5)
    for _ in range(5):  # 20 windows: we are inside the second epoch
        ref.next_batch()
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # plain ints and strings only
    assert state["epoch"] == 1 and state["position"] == 8
    expected = [ref.next_batch() for _ in range(3)]
    resumed = [
        WindowLoader(shards, SEQ_LEN, 4, dp_rank=r, dp_size=resume_dp_size, seed=5)
        for r in range(resume_dp_size)
    ]
    for loader in resumed:
        loader.load_state_dict(state)
    for step in range(3):
        got = torch.cat([loader.next_batch() for loader in resumed])
        assert torch.equal(got, expected[step]), f"step {step} after resume"


@pytest.mark.parametrize("field,kwargs", [("seq_len", {"seq_len": 4}), ("seed", {"seed": 1})])
def test_resume_with_other_seq_len_or_seed_names_the_field(dataset, field, kwargs):
    shards = open_split(dataset, "train")
    state = WindowLoader(shards, SEQ_LEN, 4).state_dict()
    args = {"seq_len": SEQ_LEN, "seed": 0} | kwargs
    other = WindowLoader(shards, args["seq_len"], 4, seed=args["seed"])
    with pytest.raises(DataError, match=field):
        other.load_state_dict(state)


def test_resume_on_other_data_names_the_fingerprint(dataset, tmp_path):
    state = WindowLoader(open_split(dataset, "train"), SEQ_LEN, 4).state_dict()
    other_dir = write_dataset(tmp_path / "other", [[np.arange(50)]])
    loader = WindowLoader(open_split(other_dir, "train"), SEQ_LEN, 4)
    with pytest.raises(DataError, match="fingerprint"):
        loader.load_state_dict(state)


def test_epochs_roll_over_inside_a_batch(tmp_path):
    root = write_dataset(tmp_path, [[np.arange(5 * SEQ_LEN + 1)]])  # exactly 5 windows
    loader = WindowLoader(open_split(root, "train"), SEQ_LEN, 3, seed=2)
    starts = []
    for _ in range(5):  # 15 windows = 3 epochs
        starts += [r[0] // SEQ_LEN for r in loader.next_batch().tolist()]
    for epoch in range(3):
        assert sorted(starts[5 * epoch : 5 * epoch + 5]) == [0, 1, 2, 3, 4], starts
    assert starts[:5] != starts[5:10] or starts[5:10] != starts[10:]  # epochs are reshuffled
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (3, 0)


def test_windows_never_cross_shard_files(tmp_path):
    # shard 0 holds tokens 0..10, shard 1 tokens 100..110: a crossing window would mix them
    root = write_dataset(tmp_path, [[np.arange(11)], [np.arange(100, 111)]])
    loader = WindowLoader(open_split(root, "train"), 4, 4)
    batch = loader.next_batch()
    expected = [(0, 1, 2, 3, 4), (4, 5, 6, 7, 8), (100, 101, 102, 103, 104), (104, 105, 106, 107, 108)]
    assert sorted(rows(batch)) == expected


def test_val_batches_are_fixed_and_in_natural_order(dataset):
    shards = open_split(dataset, "train")
    expected = expected_windows(shards)
    batches = list(val_batches(shards, SEQ_LEN, batch_size=5))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert sum((rows(b) for b in batches), []) == expected
    again = list(val_batches(shards, SEQ_LEN, batch_size=5, max_batches=2))
    assert len(again) == 2 and all(torch.equal(x, y) for x, y in zip(again, batches))


def test_missing_manifest_tells_to_run_prepare(tmp_path):
    with pytest.raises(DataError, match=r"manifest\.json.*megatrain data prepare"):
        open_split(tmp_path, "train")


def test_truncated_shard_is_reported_by_file_name(dataset):
    path = dataset / "train" / "00001_unshuffled.ds"
    data = path.read_bytes()
    path.write_bytes(data[:-1])  # half a token
    with pytest.raises(DataError, match="00001_unshuffled.ds"):
        open_split(dataset, "train")
    path.write_bytes(data[:-4])  # whole tokens: caught by the index
    with pytest.raises(DataError, match="00001_unshuffled.ds.*truncated"):
        open_split(dataset, "train")


def test_missing_shard_is_reported_by_file_name(dataset):
    (dataset / "train" / "00002_unshuffled.ds").unlink()
    with pytest.raises(DataError, match="00002_unshuffled.ds"):
        open_split(dataset, "train")


# the tokenizer has 300 tokens; the trainer pads model.vocab_size to 320 (a multiple of 64)
TOKENIZER_VOCAB, PADDED_VOCAB = 300, 320


def bad_id_message(shard_name, token_id):
    return (
        rf"{shard_name}.*token id {token_id}\b.*tokenizer.*has {TOKENIZER_VOCAB} tokens"
        r".*megatrain data prepare"
    )


@pytest.mark.parametrize("record_max_ids", [True, False], ids=["recorded", "scanned"])
def test_token_id_between_tokenizer_and_padded_vocab_is_refused_at_open(tmp_path, record_max_ids):
    bad = TOKENIZER_VOCAB + 10  # a valid row of the padded embedding, but no token of the tokenizer
    assert TOKENIZER_VOCAB < bad < PADDED_VOCAB
    good, poisoned = [np.arange(20)], [np.array([1, 2, 3, bad, 5, 6, 7, 8, 9, 10])]
    root = write_dataset(
        tmp_path, [good, poisoned], vocab_size=TOKENIZER_VOCAB, record_max_ids=record_max_ids
    )
    with pytest.raises(DataError, match=bad_id_message(r"00001_unshuffled\.ds", bad)):
        open_split(root, "train")


@pytest.mark.parametrize("record_max_ids", [True, False], ids=["recorded", "scanned"])
def test_largest_valid_token_id_opens(tmp_path, record_max_ids):
    # the negative control of the refusals: the tokenizer's last id is data like any other
    root = write_dataset(
        tmp_path, [[np.arange(20)], [np.array([TOKENIZER_VOCAB - 1] * 10)]], vocab_size=TOKENIZER_VOCAB,
        record_max_ids=record_max_ids,
    )  # fmt: skip
    shards = open_split(root, "train")
    assert [s.max_token_id for s in shards.shards] == [19, TOKENIZER_VOCAB - 1]


@pytest.mark.parametrize("record_max_ids", [True, False], ids=["recorded", "scanned"])
def test_token_id_no_window_reaches_is_refused_at_open(tmp_path, record_max_ids):
    # 3 windows of SEQ_LEN + 1 cover tokens 0..24 of the 30: the last token is never sampled
    tokens = np.arange(30)
    tokens[-1] = 5000
    root = write_dataset(tmp_path, [[tokens]], vocab_size=TOKENIZER_VOCAB, record_max_ids=record_max_ids)
    with pytest.raises(DataError, match=bad_id_message(r"00000_unshuffled\.ds", 5000)):
        open_split(root, "train")


def test_manifest_without_max_ids_is_scanned_on_open(tmp_path):
    rng = np.random.default_rng(0)
    shards = [[rng.integers(0, VOCAB - 1, n)] for n in (20, 30)]
    old = open_split(write_dataset(tmp_path / "old", shards, record_max_ids=False), "train")
    new = open_split(write_dataset(tmp_path / "new", shards), "train")
    expected = [int(np.max(docs[0])) for docs in shards]
    assert [s.max_token_id for s in old.shards] == [s.max_token_id for s in new.shards] == expected
    assert old.fingerprint == new.fingerprint  # a loader state saved on either resumes on the other


def test_shard_modified_after_open_is_caught_by_the_batch_check(tmp_path):
    root = write_dataset(tmp_path, [[np.arange(20)], [np.arange(10)]], vocab_size=TOKENIZER_VOCAB)
    loader = WindowLoader(open_split(root, "train"), SEQ_LEN, 3, vocab_size=PADDED_VOCAB)
    with open(root / "train" / "00001_unshuffled.ds", "r+b") as f:  # in place: the memory map sees it
        f.seek(3 * 2)
        f.write(np.array([TOKENIZER_VOCAB + 10], dtype="<u2").tobytes())
    with pytest.raises(DataError, match=r"00001_unshuffled\.ds.*tokenizer vocabulary size 300.*modified"):
        loader.next_batch()  # all 3 windows are in the first batch


def test_model_vocab_smaller_than_tokenizer_vocab_is_rejected(dataset):
    with pytest.raises(DataError, match="model.vocab_size"):
        WindowLoader(open_split(dataset, "train"), SEQ_LEN, 4, vocab_size=VOCAB - 1)


def test_too_few_tokens_for_one_window(tmp_path):
    root = write_dataset(tmp_path, [[np.arange(SEQ_LEN)]])  # needs SEQ_LEN + 1
    with pytest.raises(DataError, match="too small for seq_len"):
        WindowLoader(open_split(root, "train"), SEQ_LEN, 1)
    with pytest.raises(DataError, match="too small for seq_len"):
        val_batches(open_split(root, "train"), SEQ_LEN, 1)


def test_uint32_shards(tmp_path):
    root = write_dataset(tmp_path, [[np.arange(70000, 70000 + 17)]], vocab_size=100000, token_size=4)
    batch = WindowLoader(open_split(root, "train"), SEQ_LEN, 2).next_batch()
    assert sorted(r[0] for r in batch.tolist()) == [70000, 70008]
