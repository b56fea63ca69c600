"""Is one arm better than another? A bootstrap interval of the difference, and an exact paired test.

Arms are trained with the same seeds (the seed sets the initialisation and the data order), so
the comparison is paired by seed: the per-seed differences are what vary, and their mean is the
effect. Its 90% interval is a percentile bootstrap of that mean (the paper's error bars are 90%
bootstrap intervals too, over evaluation samples); with as few as 3-5 seeds a bootstrap interval
is rough, so beside it goes the exact sign-flip test: the share of the 2^k ways of flipping the
signs of the k differences whose mean is at least as far from zero (two-sided). A finding needs
both: the interval excluding zero and p <= 0.10. The interval alone is not enough at these seed
counts: simulated with no true difference (normal noise, 300 experiments), it excluded zero in
41% of them with 3 seeds, 21% with 5 and 18% with 8, where a 90% interval should in 10%; with the
test beside it, 0%, 5% and 10%. Three seeds can never give a finding (the smallest possible p is
2/8 = 0.25); five can (2/32). "not shown" says how wide the interval was, i.e. what effect this
many seeds could have resolved.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

LEVEL = 0.90
RESAMPLES = 10_000


@dataclass(frozen=True)
class Difference:
    """``a - b``: mean over seeds and its bootstrap interval."""

    mean: float
    low: float
    high: float
    seeds: int
    p_value: float  # exact two-sided sign-flip test of "no difference"
    level: float = LEVEL

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def __str__(self) -> str:
        return (f"{self.mean:+.3f}, {self.level:.0%} interval [{self.low:+.3f}, {self.high:+.3f}] over "
                f"{self.seeds} seeds, sign-flip p = {self.p_value:.2f}")


def paired_difference(a: Sequence[float], b: Sequence[float], level: float = LEVEL,
                      resamples: int = RESAMPLES, seed: int = 0) -> Difference:
    """``a - b`` where ``a[i]`` and ``b[i]`` come from the same seed."""
    a, b = [float(v) for v in a], [float(v) for v in b]
    if len(a) != len(b) or not a:
        raise ValueError(f"paired arms need the same seeds: {len(a)} values against {len(b)}")
    if any(math.isnan(x) for x in a + b):
        raise ValueError("a NaN among the values: an evaluation failed")
    diffs = np.array(a) - np.array(b)
    rng = np.random.default_rng(seed)
    means = diffs[rng.integers(0, len(diffs), size=(resamples, len(diffs)))].mean(axis=1)
    tail = (1 - level) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return Difference(float(diffs.mean()), float(low), float(high), len(diffs), _sign_flip_p(diffs), level)


def _sign_flip_p(diffs: np.ndarray) -> float:
    """Exact for up to 16 seeds (65,536 sign patterns); each pattern is equally likely under
    "no difference" when the differences are symmetric about zero."""
    if len(diffs) > 16:
        raise ValueError("more than 16 seeds: use a sampled sign-flip test")
    observed = abs(diffs.mean())
    signs = np.array(list(itertools.product((1.0, -1.0), repeat=len(diffs))))
    flipped = np.abs((signs * diffs).mean(axis=1))
    return float((flipped >= observed - 1e-12).mean())


def verdict(better: Sequence[float], worse: Sequence[float], what: str = "") -> str:
    """Whether ``better`` (per seed) beats ``worse`` (same seeds), in words, with the numbers."""
    if min(len(better), len(worse)) < 2:
        sign = "higher" if better[0] > worse[0] else "lower" if better[0] < worse[0] else "equal"
        return f"{sign} with one seed: no interval, not a finding"
    d = paired_difference(better, worse)
    label = f"{what} " if what else ""
    significant = d.excludes_zero and d.p_value <= 1 - d.level
    if significant and d.low > 0:
        return f"yes: {label}{d}"
    if significant and d.high < 0:
        return f"no, the opposite: {label}{d}"
    half = (d.high - d.low) / 2
    why = "includes 0" if not d.excludes_zero else f"p > {1 - d.level:.2f}"
    return (f"not shown: {label}{d}: {why} (an effect under about {half:.3f} is not resolved by "
            f"this many seeds)")
