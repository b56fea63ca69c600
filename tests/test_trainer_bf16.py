"""bf16 training end to end on CPU: ``megatrain train train.dtype=bf16`` runs (its loss path used to
fail on step 1 with a dtype mismatch under autocast) and its losses follow float32's."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _train_losses(dataset, run_dir, dtype, loss_impl="torch"):
    """Per-step loss and head losses of a 2-step CLI run (two micro-batches per step)."""
    overrides = {"data.path": dataset, "run.dir": run_dir, "train.device": "cpu", "train.dtype": dtype,
                 "loss.impl": loss_impl, "model.n_layers": 4, "model.dim": 32, "model.n_heads": 2,
                 "model.n_future": 2, "data.seq_len": 32, "train.batch_size": 4,
                 "train.micro_batch_size": 2, "train.steps": 2, "train.warmup_steps": 1,
                 "train.eval_every": 100, "checkpoint.every": 100, "logging.progress": False,
                 "logging.tensorboard": False}
    args = [f"{k}={v}" for k, v in overrides.items()]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "megatrain", "train", *args], capture_output=True,
                          text=True, env=env, cwd=REPO, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if '"loss"' in line]
    assert [r["step"] for r in records] == [1, 2], records
    return [[r["loss"], *r["head_losses"]] for r in records]


@pytest.mark.slow
def test_bf16_training_runs_and_follows_fp32(dataset, tmp_path):
    fp32 = _train_losses(dataset, tmp_path / "fp32", "fp32")
    bf16 = _train_losses(dataset, tmp_path / "bf16", "bf16")
    for step, (ours, ref) in enumerate(zip(bf16, fp32), start=1):
        assert all(math.isfinite(x) for x in ours), (step, ours)
        # the total and every head's loss within 1% of float32's
        for got, want in zip(ours, ref):
            assert abs(got - want) <= 0.01 * abs(want), f"step {step}: bf16 {ours} vs fp32 {ref}"
