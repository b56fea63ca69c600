"""Induction (paper §4.1): do small models learn to complete a recurring two-token name earlier
with 2-token prediction than with next-token prediction?

Arms n=1 and n=2 (and n=4 in the full variant) at equal parameters, on ``data synth induction``;
head 1's accuracy on the second token of a name's later occurrences at several checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.eval.synthetic import evaluate_induction
from megatrain.experiments.common import Sizes, cell, direction, eval_steps, evaluate_run, train_runs

TASK = "induction"
QUICK = Sizes(examples=20_000, steps=300, seeds=(0, 1, 2), eval_every=100,
              model={"model.n_layers": 4, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 128, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 20})
FULL = Sizes(examples=200_000, steps=3000, seeds=(0, 1, 2), eval_every=500,
             model={"model.n_layers": 6, "model.dim": 128, "model.n_heads": 4},
             train={"data.seq_len": 128, "train.batch_size": 32, "train.lr": 3e-3, "train.warmup_steps": 100})
QUICK_ARMS, FULL_ARMS = (1, 2), (1, 2, 4)
PAPER = ("for small models (≤30M parameters) induction either forms only with multi-token prediction "
         "or is much better with it; n=2 above n=1 (§4.1; the advantage fades with size)")


def run(sizes: Sizes, arms: tuple[int, ...], dataset: Path, work: Path, jobs: int = 1) -> dict:
    steps = eval_steps(sizes)
    accuracy = {n: {step: [] for step in steps} for n in arms}  # n -> step -> per seed
    runs = [(seed, n) for seed in sizes.seeds for n in arms]
    run_dirs = train_runs([(work / f"n{n}_seed{seed}", {
        **sizes.model, **sizes.train, "model.n_future": n, "train.steps": sizes.steps,
        "train.seed": seed, "data.path": dataset, "checkpoint.every": sizes.eval_every or 0})
        for seed, n in runs], jobs)
    for (_, n), run_dir in zip(runs, run_dirs):
        for step in steps:
            result = evaluate_run(run_dir, step, evaluate_induction, dataset)
            accuracy[n][step].append(result["accuracy"])
    header = ["step", *(f"n={n}" for n in arms)]
    rows = [[str(step), *(cell(accuracy[n][step]) for n in arms)] for step in steps]
    first_step = steps[0]
    verdict = direction(accuracy[2][first_step], accuracy[1][first_step])
    final = direction(accuracy[2][steps[-1]], accuracy[1][steps[-1]])
    return {"header": header, "rows": rows, "paper": PAPER, "metric":
            "head-1 accuracy on the second token of a name's later occurrences (chance 1/24)",
            "notes": [f"n=2 above n=1 at step {first_step} (earlier): {verdict}",
                      f"n=2 above n=1 at step {steps[-1]} (end): {final}"]}
