"""The training loop: ``setup`` builds a run, ``train_step`` takes one optimizer step, ``train``
loops, logs, validates and checkpoints. The pieces each live in their own module: the engine
(megatrain.parallel.engine) runs the model in any layout, the checkpoint manager owns the files.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.distributed.checkpoint.stateful import Stateful

from megatrain.checkpoint import CheckpointManager, RNGState
from megatrain.config import Config, head_loss_weights, mtp_lambda_at, to_yaml
from megatrain.console import log, setup_console
from megatrain.data.loader import WindowLoader
from megatrain.data.mixture import check_tokenizers, make_loader, open_training_data
from megatrain.errors import ConfigError, NonFiniteLossError
from megatrain.inference.init_from import read_init_weights
from megatrain.metrics import MetricsLogger, peak_memory_bytes
from megatrain.mtp_loss import build_head_targets, head_scales
from megatrain.optim import apply_schedule, build_scheduler
from megatrain.parallel import init_distributed
from megatrain.parallel.comm import agree_flags, all_reduce_host
from megatrain.parallel.engine import TrainingEngine, build_engine
from megatrain.run_dir import missing_steps
from megatrain.run_lock import RunDirInUse, RunLock
from megatrain.spec import RunSpec, resolve
from megatrain.validation import autocast, evaluate, validation_windows


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


@dataclass
class Run:
    """Everything a training run holds between steps; built by ``setup``."""

    spec: RunSpec
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
    lock: RunLock | None  # rank 0's hold on run.dir, released when the run ends

    @property
    def cfg(self) -> Config:
        return self.spec.config


def setup(cfg: Config | RunSpec) -> Run:
    """Join the process group, resolve the config (unless given resolved), build the engine and
    resume if possible."""
    setup_console()
    env = init_distributed()
    # every check before any collective
    spec = cfg if isinstance(cfg, RunSpec) else resolve(cfg, world_size=env.world_size)
    cfg, t = spec.config, spec.config.train
    device, autocast_dtype = spec.device(env.local_rank)
    if t.threads:
        torch.set_num_threads(t.threads)
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    train_shards = open_training_data(cfg.data, spec.dataset_dir, "train")  # one dataset or a mixture
    check_tokenizers(train_shards)  # a damaged tokenizer.json fails here, not at the end-of-run sample
    lock, checkpoints, resuming = _open_run_dir(spec, env.rank)
    try:
        mesh = spec.dims.build_mesh(device.type) if env.world_size > 1 else None
        return _build_run(spec, env.rank, device, autocast_dtype, mesh, train_shards, lock, checkpoints,
                          resuming)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(spec: RunSpec, rank: int, device, autocast_dtype, mesh, train_shards, lock: RunLock | None,
               checkpoints: CheckpointManager, resuming: bool) -> Run:
    """The engine, optimizers, loader and logger of a run, resumed from its newest intact
    checkpoint when there is one."""
    cfg, t, p = spec.config, spec.config.train, spec.config.parallel
    # init.path seeds a fresh start only: a resume's weights are its checkpoint's
    init_weights = (read_init_weights(cfg.init.path, cfg.model, t.seed)
                    if cfg.init.path and not resuming else None)
    engine, n_params = build_engine(spec, mesh, device, autocast_dtype, init_weights)
    if init_weights is not None:
        log.info(f"initial weights (init.path): {init_weights.summary}; optimizer state fresh")
    schedulers = [build_scheduler(optimizer, t) for optimizer in engine.optimizers]
    dp_rank = mesh["dp"].get_local_rank() if mesh is not None else 0
    loader = make_loader(train_shards, cfg.data.seq_len, t.batch_size, dp_rank=dp_rank,
                         dp_size=p.dp, seed=t.seed, vocab_size=spec.vocab_size)
    state = TrainState()
    checkpointable = {"model_optim": engine.checkpoint_state(), "scheduler": schedulers[0],
                      "dataloader": loader, "train_state": state, "rng": RNGState()}
    for note in spec.notes:
        log.info(note)
    if resuming:
        resumed = checkpoints.resume(checkpointable, cfg.checkpoint.load_step)
        # every stage's optimizer follows one schedule; the config's optimizer keys win
        apply_schedule(engine.optimizers, schedulers, schedulers[0].state_dict(), t)
        log.info(f"resumed from {resumed} at step {state.step}")
    if rank == 0:
        _record_start(spec, state.step, n_params, device)
    logger = MetricsLogger(spec.run_dir, tensorboard=cfg.logging.tensorboard, progress=cfg.logging.progress,
                           total_steps=t.steps, start_step=state.step, enabled=rank == 0)
    return Run(spec, rank, device, autocast_dtype, train_shards.eos_id, engine, schedulers, loader,
               state, checkpoints, checkpointable, logger,
               validation_windows(cfg, spec.dataset_dir, spec.local_batch), lock)


def _record_start(spec: RunSpec, step: int, n_params: int, device) -> None:
    """config.yaml and its history, the metrics cut back to the resumed step, and what the run is."""
    cfg, p = spec.config, spec.config.parallel
    for key, (old, new) in spec.run_dir.record_config(cfg, step).items():
        log.info(f"config changed since the last start: {key} {old} -> {new} (from step {step} on)")
    _cut_metrics(spec, step)
    sequential = cfg.model.mtp_kind == "sequential"
    depths = cfg.model.n_future - 1
    kind = (f"{depths} sequential MTP module{'' if depths == 1 else 's'}" if sequential
            else f"{cfg.model.head_type} head{'' if cfg.model.n_future == 1 else 's'}")
    log.info(f"model: {n_params / 1e6:.2f}M parameters, n_future={cfg.model.n_future} ({kind}), "
             f"vocab {spec.vocab_size}, device {device}, layout dp{p.dp} tp{p.tp} pp{p.pp}; "
             f"run dir {spec.run_dir}")
    weights = spec.head_weights
    if any(w != 1 for w in weights):
        source = ("loss.head_weights" if cfg.loss.head_weights else
                  "loss.mtp_lambda / D, DeepSeek-V3's weighting" if sequential else
                  "loss.extra_heads_weight; the paper sums the heads' losses unweighted")
        log.info(f"loss weights per head {' '.join(f'{w:g}' for w in weights)} (from {source})")


def _cut_metrics(spec: RunSpec, step: int) -> None:
    """metrics.jsonl cut back to ``step`` (a crash's later steps are logged again), and whatever
    the cut shows: damaged lines dropped, or steps before ``step`` that have no record (another
    training wrote here meanwhile, or the file was edited): the checkpoint is sound, but the
    metrics of those steps are gone, and nothing else would say so."""
    run_dir = spec.run_dir
    cut = run_dir.cut_metrics(step)
    if cut.damaged:
        log.info(cut.damage_note(run_dir.metrics_path))
    every = max([spec.config.logging.every, *[v for v in run_dir.values_used("logging.every")
                                              if isinstance(v, int)]])
    gaps = missing_steps(cut.train_steps, step, every) if step else []
    if gaps:
        spans = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in gaps)
        log.info(f"warning: {run_dir.metrics_path} has no training records for steps {spans} of the "
                 f"{step} this run resumes (another training may have written this run dir, or the "
                 f"file was cut); the checkpoint is intact, only those metrics are missing")


def _open_run_dir(spec: RunSpec, rank: int) -> tuple[RunLock | None, CheckpointManager, bool]:
    """Take the run dir (one writer), clear partial saves, and settle what this start does with an
    earlier run there: resume it (same model only; from step 0 when it stopped before its first
    checkpoint) or, for a fresh start, refuse or archive it."""
    cfg, run_dir = spec.config, spec.run_dir
    lock = run_dir.claim(rank)
    try:
        checkpoints = CheckpointManager(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save,
                                        config_text=to_yaml(cfg))
        checkpoints.prepare()
        if cfg.checkpoint.load_step and not cfg.checkpoint.resume:
            raise ConfigError(f"checkpoint.load_step={cfg.checkpoint.load_step} asks to resume, but "
                              f"checkpoint.resume=false; drop one of them")
        resuming = cfg.checkpoint.resume and bool(checkpoints.steps())
        restarting = cfg.checkpoint.resume and not resuming and run_dir.started_without_checkpoint()
        if resuming or restarting:
            run_dir.check_same_model(cfg)
        else:
            run_dir.start_fresh(cfg.run.overwrite, rank)
        if restarting:
            checkpoints.candidates(cfg.checkpoint.load_step, asked_as="checkpoint.load_step")
            if run_dir.has_history():
                log.info(f"restarting {run_dir} from step 0: it holds a run that stopped before its "
                         f"first checkpoint")
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
    scales = head_scales(counts, _head_weights(run))
    with autocast(run.device, run.autocast_dtype):
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


def _head_weights(run: Run) -> list[float]:
    """The loss weights of the step being computed; a scheduled change (loss.mtp_lambda_step) is
    announced and recorded in config_history.jsonl the step it takes effect."""
    weights = head_loss_weights(run.cfg, run.state.step)
    before = head_loss_weights(run.cfg, run.state.step - 1) if run.state.step else weights
    if weights != before and run.rank == 0:
        change = {"loss.mtp_lambda (scheduled)": [mtp_lambda_at(run.cfg.loss, run.state.step - 1),
                                                  mtp_lambda_at(run.cfg.loss, run.state.step)]}
        run.spec.run_dir.record_history(run.state.step, change)
        log.info(f"loss.mtp_lambda {change['loss.mtp_lambda (scheduled)'][0]:g} -> "
                 f"{change['loss.mtp_lambda (scheduled)'][1]:g} from step {run.state.step} on "
                 f"(loss.mtp_lambda_step)")
    return weights


def train(cfg: Config, should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train to ``cfg.train.steps``, resuming from ``run.dir`` if it holds a checkpoint.

    Runs as one process or as one rank of a torchrun / SLURM job (``parallel.*`` picks the
    layout). ``should_stop(step)`` is polled after every step on every rank and must give every
    rank the same answer (the SLURM job's agrees its signal flags in one all-reduce); when it
    says stop, the trainer saves a checkpoint of that step and returns early.
    """
    run = setup(cfg)
    cfg = run.cfg  # resolved
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
        run.logger.close()  # a failure to flush the last records is this run's error
    except BaseException:
        run.logger.close(quietly=True)  # the error in flight is the one to report
        raise
    finally:
        if run.lock is not None:
            run.lock.release()
    return TrainResult(run.spec.run_dir.path, state.step,
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
