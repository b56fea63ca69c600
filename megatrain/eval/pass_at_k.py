"""The unbiased pass@k estimator (Chen et al. 2021, "Evaluating Large Language Models Trained on
Code", the estimator the MTP paper reports).

With n samples of a problem of which c pass, pass@k is the probability that k samples drawn from
the n without replacement hold at least one that passes: 1 - C(n-c, k) / C(n, k). The ratio of
binomials is computed as a product, prod_{i=n-c+1}^{n} (1 - k/i), which never forms the huge
binomials (n = 200 is common).
"""

from __future__ import annotations

import math

KS = (1, 10, 100)  # the k the paper reports


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``c`` passing among ``n`` samples."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:  # every k-subset holds a passing sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: list[tuple[int, int]], ks=KS) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` from each problem's (n, c), for the k every problem
    has enough samples for."""
    if not counts:
        return {}
    fewest = min(n for n, _ in counts)
    return {f"pass@{k}": sum(pass_at_k(n, c, k) for n, c in counts) / len(counts)
            for k in ks if k <= fewest}
