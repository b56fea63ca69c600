"""AdamW (torch's, or apex's FusedAdam) and the paper's schedule: linear warmup, then cosine
decay to a fraction of the peak."""

from __future__ import annotations

import math

import torch

from megatrain.config import TrainConfig
from megatrain.errors import ConfigError
from megatrain.model.transformer import APEX_BUILD_HINT

DECAY_GROUP = 0  # index of the param group with weight decay; the other has none


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    """AdamW over ``model``'s trainable parameters, as ``train.optimizer`` chooses: torch's own
    (fused on CUDA) or apex's FusedAdam in AdamW mode (CUDA only). Same param groups either way."""
    # Norm gains (1-D) get no weight decay; matrices and embeddings do (Llama recipe).
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if cfg.optimizer == "apex_fused_adam":
        return _apex_fused_adam(groups, cfg, device_type)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda")


def _apex_fused_adam(groups, cfg: TrainConfig, device_type: str) -> torch.optim.Optimizer:
    if device_type != "cuda":
        raise ConfigError(f"train.optimizer=apex_fused_adam runs on CUDA only, but the optimizer "
                          f"steps on {device_type}; use train.optimizer=adamw (torch's AdamW).")
    try:
        from apex.optimizers import FusedAdam
    except ImportError as err:
        raise ConfigError(f"train.optimizer=apex_fused_adam but apex's FusedAdam is not importable "
                          f"({err}). {APEX_BUILD_HINT}; or set train.optimizer=adamw (the default: "
                          f"torch's fused AdamW).") from err
    # adam_w_mode: decoupled weight decay, i.e. AdamW, as torch's (eps 1e-8 like torch's default)
    return FusedAdam(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8, adam_w_mode=True)


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (0-based)."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    decay_steps = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / decay_steps, 1.0)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine


def build_scheduler(optimizer, cfg: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg))


def apply_schedule(optimizers, schedulers, scheduler_state: dict, cfg: TrainConfig) -> None:
    """After a resume: continue the saved schedule position on every optimizer, with ``cfg``'s
    optimizer keys applied from this step on.

    The checkpoint holds one scheduler's state (every pipeline stage's optimizer follows one
    schedule). Its base learning rate and the param groups' lr / weight decay are the values the
    checkpoint was saved with, so a resume with another ``train.lr``, ``warmup_steps``,
    ``min_lr_ratio``, ``steps`` or ``weight_decay`` would silently keep the old ones: they are
    set from ``cfg`` here. With an unchanged config every value is recomputed bit for bit.
    ``train.grad_clip`` is read from the config at each step anyway.
    """
    for optimizer, scheduler in zip(optimizers, schedulers):
        scheduler.load_state_dict(scheduler_state)
        scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        factor = lr_factor(scheduler.last_epoch, cfg)
        for k, group in enumerate(optimizer.param_groups):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor
            group["weight_decay"] = cfg.weight_decay if k == DECAY_GROUP else 0.0
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
