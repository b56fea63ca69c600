"""megatrain: train, prepare data for, submit and inspect multi-token prediction runs.

Subcommands: ``train``, ``generate``, ``eval``, ``export``, ``data prepare``, ``data synth``, ``config``,
``profile memory``, ``submit`` and ``status`` (SLURM).

The library never parses argv; this module turns arguments into a Config and calls it. Errors the
user can fix (``UserError``) are printed as one message without a traceback, exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from megatrain import __version__
from megatrain.console import setup_console
from megatrain.errors import UserError


def _load(path: str):
    """``module:name``, imported when a command needs it: building every command's arguments
    up front would import torch and the whole library (~5 s) for ``data prepare`` or ``--help``."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


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
    from megatrain.inference.export import export_run

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


def _add_train(parser) -> None:
    parser.add_argument("--config", help="YAML config file (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.steps=100")
    parser.set_defaults(func=_train)


def _add_export(parser) -> None:
    parser.add_argument("--run-dir", required=True, help="run directory of a training run")
    parser.add_argument("--checkpoint", type=int, metavar="STEP",
                        help="the checkpoint of this step (default: the newest intact one)")
    parser.add_argument("--format", required=True, choices=_load("megatrain.inference.export:FORMATS"),
                        help="meta: consolidated.pth + params.json, every head (loads with "
                             "generate --from and init.path); hf: a transformers Llama of the trunk "
                             "+ head 1, the other heads in extra_heads.safetensors (sequential MTP: "
                             "the trunk + MTP layers that transformers' generate(use_mtp=True) "
                             "drafts with); deepseek-mtp: sequential MTP in DeepSeek-V3's layout")
    parser.add_argument("--out", required=True, help="folder to create (must be absent or empty)")
    parser.set_defaults(func=_export)


def _add_config(parser) -> None:
    parser.add_argument("--config", help="YAML config file")
    parser.add_argument("--reference", action="store_true", help="print every key, default and meaning")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. model.n_future=2")
    parser.set_defaults(func=_config)


def _add_data(parser) -> None:
    data = parser.add_subparsers(dest="data_command", required=True)
    prepare = data.add_parser("prepare", help="turn source files or JSONL/Parquet shards into token shards")
    _load("megatrain.data_pipelines.prepare:add_prepare_arguments")(prepare)
    _load("megatrain.slurm.data:add_slurm_data_arguments")(prepare)
    prepare.set_defaults(func=_data_prepare)
    synth = data.add_parser("synth", help="write a synthetic dataset (induction, polynomial arithmetic)")
    _load("megatrain.data.synth.cli:add_synth_arguments")(synth)
    synth.set_defaults(func=_load("megatrain.data.synth.cli:run_synth"))


def _add_profile(parser) -> None:
    profile = parser.add_subparsers(dest="profile_command", required=True)
    memory = profile.add_parser("memory", help="memory per phase and per head of the configured step "
                                               "(JSON, timeline PNG, table)")
    _load("megatrain.profiling.cli:add_profile_memory_arguments")(memory)
    memory.set_defaults(func=_load("megatrain.profiling.cli:run_profile_memory"))


def _from(module: str, add: str, run: str):
    """A command whose arguments and run function live in ``module``."""
    def add_command(parser) -> None:
        _load(f"{module}:{add}")(parser)
        parser.set_defaults(func=_load(f"{module}:{run}"))
    return add_command


# name -> (help, the function that adds its arguments and its ``func``)
COMMANDS = {
    "train": ("train a model (default: the embedded tiny CPU run)", _add_train),
    "generate": ("complete a prompt with a trained model (greedy, sampling, self-speculative decoding)",
                 _from("megatrain.inference.generate_cli", "add_generate_arguments", "run_generate")),
    "eval": ("measure a trained model: heldout, humaneval, induction, polynomial; results in "
             "<run dir>/eval/", _from("megatrain.eval.cli", "add_eval_arguments", "run_eval")),
    "export": ("write a run's model in Meta's or Hugging Face's format", _add_export),
    "config": ("print the resolved config or the reference", _add_config),
    "data": ("data preparation", _add_data),
    "profile": ("measure a training step", _add_profile),
    "submit": ("submit a training run to SLURM (submitit)",
               _from("megatrain.slurm.cli", "add_submit_arguments", "run_submit")),
    "status": ("jobs, states and progress of a run directory",
               _from("megatrain.slurm.cli", "add_status_arguments", "run_status")),
    "plan": ("predict every rank's peak memory of a layout and say whether it fits (exit 0 fits, "
             "1 does not fit)", _from("megatrain.planning.cli", "add_plan_arguments", "run_plan")),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; only the command ``argv`` names gets its arguments (all of them when
    ``argv`` is None, e.g. for the docs)."""
    parser = argparse.ArgumentParser(prog="megatrain", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"megatrain {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    named = next((a for a in argv if not a.startswith("-")), None) if argv is not None else None
    for name, (text, add_arguments) in COMMANDS.items():
        command = commands.add_parser(name, help=text, description=text)
        if argv is None or name == named:
            add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    setup_console()
    args.command_line = ["megatrain", *argv]  # submit records it
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
