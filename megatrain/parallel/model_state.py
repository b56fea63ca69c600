"""Model parts and their optimizers in DCP's layout-independent form: the checkpoint's
``model`` and ``optimizer`` sections.

Every part keeps the full model's parameter names and the optimizer state is flattened to
per-parameter keys, so the merged dict is the same whatever the pipeline, tensor or
data-parallel layout, and a checkpoint loads into any other layout::

    model.layers.3.attention.wq.weight
    optimizer.state.layers.3.attention.wq.weight.exp_avg   (.exp_avg_sq, .step)
    optimizer.param_groups.layers.3.attention.wq.weight.lr (one entry per group key)

DeepSpeed's ZeRO engine writes the same layout (``DeepSpeedModelAndOptimizer``).
"""

from __future__ import annotations

from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class ModelAndOptimizer(Stateful):
    """This rank's model parts (pipeline stages) and their optimizers, one optimizer each."""

    OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)

    def __init__(self, parts, optimizers):
        self.parts = list(parts) if isinstance(parts, (list, tuple)) else [parts]
        self.optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]

    def state_dict(self):
        merged = {"model": {}, "optimizer": {}}
        for part, optimizer in zip(self.parts, self.optimizers):
            model_sd, optim_sd = get_state_dict(part, optimizer, options=self.OPTIONS)
            merged["model"].update(model_sd)
            merged["optimizer"].update(optim_sd)
        return merged

    def load_state_dict(self, state):
        for part, optimizer in zip(self.parts, self.optimizers):
            names = set(get_model_state_dict(part, options=self.OPTIONS))
            model_sd = {k: v for k, v in state["model"].items() if k in names}
            # flattened optimizer keys are "<state|param_groups>.<parameter name>[.<field>]"
            optim_sd = {k: v for k, v in state["optimizer"].items() if _names_parameter_of(k, names)}
            set_state_dict(part, optimizer, model_state_dict=model_sd, optim_state_dict=optim_sd,
                           options=StateDictOptions(strict=True, flatten_optimizer_state_dict=True))


def _names_parameter_of(key: str, names: set[str]) -> bool:
    rest = key.split(".", 1)[1]  # drop "state." / "param_groups."
    return any(rest == n or rest.startswith(n + ".") for n in names)
