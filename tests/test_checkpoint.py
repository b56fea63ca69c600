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


# ---- issue 23: what makes a checkpoint intact, and saying each problem once --------------------------
def _two_checkpoints(tmp_path):
    model, optim = _model_and_optim(0)
    manager = CheckpointManager(tmp_path, keep=3)
    manager.prepare()
    for step in (1, 2):
        manager.save({"mo": ModelAndOptimizer(model, optim)}, step=step)
    return manager, model


def _flip_a_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _resume_into_a_fresh_model(manager):
    other, other_optim = _model_and_optim(1)
    return manager.resume({"mo": ModelAndOptimizer(other, other_optim)}), other


def test_a_file_missing_from_the_checksums_makes_a_checkpoint_damaged(tmp_path, capsys):
    """Removing a file's entry from checksums.json must not make its changed bytes trusted: the
    checkpoint is damaged and the older intact one is resumed."""
    import json

    from megatrain.checkpoint_integrity import CHECKSUMS

    manager, _ = _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_0000002"
    manifest = json.loads((newest / CHECKSUMS).read_text())
    data_file = next(name for name in manifest["files"] if name.endswith(".distcp"))
    del manifest["files"][data_file]
    (newest / CHECKSUMS).write_text(json.dumps(manifest))
    _flip_a_byte(newest / data_file)
    resumed, _ = _resume_into_a_fresh_model(manager)
    out = capsys.readouterr().out
    assert resumed.name == "step_0000001", out
    assert f"{data_file} is not listed in its {CHECKSUMS}" in out, out


def test_a_checkpoint_without_checksums_loads_only_with_a_warning_naming_it(tmp_path, capfd):
    """An older megatrain's checkpoint (no checksums.json) is usable, but never silently: the
    resume and the readers (generate, eval, export) say which checkpoint was not verified."""
    from megatrain.checkpoint_integrity import CHECKSUMS
    from megatrain.inference.load import checkpoint_folder

    manager, model = _two_checkpoints(tmp_path)
    newest = tmp_path / "checkpoints" / "step_0000002"
    (newest / CHECKSUMS).unlink()
    resumed, other = _resume_into_a_fresh_model(manager)
    assert resumed == newest and torch.equal(other[0].weight, model[0].weight)
    warning = f"warning: checkpoint {newest} has no {CHECKSUMS}"
    assert warning in capfd.readouterr().err
    assert checkpoint_folder(tmp_path) == newest and warning in capfd.readouterr().err
    assert checkpoint_folder(tmp_path, 1).name == "step_0000001"  # control: verified, no warning
    assert "warning" not in capfd.readouterr().err


def test_every_checkpoint_damaged_says_each_problem_once(tmp_path, capsys):
    manager, _ = _two_checkpoints(tmp_path)
    for step in (1, 2):
        _flip_a_byte(tmp_path / "checkpoints" / f"step_{step:07d}" / "__0_0.distcp")
    with pytest.raises(CheckpointError) as caught:
        _resume_into_a_fresh_model(manager)
    said = capsys.readouterr().out + str(caught.value)
    counts = {step: said.count(f"step_{step:07d}: file __0_0.distcp does not match") for step in (1, 2)}
    assert counts == {1: 1, 2: 1}, said
    assert "not usable" not in said  # no separate warnings repeating the error
    # control: with the older one intact, the damaged newer one is warned about, once
    (tmp_path / "checkpoints" / "step_0000001").rename(tmp_path / "damaged_1")
    manager.save({"mo": ModelAndOptimizer(*_model_and_optim(0))}, step=1)
    resumed, _ = _resume_into_a_fresh_model(manager)
    out = capsys.readouterr().out
    assert resumed.name == "step_0000001" and out.count("step_0000002 is not usable") == 1, out
