"""Checkpoints: DCP round trip, atomic 'latest' pointer, pruning, clear errors."""

import pytest
import torch

from megatrain import checkpoint as ckpt_module
from megatrain.checkpoint import CheckpointManager, RNGState
from megatrain.errors import CheckpointError
from megatrain.parallel.model_state import ModelAndOptimizer


def _model_and_optim(seed):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    optim = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(3, 4)).sum().backward()
    optim.step()
    return model, optim


def test_round_trip_restores_model_optimizer_and_rng(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prepare()
    torch.manual_seed(123)
    manager.save({"mo": ModelAndOptimizer(model, optim), "rng": RNGState()}, step=5)
    expected_rand = torch.rand(3)

    other, other_optim = _model_and_optim(1)
    torch.manual_seed(999)
    manager.load({"mo": ModelAndOptimizer(other, other_optim), "rng": RNGState()}, manager.latest())
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    state_a, state_b = optim.state_dict()["state"], other_optim.state_dict()["state"]
    for k in state_a:
        assert torch.equal(state_a[k]["exp_avg_sq"], state_b[k]["exp_avg_sq"])
    assert torch.equal(torch.rand(3), expected_rand)


def test_crash_during_save_leaves_latest_on_the_previous_checkpoint(tmp_path, monkeypatch):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=3)
    manager.prepare()
    state = {"mo": ModelAndOptimizer(model, optim)}
    manager.save(state, step=1)

    def crash(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(ckpt_module.dcp, "save", crash)
    with pytest.raises(OSError):
        manager.save(state, step=2)
    assert manager.latest().name == "step_0000001"
    manager.prepare()  # a restart removes the partial folder
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_keeps_only_the_last_k(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prepare()
    for step in (1, 2, 3, 4):
        manager.save({"mo": ModelAndOptimizer(model, optim)}, step=step)
    kept = sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.is_dir())
    assert kept == ["step_0000003", "step_0000004"]
    assert manager.latest().name == "step_0000004"


def test_dangling_or_garbage_latest_pointer_does_not_hide_the_intact_checkpoint(tmp_path, capsys):
    """The step folders say which checkpoints exist: a pointer at a missing folder, or garbage
    bytes in it, is reported, and the resume loads the newest intact folder and repairs it."""
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prepare()
    manager.save({"mo": ModelAndOptimizer(model, optim)}, step=3)
    pointer = tmp_path / "checkpoints" / "latest"
    for damage in (b"step_0000042\n", bytes(range(256))):
        pointer.write_bytes(damage)
        other, other_optim = _model_and_optim(1)
        assert manager.resume({"mo": ModelAndOptimizer(other, other_optim)}).name == "step_0000003"
        assert torch.equal(other[0].weight, model[0].weight)
        assert pointer.read_text() == "step_0000003\n"
    assert "damaged" in capsys.readouterr().out


def test_loading_into_a_different_model_names_the_checkpoint(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prepare()
    manager.save({"mo": ModelAndOptimizer(model, optim)}, step=1)
    bigger = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Linear(16, 2))
    bigger_optim = torch.optim.AdamW(bigger.parameters())
    with pytest.raises(CheckpointError, match="step_0000001"):
        manager.load({"mo": ModelAndOptimizer(bigger, bigger_optim)}, manager.latest())


def test_async_save_publishes_latest_only_when_written(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=2, async_save=True)
    manager.prepare()
    state = {"mo": ModelAndOptimizer(model, optim)}
    manager.save(state, step=1)
    assert manager.latest() is None or manager.latest().name == "step_0000001"
    manager.finish()
    assert manager.latest().name == "step_0000001"
    manager.save(state, step=2)
    manager.save(state, step=3)  # finishes step 2 first
    assert manager.latest().name in ("step_0000002", "step_0000003")
    manager.finish()
    assert manager.latest().name == "step_0000003"
    other, other_optim = _model_and_optim(1)
    manager.load({"mo": ModelAndOptimizer(other, other_optim)}, manager.latest())
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_a_checkpoint_saved_without_cuda_resumes_on_a_machine_with_it(tmp_path, monkeypatch):
    """RNG state: a CPU-only save has no CUDA generator; a resume where CUDA is visible keeps
    that generator as it is instead of failing on the missing key."""
    manager = CheckpointManager(tmp_path, keep=2)
    manager.prepare()
    torch.manual_seed(5)
    manager.save({"rng": RNGState()}, step=1)
    expected = torch.rand(2)
    set_cuda = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.zeros(8, dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", set_cuda.append)
    manager.load({"rng": RNGState()}, manager.latest())
    assert torch.equal(torch.rand(2), expected) and set_cuda == []
