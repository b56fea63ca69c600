"""``data.mixture``: windows drawn from several datasets in proportion, deterministically from the
seed, resumed exactly; datasets with different tokenizers refused."""

import json

import numpy as np
import pytest

from megatrain.data import MixtureLoader, WindowLoader, mixture_val_batches, open_mixture, open_split
from megatrain.data.mixture import MIX_BLOCK, block_counts
from megatrain.errors import DataError
from tests.test_data_loader import write_dataset

VOCAB = 1000
SEQ_LEN = 8
TOKENIZER = {"model": {"type": "BPE", "vocab": {"a": 0}}, "added_tokens": [], "normalizer": None,
             "pre_tokenizer": None}


def make_source(root, low, high, n_shards=3, seed=0, tokenizer=TOKENIZER):
    """A dataset whose tokens all lie in [low, high): a window shows which source it came from."""
    rng = np.random.default_rng(seed)
    splits = {}
    for split in ("train", "val"):
        shards = [[rng.integers(low, high, int(rng.integers(30, 90)))] for _ in range(n_shards)]
        write_dataset(root, shards, vocab_size=VOCAB, split=split)
        splits[split] = json.loads((root / "manifest.json").read_text())["splits"][split]
    manifest = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**manifest, "splits": splits}))
    (root / "tokenizer.json").write_text(json.dumps(tokenizer))
    return root


@pytest.fixture
def sources(tmp_path):
    a = make_source(tmp_path / "a", 0, 500, seed=1)
    b = make_source(tmp_path / "b", 500, 999, seed=2)
    return a, b


def source_of_rows(batch):
    """0 for rows from source a (ids < 500), 1 for source b."""
    return (batch[:, 0] >= 500).long().tolist()


def loader(sources, weights=(0.7, 0.3), batch=16, **kwargs):
    return MixtureLoader(open_mixture(list(sources), list(weights), "train"), SEQ_LEN, batch, **kwargs)


def test_block_counts_are_exact_and_sum_to_the_block():
    counts = block_counts((0.7, 0.3))
    assert counts.sum() == MIX_BLOCK and counts.tolist() == [2867, 1229]
    assert block_counts((1 / 3, 1 / 3, 1 / 3)).sum() == MIX_BLOCK
    with pytest.raises(DataError, match="no window"):
        block_counts((1.0, 1e-9))


def test_windows_come_in_proportion(sources):
    mix = loader(sources, batch=64)
    drawn = [s for _ in range(64) for s in source_of_rows(mix.next_batch())]  # one block
    assert sum(drawn) == block_counts((0.7, 0.3))[1], "exactly the weights, per block"
    assert drawn[:20] != sorted(drawn[:20]), "sources are interleaved, not in runs"
    # negative control: other weights give other proportions
    other = loader(sources, weights=(0.5, 0.5), batch=64)
    drawn = [s for _ in range(64) for s in source_of_rows(other.next_batch())]
    assert sum(drawn) == MIX_BLOCK // 2


def test_each_source_gives_its_windows_in_its_own_shuffled_order(sources):
    mix = loader(sources, batch=32, seed=3)
    batches = [mix.next_batch() for _ in range(20)]
    from_a = [tuple(r) for b in batches for r in b.tolist() if r[0] < 500]
    single = WindowLoader(open_split(sources[0], "train"), SEQ_LEN, 1, seed=3)
    expected = [tuple(single.next_batch()[0].tolist()) for _ in range(len(from_a))]
    assert from_a == expected  # source a's k-th window is a WindowLoader's k-th, epochs included


def test_same_seed_same_batches_other_seed_differs(sources):
    a, b, c = loader(sources, seed=0), loader(sources, seed=0), loader(sources, seed=1)
    first = [a.next_batch() for _ in range(5)]
    assert all((x == b.next_batch()).all() for x in first)
    assert any((x != c.next_batch()).any() for x in first)


def test_dp_ranks_are_the_slices_of_the_global_batch(sources):
    whole = loader(sources, batch=16)
    ranks = [loader(sources, batch=16, dp_rank=r, dp_size=4) for r in range(4)]
    for _ in range(3):
        expected = whole.next_batch()
        got = np.concatenate([r.next_batch().numpy() for r in ranks])
        assert np.array_equal(got, expected.numpy())


@pytest.mark.parametrize("resume_dp", [1, 2])
def test_resume_gives_exactly_the_next_batches_of_every_source(sources, resume_dp):
    straight = loader(sources, batch=8)
    for _ in range(5):
        straight.next_batch()
    state = straight.state_dict()
    expected = [straight.next_batch() for _ in range(30)]  # wraps source epochs
    resumed = [loader(sources, batch=8, dp_rank=r, dp_size=resume_dp) for r in range(resume_dp)]
    for r in resumed:
        r.load_state_dict(state)
    for want in expected:
        got = np.concatenate([r.next_batch().numpy() for r in resumed])
        assert np.array_equal(got, want.numpy())
    # negative control: a fresh loader does not continue there
    assert not np.array_equal(loader(sources, batch=8).next_batch().numpy(), expected[0].numpy())


def test_resume_with_other_weights_or_sources_is_refused(sources, tmp_path):
    state = loader(sources).state_dict()
    with pytest.raises(DataError, match="data.mixture differs"):
        loader(sources, weights=(0.6, 0.4)).load_state_dict(state)
    with pytest.raises(DataError, match="data.mixture differs"):
        loader(sources[::-1], weights=(0.3, 0.7)).load_state_dict(state)
    with pytest.raises(DataError, match="not a mixture"):
        plain = WindowLoader(open_split(sources[0], "train"), SEQ_LEN, 4)
        loader(sources).load_state_dict(plain.state_dict())


def test_different_tokenizers_are_refused(sources, tmp_path):
    other_tokenizer = {**TOKENIZER, "model": {"type": "BPE", "vocab": {}}}
    other = make_source(tmp_path / "c", 0, 500, tokenizer=other_tokenizer)
    with pytest.raises(DataError, match="different tokenizers.*vocabulary or merges"):
        open_mixture([sources[0], other], [1, 1], "train")
    # the same tokenizer, written with other formatting, is the same tokenizer (negative control)
    (other / "tokenizer.json").write_text(json.dumps(TOKENIZER, indent=4))
    assert len(open_mixture([sources[0], other], [1, 1], "train").sources) == 2
    manifest = json.loads((other / "manifest.json").read_text())
    (other / "manifest.json").write_text(json.dumps({**manifest, "eos_id": 5}))
    with pytest.raises(DataError, match="end-of-document id"):
        open_mixture([sources[0], other], [1, 1], "train")


def test_validation_batches_mix_sources_and_repeat_identically(sources):
    mixture = open_mixture(list(sources), [0.5, 0.5], "val")
    first = list(mixture_val_batches(mixture, SEQ_LEN, 4, max_batches=3))
    again = list(mixture_val_batches(mixture, SEQ_LEN, 4, max_batches=3))
    assert len(first) == 3 and all((x == y).all() for x, y in zip(first, again))
    assert set(s for b in first for s in source_of_rows(b)) == {0, 1}


# ---- through the trainer -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two_datasets(dataset, tmp_path_factory):
    """The session's byte dataset and a second one prepared from other code with the same tokenizer."""
    from megatrain.data_pipelines import prepare_dataset
    from tests.conftest import SOURCE

    src = tmp_path_factory.mktemp("other_src")
    for i in range(40):
        (src / f"other_{i}.py").write_text(SOURCE.format(i=i + 1000).replace("Widget", "Gadget") * 2)
    other = tmp_path_factory.mktemp("other") / "ds"
    prepare_dataset(src, other, tokenizer="bytes", val_fraction=0.1, progress=False)
    return dataset, other


@pytest.mark.slow  # three short training runs: ~12 s
def test_trainer_trains_on_a_mixture_and_resumes_it_exactly(two_datasets, tmp_path):
    from tests.test_trainer import _metrics, _overrides, _train

    a, b = two_datasets
    mixture = f"data.mixture=[{{path: {a}, weight: 0.7}}, {{path: {b}, weight: 0.3}}]"
    straight = tmp_path / "straight"
    args = [o for o in _overrides(a, straight, **{"train.steps": 4, "checkpoint.every": 2})
            if not o.startswith("data.path=")]
    _train([*args, mixture])
    split = tmp_path / "split"
    args_split = [o.replace(str(straight), str(split)) for o in args]
    _train([*[o.replace("train.steps=4", "train.steps=2") for o in args_split], mixture])
    _train([*args_split, mixture])  # resumes from step 2
    losses = {m["step"]: m["loss"] for m in _metrics(straight)}
    resumed = {m["step"]: m["loss"] for m in _metrics(split)}
    assert resumed == losses
    # negative control: a run on data.path alone sees other batches
    alone = tmp_path / "alone"
    _train(_overrides(a, alone, **{"train.steps": 4, "checkpoint.every": 2}))
    assert {m["step"]: m["loss"] for m in _metrics(alone)} != losses
