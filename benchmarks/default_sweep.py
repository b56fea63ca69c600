"""Tuning sweep of the embedded default run: head-1 validation loss per configuration at equal budget.

Each candidate is a set of dotted overrides of the defaults (``megatrain train`` with no
arguments: the stdlib corpus, n_future=4 transformer heads). Every candidate gets the same
compute budget (``--budget-s``, default 180 s) and a cosine schedule that ends exactly at the end
of it, so its step count is decided before it trains, in two steps:

1. Calibration: a fresh process builds the candidate's run (``megatrain.trainer.setup``), runs
   ``--calib-warmup`` steps untimed, then ``--calib-steps`` steps, each timed with
   ``time.process_time`` (CPU seconds of the whole process, every torch thread included) and
   ``time.perf_counter`` (wall). Seconds per step = the median step's CPU seconds / the process's
   torch threads, i.e. each candidate gets ``budget x threads`` CPU seconds of optimizer steps.
   CPU time, not wall time, because the machine is shared: another process on the same cores
   stretches a step's wall time several-fold but leaves the work it takes nearly unchanged (the
   hypervisor's steal time is not charged to the process either). That holds only if idle threads
   sleep: with OpenMP's default spin-waiting a thread whose partner was descheduled burns CPU
   while it waits (measured on 2 shared cores at load ~6: 3.4-4.0 CPU s per step of the default
   model spinning, 1.17-1.36 s with passive waiting, 1.18-1.27 s on one thread), so every process
   the sweep starts runs with ``OMP_WAIT_POLICY=PASSIVE`` unless the environment sets it (the
   losses are bit-identical; only the waiting changes). Candidates whose steps cost the same
   (they differ only in the learning rate, warm-up or decay) share the first one's calibration,
   so they train the same number of steps.
2. Training: ``megatrain train`` with ``train.steps = floor(budget / seconds per step)`` (the
   cosine decays over exactly those steps), one validation at the last step
   (``train.eval_every = steps``) over the same ``--val-seqs`` validation windows for every
   candidate (``data.val_batches = val_seqs / batch_size``: the first windows of the val split),
   no intermediate checkpoints, no progress bar, no TensorBoard.

The budget covers the optimizer steps only: start-up, the validation, the final checkpoint and the
sample ``megatrain train`` prints at the end are outside it (the whole process's wall and CPU
seconds are reported too). Per candidate the table gives the overrides, parameters, the
calibrated seconds per step, steps, tokens seen, wall seconds of the training loop (sum of the
logged step times) and of the whole process, the process's CPU seconds (user + sys, from
``resource.getrusage(RUSAGE_CHILDREN)``), the 1-minute load average at the start and end of its
run, and the final validation loss of every head with head 1's accuracy.

    python benchmarks/default_sweep.py                                  # every candidate, appends docs
    python benchmarks/default_sweep.py --candidates base,lr1e-2 --budget-s 120
    python benchmarks/default_sweep.py --define 'wide=model.dim=192 train.lr=6e-3' --candidates wide
    python benchmarks/default_sweep.py --quick --out-md ''             # smoke test, prints only
    python benchmarks/default_sweep.py --reuse --work-dir /tmp/sweep --candidates base,lr2e-3
        # rows already trained in that --work-dir (same name, overrides, budget) are not trained again
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py
from tables import code_span, print_and_append  # benchmarks/tables.py

REPO = Path(__file__).resolve().parent.parent
QUIET = ["logging.progress=false", "logging.tensorboard=false", "checkpoint.every=0"]

# name -> overrides of the defaults; "base" is the defaults themselves
CANDIDATES: dict[str, list[str]] = {
    "base": [],
    "lr1e-2": ["train.lr=1e-2"],
    "lr2e-2": ["train.lr=2e-2"],
    "lr1e-3": ["train.lr=1e-3"],
    "bs8": ["train.batch_size=8"],
    "d192": ["model.dim=192"],
    "L8": ["model.n_layers=8"],
    "d96": ["model.dim=96"],
    # round 2: every change above lost to the defaults; a larger batch is the remaining direction
    "bs32": ["train.batch_size=32"],
    "bs32-lr6e-3": ["train.batch_size=32", "train.lr=6e-3"],
    "bs64-lr6e-3": ["train.batch_size=64", "train.lr=6e-3"],
    # round 3: the learning rate around the defaults' 3e-3, and the spread of a second seed
    "lr2e-3": ["train.lr=2e-3"],
    "lr5e-3": ["train.lr=5e-3"],
    "seed1": ["train.seed=1"],
}
QUICK = {"budget_s": 15.0, "calib_warmup": 1, "calib_steps": 3, "val_seqs": 16,
         "candidates": "base,lr1e-2"}
FULL = {"budget_s": 180.0, "calib_warmup": 3, "calib_steps": 8, "val_seqs": 256,
        "candidates": ",".join(CANDIDATES)}


# ---------------------------------------------------------------- calibration (child process)

def calibrate_child(overrides: list[str], warmup: int, steps: int) -> dict:
    """Build the run of ``overrides`` and time ``steps`` optimizer steps after ``warmup``."""
    import torch

    from megatrain.config import load_config
    from megatrain.trainer import setup, train_step

    cfg = load_config(None, overrides)
    run = setup(cfg)
    try:
        for _ in range(warmup):
            train_step(run)
        cpu, wall = [], []
        for _ in range(steps):
            c0, w0 = time.process_time(), time.perf_counter()
            train_step(run)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
        params = sum(p.numel() for stage in run.engine.stages for p in stage.parameters())
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
    return {"cpu": cpu, "wall": wall, "threads": torch.get_num_threads(), "params": params}


# ---------------------------------------------------------------- one candidate

@dataclass
class Row:
    name: str
    overrides: list[str]
    params: int = 0
    threads: int = 0
    s_per_step: float = 0.0  # calibrated: median CPU s per step / threads
    calib_wall_median: float = 0.0
    steps: int = 0
    tokens: int = 0
    loop_wall_s: float = 0.0  # sum of the logged step times
    process_wall_s: float = 0.0
    process_cpu_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    val_losses: list[float] = field(default_factory=list)
    val_acc1: float | None = None
    failed: str = ""
    reused: str = ""  # when the row comes from an earlier invocation's results.jsonl: its date
    shape: str = ""  # what a step's cost depends on (see step_shape)
    calib_from: str = ""  # the candidate whose calibration this one shares, if another's
    # the heads' loss weights its overrides resolved to when it ran: the defaults change over time
    # (rows written before this field trained with the unweighted sum)
    loss_weights: list[float] = field(default_factory=list)


def earlier_rows(work: Path, budget_s: float) -> dict[tuple[str, tuple[str, ...]], Row]:
    """Finished rows of earlier invocations in ``work`` at the same budget, by (name, overrides);
    the newest wins."""
    rows = {}
    path = work / "results.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        record = json.loads(line)
        if record.pop("budget_s") != budget_s or record["failed"]:
            continue
        when = datetime.datetime.fromtimestamp(record.pop("time")).strftime("%Y-%m-%d %H:%M")
        record.pop("reused", None)
        from megatrain.config import head_loss_weights, load_config
        cfg = load_config(None, record["overrides"])
        if not record.get("shape"):  # written before rows carried it
            record["shape"] = step_shape(cfg)
        record.setdefault("loss_weights", [1.0] * cfg.model.n_future)
        if record["loss_weights"] != head_loss_weights(cfg):  # trained under other default weights
            continue
        row = Row(**{**record, "load": tuple(record["load"])}, reused=when)
        rows[row.name, tuple(row.overrides)] = row
    return rows


def step_shape(cfg) -> str:
    """Everything a step's cost depends on: candidates that differ only elsewhere (learning rate,
    warm-up, decay) share one calibration, so they train the same number of steps."""
    t = cfg.train
    return json.dumps([dataclasses.asdict(cfg.model), cfg.data.seq_len, t.batch_size, t.micro_batch_size,
                       t.threads, t.compile, t.dtype, cfg.loss.impl])


def child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_candidate(name: str, overrides: list[str], args, work: Path, calibrated: dict[str, Row]) -> Row:
    """Calibrate (unless a candidate of the same step shape in ``calibrated`` was), then train."""
    from megatrain.config import head_loss_weights, load_config

    cfg = load_config(None, overrides)  # rejects a bad override before anything runs
    row = Row(name, overrides, shape=step_shape(cfg), loss_weights=head_loss_weights(cfg))
    root = work / name
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ, "PYTHONPATH": str(REPO)}

    if row.shape in calibrated:
        same = calibrated[row.shape]
        row.calib_from = same.calib_from or same.name
        row.params, row.threads = same.params, same.threads
        row.s_per_step, row.calib_wall_median = same.s_per_step, same.calib_wall_median
    else:
        calib = root / "calib"
        cmd = [sys.executable, __file__, "--calibrate-child", json.dumps(
            [f"run.dir={calib}", "train.eval_every=0", *QUIET, *overrides]),
            "--calib-warmup", str(args.calib_warmup), "--calib-steps", str(args.calib_steps)]
        out = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
        if out.returncode != 0:
            row.failed = f"calibration failed (exit {out.returncode}): {out.stderr[-2000:]}"
            return row
        calibration = json.loads(out.stdout.strip().splitlines()[-1])
        row.params, row.threads = calibration["params"], calibration["threads"]
        row.s_per_step = statistics.median(calibration["cpu"]) / row.threads
        row.calib_wall_median = statistics.median(calibration["wall"])
        calibrated[row.shape] = row
    row.steps = max(1, math.floor(args.budget_s / row.s_per_step))

    batch = cfg.train.batch_size
    run_dir = root / "run"
    train = [f"run.dir={run_dir}", f"train.steps={row.steps}", f"train.eval_every={row.steps}",
             f"data.val_batches={max(1, args.val_seqs // batch)}", *QUIET, *overrides]
    print(f"  {name}: {row.params / 1e6:.2f}M params, {row.s_per_step:.3f} s/step (CPU / "
          f"{row.threads} threads; median wall {row.calib_wall_median:.3f} s"
          f"{'; calibrated with ' + row.calib_from if row.calib_from else ''}) -> {row.steps} steps",
          flush=True)
    load_start, cpu_start, wall_start = os.getloadavg()[0], child_cpu_seconds(), time.perf_counter()
    with open(root / "train.log", "w") as log:
        done = subprocess.run([sys.executable, "-m", "megatrain", "train", *train], stdout=log,
                              stderr=subprocess.STDOUT, cwd=REPO, env=env)
    row.process_wall_s = time.perf_counter() - wall_start
    row.process_cpu_s = child_cpu_seconds() - cpu_start
    row.load = (load_start, os.getloadavg()[0])
    if done.returncode != 0:
        row.failed = f"training failed (exit {done.returncode}); see {root / 'train.log'}"
        return row
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "tokens_per_s" in r]
    evals = [r for r in records if "val_head_losses" in r]
    tokens_per_step = batch * cfg.data.seq_len
    row.loop_wall_s = sum(tokens_per_step / r["tokens_per_s"] for r in steps if r["tokens_per_s"] > 0)
    row.tokens = steps[-1]["tokens_seen"]
    row.steps = steps[-1]["step"]
    if evals:
        row.val_losses = evals[-1]["val_head_losses"]
        row.val_acc1 = evals[-1]["val_head_accuracy"][0]
    return row


# ---------------------------------------------------------------- table

def format_table(rows: list[Row], args, load: tuple[float, float]) -> str:
    budget = (f"steps = floor({args.budget_s:g} s / (median CPU s per step over {args.calib_steps} "
              f"calibration steps after {args.calib_warmup} warm-up steps, in a separate process, / the "
              f"process's torch threads))")
    lines = [f"### Tuning the embedded default at equal budget ({datetime.date.today()}, {machine_name()})",
             "",
             f"Command: {code_span(f'python benchmarks/default_sweep.py {shlex.join(sys.argv[1:])}')}. "
             f"Every candidate is `megatrain train` with its overrides on the embedded stdlib corpus "
             f"(BPE 4096), n_future=4 transformer heads, fp32 on CPU, OMP_WAIT_POLICY="
             f"{os.environ.get('OMP_WAIT_POLICY', 'PASSIVE')} (threads that wait sleep instead of "
             f"spinning, so CPU time measures work on shared cores). Budget: {budget}; the cosine "
             f"schedule decays over exactly those steps (after train.warmup_steps of linear warm-up). "
             f"The budget covers the optimizer steps only; start-up, the one validation at the last "
             f"step, the final checkpoint and the printed sample are outside it. Validation: the first "
             f"{args.val_seqs} windows of the val split for every candidate (data.val_batches = "
             f"{args.val_seqs} / batch size). s/step = the calibrated CPU seconds per step / threads; "
             f"loop wall = sum of the logged step times; process wall / CPU = the whole `megatrain "
             f"train` process (CPU = user + sys of all its threads). Load = 1-minute load average at the "
             f"start and end of the candidate's training. 1-minute load average {load[0]:.1f} at the "
             f"start of the sweep, {load[1]:.1f} at the end. {args.note}".rstrip(),
             "",
             "| candidate | overrides | params | threads | s/step (CPU/threads) | calib wall s/step "
             "| steps | tokens | loop wall (s) | process wall (s) | process CPU (s) | load start/end "
             "| head-1 val loss | val loss heads 1..4 | head-1 val acc |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        overrides = " ".join(f"`{o}`" for o in r.overrides) or "(defaults)"
        if r.failed:
            lines.append(f"| {r.name} | {overrides} | {r.failed.splitlines()[0]} |" + " |" * 12)
            continue
        losses = " ".join(f"{x:.3f}" for x in r.val_losses) or "-"
        head1 = f"**{r.val_losses[0]:.3f}**" if r.val_losses else "-"
        acc = f"{r.val_acc1:.3f}" if r.val_acc1 is not None else "-"
        name = f"{r.name} (run {r.reused})" if r.reused else r.name
        s_per_step = f"{r.s_per_step:.3f}" + (f" (= {r.calib_from})" if r.calib_from else "")
        lines.append(f"| {name} | {overrides} | {r.params / 1e6:.2f}M | {r.threads} | {s_per_step} "
                     f"| {r.calib_wall_median:.3f} | {r.steps} | {r.tokens} | {r.loop_wall_s:.0f} "
                     f"| {r.process_wall_s:.0f} | {r.process_cpu_s:.0f} | {r.load[0]:.1f} / {r.load[1]:.1f} "
                     f"| {head1} | {losses} | {acc} |")
    return "\n".join(lines)


# ---------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--candidates", help="comma-separated candidate names (default: all); known: "
                                             + ", ".join(CANDIDATES))
    parser.add_argument("--define", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="add a candidate: a name, '=', then space-separated dotted overrides, e.g. "
                             "'wide=model.dim=192 train.lr=6e-3' (repeatable); it runs when "
                             "--candidates names it, or always when --candidates is not given")
    parser.add_argument("--budget-s", type=float,
                        help=f"seconds of optimizer steps per candidate (default {FULL['budget_s']:g})")
    parser.add_argument("--calib-warmup", type=int, help="untimed calibration steps")
    parser.add_argument("--calib-steps", type=int, help="timed calibration steps")
    parser.add_argument("--val-seqs", type=int,
                        help=f"validation windows per candidate (default {FULL['val_seqs']})")
    parser.add_argument("--work-dir", default="/tmp/megatrain-default-sweep",
                        help="where the run directories go (a candidate's folder is replaced)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: " + ", ".join(f"{k} {v}" for k, v in QUICK.items()))
    parser.add_argument("--reuse", action="store_true",
                        help="take a candidate's row from an earlier invocation's --work-dir/results.jsonl "
                             "(same name, overrides and --budget-s) instead of training it again")
    parser.add_argument("--note", default="", help="a sentence added to the table's description")
    parser.add_argument("--out-md", default=str(REPO / "docs" / "benchmarks.md"),
                        help="markdown file the table is appended to; '' = print only")
    parser.add_argument("--calibrate-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    defined = {}
    for item in args.define:
        name, _, overrides = item.partition("=")
        if not name or not overrides:
            parser.error(f"--define {item!r}: give NAME=OVERRIDES, e.g. 'wide=model.dim=192'")
        defined[name] = overrides.split()
    args.defined = defined
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value if key != "candidates" or not defined else
                    ",".join([*CANDIDATES, *defined]))
    if args.budget_s <= 0 or args.calib_steps < 1 or args.calib_warmup < 0 or args.val_seqs < 1:
        parser.error("--budget-s, --calib-steps and --val-seqs must be positive, --calib-warmup >= 0")
    return args


def main() -> None:
    args = parse_args()
    if args.calibrate_child:
        print(json.dumps(calibrate_child(json.loads(args.calibrate_child), args.calib_warmup,
                                         args.calib_steps)))
        return
    known = {**CANDIDATES, **args.defined}
    names = [n for n in args.candidates.split(",") if n]
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"unknown candidate(s) {', '.join(unknown)}; known: {', '.join(known)} "
                 f"(or add one with --define NAME=OVERRIDES)")
    work = Path(args.work_dir)
    load_start = os.getloadavg()[0]
    print(f"{len(names)} candidates, {args.budget_s:g} s of steps each, run dirs in {work}", flush=True)
    rows = []
    earlier = earlier_rows(work, args.budget_s) if args.reuse else {}
    calibrated = {}  # step shape -> the first candidate calibrated with it
    for r in earlier.values():
        if r.shape and not r.calib_from:
            calibrated.setdefault(r.shape, r)
    for name in names:
        if (name, tuple(known[name])) in earlier:
            rows.append(earlier[name, tuple(known[name])])
            print(f"  {name}: reused from {work / 'results.jsonl'} ({rows[-1].reused})", flush=True)
            continue
        row = run_candidate(name, known[name], args, work, calibrated)
        rows.append(row)
        work.mkdir(parents=True, exist_ok=True)
        with open(work / "results.jsonl", "a") as f:  # kept as it goes, should a later one fail
            f.write(json.dumps({**row.__dict__, "budget_s": args.budget_s, "time": time.time()}) + "\n")
        if row.failed:
            print(f"  {name}: {row.failed}", file=sys.stderr, flush=True)
        else:
            print(f"  {name}: {row.steps} steps in {row.loop_wall_s:.0f} s of steps "
                  f"({row.process_wall_s:.0f} s process, {row.process_cpu_s:.0f} s CPU, load "
                  f"{row.load[0]:.1f}/{row.load[1]:.1f}): val loss "
                  f"{' '.join(f'{x:.3f}' for x in row.val_losses)}", flush=True)
    table = format_table(rows, args, (load_start, os.getloadavg()[0]))
    print_and_append(table, args.out_md)


if __name__ == "__main__":
    main()
