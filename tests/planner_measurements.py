"""Profile several layouts' memory in one process group: ``python -m torch.distributed.run
--nproc-per-node=N tests/planner_measurements.py OUT DATASET NAME=OVERRIDES...``.

Each NAME is one layout (its overrides joined with commas); rank 0 writes OUT/NAME.json with the
``megatrain profile memory`` result. One launch for many layouts: starting a process group and
importing torch costs more than profiling a tiny model's step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COMMON = ["model.dim=64", "model.n_heads=4", "data.seq_len=64", "train.batch_size=8",
          "train.device=cpu", "logging.tensorboard=false", "logging.progress=false"]


def main(argv: list[str]) -> None:
    import torch.distributed as dist

    from megatrain.config import load_config
    from megatrain.parallel import shutdown_distributed
    from megatrain.profiling.memory import profile_memory

    out, dataset, layouts = Path(argv[0]), argv[1], argv[2:]
    for item in layouts:
        name, overrides = item.split("=", 1)
        cfg = load_config(None, [*COMMON, f"data.path={dataset}", *overrides.split(",")])
        profile = profile_memory(cfg, steps=1, out_dir=out / name)
        if not dist.is_initialized() or dist.get_rank() == 0:
            (out / f"{name}.json").write_text(json.dumps(profile))
    if dist.is_initialized():
        shutdown_distributed()


if __name__ == "__main__":
    main(sys.argv[1:])
