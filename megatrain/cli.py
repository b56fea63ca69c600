"""megatrain: train, prepare data for, submit and inspect multi-token prediction runs.

Subcommands: ``train``, ``generate``, ``eval``, ``export``, ``data prepare``, ``data synth``, ``config``,
``profile memory``, ``submit`` and ``status`` (SLURM).

The library never parses argv; this module turns arguments into a Config and calls it. Errors the
user can fix (``UserError``) are printed as one message without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import sys

from megatrain.data.synth.cli import add_synth_arguments, run_synth
from megatrain.data_pipelines.prepare import add_prepare_arguments
from megatrain.errors import UserError
from megatrain.eval.cli import add_eval_arguments, run_eval
from megatrain.inference.export import FORMATS, export_run
from megatrain.inference.generate_cli import add_generate_arguments, run_generate
from megatrain.profiling.cli import add_profile_memory_arguments, run_profile_memory
from megatrain.slurm.cli import add_status_arguments, add_submit_arguments, run_status, run_submit
from megatrain.slurm.data import add_slurm_data_arguments


def _train(args) -> int:
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel import shutdown_distributed
    from megatrain.stopping import EXIT_INTERRUPTED, StopOnSignals
    from megatrain.trainer import train

    cfg = load_config(args.config, args.overrides)
    result = train(cfg, should_stop=StopOnSignals().install())
    code = EXIT_INTERRUPTED if result.stopped_early else 0
    if not dist.is_initialized() or dist.get_rank() == 0:
        if result.stopped_early:
            print(f"megatrain: interrupted after step {result.step}; its checkpoint is saved in "
                  f"{result.run_dir}: run the same command to resume", file=sys.stderr, flush=True)
        else:
            _print_done(result)
            if not dist.is_initialized() and result.step > 0:
                from megatrain.inference.generate_cli import print_sample

                print_sample(result.run_dir)  # one process holds the whole model: show it working
    shutdown_distributed(exit_code=code)  # with a process group: leaves it and exits
    return code


def _print_done(result) -> None:
    losses = " ".join(f"{x:.3f}" for x in result.head_losses)
    print(f"done: step {result.step}, head losses [{losses}], run dir {result.run_dir}", flush=True)


def _config(args) -> int:
    from megatrain.config import load_config, reference_markdown, to_yaml

    if args.reference:
        print(reference_markdown())
    else:
        print(to_yaml(load_config(args.config, args.overrides)), end="")
    return 0


def _export(args) -> int:
    result = export_run(args.run_dir, args.format, args.out, args.checkpoint)
    print(f"exported {result.checkpoint} as {args.format} to {result.out}: {', '.join(result.files)}")
    if result.tokenizer is None:
        print("note: the run's dataset is not on this machine; the export has no tokenizer.json",
              file=sys.stderr)
    return 0


def _data_prepare(args) -> int:
    from megatrain.data_pipelines.prepare import run_prepare

    run_stage = None
    if args.executor == "slurm":  # each stage an array job, run in order
        from megatrain.slurm.data import SlurmStageRunner, options_from_args
        run_stage = SlurmStageRunner(options_from_args(args))
    run_prepare(args, run_stage=run_stage)
    return 0


def _plan_command(commands) -> None:
    from megatrain.planning.cli import add_plan_arguments, run_plan

    plan = commands.add_parser("plan", help="predict every rank's peak memory of a layout and say "
                                            "whether it fits (exit 0 fits, 1 does not fit)")
    add_plan_arguments(plan)
    plan.set_defaults(func=run_plan)


def _slurm_commands(commands) -> None:
    submit = commands.add_parser("submit", help="submit a training run to SLURM (submitit)")
    add_submit_arguments(submit)
    submit.set_defaults(func=run_submit)
    status = commands.add_parser("status", help="jobs, states and progress of a run directory")
    add_status_arguments(status)
    status.set_defaults(func=run_status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatrain", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a model (default: the embedded tiny CPU run)")
    train.add_argument("--config", help="YAML config file (see configs/)")
    train.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    train.set_defaults(func=_train)

    generate = commands.add_parser("generate", help="complete a prompt with a trained model "
                                                    "(greedy, sampling, self-speculative decoding)")
    add_generate_arguments(generate)
    generate.set_defaults(func=run_generate)

    evaluate = commands.add_parser("eval", help="measure a trained model: heldout, humaneval, induction, "
                                                "polynomial; results in <run dir>/eval/")
    add_eval_arguments(evaluate)
    evaluate.set_defaults(func=run_eval)

    export = commands.add_parser("export", help="write a run's model in Meta's or Hugging Face's format")
    export.add_argument("--run-dir", required=True, help="run directory of a training run")
    export.add_argument("--checkpoint", type=int, metavar="STEP",
                        help="the checkpoint of this step (default: the newest intact one)")
    export.add_argument("--format", required=True, choices=FORMATS,
                        help="meta: consolidated.pth + params.json, every head (loads with "
                             "generate --from and init.path); hf: a transformers Llama of the trunk "
                             "+ head 1, the other heads in extra_heads.safetensors (sequential MTP: "
                             "the trunk + MTP layers that transformers' generate(use_mtp=True) "
                             "drafts with); deepseek-mtp: sequential MTP in DeepSeek-V3's layout")
    export.add_argument("--out", required=True, help="folder to create (must be absent or empty)")
    export.set_defaults(func=_export)

    config = commands.add_parser("config", help="print the resolved config or the reference")
    config.add_argument("--config", help="YAML config file")
    config.add_argument("--reference", action="store_true", help="print every key, default and meaning")
    config.add_argument("overrides", nargs="*")
    config.set_defaults(func=_config)

    data = commands.add_parser("data", help="data preparation").add_subparsers(dest="data_command",
                                                                              required=True)
    prepare = data.add_parser("prepare", help="turn source files or JSONL/Parquet shards into token shards")
    add_prepare_arguments(prepare)
    add_slurm_data_arguments(prepare)
    prepare.set_defaults(func=_data_prepare)
    synth = data.add_parser("synth", help="write a synthetic dataset (induction, polynomial arithmetic)")
    add_synth_arguments(synth)
    synth.set_defaults(func=run_synth)
    profile = commands.add_parser("profile", help="measure a training step").add_subparsers(
        dest="profile_command", required=True)
    memory = profile.add_parser("memory", help="memory per phase and per head of the configured step "
                                               "(JSON, timeline PNG, table)")
    add_profile_memory_arguments(memory)
    memory.set_defaults(func=run_profile_memory)
    _slurm_commands(commands)
    _plan_command(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = ["megatrain", *(sys.argv[1:] if argv is None else argv)]  # submit records it
    try:
        return args.func(args)
    except UserError as err:
        print(f"megatrain: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("megatrain: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
