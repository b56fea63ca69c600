"""Induction (paper §4.1): do small models learn to complete a recurring name earlier with
2-token prediction than with next-token prediction?

Arms at equal parameters on ``data synth induction`` (version 3: three-token names in a counting
filler, so that head 2's targets around a name reward copying too): n=1, n=2, and the control n=2
with the second head's loss weight 0 (the same architecture trained for the next token only: what
differs from n=2 is the loss alone). Head 1's accuracy on the second token of a name's later
occurrences at several checkpoints; each comparison is paired by seed with a bootstrap interval
and a sign-flip test (intervals.py).
"""

from __future__ import annotations

from pathlib import Path

from megatrain.data.synth import induction
from megatrain.data.synth.dataset import read_documents
from megatrain.eval.synthetic import evaluate_induction
from megatrain.experiments.common import (
    Arm,
    Sizes,
    cell,
    comparisons,
    eval_steps,
    evaluate_run,
    shared_documents,
    train_runs,
)
from megatrain.experiments.intervals import verdict

TASK = "induction"
# 5 seeds x 3 arms, two runs at a time. 1000 steps: version 2's runs formed the induction head
# between 750 and 1750 steps at this size and lr (docs/results.md); version 3 gives it more to learn
# from. lr 3e-3: at 1e-2 over 2000 steps n=1 formed it in 2 seeds of 3 and n=2 in none (version 2).
# Version 3 forms it later: in 1000 steps no run did, in 2500 (`--steps 2500`, 58.9 min) n=1 in 0
# of 5 seeds, n=2 and its control in 2 each (docs/results.md).
QUICK = Sizes(examples=20_000, steps=1000, seeds=(0, 1, 2, 3, 4), eval_every=250,
              model={"model.n_layers": 4, "model.dim": 64, "model.n_heads": 4},
              train={"data.seq_len": 128, "train.batch_size": 16, "train.lr": 3e-3, "train.warmup_steps": 50})
FULL = Sizes(examples=200_000, steps=3000, seeds=(0, 1, 2, 3, 4), eval_every=500,
             model={"model.n_layers": 6, "model.dim": 128, "model.n_heads": 4},
             train={"data.seq_len": 128, "train.batch_size": 32, "train.lr": 3e-3, "train.warmup_steps": 100})
# accuracy on later occurrences at which a run counts as having formed induction: twice chance
FORMED = 2 / induction.N_SECOND
QUICK_ARMS = (Arm(1), Arm(2), Arm(2, extra_heads_weight=0.0))
FULL_ARMS = (*QUICK_ARMS, Arm(4))
PAPER = ("for small models (≤30M parameters) induction either forms only with multi-token prediction "
         "or is much better with it; n=2 above n=1 (§4.1; the advantage fades with size)")


def run(sizes: Sizes, arms: tuple[Arm, ...], dataset: Path, work: Path, jobs: int = 1) -> dict:
    steps = eval_steps(sizes)
    accuracy = {arm: {step: [] for step in steps} for arm in arms}  # arm -> step -> per seed
    runs = [(seed, arm) for seed in sizes.seeds for arm in arms]
    run_dirs = train_runs([(work / f"{arm.name}_seed{seed}", {
        **sizes.model, **sizes.train, **arm.overrides, "train.steps": sizes.steps,
        "train.seed": seed, "data.path": dataset, "checkpoint.every": sizes.eval_every or 0})
        for seed, arm in runs], jobs)
    for (_, arm), run_dir in zip(runs, run_dirs):
        for step in steps:
            result = evaluate_run(run_dir, step, evaluate_induction, dataset)
            accuracy[arm][step].append(result["accuracy"])
    header = ["step", *(arm.label for arm in arms)]
    rows = [[str(step), *(cell(accuracy[arm][step]) for arm in arms)] for step in steps]
    rows.append([f"first step ≥ {FORMED:.3f}, per seed", *(_formation(accuracy[arm], steps) for arm in arms)])
    notes = []
    for step in dict.fromkeys((steps[0], steps[len(steps) // 2], steps[-1])):
        for arm, other in comparisons(arms):
            against = "its control (the same model, head 2 unweighted)" if other.is_control else other.label
            notes.append(f"{arm.label} above {against} at step {step}: "
                         f"{verdict(accuracy[arm][step], accuracy[other][step])}")
    train, test = read_documents(dataset, "train"), read_documents(dataset, "val")
    notes.append(f"test documents also in the training split: {shared_documents(train, test)} of {len(test)}")
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
