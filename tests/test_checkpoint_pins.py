"""A reader's pin keeps a checkpoint from being pruned under it; the training never waits for it.

flock conflicts between two open() calls of one process as between processes, so one process
plays both the reader and the training here (the run-dir readers test does it with two)."""

import os

import pytest

from megatrain import checkpoint_pins
from megatrain.checkpoint import CheckpointManager
from megatrain.checkpoint_integrity import CHECKSUMS, checksums_text, problem_of
from megatrain.checkpoint_pins import PIN_FILE, pinned
from megatrain.parallel.model_state import ModelAndOptimizer
from tests.test_checkpoint import _model_and_optim


def _saver(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=1)
    manager.prepare()
    return manager, lambda step: manager.save({"mo": ModelAndOptimizer(model, optim)}, step=step)


def _kept(tmp_path):
    return sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())


def test_a_pinned_checkpoint_outlives_pruning_until_a_save_after_its_reader_let_go(tmp_path):
    manager, save = _saver(tmp_path)
    save(1)
    first = manager.path_of(1)
    assert problem_of(first) is None  # the pin file is one of the checkpoint's checksummed files
    with pinned(first):
        save(2)  # keep=1 would prune step 1: its reader holds it
        assert _kept(tmp_path) == ["step_0000001", "step_0000002"]
        model, optim = _model_and_optim(1)
        manager.load({"mo": ModelAndOptimizer(model, optim)}, first)  # still whole
    save(3)
    assert _kept(tmp_path) == ["step_0000003"]
    save(4)  # the control: unpinned, the previous one goes at once
    assert _kept(tmp_path) == ["step_0000004"]


def test_a_pin_that_lost_the_race_to_the_pruner_says_the_folder_is_gone(tmp_path, monkeypatch):
    """The pruner locked, renamed the folder away and let go between the reader's open and lock."""
    manager, save = _saver(tmp_path)
    save(1)
    folder = manager.path_of(1)
    real_flock = checkpoint_pins._flock

    def pruned_first(fd, how):
        folder.rename(tmp_path / "pruned")
        return real_flock(fd, how)

    monkeypatch.setattr(checkpoint_pins, "_flock", pruned_first)
    with pytest.raises(FileNotFoundError), pinned(folder):
        pass
    with pytest.raises(FileNotFoundError), pinned(folder):  # and one chosen after it was gone
        pass


def test_a_checkpoint_saved_before_pins_is_read_unpinned_and_pruned(tmp_path):
    manager, save = _saver(tmp_path)
    save(1)
    old = manager.path_of(1)
    os.remove(old / PIN_FILE)
    (old / CHECKSUMS).write_text(checksums_text(old))
    assert problem_of(old) is None
    with pinned(old):
        save(2)
    assert _kept(tmp_path) == ["step_0000002"]
