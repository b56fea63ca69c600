"""Predicted (``megatrain plan``) vs measured (``megatrain profile memory``) peak memory per phase.

One process, one config: the planner's prediction for rank 0 next to the profiler's measurement of
the same training step, per phase (trunk forward, the heads, trunk backward, optimizer step) and
for the step.

    python benchmarks/memory_plan.py            # CPU: the embedded tiny config (exact byte counts)
    python benchmarks/memory_plan.py --gpu      # one CUDA GPU: configs/paper/1.3b_n4.yaml, bf16
    python benchmarks/memory_plan.py --config F key=value ... --no-append

On a GPU the measurement is CUDA's ``memory_allocated`` (the planner's allocation figure, before
its allowance for the CUDA context and the allocator's reserve). The table is printed and
appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import tempfile
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
GPU_CONFIG = REPO / "configs" / "paper" / "1.3b_n4.yaml"
GPU_OVERRIDES = ["train.device=cuda", "train.batch_size=2", "train.micro_batch_size=1",
                 "data.seq_len=4096"]
GB = 1e9


def measured_phases(profile: dict) -> dict[str, int]:
    """The profile's per-phase peaks (rank 0, every profiled step) grouped as the planner's."""
    peaks: dict[str, int] = {}
    for phase in profile["ranks"][0]["phases"]:
        name = phase["name"]
        group = "heads" if name.startswith("head") else name
        peaks[group] = max(peaks.get(group, 0), phase["peak_bytes"])
    return peaks


def planned_phases(plan) -> dict[str, int]:
    phases = dict(plan.phases)
    # the node's backward (handing out the heads' gradients) runs inside the profiler's trunk.backward
    phases["trunk.backward"] = max(phases.get("trunk.backward", 0), phases.pop("heads.backward", 0))
    return phases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="the 1.3B n_future=4 config on one GPU")
    parser.add_argument("--config", help="YAML config (default: tiny on CPU, 1.3B n4 with --gpu)")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--no-append", action="store_true", help="do not append to docs/benchmarks.md")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)

    import torch

    from megatrain.config import load_config
    from megatrain.planning.memory_model import plan_rank
    from megatrain.profiling.memory import profile_memory
    from megatrain.spec import resolve

    if args.gpu and not torch.cuda.is_available():
        print("--gpu: no CUDA device is visible; run on a GPU machine (see docs/benchmarks.md)",
              file=sys.stderr)
        return 1
    config = args.config or (GPU_CONFIG if args.gpu else None)
    overrides = ([*GPU_OVERRIDES] if args.gpu else ["train.device=cpu"]) + args.overrides
    cfg = load_config(config, overrides)
    with tempfile.TemporaryDirectory() as out:
        profile = profile_memory(cfg, steps=args.steps, out_dir=Path(out))
    plan = plan_rank(resolve(cfg, data="existing"), 0)
    measured, planned = measured_phases(profile), planned_phases(plan)
    rows = [f"| {name} | {planned.get(name, 0) / GB:.3f} | {measured[name] / GB:.3f} | "
            f"{planned.get(name, 0) / measured[name] - 1:+.1%} |" for name in measured]
    step_measured = profile["ranks"][0]["peak_bytes"]
    rows.append(f"| **step peak** | {plan.peak_bytes / GB:.3f} | {step_measured / GB:.3f} | "
                f"{plan.peak_bytes / step_measured - 1:+.1%} |")
    command = "python benchmarks/memory_plan.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = "\n".join([
        f"### Memory plan vs measurement ({datetime.date.today()}, {machine_name()})",
        "",
        f"`{command.strip()}`: config {config or 'embedded default'} {' '.join(overrides)}, "
        f"{args.steps} step(s) after a warm-up, rank 0; GB = 1e9 bytes of allocated tensors.",
        "",
        "| phase | planned (GB) | measured (GB) | planned vs measured |",
        "|---|---|---|---|",
        *rows, ""])
    print(table)
    if not args.no_append:
        with (REPO / "docs" / "benchmarks.md").open("a") as f:
            f.write("\n" + table)
        print("appended to docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
