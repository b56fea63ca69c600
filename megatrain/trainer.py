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
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.checkpoint import CheckpointManager, ModelAndOptimizer, RNGState
from megatrain.config import Config
from megatrain.data.loader import WindowLoader, val_batches
from megatrain.data.shards import open_split
from megatrain.errors import ConfigError, NonFiniteLossError
from megatrain.metrics import MetricsLogger, peak_memory_bytes, truncate_metrics
from megatrain.model.mtp import MTPTransformer, count_parameters
from megatrain.mtp_loss import HeadStats, build_head_targets
from megatrain.optim import build_optimizer, build_scheduler
from megatrain.parallel import ParallelDims, init_distributed, materialize, parallelize
from megatrain.parallel.comm import all_reduce_host
from megatrain.run_dir import check_same_model, write_config
from megatrain.parallel.deepspeed_engine import DeepSpeedModelAndOptimizer, parallelize_deepspeed


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


def resolve_device(cfg: Config, local_rank: int = 0) -> tuple[torch.device, torch.dtype | None]:
    want = cfg.train.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu")
    device = torch.device(want, local_rank) if want == "cuda" else torch.device(want)
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    return device, (torch.bfloat16 if dtype == "bf16" else None)


def resolve_dataset(cfg: Config) -> Path:
    if cfg.data.path:
        return Path(cfg.data.path).expanduser()
    from megatrain.data_pipelines.prepare import ensure_default_dataset
    return Path(ensure_default_dataset(Path(cfg.data.cache_dir).expanduser()))


def head_scales(valid_counts: torch.Tensor, weights: list[float]) -> torch.Tensor:
    """weight_i / valid targets of head i in the global batch (see docs/design.md)."""
    return (torch.tensor(weights, dtype=torch.float64) / valid_counts.clamp(min=1).double()).float()


VOCAB_MULTIPLE = 64


def resolve_vocab(cfg: Config, tokenizer_vocab: int, dataset_dir: Path) -> None:
    """model.vocab_size=0 takes the tokenizer's size rounded up to a multiple of 64 (Megatron's
    padding): tensor parallelism can split it and GPU matmuls stay aligned, whatever the layout."""
    if cfg.model.vocab_size == 0:
        cfg.model.vocab_size = -(-tokenizer_vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    elif cfg.model.vocab_size < tokenizer_vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the tokenizer's "
                          f"{tokenizer_vocab} ({dataset_dir}); set model.vocab_size="
                          f"{tokenizer_vocab} or 0 (= from the dataset)")


def evaluate(pm, val_windows, cfg: Config, device, autocast_dtype, eos_id):
    """Per-head validation loss and accuracy over ``val_windows`` (the same on every dp rank)."""
    n = cfg.model.n_future
    totals = None
    with _autocast(device, autocast_dtype):
        for window in val_windows:
            window = window.to(device)
            targets = build_head_targets(window, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)
            s = pm.evaluate(window[:, :-1], targets)
            totals = s if totals is None else HeadStats(totals.loss_sum + s.loss_sum,
                                                        totals.n_correct + s.n_correct,
                                                        totals.n_valid + s.n_valid)
    valid = totals.n_valid.clamp(min=1)
    return (totals.loss_sum / valid).tolist(), (totals.n_correct / valid).tolist()


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def build_parallel_model(cfg: Config, dims: ParallelDims, mesh, device, autocast_dtype):
    """This rank's model parts and their optimizers, for FSDP/TP/PP or DeepSpeed.

    FSDP/TP/PP build on the meta device, shard, then materialise only this rank's shards (no rank
    ever holds the whole model); DeepSpeed partitions a materialised module itself.
    """
    t, p = cfg.train, cfg.parallel
    max_seq_len = cfg.model.max_seq_len or cfg.data.seq_len
    common = dict(device=device, local_batch=t.batch_size // p.dp,
                  micro_batch_size=t.micro_batch_size, ignore_index=cfg.loss.ignore_index,
                  impl=cfg.loss.impl, compile_blocks=t.compile)
    if p.dp_engine == "deepspeed":  # its AdamW is built inside (parallel/deepspeed_engine.py)
        model = MTPTransformer(cfg.model, max_seq_len=max_seq_len, seed=t.seed).to(device)
        pm = parallelize_deepspeed(model, t, p, bf16=autocast_dtype == torch.bfloat16, **common)
        return pm, [pm.optimizer], count_parameters(model)
    with torch.device("meta"):
        model = MTPTransformer(cfg.model, max_seq_len=max_seq_len, seed=t.seed)
    fsdp_dtype = torch.bfloat16 if device.type == "cuda" and dims.dp_enabled else None
    pm = parallelize(model, dims, mesh, p, param_dtype=fsdp_dtype, **common)
    materialize(pm.stages, device, t.seed, max_seq_len)
    return pm, [build_optimizer(stage, t, device.type) for stage in pm.stages], count_parameters(model)


def optimizer_step(pm, optimizers, loss: float, grad_clip: float, deepspeed: bool):
    """Clip and apply the step unless the loss or the gradient norm is NaN/inf; zero the grads.

    Returns (grad_norm, applied)."""
    if deepspeed:  # DeepSpeed clips, steps and skips a NaN/inf gradient norm itself
        grad_norm, applied = pm.step()
        return grad_norm, math.isfinite(loss) and applied
    grad_norm = pm.clip_grad_norm_(grad_clip)
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    for optimizer in optimizers:
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grad_norm, finite


def train(cfg: Config, should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from ``run.dir`` if it holds a checkpoint.

    Runs as one process or as one rank of a torchrun / SLURM job (``parallel.*`` picks the
    layout). ``should_stop`` is polled after every step (e.g. a flag set by a preemption signal
    handler); when any rank says stop, the trainer saves a checkpoint and returns early.
    """
    t, p = cfg.train, cfg.parallel
    env = init_distributed()
    is_main = env.rank == 0
    device, autocast_dtype = resolve_device(cfg, env.local_rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)

    dataset_dir = resolve_dataset(cfg)
    train_shards = open_split(dataset_dir, "train")
    resolve_vocab(cfg, train_shards.vocab_size, dataset_dir)
    eos_id = train_shards.eos_id
    dims = ParallelDims(p.dp, p.tp, p.pp, env.world_size)
    dims.validate(cfg.model, p, t.batch_size, t.micro_batch_size)  # before any collective
    deepspeed = p.dp_engine == "deepspeed"
    run_dir = Path(cfg.run.dir).expanduser()
    check_same_model(run_dir, cfg)
    mesh = dims.build_mesh(device.type) if env.world_size > 1 else None
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_config(run_dir, cfg)

    pm, optimizers, n_params = build_parallel_model(cfg, dims, mesh, device, autocast_dtype)
    schedulers = [build_scheduler(optimizer, t) for optimizer in optimizers]
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    loader = WindowLoader(train_shards, cfg.data.seq_len, t.batch_size, dp_rank=dp_rank,
                          dp_size=p.dp, seed=t.seed, vocab_size=cfg.model.vocab_size)
    state = TrainState()
    checkpointable = {"model_optim": DeepSpeedModelAndOptimizer(pm) if deepspeed
                      else ModelAndOptimizer(pm.stages, optimizers),
                      "scheduler": schedulers[0], "dataloader": loader, "train_state": state,
                      "rng": RNGState()}
    checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
    checkpoints.prepare()
    latest = checkpoints.latest() if cfg.checkpoint.resume else None
    if latest is not None:
        checkpoints.load(checkpointable, latest)
        for scheduler in schedulers[1:]:  # every stage's optimizer follows one schedule
            scheduler.load_state_dict(schedulers[0].state_dict())
        if is_main:
            print(f"resumed from {latest} at step {state.step}", flush=True)
    if is_main:
        truncate_metrics(run_dir / "metrics.jsonl", state.step)

    val_windows = None
    if t.eval_every and cfg.data.val_batches:
        # Whole local batches, so that a pipeline schedule can split them into its microbatches.
        local_batch = t.batch_size // p.dp
        val_windows = [w for w in val_batches(open_split(dataset_dir, "val"), cfg.data.seq_len,
                                              local_batch, cfg.data.val_batches)
                       if w.shape[0] == local_batch]

    n = cfg.model.n_future
    weights = list(cfg.loss.head_weights) or [1.0] * n
    if is_main:
        print(f"model: {n_params / 1e6:.2f}M parameters, n_future={n} ({cfg.model.head_type} heads), "
              f"vocab {cfg.model.vocab_size}, device {device}, layout dp{p.dp} tp{p.tp} pp{p.pp}; "
              f"run dir {run_dir}", flush=True)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           total_steps=t.steps, start_step=state.step, enabled=is_main)
    fault_step = int(os.environ.get("MEGATRAIN_FAULT_KILL_AT_STEP", "0"))  # tests: die mid-run
    bad_steps, last = 0, None
    try:
        while state.step < t.steps:
            started = time.perf_counter()
            batch = loader.next_batch().to(device)  # this dp rank's rows (B / dp, T + 1)
            targets = build_head_targets(batch, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)  # (n, B / dp, T)
            counts = all_reduce_host((targets != cfg.loss.ignore_index).flatten(1).sum(1).cpu(),
                                     pm.group("dp"))  # valid targets per head in the global batch
            scales = head_scales(counts, weights)
            with _autocast(device, autocast_dtype):
                total, stats = pm.forward_backward(batch[:, :-1], targets, scales, t.micro_batch_size)
            lr = schedulers[0].get_last_lr()[0]
            grad_norm, finite = optimizer_step(pm, optimizers, total, t.grad_clip, deepspeed)
            for scheduler in schedulers:
                scheduler.step()
            bad_steps = 0 if finite else bad_steps + 1
            state.step += 1
            tokens = t.batch_size * cfg.data.seq_len
            state.tokens_seen += tokens
            valid = stats.n_valid.clamp(min=1)
            last = {"step": state.step, "loss": total,
                    "head_losses": (stats.loss_sum / valid).tolist(),
                    "head_accuracy": (stats.n_correct / valid).tolist(),
                    "lr": lr, "grad_norm": grad_norm, "skipped": not finite,
                    "tokens_per_s": tokens / (time.perf_counter() - started),
                    "peak_mem_bytes": peak_memory_bytes(device), "tokens_seen": state.tokens_seen}
            if state.step % cfg.logging.every == 0 or state.step == t.steps:
                logger.log_train(last)
            logger.advance()
            if not finite and bad_steps >= t.max_bad_steps:
                checkpoints.finish()  # an async save of the last good step still counts
                raise NonFiniteLossError(
                    f"loss or gradient norm was NaN/inf for {bad_steps} steps in a row (last at step "
                    f"{state.step}); no such step was applied and the last good checkpoint in "
                    f"{checkpoints.root} is intact. Lower train.lr or check the data.")
            if val_windows and state.step % t.eval_every == 0:
                logger.log_eval(state.step, *evaluate(pm, val_windows, cfg, device, autocast_dtype,
                                                      eos_id))
            stop = should_stop is not None and should_stop()
            if dist.is_initialized() and should_stop is not None:  # stop together or not at all
                stop = bool(all_reduce_host(torch.tensor([int(stop)]), dist.group.WORLD,
                                            op=dist.ReduceOp.MAX).item())
            if finite and (stop or state.step == t.steps or
                           (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0)):
                checkpoints.save(checkpointable, state.step)
            checkpoints.poll()
            if fault_step and state.step == fault_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if stop:
                break
        checkpoints.finish()
    finally:
        logger.close()
    return TrainResult(run_dir, state.step, last["head_losses"] if last else [],
                       stopped_early=state.step < t.steps)
