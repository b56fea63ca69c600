"""``megatrain plan``: predict every rank's peak memory of a layout before submitting it."""

from __future__ import annotations

import argparse
import sys

from megatrain.planning.plan import EXIT_DOES_NOT_FIT, EXIT_FITS, make_plan, report

DEFAULT_DEVICE_MEMORY_GB = 80.0


def add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    world = parser.add_mutually_exclusive_group()
    world.add_argument("--world-size", type=int, help="processes (GPUs) in the job")
    world.add_argument("--nodes", type=int, help="nodes (with --gpus-per-node)")
    parser.add_argument("--gpus-per-node", type=int, help="GPUs per node (with --nodes)")
    parser.add_argument("--device-memory-gb", type=float, default=DEFAULT_DEVICE_MEMORY_GB,
                        help=f"memory of one GPU in GB (default {DEFAULT_DEVICE_MEMORY_GB:g})")
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. parallel.tp=8")


def world_size_of(args) -> int | None:
    from megatrain.errors import ConfigError

    if args.nodes is not None:
        if not args.gpus_per_node:
            raise ConfigError("--nodes needs --gpus-per-node (the world size is their product)")
        return args.nodes * args.gpus_per_node
    return args.world_size


def run_plan(args) -> int:
    from megatrain.config import load_config

    cfg = load_config(args.config, args.overrides)
    plan = make_plan(cfg, args.device_memory_gb, world_size_of(args))
    print(report(plan, as_json=args.json, gpus_per_node=args.gpus_per_node), file=sys.stdout)
    return EXIT_FITS if plan.fits else EXIT_DOES_NOT_FIT
