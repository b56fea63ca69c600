"""``megatrain data synth induction|polynomial --output DIR [--examples N] [--seed S]``, and for
polynomial ``[--degree D] [--train-ops LOW-HIGH] [--val-ops LOW-HIGH]``."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

from megatrain.data.synth import induction, polynomial
from megatrain.data.synth.dataset import SYNTH_KEY, write_dataset
from megatrain.errors import UserError

TASKS = {"induction": induction, "polynomial": polynomial}
DEFAULT_EXAMPLES = 20_000


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("task", choices=sorted(TASKS), help="induction: recurring two-token names; "
                        "polynomial: arithmetic over F_7[X]/(X^5) by default")
    parser.add_argument("--output", required=True, help="folder to create (must be absent or empty)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"training documents (default {DEFAULT_EXAMPLES}); the val split is sized "
                             f"from it")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    ring = polynomial.Settings()
    parser.add_argument("--degree", type=int, help=f"polynomial only: coefficients per polynomial, the "
                        f"ring F_7[X]/(X^D) (default {ring.degree}, the paper's)")
    parser.add_argument("--train-ops", type=_ops_range, help=f"polynomial only: operations per training "
                        f"expression, LOW-HIGH or K (default {_show(ring.train_ops)})")
    parser.add_argument("--val-ops", type=_ops_range, help=f"polynomial only: operations per validation "
                        f"expression; counts above --train-ops are out of distribution (default "
                        f"{_show(ring.val_ops)})")
    return parser


def _ops_range(text: str) -> tuple[int, int]:
    low, dash, high = text.partition("-")
    try:
        if dash and not high:
            raise ValueError(text)
        return int(low), int(high or low)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW-HIGH or K (e.g. 1-5), got {text!r}") from None


def _show(ops: tuple[int, int]) -> str:
    return f"{ops[0]}-{ops[1]}"


def make_synth_dataset(task: str, output: str | Path, examples: int = DEFAULT_EXAMPLES, seed: int = 0,
                       ring: polynomial.Settings | None = None) -> dict:
    """Generate and write the dataset; returns its manifest. ``ring``: the polynomial task's
    settings (default: the paper's); refused for the induction task."""
    if examples < 1:
        raise UserError(f"--examples must be >= 1, got {examples}")
    module = TASKS[task]
    settings = {"task": task, "examples": examples, "seed": seed, "version": module.VERSION}
    if task == "polynomial":
        ring = ring or polynomial.Settings()
        settings.update(ring.as_manifest())
        splits = polynomial.splits(examples, seed, ring)
    elif ring is not None:
        raise UserError(_not_polynomial(task, "--degree, --train-ops, --val-ops"))
    else:
        splits = module.splits(examples, seed)
    return write_dataset(Path(output).expanduser(), module.vocabulary(), splits, settings)


def _not_polynomial(task: str, flags: str) -> str:
    return f"{flags}: polynomial settings; the {task} task has none"


def run_synth(args: argparse.Namespace) -> int:
    ring = None
    given = {key: value for key, value in (("degree", args.degree), ("train_ops", args.train_ops),
                                           ("val_ops", args.val_ops)) if value is not None}
    if given:
        if args.task != "polynomial":  # said before the values are checked: none of them apply
            flags = ", ".join("--" + key.replace("_", "-") for key in given)
            raise UserError(_not_polynomial(args.task, flags))
        ring = replace(polynomial.Settings(), **given)
    manifest = make_synth_dataset(args.task, args.output, args.examples, args.seed, ring)
    counts = ", ".join(f"{split} {s['documents']} documents / {s['tokens']} tokens"
                       for split, s in manifest["splits"].items())
    described = ""
    if args.task == "polynomial":
        written = polynomial.Settings.from_manifest(manifest[SYNTH_KEY], args.output)
        described = (f" ({written.ring}, training operations {_show(written.train_ops)}, validation "
                     f"{_show(written.val_ops)})")
    print(f"[data synth] {args.task}{described} -> {args.output}: vocab {manifest['vocab_size']}, {counts}",
          file=sys.stderr)
    return 0
