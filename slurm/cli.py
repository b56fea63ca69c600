"""``megatrain submit`` and ``megatrain status``: argparse wiring for ``megatrain.cli``.

Importing this module needs neither submitit nor a SLURM cluster; only running ``submit`` does.
"""

from __future__ import annotations

import argparse
import dataclasses

from megatrain.cli_fields import add_field_arguments, field_values
from megatrain.slurm.resources import Resources

RESOURCE_FIELDS = [f.name for f in dataclasses.fields(Resources)]


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    res = parser.add_argument_group("resources")
    add_field_arguments(res, Resources, RESOURCE_FIELDS)
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resource request and the sbatch script; submit nothing")
    parser.add_argument("--device-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GB, for the memory plan of GPU jobs (default 80)")
    parser.add_argument("--no-plan-check", action="store_true",
                        help="submit a GPU job even when `megatrain plan` predicts it will not fit")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")


def resources_from_args(args):
    return Resources(**field_values(args, RESOURCE_FIELDS))


def run_submit(args) -> int:
    from megatrain.config import load_config
    from megatrain.slurm.submit import submit

    cfg = load_config(args.config, args.overrides)  # a bad key stops here, before anything else
    result = submit(cfg, resources_from_args(args), dry_run=args.dry_run, command=args.command_line,
                    plan_check=not args.no_plan_check, device_memory_gb=args.device_memory_gb)
    print(f"resources: {result.resources.describe()}")
    if args.dry_run:
        print(f"run dir: {result.run_dir} (dry run: nothing written, nothing queued)")
        print("sbatch script:")
        print(result.sbatch_script)
        return 0
    print(f"submitted job {result.job_id}; run dir {result.run_dir}")
    print(f"logs: {result.stdout}\n      {result.stderr}")
    print(f"follow it with: megatrain status {result.run_dir}")
    return 0


def add_status_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="run directory of a submitted run (its run.dir)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run_status(args) -> int:
    from megatrain.slurm.status import collect, format_status, to_json

    status = collect(args.run_dir)
    print(to_json(status) if args.json else format_status(status))
    return 0

