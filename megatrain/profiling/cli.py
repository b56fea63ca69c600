"""``megatrain profile memory``: arguments and the command."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_profile_memory_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_future=2")
    parser.add_argument("--steps", type=int, default=2, metavar="K",
                        help="profiled steps, after one warm-up step (default 2)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where memory_profile.json, memory_timeline.png (and on GPUs "
                             "rank<r>_snapshot.pickle) go; the profiled run itself goes in DIR/run")
    parser.add_argument("--compare-naive", action="store_true",
                        help="also profile the same steps with the naive all-logits loss and print both")


def run_profile_memory(args) -> int:
    from megatrain.config import load_config
    from megatrain.parallel import shutdown_distributed
    from megatrain.profiling.memory import profile_memory

    cfg = load_config(args.config, args.overrides)
    profile_memory(cfg, steps=args.steps, out_dir=Path(args.out), compare_naive=args.compare_naive)
    shutdown_distributed()  # with a process group: leaves it and exits
    return 0
