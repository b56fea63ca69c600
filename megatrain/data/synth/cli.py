"""``megatrain data synth induction|polynomial --output DIR [--examples N] [--seed S]``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatrain.data.synth import induction, polynomial
from megatrain.data.synth.dataset import write_dataset
from megatrain.errors import UserError

TASKS = {"induction": induction, "polynomial": polynomial}
DEFAULT_EXAMPLES = 20_000


def add_synth_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("task", choices=sorted(TASKS), help="induction: recurring two-token names; "
                        "polynomial: arithmetic over F_7[X]/(X^5)")
    parser.add_argument("--output", required=True, help="folder to create (must be absent or empty)")
    parser.add_argument("--examples", type=int, default=DEFAULT_EXAMPLES,
                        help=f"training documents (default {DEFAULT_EXAMPLES}); the val split is sized "
                             f"from it")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    return parser


def make_synth_dataset(task: str, output: str | Path, examples: int = DEFAULT_EXAMPLES,
                       seed: int = 0) -> dict:
    """Generate and write the dataset; returns its manifest."""
    if examples < 1:
        raise UserError(f"--examples must be >= 1, got {examples}")
    module = TASKS[task]
    settings = {"task": task, "examples": examples, "seed": seed, "version": module.VERSION}
    return write_dataset(Path(output).expanduser(), module.vocabulary(), module.splits(examples, seed),
                         settings)


def run_synth(args: argparse.Namespace) -> int:
    manifest = make_synth_dataset(args.task, args.output, args.examples, args.seed)
    counts = ", ".join(f"{split} {s['documents']} documents / {s['tokens']} tokens"
                       for split, s in manifest["splits"].items())
    print(f"[data synth] {args.task} -> {args.output}: vocab {manifest['vocab_size']}, {counts}",
          file=sys.stderr)
    return 0
