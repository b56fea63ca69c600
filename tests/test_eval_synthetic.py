"""The synthetic probes (megatrain/eval/synthetic.py) score what they claim to score.

What is protected: an oracle that does induction scores 1 on later occurrences and chance-level on
first ones, while a model without it scores near chance (the negative control); polynomial
accuracy is bucketed by operation count: an oracle right only in the training distribution scores
1 in and 0 out. A real (untrained) model runs through both, and a document longer than the
model's positions is refused.
"""

import numpy as np
import pytest
import torch

from megatrain.data.synth import induction, polynomial
from megatrain.data.synth.cli import make_synth_dataset
from megatrain.errors import DataError
from megatrain.eval.synthetic import evaluate_induction, evaluate_polynomial
from megatrain.model.mtp import MTPTransformer


@pytest.fixture(scope="module")
def synth_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth_eval")
    for task in ("induction", "polynomial"):
        make_synth_dataset(task, root / task, examples=200, seed=2)
    return {task: root / task for task in ("induction", "polynomial")}


class RuleModel(torch.nn.Module):
    """Head-1 logits that put all mass on ``rule(prefix)``, the token it predicts after a prefix."""

    def __init__(self, rule, vocab_size: int, positions: int = 256):
        super().__init__()
        self.rule, self.vocab_size = rule, vocab_size
        self.register_buffer("rope_cos", torch.zeros(positions, 1))

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab_size)
        for b, row in enumerate(tokens.tolist()):
            for t in range(len(row)):
                logits[b, t, self.rule(row[:t + 1])] = 1.0
        return logits


def _induction_oracle(prefix):
    """Copy the token that followed the last earlier occurrence of the current token."""
    for p in range(len(prefix) - 2, -1, -1):
        if prefix[p] == prefix[-1] and prefix[-1] in induction.FIRST_IDS:
            return prefix[p + 1]
    return induction.SECOND_IDS.start  # a fixed guess


def _polynomial_oracle(max_ops, degree=polynomial.DEGREE):
    ops = {v: k for k, v in polynomial.OP_IDS.items()}

    def rule(prefix):
        if polynomial.EQUALS_ID not in prefix:
            return 0
        n_ops, equals = polynomial.answer_span(np.array(prefix))
        doc = np.array(prefix[:equals])
        value = doc[:degree] - 1
        for i in range(n_ops):
            at = degree + i * (degree + 1)
            value = polynomial.apply(ops[int(doc[at])], value, doc[at + 1:at + 1 + degree] - 1)
        if n_ops > max_ops:
            value = (value + 1) % polynomial.P  # wrong on purpose
        k = len(prefix) - 1 - equals
        return 1 + int(value[k]) if k < degree else 0

    return rule


def test_induction_probe_scores_copying_later_occurrences(synth_dirs):
    vocab = len(induction.vocabulary())
    result = evaluate_induction(RuleModel(_induction_oracle, vocab), None, synth_dirs["induction"],
                                device="cpu", batch_size=16)
    assert result["accuracy"] == 1.0
    assert result["first_occurrence_accuracy"] < 0.2  # nothing to copy from: chance level
    assert [row["occurrence"] for row in result["table"]] == ["later", "first"]
    # negative control: a model that never copies is at chance on later occurrences too
    guess = evaluate_induction(RuleModel(lambda prefix: induction.SECOND_IDS.start, vocab), None,
                               synth_dirs["induction"], device="cpu", batch_size=16)
    assert guess["accuracy"] < 0.2, guess


def test_polynomial_accuracy_is_bucketed_by_operation_count(synth_dirs):
    vocab = len(polynomial.vocabulary())
    exact = evaluate_polynomial(RuleModel(_polynomial_oracle(99), vocab), None, synth_dirs["polynomial"],
                                device="cpu", batch_size=64)
    assert [row["exact_match"] for row in exact["table"]] == [1.0] * len(exact["table"])
    assert exact["out_of_distribution_accuracy"] == 1.0
    # negative control: right only within the training distribution
    low, high = polynomial.TRAIN_OPS
    in_only = evaluate_polynomial(RuleModel(_polynomial_oracle(high), vocab), None, synth_dirs["polynomial"],
                                  device="cpu", batch_size=64)
    assert in_only["in_distribution_accuracy"] == 1.0 and in_only["out_of_distribution_accuracy"] == 0.0
    assert {row["operations"] for row in in_only["table"] if row["distribution"] == "out"} == \
        set(range(high + 1, polynomial.VAL_OPS[1] + 1))


def test_polynomial_scoring_follows_the_ring_and_operations_the_dataset_was_made_with(tmp_path):
    ring = polynomial.Settings(degree=2, train_ops=(1, 2), val_ops=(1, 3))
    make_synth_dataset("polynomial", tmp_path / "small", examples=100, seed=2, ring=ring)
    vocab = len(polynomial.vocabulary())
    exact = evaluate_polynomial(RuleModel(_polynomial_oracle(99, degree=2), vocab), None, tmp_path / "small",
                                device="cpu", batch_size=64)
    assert exact["ring"] == "F_7[X]/(X^2)" and exact["train_operations"] == [1, 2]
    assert polynomial.Settings(degree=1).ring == "F_7"  # X^1 = 0 leaves the integers mod 7
    assert exact["in_distribution_accuracy"] == exact["out_of_distribution_accuracy"] == 1.0
    in_only = evaluate_polynomial(RuleModel(_polynomial_oracle(2, degree=2), vocab), None, tmp_path / "small",
                                  device="cpu", batch_size=64)
    assert [(row["operations"], row["distribution"], row["exact_match"]) for row in in_only["table"]] == \
        [(1, "in", 1.0), (2, "in", 1.0), (3, "out", 0.0)]


def test_a_real_model_runs_and_long_documents_are_refused(synth_dirs, tiny_model_cfg):
    cfg = tiny_model_cfg(vocab_size=len(induction.vocabulary()), n_layers=3, n_future=2)
    model = MTPTransformer(cfg, max_seq_len=160).eval()
    result = evaluate_induction(model, None, synth_dirs["induction"], device="cpu", batch_size=32)
    assert 0.0 <= result["accuracy"] <= 1.0 and result["table"][0]["scored"] > 0
    short = MTPTransformer(cfg, max_seq_len=16).eval()
    with pytest.raises(DataError, match="longer than the model's 16 positions"):
        evaluate_induction(short, None, synth_dirs["induction"], device="cpu", batch_size=32)
    with pytest.raises(DataError, match="not a `polynomial` dataset"):
        evaluate_polynomial(model, None, synth_dirs["induction"], device="cpu", batch_size=32)
