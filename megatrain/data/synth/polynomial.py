"""Modular polynomial arithmetic (the paper's algorithmic-reasoning task): expressions of k
operations over F_7[X]/(X^d), the answer after ``=``; by default the paper's ring F_7[X]/(X^5).

A polynomial is written as its d coefficients, constant term first, each one token ``0``..``6``.
An expression ``p0 op1 p1 op2 p2 ... opk pk = r`` is evaluated left to right (no precedence),
``op`` one of ``+ - *`` in the ring (products drop powers X^d and above, coefficients mod 7).
Training documents have ``train_ops`` operations; the validation split covers ``val_ops``, whose
counts above ``train_ops`` are out of the training distribution. Every problem (an expression
without its answer) is a training problem or a test problem, by a hash of its tokens and the seed
(one in ``HELD_OUT_EVERY``): training documents are drawn from training problems only and the
in-distribution validation documents from test problems only, so "in distribution" measures
arithmetic learnt, not answers remembered (in a ring as small as F_7 with one operation there are
only 147 problems, and 20k training documents hold every one of them). A smaller ring and fewer
operations make a task that small models learn within minutes (``megatrain.experiments``'s quick
variants); the dataset's manifest records the settings and the evaluation reads them from there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from megatrain.errors import DataError, UserError

P = 7  # the field F_7
DEGREE = 5  # default d: X^5 = 0, polynomials of 5 coefficients
TRAIN_OPS = (1, 5)  # default inclusive range of operations in training documents
VAL_OPS = (1, 8)  # default validation range: 6..8 are out of distribution
VAL_PER_OPS = 100  # validation documents per operation count (at least)
OPERATORS = ("+", "-", "*")
HELD_OUT_EVERY = 5  # one problem in five is a test problem
VERSION = 2  # bump when generated documents change (2: test problems held out of training)


def vocabulary() -> list[str]:
    """Token i's text; 0 is the EOS. Coefficient c is token 1 + c."""
    from megatrain.data_pipelines.vocab import EOS_TOKEN

    return [EOS_TOKEN, *(str(c) for c in range(P)), *OPERATORS, "="]


COEFF_IDS = range(1, 1 + P)
OP_IDS = {op: 1 + P + i for i, op in enumerate(OPERATORS)}
EQUALS_ID = 1 + P + len(OPERATORS)


@dataclass(frozen=True)
class Settings:
    """What a polynomial dataset was generated with; ``from_manifest`` reads it back."""

    degree: int = DEGREE
    train_ops: tuple[int, int] = TRAIN_OPS
    val_ops: tuple[int, int] = VAL_OPS

    def __post_init__(self):
        for name in ("train_ops", "val_ops"):  # tuples whatever came in (a manifest holds lists)
            value = tuple(getattr(self, name))
            if len(value) != 2 or not all(isinstance(v, int) for v in value):
                raise UserError(f"--{name.replace('_', '-')} must be a range LOW-HIGH of two integers, "
                                f"got {value}")
            object.__setattr__(self, name, value)
        if not isinstance(self.degree, int) or self.degree < 1:
            raise UserError(f"--degree must be an integer >= 1 (coefficients per polynomial), "
                            f"got {self.degree}")
        for flag, (low, high) in (("--train-ops", self.train_ops), ("--val-ops", self.val_ops)):
            if not 1 <= low <= high:
                raise UserError(f"{flag} must be a range LOW-HIGH with 1 <= LOW <= HIGH, got {low}-{high}")
        (low, high), (val_low, val_high) = self.train_ops, self.val_ops
        if val_high < low or val_low > high:
            raise UserError(f"--val-ops {val_low}-{val_high} shares no operation count with --train-ops "
                            f"{low}-{high}: validation would have nothing in distribution to compare with")

    def as_manifest(self) -> dict:
        return {"degree": self.degree, "train_ops": list(self.train_ops), "val_ops": list(self.val_ops)}

    @classmethod
    def from_manifest(cls, settings: dict, source: object) -> Settings:
        """The settings ``source`` (a dataset's manifest) records; a dataset written before they
        were recorded used the defaults. A DataError naming ``source`` if they are not valid."""
        try:
            return cls(settings.get("degree", DEGREE), tuple(settings.get("train_ops", TRAIN_OPS)),
                       tuple(settings.get("val_ops", VAL_OPS)))
        except (UserError, TypeError) as err:
            raise DataError(f"{source}: its polynomial settings are not valid ({err}); write the dataset "
                            f"again with `megatrain data synth polynomial`") from None

    @property
    def ring(self) -> str:
        """Its name: F_7[X]/(X^d), or F_7 for d = 1 (the integers mod 7)."""
        return f"F_{P}" if self.degree == 1 else f"F_{P}[X]/(X^{self.degree})"

    def in_distribution(self, n_ops: int) -> bool:
        return self.train_ops[0] <= n_ops <= self.train_ops[1]


def apply(op: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a op b`` in F_7[X]/(X^d), d the operands' length."""
    if op == "+":
        return (a + b) % P
    if op == "-":
        return (a - b) % P
    return np.convolve(a, b)[:len(a)] % P  # the product, truncated mod X^d


def expression(n_ops: int, rng: np.random.Generator, degree: int = DEGREE) -> list[int]:
    """One document: the expression's tokens, ``=``, the answer's ``degree`` coefficient tokens."""
    value = rng.integers(0, P, degree)
    tokens = [COEFF_IDS[0] + int(c) for c in value]
    for _ in range(n_ops):
        op = OPERATORS[int(rng.integers(len(OPERATORS)))]
        operand = rng.integers(0, P, degree)
        value = apply(op, value, operand)
        tokens += [OP_IDS[op]] + [COEFF_IDS[0] + int(c) for c in operand]
    return tokens + [EQUALS_ID] + [COEFF_IDS[0] + int(c) for c in value]


def longest_document(settings: Settings) -> int:
    """Tokens in a document of the most operations (without its EOS)."""
    most = max(settings.train_ops[1], settings.val_ops[1])
    return settings.degree * (most + 2) + most + 1


def answer_span(tokens: np.ndarray) -> tuple[int, int]:
    """(operations, position of ``=``) of a document; the answer is the tokens after ``=``."""
    equals = int(np.flatnonzero(tokens == EQUALS_ID)[0])
    n_ops = int(np.isin(tokens[:equals], list(OP_IDS.values())).sum())
    return n_ops, equals


def splits(examples: int, seed: int, settings: Settings = Settings()) -> dict[str, list[list[int]]]:
    """``examples`` training documents (operations uniform in ``train_ops``, training problems only)
    and a validation split with the same number of documents for every count in ``val_ops`` (test
    problems only where the count is in distribution), from independent streams."""
    rng = np.random.default_rng(seed)
    (low, high), (val_low, val_high), degree = settings.train_ops, settings.val_ops, settings.degree
    train = [_drawn(int(rng.integers(low, high + 1)), rng, degree, False, seed) for _ in range(examples)]
    val_rng = np.random.default_rng(seed + 1_000_003)
    per_ops = max(VAL_PER_OPS, examples // 50)
    # out-of-distribution counts never occur in training: any problem of them is a test problem
    val = [_drawn(k, val_rng, degree, True, seed) if settings.in_distribution(k)
           else expression(k, val_rng, degree)
           for k in range(val_low, val_high + 1) for _ in range(per_ops)]
    return {"train": train, "val": val}


def problem_of(document: list[int]) -> tuple[int, ...]:
    """A document's problem: its tokens up to ``=``."""
    return tuple(document[:document.index(EQUALS_ID)])


def is_test_problem(document: list[int], seed: int) -> bool:
    """Whether the problem of ``document`` (its tokens up to ``=``) is held out of training."""
    problem = problem_of(document)
    digest = hashlib.blake2b(bytes(problem), digest_size=8, key=seed.to_bytes(8, "little")).digest()
    return int.from_bytes(digest, "little") % HELD_OUT_EVERY == 0


def _drawn(n_ops: int, rng: np.random.Generator, degree: int, test: bool, seed: int) -> list[int]:
    """An expression of ``n_ops`` operations whose problem is a test problem or not, as asked."""
    while True:
        document = expression(n_ops, rng, degree)
        if is_test_problem(document, seed) == test:
            return document


def projected_problem(document: list[int], degree: int, lower: int) -> tuple[tuple[int, ...], bool]:
    """The problem of ``document`` (an expression over F_7[X]/(X^degree)) mapped to F_7[X]/(X^lower)
    by dropping every operand's coefficients from X^lower on, and whether all those were 0. The map
    is a ring homomorphism, so the answer's first ``lower`` coefficients answer the mapped problem:
    every problem of the larger ring carries one of the smaller (for lower = 1, its constant terms
    are an F_7 problem), and it is literally that problem when the dropped coefficients are all 0."""
    problem = problem_of(document)
    tokens, dropped_all_zero = [], True
    for start in range(0, len(problem), degree + 1):  # operand, operator, operand, ...
        operand = problem[start:start + degree]
        tokens += operand[:lower]
        dropped_all_zero &= all(t == COEFF_IDS[0] for t in operand[lower:])
        tokens += problem[start + degree:start + degree + 1]  # the operator after it, if any
    return tuple(tokens), dropped_all_zero


def problems_shared(train: list[list[int]], val: list[list[int]]) -> int:
    """How many validation documents pose a problem some training document poses."""
    seen = {problem_of(doc) for doc in train}
    return sum(problem_of(doc) in seen for doc in val)
