"""What the experiments share: training one arm, evaluating its checkpoints, statistics over seeds
and the results file."""

from __future__ import annotations

import datetime
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from megatrain.data.synth.polynomial import Settings
from megatrain.files import atomic_write_text, exclusive_lock

REPO = Path(__file__).resolve().parents[2]
RESULTS_FILE = REPO / "docs" / "results.md"
# every run: quiet, no TensorBoard, keep every checkpoint (curves are read from them), one thread:
# these models are too small to gain from a second one, and on a shared 2-core machine OpenMP's
# spinning made a 2-thread run 20x slower than a 1-thread one (measured, same losses); the
# paper's loss, the unweighted sum over heads (the trainer's default weighs heads 2..n less); no
# head is trained on a target across a document boundary (its context cannot predict it)
RUN_DEFAULTS = {"logging.progress": False, "logging.tensorboard": False, "checkpoint.keep": 100,
                "train.eval_every": 0, "train.threads": 1, "loss.extra_heads_weight": 1.0,
                "loss.mask_cross_document": True}


@dataclass(frozen=True)
class Arm:
    """One arm: n heads, and the weight of heads 2..n in the loss. Weight 0 is the control that
    isolates the loss: the n-head architecture (its shallower trunk) trained as next-token only."""

    n_future: int
    extra_heads_weight: float = 1.0

    @property
    def is_control(self) -> bool:
        return self.n_future > 1 and self.extra_heads_weight == 0

    @property
    def label(self) -> str:
        return f"n={self.n_future}" + (" weight 0 (control)" if self.is_control else "")

    @property
    def name(self) -> str:
        return f"n{self.n_future}" + ("_w0" if self.is_control else "")

    @property
    def overrides(self) -> dict:
        return {"model.n_future": self.n_future, "loss.extra_heads_weight": self.extra_heads_weight}


def comparisons(arms: Sequence[Arm]) -> list[tuple[Arm, Arm]]:
    """The (arm, other) pairs a table reports: each multi-token arm against n=1 (the first arm), and
    against the control of its n_future when there is one."""
    baseline, control = arms[0], next((a for a in arms if a.is_control), None)
    pairs = []
    for arm in arms[1:]:
        if arm is control:
            continue
        pairs.append((arm, baseline))
        if control is not None and arm.n_future == control.n_future:
            pairs.append((arm, control))
    return pairs


def shared_documents(train: Sequence, test: Sequence) -> int:
    """How many test documents also occur (token for token) in the training split."""
    seen = {tuple(int(t) for t in doc) for doc in train}
    return sum(tuple(int(t) for t in doc) in seen for doc in test)


@dataclass
class Sizes:
    """One variant (quick or full) of an experiment."""

    examples: int  # training documents generated
    steps: int
    seeds: tuple[int, ...]
    model: dict  # model.* overrides shared by every arm
    train: dict = field(default_factory=dict)  # train.* / data.* overrides
    eval_every: int = 0  # evaluate checkpoints every this many steps too (0: the last one only)
    options: dict = field(default_factory=dict)  # an experiment's own knobs
    ring: Settings | None = None  # the polynomial task's ring and operation counts (None: the paper's)


def overrides_list(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def train_run(run_dir: Path, overrides: dict) -> Path:
    """Train one run from scratch (or finish it: an interrupted experiment resumes) in ``run_dir``."""
    from megatrain.config import load_config
    from megatrain.trainer import train

    started = time.perf_counter()
    cfg = load_config(None, overrides_list({**RUN_DEFAULTS, **overrides, "run.dir": run_dir}))
    result = train(cfg)
    losses = " ".join(f"{x:.3f}" for x in result.head_losses)
    print(f"  trained {run_dir.name}: step {result.step}, head losses [{losses}], "
          f"{time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return run_dir


def train_runs(specs: Sequence[tuple[Path, dict]], jobs: int = 1) -> list[Path]:
    """``train_run`` for each (run_dir, overrides), up to ``jobs`` at a time, each in a process of
    its own: every run uses one torch thread, so on a machine with k cores k runs at once finish in
    about the time of one. The processes are spawned, not forked: a fork of a process whose torch
    thread pools have started can deadlock in them."""
    if jobs <= 1 or len(specs) <= 1:
        return [train_run(run_dir, overrides) for run_dir, overrides in specs]
    from concurrent.futures import ProcessPoolExecutor
    from multiprocessing import get_context

    pool = ProcessPoolExecutor(min(jobs, len(specs)), mp_context=get_context("spawn"))
    futures = [pool.submit(train_run, run_dir, overrides) for run_dir, overrides in specs]
    try:
        for (run_dir, _), future in zip(specs, futures):
            try:
                future.result()
            except Exception as err:  # name the run, and do not train the queued ones first
                raise RuntimeError(f"training {run_dir} failed: {err}") from err
    finally:
        pool.shutdown(cancel_futures=True)
    return [run_dir for run_dir, _ in specs]


def evaluate_run(run_dir: Path, step: int | None, evaluate: Callable, dataset: Path,
                 batch_size: int = 64) -> dict:
    """``evaluate(model, cfg, dataset, device=, batch_size=)`` on the checkpoint of ``step``
    (None: the newest)."""
    from megatrain.inference.load import load_model

    model, cfg = load_model(run_dir, step)
    return evaluate(model, cfg, dataset, device="cpu", batch_size=batch_size)


def eval_steps(sizes: Sizes) -> list[int]:
    every = sizes.eval_every or sizes.steps
    return sorted({*range(every, sizes.steps + 1, every), sizes.steps})


def spread(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one value)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(values: Sequence[float], digits: int = 3) -> str:
    mean, std = spread(values)
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if len(values) > 1 else f"{mean:.{digits}f}"


def machine(jobs: int = 1) -> str:
    """The machine, how the runs shared it, and how busy it was: wall times on a shared machine are
    not the budget's."""
    load = os.getloadavg()[1]  # over the last 5 minutes
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores, {jobs} training run(s) at a time on "
            f"{RUN_DEFAULTS['train.threads']} torch thread each, load average {load:.1f} at the end")


def append_results(title: str, setting: str, header: Sequence[str], rows: Sequence[Sequence[str]],
                   paper: str, notes: Sequence[str], seconds: float, path: Path = RESULTS_FILE,
                   jobs: int = 1) -> str:
    """Add one experiment's table to ``path`` (created with its heading if absent), at the end of
    its current tables: before the appendix of superseded ones when the file has one. Returns it."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {title} — {stamp}", "", f"{setting}; {seconds / 60:.1f} min on {machine(jobs)}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines += ["", f"Paper: {paper}", ""]
    lines += [f"- {note}" for note in notes]
    block = "\n".join(lines).rstrip() + "\n"
    # read, insert, replace: under a lock, so that two experiments ending together keep both tables
    with exclusive_lock(path.with_name(path.name + ".lock")):
        text = path.read_text() if path.exists() else RESULTS_HEADING
        current, appendix, superseded = text.partition(APPENDIX_HEADING)
        atomic_write_text(path, current.rstrip("\n") + "\n\n" + block
                          + (("\n" + appendix + superseded) if appendix else ""))
    return block


# Tables under this heading are kept as the record of earlier settings; new tables go above it.
APPENDIX_HEADING = "## Appendix: superseded tables"
RESULTS_HEADING = """# Results: the paper's small experiments at our scale

Appended by `python -m megatrain.experiments NAME [--quick]` (megatrain/experiments/). Each table
compares parameter-matched models (`model.n_layers` fixed: n heads replace n-1 trunk layers) trained
on the same data with the same seeds; cells are mean ± sample standard deviation over the seeds.
Below each table: the paper's finding (its direction of effect, at its much larger scale) and
whether ours points the same way: the mean per-seed difference between arms with its paired
bootstrap 90% interval and an exact sign-flip test (megatrain/experiments/intervals.py); a finding
needs the interval to exclude zero.
"""
