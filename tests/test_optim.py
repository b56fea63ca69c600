import math

import pytest
import torch

from megatrain.config import TrainConfig
from megatrain.optim import build_optimizer, build_scheduler, lr_factor


def test_warmup_then_cosine_to_min_ratio():
    cfg = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.03)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(10, cfg) == pytest.approx(1.0)
    assert lr_factor(55, cfg) == pytest.approx(0.03 + 0.97 * 0.5)
    assert lr_factor(100, cfg) == pytest.approx(0.03)
    values = [lr_factor(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_no_weight_decay_on_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False), torch.nn.RMSNorm(4))
    opt = build_optimizer(model, TrainConfig(), "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and len(decay["params"]) == 1
    assert no_decay["weight_decay"] == 0.0 and no_decay["params"][0].dim() == 1
    assert decay["betas"] == (0.9, 0.95)
    sched = build_scheduler(opt, TrainConfig(steps=10, warmup_steps=2))
    assert math.isclose(sched.get_last_lr()[0], TrainConfig().lr * 0.5)
