"""Algorithmic reasoning (paper §4.2): accuracy on polynomial arithmetic over F_7[X]/(X^5) by
number of operations, in (1-5) and out (6-8) of the training distribution, for n=1, 2, 4 at equal
parameters. Greedy answer exact match (megatrain/eval/synthetic.py)."""

from __future__ import annotations

from pathlib import Path

from megatrain.eval.synthetic import DISTRIBUTION, evaluate_polynomial
from megatrain.experiments.common import Sizes, cell, direction, evaluate_run, train_runs

TASK = "polynomial"
QUICK = Sizes(examples=20_000, steps=300, seeds=(0, 1, 2),
              model={"model.n_layers": 6, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 64, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 20})
FULL = Sizes(examples=200_000, steps=5000, seeds=(0, 1, 2),
             model={"model.n_layers": 8, "model.dim": 256, "model.n_heads": 8},
             train={"data.seq_len": 64, "train.batch_size": 64, "train.lr": 1e-3, "train.warmup_steps": 200})
QUICK_ARMS = FULL_ARMS = (1, 2, 4)
PAPER = ("multi-token prediction improves accuracy at every number of operations, with large relative "
         "gains out of distribution despite low absolute numbers (§4.2, Fig. 8)")


def run(sizes: Sizes, arms: tuple[int, ...], dataset: Path, work: Path, jobs: int = 1) -> dict:
    exact: dict[int, dict] = {n: {} for n in arms}  # n -> (operations, distribution) -> per seed
    coefficients: dict[int, dict] = {n: {} for n in arms}  # the same, per answer coefficient
    runs = [(seed, n) for seed in sizes.seeds for n in arms]
    run_dirs = train_runs([(work / f"n{n}_seed{seed}", {
        **sizes.model, **sizes.train, "model.n_future": n, "train.steps": sizes.steps,
        "train.seed": seed, "data.path": dataset, "checkpoint.every": 0}) for seed, n in runs], jobs)
    for (_, n), run_dir in zip(runs, run_dirs):
        result = evaluate_run(run_dir, None, evaluate_polynomial, dataset, batch_size=128)
        for row in result["table"]:
            key = (row["operations"], row["distribution"])
            exact[n].setdefault(key, []).append(row["exact_match"])
            coefficients[n].setdefault(key, []).append(row["coefficient_accuracy"])
        exact[n].setdefault(("all", "in"), []).append(result["in_distribution_accuracy"])
        exact[n].setdefault(("all", "out"), []).append(result["out_of_distribution_accuracy"])
        for kind in ("in", "out"):
            coefficients[n].setdefault(("all", kind), []).append(
                result[DISTRIBUTION[kind] + "_coefficient_accuracy"])
    keys = sorted(k for k in exact[arms[0]] if k[0] != "all") + [("all", "in"), ("all", "out")]
    # exact match is the paper's measure; the share of right answer coefficients (chance 1/7) shows
    # progress long before whole answers come out right
    header = ["operations", "distribution", *(f"n={n} exact" for n in arms),
              *(f"n={n} coefficients" for n in arms)]
    rows = [[str(ops), kind, *(cell(exact[n][(ops, kind)]) for n in arms),
             *(cell(coefficients[n][(ops, kind)]) for n in arms)] for ops, kind in keys]
    notes = [f"n={n} above n=1 {kind} distribution, {name}: "
             f"{direction(values[n][('all', kind)], values[1][('all', kind)])}"
             for name, values in (("exact match", exact), ("coefficients", coefficients))
             for n in arms if n != 1 for kind in ("in", "out")]
    return {"header": header, "rows": rows, "paper": PAPER, "notes": notes,
            "metric": "greedy exact match of the answer polynomial, and the share of its 5 coefficients "
                      "right (teacher-forced, chance 1/7)"}
