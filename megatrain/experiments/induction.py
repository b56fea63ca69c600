"""Induction (paper §4.1): do small models learn to complete a recurring two-token name earlier
with 2-token prediction than with next-token prediction?

Arms n=1 and n=2 (and n=4 in the full variant) at equal parameters, on ``data synth induction``;
head 1's accuracy on the second token of a name's later occurrences at several checkpoints.
"""

from __future__ import annotations

from pathlib import Path

from megatrain.data.synth import induction
from megatrain.eval.synthetic import evaluate_induction
from megatrain.experiments.common import Sizes, cell, eval_steps, evaluate_run, train_runs
from megatrain.experiments.intervals import verdict

TASK = "induction"
# 2000 steps: six runs two at a time fit the quick budget, and most runs form the induction head
# within it (first steps at twice chance, seeds 0/1/2: n=1 750 / never / 1250, n=2 1500 / 1250 /
# 1750; at 300 steps no arm left chance). lr 3e-3: at 1e-2 over the same 2000 steps n=1 formed it
# in 2 seeds of 3 (1500, 1250) and n=2 in none (docs/results.md, 12:36 and 12:21 UTC tables).
QUICK = Sizes(examples=20_000, steps=2000, seeds=(0, 1, 2), eval_every=250,
              model={"model.n_layers": 4, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 128, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 50})
FULL = Sizes(examples=200_000, steps=3000, seeds=(0, 1, 2), eval_every=500,
             model={"model.n_layers": 6, "model.dim": 128, "model.n_heads": 4},
             train={"data.seq_len": 128, "train.batch_size": 32, "train.lr": 3e-3, "train.warmup_steps": 100})
# accuracy on later occurrences at which a run counts as having formed induction: twice chance
FORMED = 2 / induction.N_SECOND
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
    rows.append([f"first step ≥ {FORMED:.3f}, per seed", *(_formation(accuracy[n], steps) for n in arms)])
    first_step = steps[0]
    middle = steps[len(steps) // 2]
    notes = [f"n={n} above n=1 at step {step}: {verdict(accuracy[n][step], accuracy[1][step])}"
             for n in arms if n != 1 for step in dict.fromkeys((first_step, middle, steps[-1]))]
    return {"header": header, "rows": rows, "paper": PAPER, "notes": notes, "metric":
            f"head-1 accuracy on the second token of a name's later occurrences (chance "
            f"1/{induction.N_SECOND}); a run has formed induction once it reaches twice chance"}


def _formation(by_step: dict[int, list[float]], steps: list[int]) -> str:
    """The first evaluated step at which each seed's accuracy reached FORMED ("—": never)."""
    firsts = []
    for seed in range(len(by_step[steps[0]])):
        reached = [step for step in steps if by_step[step][seed] >= FORMED]
        firsts.append(str(reached[0]) if reached else "—")
    return " / ".join(firsts)
