"""`megatrain data synth`: the synthetic datasets are prepared datasets the trainer takes unchanged.

What is protected: the folder passes the shard reader's checks with its own word-level tokenizer
(text round-trips); generation is reproducible by seed; polynomial answers are the ring's
arithmetic (checked against hand-worked products) and val holds out-of-distribution operation
counts; induction names keep their second part within a document; a short training run works on
it; a non-empty --output is refused with exit 2.
"""

import numpy as np
import pytest

from megatrain.cli import main
from megatrain.config import load_config
from megatrain.data import open_split
from megatrain.data.synth import induction, polynomial
from megatrain.data.synth.cli import make_synth_dataset
from megatrain.data.synth.dataset import read_documents, synth_settings
from megatrain.errors import DataError, UserError
from tests.test_trainer import _overrides


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    for task in ("induction", "polynomial"):
        make_synth_dataset(task, root / task, examples=300, seed=1)
    return {task: root / task for task in ("induction", "polynomial")}


@pytest.mark.parametrize("task", ["induction", "polynomial"])
def test_dataset_opens_like_a_prepared_one_and_its_tokenizer_round_trips(synth_dirs, task):
    from tokenizers import Tokenizer

    train, val = open_split(synth_dirs[task], "train"), open_split(synth_dirs[task], "val")
    assert train.total_tokens > 0 and val.total_tokens > 0 and train.eos_id == 0
    tokenizer = Tokenizer.from_file(str(train.tokenizer_path))
    assert tokenizer.get_vocab_size() == train.vocab_size
    doc = read_documents(synth_dirs[task], "val")[0]
    text = tokenizer.decode(doc.tolist())
    assert tokenizer.encode(text).ids == doc.tolist(), text


def test_generation_is_reproducible_by_seed():
    assert polynomial.splits(20, seed=3) == polynomial.splits(20, seed=3)
    assert induction.splits(20, seed=3) == induction.splits(20, seed=3)
    assert induction.splits(20, seed=3)["train"] != induction.splits(20, seed=4)["train"]  # control


def _poly(*coefficients):
    return np.array(coefficients + (0,) * (polynomial.DEGREE - len(coefficients)))


def test_polynomial_arithmetic_is_the_ring_f7_mod_x5():
    one_plus_x, one_minus_x = _poly(1, 1), _poly(1, 6)
    assert polynomial.apply("*", one_plus_x, one_minus_x).tolist() == _poly(1, 0, 6).tolist()  # 1 - X^2
    assert polynomial.apply("*", _poly(0, 0, 0, 0, 1), _poly(0, 1)).tolist() == _poly().tolist()  # X^5 = 0
    assert polynomial.apply("-", _poly(2), _poly(5)).tolist() == _poly(4).tolist()
    assert polynomial.apply("+", _poly(3, 6), _poly(4, 2)).tolist() == _poly(0, 1).tolist()
    # control: without the truncation mod X^5 the product would have more terms
    assert len(np.convolve(_poly(0, 0, 0, 0, 1), _poly(0, 1))) > polynomial.DEGREE
    # smaller rings, worked by hand: X * X = X^2 = 0 mod X^2; in F_7 (degree 1) 3 * 5 = 15 = 1
    assert polynomial.apply("*", np.array([0, 1]), np.array([0, 1])).tolist() == [0, 0]
    assert polynomial.apply("*", np.array([2, 1]), np.array([3, 1])).tolist() == [6, 5]  # 6 + 5X + X^2
    assert polynomial.apply("*", np.array([3]), np.array([5])).tolist() == [1]
    assert polynomial.apply("-", np.array([2]), np.array([5])).tolist() == [4]


def _check_answers(dataset, ring):
    """Every document's answer is its expression's value in the ring; returns, per split, the
    operation counts seen."""
    ops = {v: k for k, v in polynomial.OP_IDS.items()}
    seen = {}
    for split in ("train", "val"):
        counts = set()
        for doc in read_documents(dataset, split):
            n_ops, equals = polynomial.answer_span(doc)
            counts.add(n_ops)
            value = doc[:ring.degree] - 1
            for i in range(n_ops):
                at = ring.degree + i * (ring.degree + 1)
                value = polynomial.apply(ops[int(doc[at])], value, doc[at + 1:at + 1 + ring.degree] - 1)
            assert (doc[equals + 1:] - 1).tolist() == value.tolist()
            assert len(doc) <= polynomial.longest_document(ring)
        seen[split] = counts
    return seen


def test_polynomial_answers_follow_the_expression_and_val_goes_out_of_distribution(synth_dirs):
    seen = _check_answers(synth_dirs["polynomial"], polynomial.Settings())
    assert seen == {"train": set(range(polynomial.TRAIN_OPS[0], polynomial.TRAIN_OPS[1] + 1)),
                    "val": set(range(polynomial.VAL_OPS[0], polynomial.VAL_OPS[1] + 1))}
    assert polynomial.VAL_OPS[1] > polynomial.TRAIN_OPS[1]
    assert polynomial.longest_document(polynomial.Settings()) == 5 * 10 + 8 + 1  # 8 operations


def test_a_smaller_ring_and_its_operation_counts_are_generated_and_recorded(tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["data", "synth", "polynomial", "--output", str(out), "--examples", "60",
                 "--degree", "2", "--train-ops", "1-2", "--val-ops", "1-4"]) == 0
    assert "F_7[X]/(X^2), training operations 1-2, validation 1-4" in capsys.readouterr().err
    ring = polynomial.Settings.from_manifest(synth_settings(out, "polynomial"), out)
    assert ring == polynomial.Settings(degree=2, train_ops=(1, 2), val_ops=(1, 4))
    assert _check_answers(out, ring) == {"train": {1, 2}, "val": {1, 2, 3, 4}}
    # a dataset written before the settings were recorded was made with the paper's
    older = {"task": "polynomial", "version": 1}
    assert polynomial.Settings.from_manifest(older, out) == polynomial.Settings()


def test_settings_normalise_what_a_manifest_holds_and_refuse_what_cannot_be_generated(tmp_path):
    assert polynomial.Settings(2, [1, 2], [1, 3]) == polynomial.Settings(2, (1, 2), (1, 3))  # JSON lists
    with pytest.raises(UserError, match="--train-ops must be a range LOW-HIGH of two integers"):
        polynomial.Settings(train_ops=(1, 2, 3))
    with pytest.raises(UserError, match="--val-ops 6-8 shares no operation count with --train-ops 1-5"):
        polynomial.Settings(val_ops=(6, 8))
    polynomial.Settings(train_ops=(2, 3), val_ops=(1, 2))  # control: overlapping at 2 is enough
    with pytest.raises(DataError, match=r"manifest.json: its polynomial settings are not valid \(--degree"):
        polynomial.Settings.from_manifest({"degree": "five"}, tmp_path / "manifest.json")


@pytest.mark.parametrize("flags, message", [
    (["induction", "--degree", "2"], "--degree: polynomial settings; the induction task has none"),
    (["polynomial", "--val-ops", "5-"], "expected LOW-HIGH or K"),
    (["polynomial", "--train-ops", "3-1"], "--train-ops must be a range LOW-HIGH with 1 <= LOW <= HIGH"),
    (["polynomial", "--val-ops", "0-4"], "--val-ops must be a range"),
    (["polynomial", "--degree", "0"], "--degree must be an integer >= 1"),
    (["polynomial", "--train-ops", "one"], "expected LOW-HIGH or K"),
])
def test_bad_generator_settings_are_refused_naming_the_flag_and_write_nothing(tmp_path, capsys, flags,
                                                                              message):
    try:
        code = main(["data", "synth", *flags, "--output", str(tmp_path / "out"), "--examples", "10"])
    except SystemExit as exit:  # argparse refuses a malformed value itself
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_induction_names_recur_whole_in_a_counting_filler(synth_dirs):
    """Every token after a later occurrence's first part is predictable: the name's tail by copying
    its first occurrence, the filler after the name by counting on from the one before it."""
    later_total = 0
    tail = induction.NAME_TAIL
    for doc in read_documents(synth_dirs["induction"], "val"):
        later, first = induction.scored_positions(doc)
        tail_of = {int(doc[p]): doc[p + 1:p + 1 + tail].tolist() for p in first}
        assert all(doc[p + 1:p + 1 + tail].tolist() == tail_of[int(doc[p])] for p in later)
        assert all(int(t) in induction.SECOND_IDS for p in later + first for t in doc[p + 1:p + 1 + tail])
        fillers = [int(t) - induction.FILLER_IDS.start for t in doc if int(t) in induction.FILLER_IDS]
        assert all((b - a) % induction.N_FILLER == 1 for a, b in zip(fillers, fillers[1:]))
        later_total += len(later)
        assert len(doc) <= induction.MAX_TOKENS < 128
    assert later_total > 0


def test_training_runs_on_a_synthetic_dataset(synth_dirs, tmp_path):
    from megatrain.trainer import train

    result = train(load_config(None, _overrides(synth_dirs["polynomial"], tmp_path / "run", **{
        "train.steps": 2, "checkpoint.every": 0, "train.eval_every": 2, "data.seq_len": 64})))
    assert result.step == 2 and all(np.isfinite(result.head_losses))


def test_cli_writes_a_dataset_and_refuses_a_non_empty_output(tmp_path, capsys):
    assert main(["data", "synth", "polynomial", "--output", str(tmp_path / "p"), "--examples", "10"]) == 0
    assert open_split(tmp_path / "p", "train").total_tokens > 0
    assert main(["data", "synth", "induction", "--output", str(tmp_path / "p"), "--examples", "10"]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_polynomial_test_problems_never_occur_in_training():
    """In F_7 with one operation there are only 147 problems: drawn at random, 20k training
    documents hold every one. Held out by a hash of the problem, none of the in-distribution
    validation problems is in training, and about one problem in five is a test problem."""
    ring = polynomial.Settings(degree=1, train_ops=(1, 1), val_ops=(1, 2))
    data = polynomial.splits(2000, seed=5, settings=ring)
    assert polynomial.problems_shared(data["train"], data["val"]) == 0
    problems = {tuple(doc[:doc.index(polynomial.EQUALS_ID)]) for doc in data["train"]}
    assert 147 * 0.6 < len(problems) < 147 * 0.9  # about four in five are training problems
    in_distribution = [doc for doc in data["val"] if polynomial.answer_span(np.array(doc))[0] == 1]
    assert in_distribution and all(polynomial.is_test_problem(doc, 5) for doc in in_distribution)
    # control: the same number of documents drawn without holding out shares most problems
    rng = np.random.default_rng(0)
    drawn = [polynomial.expression(1, rng, 1) for _ in range(2000)]
    assert polynomial.problems_shared(drawn, in_distribution) == len(in_distribution)
    # another seed holds out other problems
    assert {tuple(d) for d in in_distribution} != {
        tuple(d) for d in polynomial.splits(2000, seed=6, settings=ring)["val"]
        if polynomial.answer_span(np.array(d))[0] == 1}
