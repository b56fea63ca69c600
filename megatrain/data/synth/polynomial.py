"""Modular polynomial arithmetic (the paper's algorithmic-reasoning task): expressions of k
operations over F_7[X]/(X^5), the answer after ``=``.

A polynomial is written as its 5 coefficients, constant term first, each one token ``0``..``6``.
An expression ``p0 op1 p1 op2 p2 ... opk pk = r`` is evaluated left to right (no precedence),
``op`` one of ``+ - *`` in the ring (products drop powers X^5 and above, coefficients mod 7).
Training documents have ``TRAIN_OPS`` operations; the validation split covers ``VAL_OPS``, whose
larger counts are out of the training distribution.
"""

from __future__ import annotations

import numpy as np

P = 7  # the field F_7
DEGREE = 5  # X^5 = 0: polynomials of 5 coefficients
TRAIN_OPS = (1, 5)  # inclusive range of operations in training documents
VAL_OPS = (1, 8)  # validation: 6..8 are out of distribution
VAL_PER_OPS = 100  # validation documents per operation count (at least)
OPERATORS = ("+", "-", "*")
VERSION = 1  # bump when generated documents change


def vocabulary() -> list[str]:
    """Token i's text; 0 is the EOS. Coefficient c is token 1 + c."""
    from megatrain.data_pipelines.vocab import EOS_TOKEN

    return [EOS_TOKEN, *(str(c) for c in range(P)), *OPERATORS, "="]


COEFF_IDS = range(1, 1 + P)
OP_IDS = {op: 1 + P + i for i, op in enumerate(OPERATORS)}
EQUALS_ID = 1 + P + len(OPERATORS)


def apply(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if op == "+":
        return (a + b) % P
    if op == "-":
        return (a - b) % P
    return np.convolve(a, b)[:DEGREE] % P  # the product, truncated mod X^5


def expression(n_ops: int, rng: np.random.Generator) -> list[int]:
    """One document: the expression's tokens, ``=``, the answer's 5 coefficient tokens."""
    value = rng.integers(0, P, DEGREE)
    tokens = [COEFF_IDS[0] + int(c) for c in value]
    for _ in range(n_ops):
        op = OPERATORS[int(rng.integers(len(OPERATORS)))]
        operand = rng.integers(0, P, DEGREE)
        value = apply(op, value, operand)
        tokens += [OP_IDS[op]] + [COEFF_IDS[0] + int(c) for c in operand]
    return tokens + [EQUALS_ID] + [COEFF_IDS[0] + int(c) for c in value]


def answer_span(tokens: np.ndarray) -> tuple[int, int]:
    """(operations, position of ``=``) of a document; the answer is the DEGREE tokens after ``=``."""
    equals = int(np.flatnonzero(tokens == EQUALS_ID)[0])
    n_ops = int(np.isin(tokens[:equals], list(OP_IDS.values())).sum())
    return n_ops, equals


def splits(examples: int, seed: int) -> dict[str, list[list[int]]]:
    """``examples`` training documents (operations uniform in TRAIN_OPS) and a validation split
    with the same number of documents for every count in VAL_OPS, from independent streams."""
    rng = np.random.default_rng(seed)
    train = [expression(int(rng.integers(TRAIN_OPS[0], TRAIN_OPS[1] + 1)), rng) for _ in range(examples)]
    val_rng = np.random.default_rng(seed + 1_000_003)
    per_ops = max(VAL_PER_OPS, examples // 50)
    val = [expression(k, val_rng) for k in range(VAL_OPS[0], VAL_OPS[1] + 1) for _ in range(per_ops)]
    return {"train": train, "val": val}
