"""Peak memory of the heads' pipeline stage at 2 vs 8 microbatches (does it grow with M?).

Runs ``megatrain profile memory`` (exact live tensor bytes on CPU, per rank) for a two-stage
pipeline under GPipe and 1F1B, and for one process with gradient accumulation, at M = 2 and 8
microbatches of the same size, and reports the heads' rank's peak. ``--code-dir`` runs another
checkout's code with this script (e.g. the commit before a change) for a before/after table.

    python benchmarks/head_grad_memory.py                       # this checkout; appends docs/benchmarks.md
    python benchmarks/head_grad_memory.py --code-dir /tmp/old --label "before 4a06e2e" --no-append
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from machine import machine_name  # benchmarks/machine.py

REPO = Path(__file__).resolve().parent.parent
LAYOUTS = {  # name -> (ranks, overrides)
    "pp2 gpipe": (2, ["parallel.pp=2", "parallel.pp_schedule=gpipe"]),
    "pp2 1f1b": (2, ["parallel.pp=2", "parallel.pp_schedule=1f1b"]),
    "1 process, accumulation": (1, []),
}


def measure(code_dir: Path, layout: str, microbatches: int, args) -> int:
    ranks, overrides = LAYOUTS[layout]
    model = [f"model.n_layers={args.layers}", "model.n_future=4", f"model.dim={args.dim}",
             "model.n_heads=4", f"data.seq_len={args.seq_len}", f"train.batch_size={microbatches}",
             "train.micro_batch_size=1", "train.device=cpu", "logging.tensorboard=false",
             "logging.progress=false"]
    with tempfile.TemporaryDirectory() as out:
        cli = ["-m", "megatrain", "profile", "memory", "--out", out, "--steps", "1", *model, *overrides,
               f"run.dir={out}/run"]
        launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
                     f"--nproc-per-node={ranks}"] if ranks > 1 else [sys.executable])
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(code_dir)}
        done = subprocess.run([*launcher, *cli], capture_output=True, text=True, cwd=code_dir, env=env)
        if done.returncode != 0:
            sys.exit(f"{layout} M={microbatches} failed:\n{done.stderr[-3000:]}")
        profile = json.loads((Path(out) / "memory_profile.json").read_text())
    return profile["ranks"][-1]["peak_bytes"]  # the last rank holds the heads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--code-dir", type=Path, default=REPO, help="checkout whose megatrain runs")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--layers", type=int, default=7)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--no-append", action="store_true")
    args = parser.parse_args()
    rows = []
    for layout in LAYOUTS:
        peaks = {m: measure(args.code_dir.resolve(), layout, m, args) for m in (2, 8)}
        rows.append(f"| {args.label} | {layout} | {peaks[2] / 2**20:.2f} | {peaks[8] / 2**20:.2f} | "
                    f"{(peaks[8] - peaks[2]) / 2**20:+.2f} |")
        print(rows[-1], flush=True)
    header = ("| code | layout | heads' rank peak, M=2 (MiB) | M=8 (MiB) | growth (MiB) |\n"
              "|---|---|---|---|---|")
    table = "\n".join([header, *rows])
    print(table)
    if not args.no_append:
        command = "python benchmarks/head_grad_memory.py " + " ".join(sys.argv[1:])
        section = (f"\n### Heads' stage peak at 2 vs 8 microbatches ({datetime.date.today()}, "
                   f"{machine_name()})\n\nCommand: `{command}`; n_future=4, {args.layers} layers, dim "
                   f"{args.dim}, seq {args.seq_len}, one sequence per microbatch, vocab of the embedded "
                   f"corpus; `megatrain profile memory` (exact live tensor bytes), peak of the last "
                   f"rank over one step after a warm-up step.\n\n{table}\n")
        with open(REPO / "docs" / "benchmarks.md", "a") as f:
            f.write(section)


if __name__ == "__main__":
    main()
