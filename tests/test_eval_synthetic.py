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


def _polynomial_oracle(max_ops):
    ops = {v: k for k, v in polynomial.OP_IDS.items()}

    def rule(prefix):
        if polynomial.EQUALS_ID not in prefix:
            return 0
        n_ops, equals = polynomial.answer_span(np.array(prefix))
        doc = np.array(prefix[:equals])
        value = doc[:polynomial.DEGREE] - 1
        for i in range(n_ops):
            at = polynomial.DEGREE + i * (polynomial.DEGREE + 1)
            value = polynomial.apply(ops[int(doc[at])], value, doc[at + 1:at + 1 + polynomial.DEGREE] - 1)
        if n_ops > max_ops:
            value = (value + 1) % polynomial.P  # wrong on purpose
        k = len(prefix) - 1 - equals
        return 1 + int(value[k]) if k < polynomial.DEGREE else 0

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
