"""Algorithmic reasoning (paper §4.2): accuracy on modular polynomial arithmetic by number of
operations, in and out of the training distribution, at equal parameters: n=1, n=2 and its control
(the same n=2 model with the second head's loss weight 0: what differs from n=2 is the loss alone),
and n=4 in the full variant. Greedy answer exact match (megatrain/eval/synthetic.py); every
comparison paired by seed with a bootstrap interval and a sign-flip test (intervals.py). The test
problems are held out of training (data/synth/polynomial.py, version 2): the table says how many
validation documents pose a training problem (none, by construction; counted from the data).

The full variant is the paper's task, F_7[X]/(X^5) with 1-5 operations in training. The quick one
shrinks the ring to F_7 (degree 1: arithmetic mod 7) with one operation in training and two out of
distribution: on 2 CPU cores a 0.33M-parameter model learns single operations mod 7 within ~1500
steps, but in 3000 steps none of the harder settings tried (F_7[X]/(X^2) with 1-2 operations,
F_7[X]/(X^3) with 1-3, F_7 with 1-3; numbers in docs/results.md, the 12:48 UTC polynomial reading),
and a task no arm learns can show no effect.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.data.synth import polynomial as task
from megatrain.data.synth.dataset import read_documents
from megatrain.eval.synthetic import DISTRIBUTION, evaluate_polynomial
from megatrain.experiments.common import Arm, Sizes, cell, comparisons, evaluate_run, train_runs
from megatrain.experiments.intervals import verdict

TASK = "polynomial"
QUICK_RING = task.Settings(degree=1, train_ops=(1, 1), val_ops=(1, 2))
# 5 seeds x 3 arms, two runs at a time: 23.3 min on 2 cores at 1500 steps (2026-12-06), over the
# 15-minute quick budget; held-out problems need more steps still (docs/results.md says why)
QUICK = Sizes(examples=20_000, steps=1500, seeds=(0, 1, 2, 3, 4), ring=QUICK_RING,
              model={"model.n_layers": 6, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 64, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 50})
FULL = Sizes(examples=200_000, steps=5000, seeds=(0, 1, 2), ring=task.Settings(),
             model={"model.n_layers": 8, "model.dim": 256, "model.n_heads": 8},
             train={"data.seq_len": 64, "train.batch_size": 64, "train.lr": 1e-3, "train.warmup_steps": 200})
QUICK_ARMS = (Arm(1), Arm(2), Arm(2, extra_heads_weight=0.0))
FULL_ARMS = (*QUICK_ARMS, Arm(4))
PAPER = ("multi-token prediction improves accuracy at every number of operations, with large relative "
         "gains out of distribution despite low absolute numbers (§4.2, Fig. 8)")


def ring_of(sizes: Sizes) -> task.Settings:
    """The generator settings of a variant: its own, else the paper's."""
    return sizes.ring or task.Settings()


def scores_coefficients(ring: task.Settings) -> bool:
    """Whether the share of answer coefficients right says more than exact match: with one
    coefficient per answer the two are the same number."""
    return ring.degree > 1


def metric(ring: task.Settings, after: str = "") -> str:
    """What the table measures."""
    if not scores_coefficients(ring):
        return f"greedy exact match of the answer in F_7 (integers mod 7){after}"
    exact = f"greedy exact match of the answer in {ring.ring}{after}"
    return f"{exact}, and the share of its {ring.degree} coefficients right (teacher-forced, chance 1/7)"


def run(sizes: Sizes, arms: tuple[Arm, ...], dataset: Path, work: Path, jobs: int = 1) -> dict:
    exact: dict[Arm, dict] = {arm: {} for arm in arms}  # arm -> (operations, distribution) -> per seed
    coefficients: dict[Arm, dict] = {arm: {} for arm in arms}  # the same, per answer coefficient
    runs = [(seed, arm) for seed in sizes.seeds for arm in arms]
    run_dirs = train_runs([(work / f"{arm.name}_seed{seed}", {
        **sizes.model, **sizes.train, **arm.overrides, "train.steps": sizes.steps,
        "train.seed": seed, "data.path": dataset, "checkpoint.every": 0}) for seed, arm in runs], jobs)
    for (_, arm), run_dir in zip(runs, run_dirs):
        result = evaluate_run(run_dir, None, evaluate_polynomial, dataset, batch_size=128)
        for row in result["table"]:
            key = (row["operations"], row["distribution"])
            exact[arm].setdefault(key, []).append(row["exact_match"])
            coefficients[arm].setdefault(key, []).append(row["coefficient_accuracy"])
        exact[arm].setdefault(("all", "in"), []).append(result["in_distribution_accuracy"])
        exact[arm].setdefault(("all", "out"), []).append(result["out_of_distribution_accuracy"])
        for kind in ("in", "out"):
            coefficients[arm].setdefault(("all", kind), []).append(
                result[DISTRIBUTION[kind] + "_coefficient_accuracy"])
    keys = sorted(k for k in exact[arms[0]] if k[0] != "all") + [("all", "in"), ("all", "out")]
    ring = ring_of(sizes)
    # exact match is the paper's measure; the share of right answer coefficients (chance 1/7) shows
    # progress long before whole answers come out right
    measures = (("exact match", exact),)
    if scores_coefficients(ring):
        measures += (("coefficients", coefficients),)
    header = ["operations", "distribution",
              *(f"{arm.label} {name.split()[0]}" for name, _ in measures for arm in arms)]
    rows = [[str(ops), kind, *(cell(values[arm][(ops, kind)]) for _, values in measures for arm in arms)]
            for ops, kind in keys]
    notes = []
    for name, values in measures:
        for kind in ("in", "out"):
            for arm, other in comparisons(arms):
                against = "its control (head 2 unweighted)" if other.is_control else other.label
                notes.append(f"{arm.label} above {against}, {kind} distribution, {name}: "
                             f"{verdict(values[arm][('all', kind)], values[other][('all', kind)])}")
    train, test = read_documents(dataset, "train"), read_documents(dataset, "val")
    notes.append(f"validation documents posing a problem that a training document poses: "
                 f"{task.problems_shared(_listed(train), _listed(test))} of {len(test)}")
    return {"header": header, "rows": rows, "paper": PAPER, "notes": notes, "metric": metric(ring)}


def _listed(documents) -> list[list[int]]:
    return [[int(t) for t in doc] for doc in documents]
