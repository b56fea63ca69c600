"""The training loop: trunk forward, sequential heads, AdamW, checkpoints, metrics.

``train(cfg)`` reads in one screen; the pieces it calls each live in their own module.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.checkpoint import CheckpointManager, ModelAndOptimizer, RNGState
from megatrain.config import Config, to_yaml
from megatrain.data.loader import WindowLoader, val_batches
from megatrain.data.shards import open_split
from megatrain.errors import ConfigError, NonFiniteLossError
from megatrain.metrics import MetricsLogger, peak_memory_bytes, truncate_metrics
from megatrain.model.mtp import MTPTransformer, count_parameters
from megatrain.mtp_loss import build_head_targets, mtp_loss
from megatrain.optim import build_optimizer, build_scheduler


@dataclass
class TrainState(Stateful):
    step: int = 0
    tokens_seen: int = 0

    def state_dict(self):
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state):
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    head_losses: list = field(default_factory=list)
    stopped_early: bool = False  # should_stop() asked for a stop; a checkpoint was saved first


def resolve_device(cfg: Config) -> tuple[torch.device, torch.dtype | None]:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    device = torch.device(want)
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, (torch.bfloat16 if dtype == "bf16" else None)


def resolve_dataset(cfg: Config) -> Path:
    if cfg.data.path:
        return Path(cfg.data.path).expanduser()
    from megatrain.data_pipelines.prepare import ensure_default_dataset
    return Path(ensure_default_dataset(Path(cfg.data.cache_dir).expanduser()))


def check_run_dir(run_dir: Path, cfg: Config) -> None:
    """Refuse to resume a run whose model differs; never overwrite another run's config."""
    saved = run_dir / "config.yaml"
    if not saved.is_file() or not (run_dir / "checkpoints" / "latest").is_file():
        return
    from omegaconf import OmegaConf
    old = OmegaConf.load(saved).get("model")
    new = OmegaConf.structured(cfg).model
    if old != new:
        raise ConfigError(f"{run_dir} holds checkpoints of a different model (model.* differs from "
                          f"{saved}); use a new run.dir or the same model settings to resume")


def write_config(run_dir: Path, cfg: Config) -> None:
    tmp = run_dir / "config.yaml.tmp"
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, run_dir / "config.yaml")


def head_scales_for(targets: torch.Tensor, weights: list[float], ignore_index: int) -> torch.Tensor:
    """weight_i / valid targets of head i in the whole (per-step) batch."""
    counts = (targets != ignore_index).flatten(1).sum(1).clamp(min=1).double()
    return (torch.tensor(weights, dtype=torch.float64) / counts).float()


def evaluate(model, val_windows, cfg: Config, device, autocast_dtype, eos_id):
    n = cfg.model.n_future
    loss_sum = torch.zeros(n, dtype=torch.float64)
    correct = torch.zeros(n, dtype=torch.int64)
    valid = torch.zeros(n, dtype=torch.int64)
    model.eval()
    with torch.no_grad(), _autocast(device, autocast_dtype):
        for window in val_windows:
            window = window.to(device)
            targets = build_head_targets(window, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)
            hidden = model.trunk(window[:, :-1])
            _, stats = mtp_loss(model, hidden, targets, torch.ones(n), cfg.loss.ignore_index, cfg.loss.impl)
            loss_sum += stats.loss_sum
            correct += stats.n_correct
            valid += stats.n_valid
    model.train()
    valid = valid.clamp(min=1)
    return (loss_sum / valid).tolist(), (correct / valid).tolist()


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def train(cfg: Config, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from ``run.dir`` if it holds a checkpoint.

    ``should_stop`` is polled after every step (e.g. a flag set by a preemption signal handler);
    when it returns True the trainer saves a checkpoint and returns with ``stopped_early``.
    """
    device, autocast_dtype = resolve_device(cfg)
    t = cfg.train
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    dataset_dir = resolve_dataset(cfg)
    train_shards = open_split(dataset_dir, "train")
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = train_shards.vocab_size
    elif cfg.model.vocab_size < train_shards.vocab_size:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{train_shards.vocab_size} ({dataset_dir}); set model.vocab_size="
                          f"{train_shards.vocab_size} or 0 (= from the dataset)")
    eos_id = train_shards.eos_id

    run_dir = Path(cfg.run.dir).expanduser()
    run_dir.mkdir(parents=True, exist_ok=True)
    check_run_dir(run_dir, cfg)
    write_config(run_dir, cfg)

    model = MTPTransformer(cfg.model, max_seq_len=cfg.model.max_seq_len or cfg.data.seq_len).to(device)
    optimizer = build_optimizer(model, t, device.type)
    scheduler = build_scheduler(optimizer, t)
    loader = WindowLoader(train_shards, cfg.data.seq_len, t.batch_size, seed=t.seed,
                          vocab_size=cfg.model.vocab_size)
    state = TrainState()
    checkpointable = {"model_optim": ModelAndOptimizer(model, optimizer), "scheduler": scheduler,
                      "dataloader": loader, "train_state": state, "rng": RNGState()}
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep)
    checkpoints.prepare()
    latest = checkpoints.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        checkpoints.load(checkpointable, latest)
        print(f"resumed from {latest} at step {state.step}", flush=True)
    truncate_metrics(run_dir / "metrics.jsonl", state.step)

    val_windows = None
    if t.eval_every and cfg.data.val_batches:
        val_windows = list(val_batches(open_split(dataset_dir, "val"), cfg.data.seq_len,
                                       t.micro_batch_size or t.batch_size, cfg.data.val_batches))

    n = cfg.model.n_future
    weights = list(cfg.loss.head_weights) or [1.0] * n
    micro = t.micro_batch_size or t.batch_size
    print(f"model: {count_parameters(model) / 1e6:.2f}M parameters, n_future={n} "
          f"({cfg.model.head_type} heads), vocab {cfg.model.vocab_size}, device {device}; "
          f"run dir {run_dir}", flush=True)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           total_steps=t.steps, start_step=state.step)
    fault_step = int(os.environ.get("MEGATRAIN_FAULT_KILL_AT_STEP", "0"))  # tests: die mid-run
    bad_steps, last = 0, None
    try:
        while state.step < t.steps:
            started = time.perf_counter()
            batch = loader.next_batch().to(device)  # (B, T+1)
            targets = build_head_targets(batch, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)  # (n, B, T)
            scales = head_scales_for(targets, weights, cfg.loss.ignore_index)
            loss_sum = torch.zeros(n, dtype=torch.float64)
            correct = torch.zeros(n, dtype=torch.int64)
            valid = torch.zeros(n, dtype=torch.int64)
            total = 0.0
            for start in range(0, batch.shape[0], micro):
                with _autocast(device, autocast_dtype):
                    hidden = model.trunk(batch[start:start + micro, :-1])
                    loss, stats = mtp_loss(model, hidden, targets[:, start:start + micro], scales,
                                           cfg.loss.ignore_index, cfg.loss.impl)
                loss.backward()
                total += loss.item()
                loss_sum += stats.loss_sum
                correct += stats.n_correct
                valid += stats.n_valid
            grad_norm = _clip(model, t.grad_clip)
            lr = scheduler.get_last_lr()[0]
            finite = math.isfinite(total) and math.isfinite(grad_norm)
            if finite:
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.step += 1
            state.tokens_seen += batch.shape[0] * (batch.shape[1] - 1)
            valid_f = valid.clamp(min=1)
            last = {"step": state.step, "loss": total,
                    "head_losses": (loss_sum / valid_f).tolist(),
                    "head_accuracy": (correct / valid_f).tolist(),
                    "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
                    "tokens_per_s": batch.shape[0] * (batch.shape[1] - 1) / (time.perf_counter() - started),
                    "peak_mem_bytes": peak_memory_bytes(device), "tokens_seen": state.tokens_seen}
            if state.step % cfg.logging.every == 0 or state.step == t.steps:
                logger.log_train(last)
            logger.advance()
            if not finite and bad_steps >= t.max_bad_steps:
                raise NonFiniteLossError(
                    f"loss or gradient norm was NaN/inf for {bad_steps} steps in a row (last at step "
                    f"{state.step}); no such step was applied and the last good checkpoint in "
                    f"{checkpoints.root} is intact. Lower train.lr or check the data.")
            if val_windows and state.step % t.eval_every == 0:
                logger.log_eval(state.step, *evaluate(model, val_windows, cfg, device, autocast_dtype, eos_id))
            stop = should_stop is not None and should_stop()
            if finite and (stop or state.step == t.steps or
                           (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0)):
                checkpoints.save(checkpointable, state.step)
            if fault_step and state.step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                break
    finally:
        logger.close()
    return TrainResult(run_dir, state.step, last["head_losses"] if last else [],
                       stopped_early=state.step < t.steps)


def _clip(model: torch.nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
