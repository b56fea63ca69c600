"""Code (paper §3.1-3.2 at toy scale): n=1 vs n=4 on the default code corpus (the Python standard
library, BPE 4096): per-head held-out loss, HumanEval greedy pass@1 and self-speculative tokens per
forward, all measured through ``megatrain eval`` (heldout, humaneval) as a user would.

At this scale HumanEval pass@1 is expected to be 0: the paper's gains appear at billions of
parameters and hundreds of billions of tokens. It is reported anyway, as measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from megatrain.experiments.common import RUN_DEFAULTS, Sizes, cell, default_jobs, train_runs
from megatrain.experiments.intervals import verdict

TASK = None  # the trainer's embedded default corpus, not a synthetic dataset
# options: humaneval_limit = the first K problems only (0: all 164)
QUICK = Sizes(examples=0, steps=150, seeds=(0, 1, 2), options={"humaneval_limit": 40},
              model={"model.n_layers": 6, "model.dim": 128, "model.n_heads": 4},
              train={"data.seq_len": 128, "train.batch_size": 16})
FULL = Sizes(examples=0, steps=2000, seeds=(0, 1, 2), options={"humaneval_limit": 0},
             model={"model.n_layers": 8, "model.dim": 256, "model.n_heads": 8},
             train={"data.seq_len": 256, "train.batch_size": 32})
QUICK_ARMS = FULL_ARMS = (1, 4)
MAX_NEW_TOKENS = 128
PAPER = ("n=4 is worse than n=1 at the smallest sizes and better from a few billion parameters (13B: 12% "
         "more HumanEval problems solved, §3.1); 4-token self-speculative decoding is up to 3× faster (§3.2)")


def megatrain_eval(run_dir: Path, task: str, *options: str, shared: bool = False) -> dict:
    """Run ``megatrain eval`` on ``run_dir`` and return its results file (or {"error": ...}).
    ``shared``: other evaluations run at the same time, so this one takes one torch thread, as
    every training run here does (RUN_DEFAULTS)."""
    out = run_dir / "eval" / f"experiment-{task}.json"
    command = [sys.executable, "-m", "megatrain", "eval", "--run-dir", str(run_dir), "--out", str(out),
               task, *options]
    env = {**os.environ, **({"OMP_NUM_THREADS": str(RUN_DEFAULTS["train.threads"])} if shared else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(out.read_text())


def run(sizes: Sizes, arms: tuple[int, ...], dataset: Path | None, work: Path, jobs: int = 1) -> dict:
    limit = sizes.options.get("humaneval_limit", 0)
    head_loss = {n: [] for n in arms}  # head 1 held-out loss per seed
    extra_heads = {n: [] for n in arms}  # mean loss of heads 2..n per seed
    pass1 = {n: [] for n in arms}
    per_forward = {n: [] for n in arms}
    errors = []
    runs = [(seed, n) for seed in sizes.seeds for n in arms]
    run_dirs = train_runs([(work / f"n{n}_seed{seed}", {
        **sizes.model, **sizes.train, "model.n_future": n, "train.steps": sizes.steps,
        "train.seed": seed, "checkpoint.every": 0}) for seed, n in runs], jobs)
    # the sandboxed test programs of `jobs` evaluations at once share the cores: fewer workers each,
    # so that a program's wall-clock limit is not spent waiting for a core
    workers = max(1, default_jobs() // max(1, jobs))
    options = ["--max-new-tokens", str(MAX_NEW_TOKENS), "--workers", str(workers),
               *(["--limit", str(limit)] if limit else [])]
    shared = jobs > 1

    def evaluate(run_dir: Path) -> tuple[dict, dict]:  # each eval is a process of its own
        return (megatrain_eval(run_dir, "heldout", shared=shared),
                megatrain_eval(run_dir, "humaneval", *options, shared=shared))

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        evaluations = list(pool.map(evaluate, run_dirs))
    for (seed, n), (heldout, humaneval) in zip(runs, evaluations):
        if "error" in heldout:
            errors.append(f"heldout n={n} seed {seed}: {heldout['error']}")
        else:
            head_loss[n].append(heldout["head_losses"][0])
            if n > 1:
                extra_heads[n].append(sum(heldout["head_losses"][1:]) / (n - 1))
        if "error" in humaneval:
            errors.append(f"humaneval n={n} seed {seed}: {humaneval['error']}")
        else:
            pass1[n].append(humaneval["modes"]["greedy"]["pass@1"])
            per_forward[n].append(humaneval["decoding"]["tokens_per_forward"])
    header = ["metric", *(f"n={n}" for n in arms)]

    def row(name, values):
        return [name, *(cell(values[n]) if values[n] else "—" for n in arms)]

    rows = [row("held-out loss, head 1", head_loss), row("held-out loss, heads 2..n (mean)", extra_heads),
            row(f"HumanEval greedy pass@1 ({limit or 164} problems)", pass1),
            row("tokens per forward (greedy; self-speculative for n>1)", per_forward)]
    lower_loss = verdict([-x for x in head_loss[4]], [-x for x in head_loss[1]])
    notes = [f"n=4 head-1 held-out loss below n=1's: {lower_loss}" if head_loss[1] and head_loss[4]
             else "held-out loss not measured", *errors]
    return {"header": header, "rows": rows, "paper": PAPER, "notes": notes,
            "metric": "held-out loss per head, HumanEval pass@1, speculative tokens per forward"}
