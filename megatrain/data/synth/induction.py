"""The induction task (paper §4.1 style): text in which two-token names recur.

A document is a run of random filler words in which a few names appear several times each. A name
is two tokens, a first part and a second part, paired at random anew in every document (first
parts distinct within a document), so after a first part the second part is predictable only by
looking back at that name's earlier occurrence: an induction head. The probe is the accuracy of
head 1 on the second token of a name's later occurrences; on first occurrences it can do no
better than chance (1 / ``N_SECOND``), which the evaluation reports as the baseline.
"""

from __future__ import annotations

import numpy as np

N_FILLER, N_FIRST, N_SECOND = 64, 24, 24
# Names are dense, so that small models form the induction head within the quick experiment's
# budget: version 1 (2-3 names, 2-4 occurrences, 2-8 fillers per gap) gave each name fewer later
# occurrences to learn from, and its quick runs (300 steps) never left chance. How soon runs on
# this version form it: docs/results.md, the induction tables of 12:21 and 12:36 UTC.
NAMES_PER_DOC = (3, 4)  # inclusive range of the number of distinct names in a document
OCCURRENCES = (3, 5)  # inclusive range of how often each name appears
FILLER_PER_GAP = (1, 4)  # inclusive range of filler words before each name occurrence
# the longest document, so that a model trained on windows of 128 tokens sees whole documents
MAX_TOKENS = NAMES_PER_DOC[1] * OCCURRENCES[1] * (FILLER_PER_GAP[1] + 2)
VERSION = 2  # bump when generated documents change


def vocabulary() -> list[str]:
    """Token i's text; 0 is the EOS (every synthetic vocabulary starts with it)."""
    from megatrain.data_pipelines.vocab import EOS_TOKEN

    return ([EOS_TOKEN] + [f"w{i:02d}" for i in range(N_FILLER)] + [f"A{i:02d}" for i in range(N_FIRST)]
            + [f"b{i:02d}" for i in range(N_SECOND)])


FILLER_IDS = range(1, 1 + N_FILLER)
FIRST_IDS = range(FILLER_IDS.stop, FILLER_IDS.stop + N_FIRST)
SECOND_IDS = range(FIRST_IDS.stop, FIRST_IDS.stop + N_SECOND)


def document(rng: np.random.Generator) -> list[int]:
    n_names = int(rng.integers(NAMES_PER_DOC[0], NAMES_PER_DOC[1] + 1))
    firsts = FIRST_IDS.start + rng.permutation(N_FIRST)[:n_names]  # distinct within a document
    seconds = SECOND_IDS.start + rng.integers(0, N_SECOND, n_names)  # two names may share one
    order = np.repeat(np.arange(n_names), rng.integers(OCCURRENCES[0], OCCURRENCES[1] + 1, n_names))
    rng.shuffle(order)
    gaps = rng.integers(FILLER_PER_GAP[0], FILLER_PER_GAP[1] + 1, len(order))
    fillers = (FILLER_IDS.start + rng.integers(0, N_FILLER, int(gaps.sum()))).tolist()
    tokens: list[int] = []
    start = 0
    for name, gap in zip(order.tolist(), gaps.tolist()):
        tokens += fillers[start:start + gap] + [int(firsts[name]), int(seconds[name])]
        start += gap
    return tokens


def documents(n: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [document(rng) for _ in range(n)]


def scored_positions(tokens: np.ndarray) -> tuple[list[int], list[int]]:
    """Positions p of name first parts whose next token (the second part, at p+1) is scored:
    (later occurrences, first occurrences)."""
    seen: set[int] = set()
    later, first = [], []
    for p, token in enumerate(tokens[:-1].tolist()):
        if token in FIRST_IDS:
            (later if token in seen else first).append(p)
            seen.add(token)
    return later, first


def splits(examples: int, seed: int) -> dict[str, list[list[int]]]:
    """``examples`` training documents and a tenth as many (at least 200) validation documents,
    from independent streams of the seed."""
    return {"train": documents(examples, seed), "val": documents(max(200, examples // 10), seed + 1_000_003)}
