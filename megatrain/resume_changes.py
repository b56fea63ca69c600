"""What a resume does with each config key that changed since the run's last start.

A resume prints every changed key ("config changed since the last start: KEY OLD -> NEW (from
step N on)") and records it in config_history.jsonl, so each such change must really take effect
from that step, or the resume must be refused before anything is loaded or written, or (a key
only a fresh start reads) keep the run's value and say so. Every key of the config has one rule
here, by its dotted name or its section's prefix; a key added to the config without a rule fails
the test that walks them all (tests/test_resume_changes.py).
"""

from __future__ import annotations

from megatrain.optim import SCHEDULE_KEYS

APPLIED = "applied"  # the run is built from the resolved config, or reads it at every step
SCHEDULE = "schedule"  # the checkpoint saved it with the optimizer: optim.apply_schedule sets the config's
CHECKED = "checked"  # the checkpoint must agree: another value is refused where noted
FRESH_ONLY = "fresh only"  # read by a start without a checkpoint only: a resume keeps the run's value
# (spec.FRESH_START_KEYS, with a note), so no change is recorded

_DATA_STATE = "the data loader's saved state refuses other data, sequence length or seed (DataError)"

RULES: dict[str, tuple[str, str]] = {
    "model.": (CHECKED, "RunDir.check_same_model: the checkpoint holds this model's tensors"),
    "loss.": (APPLIED, "the targets and the heads' weights are computed from the config at every step"),
    "data.": (CHECKED, _DATA_STATE + "; the same data moved elsewhere is the same data"),
    "data.val_batches": (APPLIED, "validation windows are read from the config"),
    "train.": (APPLIED, "the engine (grad_clip, micro batches, compile, optimizer kind), the loader's "
                        "batch (it continues at the saved global position) and the loop are built "
                        "from the config"),
    **{f"train.{key}": (SCHEDULE, "optim.apply_schedule") for key in SCHEDULE_KEYS},
    "train.seed": (CHECKED, _DATA_STATE + " (the seed orders the data)"),
    "checkpoint.": (APPLIED, "the checkpoint manager and this start's choice of checkpoint"),
    "logging.": (APPLIED, "the metrics sinks are built from the config"),
    "run.dir": (APPLIED, "the run dir this start writes (a run dir moved elsewhere)"),
    "run.overwrite": (APPLIED, "decides what a start that resumes nothing does; a resume has nothing "
                               "for it to do"),
    "parallel.": (APPLIED, "checkpoints are layout-independent and load into any layout"),
    "init.path": (FRESH_ONLY, "its weights seed a start without a checkpoint; a resume's weights "
                              "are the checkpoint's (spec.FRESH_START_KEYS)"),
}


def rule_of(key: str) -> tuple[str, str]:
    """The rule of the dotted ``key``: its own, else its section's (the longest prefix)."""
    matches = [prefix for prefix in RULES
               if key == prefix or (prefix.endswith(".") and key.startswith(prefix))]
    if not matches:
        raise KeyError(f"config key {key!r} has no resume rule in megatrain/resume_changes.py")
    return RULES[max(matches, key=len)]
