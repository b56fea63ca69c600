"""The induction task (paper §4.1 style): text in which three-token names recur.

A document is a counting run of filler words (w17 w18 w19 ..., from a random start, wrapping
around) into which a few names are inserted, each several times. A name is three tokens, a first
part and two more, drawn at random anew in every document (first parts distinct within a
document), so after a first part the rest of the name is predictable only by looking back at that
name's earlier occurrence: an induction head. After a name the count goes on where it stopped.

So every target around a later occurrence is predictable except the first part itself: head 1
after the first part (the probe: copy the second part), head 2 there (copy the third part, two
ahead), and both heads after the name (the count resumes). Version 2 had two-token names in
uniformly random filler, where head 2's target around a name (the filler after it) was noise and
rewarded no copying: the second head had nothing to learn that could help induction form.

The probe is the accuracy of head 1 on the second token of a name's later occurrences; on first
occurrences it can do no better than chance (1 / ``N_SECOND``), which the evaluation reports as the
baseline.
"""

from __future__ import annotations

import numpy as np

N_FILLER, N_FIRST, N_SECOND = 64, 24, 24
NAME_TAIL = 2  # tokens after a name's first part, each drawn from the N_SECOND ids
NAMES_PER_DOC = (3, 4)  # inclusive range of the number of distinct names in a document
OCCURRENCES = (3, 5)  # inclusive range of how often each name appears
FILLER_PER_GAP = (1, 3)  # inclusive range of filler words before each name occurrence
# the longest document, so that a model trained on windows of 128 tokens sees whole documents
MAX_TOKENS = NAMES_PER_DOC[1] * OCCURRENCES[1] * (FILLER_PER_GAP[1] + 1 + NAME_TAIL)
VERSION = 3  # bump when generated documents change


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
    tails = SECOND_IDS.start + rng.integers(0, N_SECOND, (n_names, NAME_TAIL))  # may repeat
    order = np.repeat(np.arange(n_names), rng.integers(OCCURRENCES[0], OCCURRENCES[1] + 1, n_names))
    rng.shuffle(order)
    gaps = rng.integers(FILLER_PER_GAP[0], FILLER_PER_GAP[1] + 1, len(order))
    count = int(rng.integers(0, N_FILLER)) + np.arange(int(gaps.sum()))
    fillers = (FILLER_IDS.start + count % N_FILLER).tolist()
    tokens: list[int] = []
    start = 0
    for name, gap in zip(order.tolist(), gaps.tolist()):
        tokens += fillers[start:start + gap] + [int(firsts[name]), *map(int, tails[name])]
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
