"""``megatrain submit`` and ``megatrain status``: argparse wiring for ``megatrain.cli``.

Importing this module needs neither submitit nor a SLURM cluster; only running ``submit`` does.
"""

from __future__ import annotations

import argparse


def add_submit_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    res = parser.add_argument_group("resources")
    res.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    res.add_argument("--gpus-per-node", type=int, default=0,
                     help="GPUs per node; one training process per GPU (default 0: CPU)")
    res.add_argument("--tasks-per-node", type=int, default=None,
                     help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    res.add_argument("--cpus-per-task", type=int, default=None, help="CPUs per process")
    res.add_argument("--mem-gb", type=float, default=None, help="memory per node in GB (0 = all of it)")
    res.add_argument("--partition", help="SLURM partition (default: the cluster's default)")
    res.add_argument("--account", help="SLURM account")
    res.add_argument("--qos", help="SLURM quality of service")
    res.add_argument("--constraint", help="SLURM node features, e.g. h100")
    res.add_argument("--time", type=int, default=60, dest="time_min",
                     help="time limit per run of the job, in minutes (default 60); the job "
                          "checkpoints and requeues itself before it")
    res.add_argument("--exclusive", action="store_true", help="whole nodes only")
    res.add_argument("--max-requeues", type=int, default=3,
                     help="requeues allowed (time limits, preemptions, node failures; default 3)")
    res.add_argument("--signal-delay-s", type=int, default=None,
                     help="seconds before the time limit the job is told to checkpoint (default "
                          "120, or half of --time if shorter); allow one step plus one checkpoint save")
    res.add_argument("--job-name", default="megatrain", help="SLURM job name")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resource request and the sbatch script; submit nothing")
    parser.add_argument("--device-memory-gb", type=float, default=80.0,
                        help="memory of one GPU in GB, for the memory plan of GPU jobs (default 80)")
    parser.add_argument("--no-plan-check", action="store_true",
                        help="submit a GPU job even when `megatrain plan` predicts it will not fit")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides, e.g. train.steps=100")


def resources_from_args(args):
    from megatrain.slurm.resources import Resources

    return Resources(nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                     tasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task,
                     mem_gb=args.mem_gb, partition=args.partition, account=args.account,
                     qos=args.qos, constraint=args.constraint, time_min=args.time_min,
                     exclusive=args.exclusive, max_requeues=args.max_requeues,
                     signal_delay_s=args.signal_delay_s, job_name=args.job_name)


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

