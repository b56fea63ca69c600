"""Every config key a resume announces as changed takes effect from that step, or the resume is
refused, or (a key only a fresh start reads) the run keeps its value and says so (issue 23, point 3:
train.beta1/beta2 were announced, recorded and silently not applied)."""

import shutil
import warnings

import pytest
import yaml

from megatrain.config import Config, TrainConfig, load_config, to_yaml
from megatrain.optim import SCHEDULE_KEYS, build_optimizer, build_scheduler
from megatrain.resume_changes import FRESH_ONLY, RULES, rule_of
from megatrain.run_dir import _flat
from megatrain.spec import FRESH_START_KEYS
from tests.test_trainer import _metrics, _overrides, _train

SETTINGS = {"train.steps": 8, "checkpoint.every": 3, "train.eval_every": 0, "model.n_layers": 3}
RESUMED_AT = 3
# a value for each key that changes what the optimizer does at step 3 of SETTINGS' schedule
CHANGED = {"lr": 5e-3, "min_lr_ratio": 0.5, "warmup_steps": 10, "steps": 100, "weight_decay": 0.3,
           "beta1": 0.5, "beta2": 0.7, "grad_clip": 0.25}


def test_every_config_key_has_a_resume_rule():
    keys = sorted(_flat(yaml.safe_load(to_yaml(Config()))))
    without = []
    for key in keys:
        try:
            rule_of(key)
        except KeyError:
            without.append(key)
    assert not without, f"no rule in megatrain/resume_changes.py for {without}"
    assert all(rule_of(f"train.{key}")[0] == "schedule" for key in SCHEDULE_KEYS)
    assert set(CHANGED) == {*SCHEDULE_KEYS, "grad_clip"}, "walk every optimizer/schedule key below"
    assert {k for k, (rule, _) in RULES.items() if rule == FRESH_ONLY} == set(FRESH_START_KEYS)


@pytest.fixture(scope="module")
def checkpointed_at_step_3(dataset, tmp_path_factory):
    """A run dir whose newest checkpoint is step 3 (metrics of steps 1-3)."""
    from megatrain.trainer import train

    run = tmp_path_factory.mktemp("resume_changes") / "run"
    cfg = load_config(None, _overrides(dataset, run, **SETTINGS))
    assert train(cfg, should_stop=lambda step: step == RESUMED_AT).stopped_early
    return run


def _group_settings(optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


def _as_if_trained_with(train_cfg: TrainConfig, model) -> list[dict]:
    """The param groups' settings a run of ``train_cfg`` steps with after RESUMED_AT steps."""
    optimizer = build_optimizer(model, train_cfg, "cpu")
    scheduler = build_scheduler(optimizer, train_cfg)
    with warnings.catch_warnings():  # stepping the schedule alone, on purpose
        warnings.simplefilter("ignore")
        for _ in range(RESUMED_AT):
            scheduler.step()
    return _group_settings(optimizer)


@pytest.mark.parametrize("key", sorted(CHANGED))
def test_a_resume_applies_every_changed_optimizer_and_schedule_key(key, dataset, checkpointed_at_step_3,
                                                                   tmp_path):
    """Resumed with train.KEY changed, the optimizer steps with exactly the settings a run of the
    new config would have at that step (and, as a control, not with the old config's)."""
    from megatrain.trainer import setup

    run = tmp_path / "run"
    shutil.copytree(checkpointed_at_step_3, run)
    resumed = setup(load_config(None, _overrides(dataset, run, **{**SETTINGS, f"train.{key}": CHANGED[key]})))
    try:
        assert resumed.state.step == RESUMED_AT
        new_cfg, old_cfg = resumed.cfg.train, load_config(None, _overrides(dataset, run, **SETTINGS)).train
        (optimizer,) = resumed.engine.optimizers
        got = _group_settings(optimizer)
        model = resumed.engine.stages[0]
        assert got == _as_if_trained_with(new_cfg, model), (key, got)
        assert got != _as_if_trained_with(old_cfg, model) or key == "grad_clip", (key, got)
        assert resumed.engine.grad_clip == new_cfg.grad_clip  # read by the engine at every step
        assert resumed.schedulers[0].get_last_lr()[0] == got[0]["lr"]
    finally:
        resumed.logger.close()
        resumed.lock.release()


def test_resumed_betas_change_the_training_as_announced(dataset, checkpointed_at_step_3, tmp_path, capsys):
    """The reported case: beta1=0 beta2=0.5 on resume was printed and recorded, yet the metrics were
    bit-identical to an unchanged resume."""
    same, changed = tmp_path / "same", tmp_path / "changed"
    for run, extra in ((same, {}), (changed, {"train.beta1": 0.0, "train.beta2": 0.5})):
        shutil.copytree(checkpointed_at_step_3, run)
        _train(_overrides(dataset, run, **{**SETTINGS, "train.steps": 5}, **extra))
    assert "train.beta1 0.9 -> 0.0 (from step 3 on)" in capsys.readouterr().out
    a, b = ({r["step"]: r["loss"] for r in _metrics(run)} for run in (same, changed))
    assert a[4] == b[4], (a, b)  # step 4 runs on step 3's weights, whatever the betas
    assert a[5] != b[5], (a, b)  # step 5 on weights that step 4 updated with the new betas


def test_a_resume_keeps_the_runs_init_path_and_says_so_instead_of_recording_a_change(
        dataset, checkpointed_at_step_3, tmp_path, capsys):
    """init.path seeds a start without a checkpoint only: a resume given another one keeps the
    run's (nothing would apply the new one), says so, and records no change."""
    run = tmp_path / "run"
    shutil.copytree(checkpointed_at_step_3, run)
    _train(_overrides(dataset, run, **{**SETTINGS, "train.steps": 4},
                      **{"init.path": str(tmp_path / "other_run")}))
    out = capsys.readouterr().out
    assert f"init.path='{tmp_path / 'other_run'}' is not used: this run resumes from its checkpoint" in out
    assert "config changed since the last start: init.path" not in out
    assert yaml.safe_load((run / "config.yaml").read_text())["init"]["path"] == ""
    assert "init.path" not in (run / "config_history.jsonl").read_text()
