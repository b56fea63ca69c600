"""The training loop: ``setup`` builds a run, ``train_step`` takes one optimizer step, ``train``
loops, logs, validates and checkpoints. The pieces each live in their own module: the engine
(megatrain.parallel.engine) runs the model in any layout, the checkpoint manager owns the files.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.checkpoint import CheckpointManager, RNGState
from megatrain.config import Config, head_loss_weights, to_yaml
from megatrain.data.loader import WindowLoader
from megatrain.data.mixture import make_loader, open_training_data, validation_batches
from megatrain.errors import ConfigError, NonFiniteLossError
from megatrain.inference.init_from import read_init_weights
from megatrain.metrics import MetricsLogger, peak_memory_bytes, truncate_metrics
from megatrain.mtp_loss import HeadStats, build_head_targets
from megatrain.optim import apply_schedule, build_scheduler
from megatrain.parallel import ParallelDims, init_distributed
from megatrain.parallel.comm import agree_flags, all_reduce_host
from megatrain.parallel.engine import TrainingEngine, build_engine
from megatrain.run_dir import check_same_model, claim, record_config, start_fresh
from megatrain.run_lock import RunDirInUse, RunLock


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
    stopped_early: bool = False  # should_stop(step) asked for a stop; a checkpoint was saved first


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
    """data.path's folder (a mixture's first source: they share the tokenizer export and generate read)."""
    if cfg.data.mixture:
        return Path(cfg.data.mixture[0].path).expanduser()
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


def evaluate(engine: TrainingEngine, val_windows, cfg: Config, device, autocast_dtype, eos_id):
    """Per-head validation loss and accuracy over ``val_windows`` (the same on every dp rank)."""
    n = cfg.model.n_future
    totals = None
    with _autocast(device, autocast_dtype):
        for window in val_windows:
            window = window.to(device)
            targets = build_head_targets(window, n, cfg.loss.ignore_index, eos_id,
                                         cfg.loss.mask_cross_document)
            s = engine.evaluate(window[:, :-1], targets)
            totals = s if totals is None else HeadStats(totals.loss_sum + s.loss_sum,
                                                        totals.n_correct + s.n_correct,
                                                        totals.n_valid + s.n_valid)
    valid = totals.n_valid.clamp(min=1)
    return (totals.loss_sum / valid).tolist(), (totals.n_correct / valid).tolist()


def _autocast(device, dtype):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def _validation_windows(cfg: Config, dataset_dir: Path) -> list[torch.Tensor] | None:
    """Whole local batches of the val split, so that a pipeline schedule can split them into its
    microbatches; None when validation is off."""
    if not (cfg.train.eval_every and cfg.data.val_batches):
        return None
    local_batch = cfg.train.batch_size // cfg.parallel.dp
    windows = validation_batches(open_training_data(cfg.data, dataset_dir, "val"), cfg.data.seq_len,
                                 local_batch, cfg.data.val_batches)
    return [w for w in windows if w.shape[0] == local_batch]


@dataclass
class Run:
    """Everything a training run holds between steps; built by ``setup``."""

    cfg: Config
    rank: int
    device: torch.device
    autocast_dtype: torch.dtype | None
    eos_id: int | None
    engine: TrainingEngine
    schedulers: list
    loader: WindowLoader
    state: TrainState
    checkpoints: CheckpointManager
    checkpointable: dict  # name -> Stateful: what a checkpoint saves and a resume restores
    logger: MetricsLogger
    val_windows: list[torch.Tensor] | None
    head_weights: list[float]
    lock: RunLock | None  # rank 0's hold on run.dir, released when the run ends


def setup(cfg: Config) -> Run:
    """Join the process group, validate the layout, build the engine and resume if possible."""
    t, p = cfg.train, cfg.parallel
    env = init_distributed()
    device, autocast_dtype = resolve_device(cfg, env.local_rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    dataset_dir = resolve_dataset(cfg)
    train_shards = open_training_data(cfg.data, dataset_dir, "train")  # one dataset or a mixture
    resolve_vocab(cfg, train_shards.vocab_size, dataset_dir)
    dims = ParallelDims(p.dp, p.tp, p.pp, env.world_size)
    dims.validate(cfg.model, p, t.batch_size, t.micro_batch_size)  # before any collective
    run_dir = Path(cfg.run.dir).expanduser()
    lock, checkpoints, resuming = _open_run_dir(cfg, run_dir, env.rank)
    try:
        mesh = dims.build_mesh(device.type) if env.world_size > 1 else None
        return _build_run(cfg, env.rank, device, autocast_dtype, dims, mesh, dataset_dir, train_shards,
                          lock, checkpoints, resuming)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(cfg: Config, rank: int, device, autocast_dtype, dims: ParallelDims, mesh,
               dataset_dir: Path, train_shards, lock: RunLock | None,
               checkpoints: CheckpointManager, resuming: bool) -> Run:
    """The engine, optimizers, loader and logger of a run, resumed from its newest intact
    checkpoint when there is one."""
    t, p, run_dir = cfg.train, cfg.parallel, checkpoints.run_dir
    # init.path seeds a fresh start only: a resume's weights are its checkpoint's
    init_weights = (read_init_weights(cfg.init.path, cfg.model, t.seed)
                    if cfg.init.path and not resuming else None)
    engine, n_params = build_engine(cfg, dims, mesh, device, autocast_dtype, init_weights)
    if init_weights is not None and rank == 0:
        print(f"initial weights (init.path): {init_weights.summary}; optimizer state fresh", flush=True)
    schedulers = [build_scheduler(optimizer, t) for optimizer in engine.optimizers]
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    loader = make_loader(train_shards, cfg.data.seq_len, t.batch_size, dp_rank=dp_rank,
                         dp_size=p.dp, seed=t.seed, vocab_size=cfg.model.vocab_size)
    state = TrainState()
    checkpointable = {"model_optim": engine.checkpoint_state(), "scheduler": schedulers[0],
                      "dataloader": loader, "train_state": state, "rng": RNGState()}
    if resuming:
        _keep_an_older_runs_loss(run_dir, cfg, rank)
        resumed = checkpoints.resume(checkpointable, cfg.checkpoint.load_step)
        # every stage's optimizer follows one schedule; the config's optimizer keys win
        apply_schedule(engine.optimizers, schedulers, schedulers[0].state_dict(), t)
        if rank == 0:
            print(f"resumed from {resumed} at step {state.step}", flush=True)
    if rank == 0:
        for key, (old, new) in record_config(run_dir, cfg, state.step).items():
            print(f"config changed since the last start: {key} {old} -> {new} (from step "
                  f"{state.step} on)", flush=True)
        truncate_metrics(run_dir / "metrics.jsonl", state.step)
        print(f"model: {n_params / 1e6:.2f}M parameters, n_future={cfg.model.n_future} "
              f"({cfg.model.head_type} heads), vocab {cfg.model.vocab_size}, device {device}, "
              f"layout dp{p.dp} tp{p.tp} pp{p.pp}; run dir {run_dir}", flush=True)
        weights = head_loss_weights(cfg)
        if any(w != 1 for w in weights):
            source = "loss.head_weights" if cfg.loss.head_weights else "loss.extra_heads_weight"
            print(f"loss weights per head {' '.join(f'{w:g}' for w in weights)} (from {source}; the "
                  f"paper sums the heads' losses unweighted)", flush=True)
    logger = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           total_steps=t.steps, start_step=state.step, enabled=rank == 0)
    return Run(cfg, rank, device, autocast_dtype, train_shards.eos_id, engine, schedulers, loader,
               state, checkpoints, checkpointable, logger, _validation_windows(cfg, dataset_dir),
               head_loss_weights(cfg), lock)


def _keep_an_older_runs_loss(run_dir: Path, cfg: Config, rank: int) -> None:
    """A run started before ``loss.extra_heads_weight`` existed summed its heads' losses unweighted:
    resumed under today's default (0.03) its loss would change mid-run, so it keeps 1 unless the
    command asks for a weight (a value other than the default, or ``loss.head_weights``)."""
    from megatrain.config import LossConfig, predates_extra_heads_weight

    saved = run_dir / "config.yaml"
    if not saved.is_file() or not predates_extra_heads_weight(saved):
        return
    if cfg.loss.head_weights or cfg.loss.extra_heads_weight != LossConfig.extra_heads_weight:
        return
    cfg.loss.extra_heads_weight = 1.0
    if rank == 0:
        print("this run started before loss.extra_heads_weight existed, with the heads' losses summed "
              "unweighted: it continues so (loss.extra_heads_weight=1); pass another value to change that",
              flush=True)


def _open_run_dir(cfg: Config, run_dir: Path,
                  rank: int) -> tuple[RunLock | None, CheckpointManager, bool]:
    """Take the run dir (one writer), clear partial saves, and settle what this start does with an
    earlier run there: resume it (same model only) or, for a fresh start, refuse or archive it."""
    lock = claim(run_dir, rank)
    try:
        checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
                                        config_text=to_yaml(cfg))
        checkpoints.prepare()
        if cfg.checkpoint.load_step and not cfg.checkpoint.resume:
            raise ConfigError(f"checkpoint.load_step={cfg.checkpoint.load_step} asks to resume, but "
                              f"checkpoint.resume=false; drop one of them")
        resuming = cfg.checkpoint.resume and bool(checkpoints.steps())
        if resuming:
            check_same_model(run_dir, cfg)
        else:
            start_fresh(run_dir, cfg.run.overwrite, rank)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return lock, checkpoints, resuming


def train_step(run: Run) -> dict:
    """One optimizer step on the next global batch; returns its metrics record."""
    cfg, t = run.cfg, run.cfg.train
    started = time.perf_counter()
    batch = run.loader.next_batch().to(run.device)  # this dp rank's rows (B / dp, T + 1)
    targets = build_head_targets(batch, cfg.model.n_future, cfg.loss.ignore_index, run.eos_id,
                                 cfg.loss.mask_cross_document)  # (n, B / dp, T)
    counts = all_reduce_host((targets != cfg.loss.ignore_index).flatten(1).sum(1).cpu(),
                             run.engine.group("dp"))  # valid targets per head in the global batch
    scales = head_scales(counts, run.head_weights)
    with _autocast(run.device, run.autocast_dtype):
        total, stats = run.engine.forward_backward(batch[:, :-1], targets, scales, t.micro_batch_size)
    lr = run.schedulers[0].get_last_lr()[0]
    grad_norm, applied = run.engine.optimizer_step(total)
    for scheduler in run.schedulers:
        scheduler.step()
    tokens = t.batch_size * cfg.data.seq_len
    run.state.step += 1
    run.state.tokens_seen += tokens
    valid = stats.n_valid.clamp(min=1)
    return {"step": run.state.step, "loss": total, "head_losses": (stats.loss_sum / valid).tolist(),
            "head_accuracy": (stats.n_correct / valid).tolist(), "lr": lr, "grad_norm": grad_norm,
            "skipped": not applied, "tokens_per_s": tokens / (time.perf_counter() - started),
            "peak_mem_bytes": peak_memory_bytes(run.device), "tokens_seen": run.state.tokens_seen}


def train(cfg: Config, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from ``run.dir`` if it holds a checkpoint.

    Runs as one process or as one rank of a torchrun / SLURM job (``parallel.*`` picks the
    layout). ``should_stop(step)`` is polled after every step on every rank and must give every
    rank the same answer (the SLURM job's agrees its signal flags in one all-reduce); when it
    says stop, the trainer saves a checkpoint of that step and returns early.
    """
    run = setup(cfg)
    t, state = cfg.train, run.state
    bad_steps, record = 0, None
    try:
        while state.step < t.steps:
            record = train_step(run)
            if state.step % cfg.logging.every == 0 or state.step == t.steps:
                run.logger.log_train(record)
            run.logger.advance()
            bad_steps = bad_steps + 1 if record["skipped"] else 0
            if record["skipped"] and bad_steps >= t.max_bad_steps:
                run.checkpoints.finish()  # an async save of the last good step still counts
                raise NonFiniteLossError(
                    f"loss or gradient norm was NaN/inf for {bad_steps} steps in a row (last at step "
                    f"{state.step}); no such step was applied. {_rewind_advice(run)}")
            if run.val_windows and state.step % t.eval_every == 0:
                run.logger.log_eval(state.step, *evaluate(run.engine, run.val_windows, cfg, run.device,
                                                          run.autocast_dtype, run.eos_id))
            stop = should_stop is not None and should_stop(state.step)
            if not record["skipped"] and (stop or state.step == t.steps or
                                          (cfg.checkpoint.every and state.step % cfg.checkpoint.every == 0)):
                _save(run)
            run.checkpoints.poll()
            if stop:
                break
        run.checkpoints.finish()
    finally:
        run.logger.close()
        if run.lock is not None:
            run.lock.release()
    return TrainResult(Path(cfg.run.dir).expanduser(), state.step,
                       record["head_losses"] if record else [], stopped_early=state.step < t.steps)


def _save(run: Run) -> None:
    """Checkpoint this step, unless another start has taken the run dir over (then writing on
    would corrupt it) or the step's update made a parameter NaN/inf (a resume from such a state
    could only produce NaN)."""
    (lost,) = agree_flags([run.lock is not None and run.lock.lost])
    if lost:  # another start took the run dir over: writing on would corrupt it
        raise RunDirInUse(f"another training took over {run.checkpoints.run_dir} while this one ran "
                          f"(it was presumed gone); step {run.state.step} was not saved")
    if not run.engine.parameters_are_finite():
        run.checkpoints.finish()
        raise NonFiniteLossError(f"the update of step {run.state.step} made parameters NaN/inf; it was "
                                 f"not saved. {_rewind_advice(run)}")
    run.checkpoints.save(run.checkpointable, run.state.step)


def _rewind_advice(run: Run) -> str:
    """Which checkpoints there are and the command that rewinds to the newest with a lower lr."""
    steps = run.checkpoints.steps()
    if not steps:
        return "There is no checkpoint yet: lower train.lr or check the data, and start again."
    lr = run.cfg.train.lr
    return (f"Checkpoints in {run.checkpoints.root}: steps {', '.join(map(str, steps))}. A checkpoint "
            f"saved just before a blow-up may already hold diverging weights: rewind to an earlier "
            f"one with a lower learning rate, e.g. the same command plus "
            f"checkpoint.load_step={steps[0] if len(steps) > 1 else steps[-1]} train.lr={lr / 10:g}")
