"""AdamW (torch's, or apex's FusedAdam) and the paper's schedule: linear warmup, then cosine
decay to a fraction of the peak."""

from __future__ import annotations

import math

import torch

from megatrain.config import TrainConfig
from megatrain.errors import ConfigError
from megatrain.model.transformer import APEX_BUILD_HINT

DECAY_GROUP = 0  # index of the param group with weight decay; the other has none
# The train.* keys a resume takes from the config instead of the checkpoint (apply_schedule): the
# optimizer's param groups and the schedule would otherwise keep the values saved with it.
SCHEDULE_KEYS = ("lr", "min_lr_ratio", "warmup_steps", "steps", "weight_decay", "beta1", "beta2")


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
    schedule). Its base learning rate and the param groups' hyperparameters are the values the
    checkpoint was saved with, so a resume with another value of any of ``SCHEDULE_KEYS`` would
    silently keep the old one: each is set from ``cfg`` here (``steps``, ``warmup_steps`` and
    ``min_lr_ratio`` through the schedule's ``lr_factor``, which reads ``cfg``). With an unchanged
    config every value is recomputed bit for bit. ``train.grad_clip`` is read by the engine, which
    is built from the config.
    """
    for optimizer, scheduler in zip(optimizers, schedulers):
        scheduler.load_state_dict(scheduler_state)
        scheduler.base_lrs = [cfg.lr for _ in scheduler.base_lrs]
        factor = lr_factor(scheduler.last_epoch, cfg)
        for k, group in enumerate(optimizer.param_groups):
            group["initial_lr"] = cfg.lr
            group["lr"] = cfg.lr * factor
            group["weight_decay"] = cfg.weight_decay if k == DECAY_GROUP else 0.0
            group["betas"] = (cfg.beta1, cfg.beta2)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
