"""Reading a run dir while a training writes and prunes it (issue 23, point 11): generate, eval
and export read the newest complete checkpoint at the time of reading, once more if it vanished
under them, and never fail with a traceback (3 of 22 `generate` calls crashed with
FileNotFoundError .../.metadata before)."""

import os
import subprocess
import sys
import time

import pytest
import torch

from tests.test_trainer import REPO, _overrides

READS = 6


def _wait_for_a_checkpoint(run, training, timeout=120):
    deadline = time.monotonic() + timeout
    while not (run / "checkpoints" / "latest").is_file():
        assert training.poll() is None and time.monotonic() < deadline, "the training never saved"
        time.sleep(0.1)


def test_a_checkpoint_pruned_while_it_is_read_is_replaced_by_the_newest_without_a_traceback(
        dataset, tmp_path, caplog):
    """The race made deterministic: the checkpoint a reader picked vanishes before it loads it."""
    from megatrain.inference.load import load_checkpoint, read_checkpoint
    from tests.test_trainer import _train

    run = tmp_path / "run"
    _train(_overrides(dataset, run, **{"train.steps": 2, "checkpoint.every": 1, "checkpoint.keep": 2,
                                       "train.eval_every": 0, "model.n_layers": 3}))
    picked = run / "checkpoints" / "step_0000001"
    picked.rename(tmp_path / "pruned")  # as the training's pruning does, after the reader chose it
    folder, (model, cfg) = read_checkpoint(run, None, load_checkpoint, folder=picked)
    assert folder.name == "step_0000002" and cfg.model.n_layers == 3
    # DCP logs a traceback to the root logger for the missing .metadata before failing: dropped
    assert not [r for r in caplog.records if "metadata is not found" in r.getMessage()], caplog.text


@pytest.mark.slow
def test_readers_get_a_whole_checkpoint_while_a_training_saves_and_prunes(dataset, tmp_path, caplog):
    from megatrain.inference.export import export_run
    from megatrain.inference.load import load_model
    from megatrain.inference.source import ModelSource

    run = tmp_path / "run"
    # harder than the reported case (keep 2): a checkpoint every 2 steps, each prunes the one before
    args = _overrides(dataset, run, **{"train.steps": 100000, "checkpoint.every": 2, "checkpoint.keep": 1,
                                       "train.eval_every": 0, "model.n_layers": 3})
    training = subprocess.Popen([sys.executable, "-m", "megatrain", "train", *args], cwd=REPO,
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)
    read = []
    try:
        _wait_for_a_checkpoint(run, training)
        for i in range(READS):
            source = ModelSource.open(str(run), None, None)  # generate and eval
            model, _ = load_model(run) if i % 2 else source.load(torch.device("cpu"))  # the library's
            exported = export_run(run, "meta", tmp_path / f"export_{i}")  # export
            read.append((int(source.label), int(exported.checkpoint.name[5:])))
            assert sum(p.numel() for p in model.parameters()) > 0
        still_training = training.poll() is None
    finally:
        training.kill()
        _, err = training.communicate()
    assert still_training, err[-2000:]
    # DCP's tracebacks for a folder pruned under a reader, which a command would print on stderr
    assert not [r for r in caplog.records if "metadata is not found" in r.getMessage()], caplog.text
    steps = [step for pair in read for step in pair]
    assert steps == sorted(steps), read  # each the newest at its time: never older than the last
    assert len(set(steps)) > 2, read  # the training saved and pruned while they read
