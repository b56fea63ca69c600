"""The experiments' verdicts: a paired bootstrap interval with an exact sign-flip test beside it."""

import numpy as np
import pytest

from megatrain.experiments.intervals import paired_difference, verdict


def test_a_consistent_gain_over_five_seeds_is_a_finding():
    better, worse = [0.50, 0.52, 0.49, 0.51, 0.53], [0.20, 0.21, 0.20, 0.22, 0.21]
    d = paired_difference(better, worse)
    assert d.mean == pytest.approx(0.302) and 0.28 < d.low < d.mean < d.high < 0.33
    assert d.p_value == pytest.approx(2 / 32)  # only all-plus and all-minus are as extreme
    assert verdict(better, worse).startswith("yes: +0.302")
    assert verdict(worse, better).startswith("no, the opposite: -0.302")


def test_three_seeds_never_make_a_finding_however_clear():
    better, worse = [0.5, 0.51, 0.52], [0.2, 0.21, 0.2]
    assert paired_difference(better, worse).excludes_zero
    text = verdict(better, worse)
    assert text.startswith("not shown") and "p > 0.10" in text, text


def test_noise_is_not_shown_and_says_what_it_could_resolve():
    text = verdict([0.5, 0.2, 0.8, 0.4, 0.6], [0.45, 0.4, 0.5, 0.5, 0.55])
    assert text.startswith("not shown") and "includes 0" in text and "an effect under about" in text
    assert verdict([0.3], [0.2]) == "higher with one seed: no interval, not a finding"


def test_unpaired_or_failed_evaluations_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="NaN"):
        paired_difference([0.1, float("nan")], [0.1, 0.2])


def _false_findings(seeds: int, interval_only: bool, trials: int = 200) -> float:
    rng = np.random.default_rng(7)
    hits = 0
    for trial in range(trials):
        a, b = rng.normal(0, 1, seeds), rng.normal(0, 1, seeds)
        if interval_only:
            hits += paired_difference(a, b, resamples=1000, seed=trial).excludes_zero
        else:
            hits += not verdict(a, b).startswith("not shown")
    return hits / trials


@pytest.mark.parametrize("seeds", [5, 8])
def test_without_a_true_difference_findings_are_about_as_rare_as_promised(seeds):
    assert _false_findings(seeds, interval_only=False) <= 0.13


def test_the_bootstrap_interval_alone_would_find_effects_in_noise():
    """Negative control: why the verdict needs the test beside the interval."""
    assert _false_findings(3, interval_only=True) > 0.25
