"""``python -m megatrain.experiments NAME [--quick]``: data, training, evaluation, docs/results.md."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from megatrain.errors import UserError
from megatrain.experiments import code, finetune, induction, polynomial
from megatrain.experiments.common import RESULTS_FILE, append_results
from megatrain.machine import usable_cpus

EXPERIMENTS = {"induction": induction, "polynomial": polynomial, "finetune": finetune, "code": code}


def cost(sizes, arms) -> str:
    runs = len(sizes.seeds) * len(arms)
    return f"{runs} training runs of {sizes.steps} steps ({len(sizes.seeds)} seeds × {len(arms)} arms)"


def _check_documents_fit(task: str, sizes) -> None:
    """The probes read whole documents, so a model's positions must hold the longest one: said
    before the training, not by the evaluation after it."""
    from megatrain.data.synth import induction as induction_task
    from megatrain.data.synth import polynomial as polynomial_task

    longest = (polynomial_task.longest_document(polynomial.ring_of(sizes)) if task == "polynomial"
               else induction_task.MAX_TOKENS)
    positions = max(sizes.model.get("model.max_seq_len", 0), sizes.train["data.seq_len"])
    if longest > positions:
        raise UserError(f"{task} documents run to {longest} tokens but the models have {positions} "
                        f"positions: raise data.seq_len (or model.max_seq_len) of this variant to at least "
                        f"{longest}")


def _generator(settings: dict) -> str:
    """The generator settings a dataset's manifest records, for the results line."""
    skip = ("task", "examples", "seed")
    return ", ".join(f"{key} {'-'.join(map(str, value)) if isinstance(value, list) else value}"
                     for key, value in settings.items() if key not in skip)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatrain.experiments", description=__doc__)
    parser.add_argument("name", choices=sorted(EXPERIMENTS))
    parser.add_argument("--quick", action="store_true", help="the ~15 min CPU variant")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/experiments"),
                        help="datasets and run directories go here (default runs/experiments)")
    parser.add_argument("--seeds", type=int, nargs="+", help="override the variant's seeds")
    parser.add_argument("--steps", type=int, help="override the variant's training steps")
    parser.add_argument("--examples", type=int, help="override the variant's training documents")
    parser.add_argument("--jobs", type=int, default=usable_cpus(),
                        help="training runs at once, each in its own process on one torch thread "
                             "(default: one per CPU this process may use)")
    parser.add_argument("--results", type=Path, default=RESULTS_FILE, help="markdown file to append to")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from megatrain.data.synth.cli import make_synth_dataset
    from megatrain.data.synth.dataset import SYNTH_KEY

    experiment = EXPERIMENTS[args.name]
    sizes, arms = (experiment.QUICK, experiment.QUICK_ARMS) if args.quick else (experiment.FULL,
                                                                                experiment.FULL_ARMS)
    # a seed given twice would put two runs in one run dir
    sizes = replace(sizes, **({"seeds": tuple(dict.fromkeys(args.seeds))} if args.seeds else {}),
                    **({"steps": args.steps} if args.steps else {}),
                    **({"examples": args.examples} if args.examples else {}))
    variant = "quick" if args.quick else "full"
    work = args.work_dir / f"{args.name}-{variant}-{time.strftime('%Y%m%d-%H%M%S')}"
    describe = getattr(experiment, "cost", cost)  # an experiment with another shape says its own
    print(f"[experiments] {args.name} ({variant}): {describe(sizes, arms)}, {args.jobs} at a time, in "
          f"{work}", file=sys.stderr)
    started = time.perf_counter()
    dataset, data = None, ""  # None: the trainer's default corpus
    if experiment.TASK is not None:
        _check_documents_fit(experiment.TASK, sizes)
        dataset = work / f"data_{experiment.TASK}"
        manifest = make_synth_dataset(experiment.TASK, dataset, sizes.examples, seed=0, ring=sizes.ring)
        data = f"{sizes.examples} training documents ({_generator(manifest[SYNTH_KEY])}), "
    outcome = experiment.run(sizes, arms, dataset, work, jobs=max(1, args.jobs))
    keys = ", ".join(f"{k}={v}" for k, v in {**sizes.model, **sizes.train}.items())
    setting = (f"`{args.name}` {variant}: {outcome['metric']}; seeds {list(sizes.seeds)}, "
               f"{sizes.steps} steps, {data}{keys}")
    block = append_results(f"{args.name} ({variant})", setting, outcome["header"], outcome["rows"],
                           outcome["paper"], outcome["notes"], time.perf_counter() - started, args.results,
                           jobs=max(1, min(args.jobs, len(sizes.seeds) * len(arms))))
    print(block)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except UserError as err:  # one message and exit status 2, as the megatrain command does
        print(f"python -m megatrain.experiments: error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
