"""``megatrain profile memory``: run the configured training step and measure memory per phase.

It runs ``WARMUP_STEPS`` + K steps of exactly the configured model and layout through the trainer's
own ``setup`` and ``train_step`` (as one process, or as every rank of a torchrun / SLURM job), with a
phase recorder active (megatrain.profiling.phases): on the CPU the exact count of live tensor
bytes (cpu_counter.py), on a GPU the caching allocator's statistics (cuda_counter.py). Both start
before the model is built, so every figure is "bytes allocated since the profiler started".

Outputs in ``out_dir`` (rank 0 writes them; every rank returns the same dict):
``memory_profile.json``, ``memory_timeline.png`` and the per-head table printed to the terminal;
per-phase peaks as TensorBoard scalars in ``out_dir/run/tensorboard`` when ``logging.tensorboard``
is on. The training run itself lives in ``out_dir/run`` (never the config's ``run.dir``: a profile
must not resume or touch a real run), without checkpoints.
"""

from __future__ import annotations

import copy
import gc
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatrain.config import Config
from megatrain.errors import UserError
from megatrain.files import atomic_write_text
from megatrain.mtp_loss import HeadStats, mtp_loss_naive
from megatrain.parallel.comm import agree_flags
from megatrain.parallel.process_group import init_distributed
from megatrain.profiling.cpu_counter import CpuAllocationCounter
from megatrain.profiling.cuda_counter import CudaAllocatorCounter
from megatrain.profiling.phases import recording
from megatrain.profiling.report import format_report, head_summary, per_phase_step_peaks
from megatrain.profiling.timeline_plot import plot_timeline
from megatrain.spec import RunSpec, resolve
from megatrain.trainer import setup, train_step

_SCRATCH_MARKER = "MEGATRAIN_PROFILE_RUN"
WARMUP_STEPS = 1  # builds the optimizer state and the pipeline's buffers before anything is measured
BASELINE = "bytes allocated since the profiler started (before the model was built)"


@dataclass
class _Measured:
    ranks: list[dict]  # {"rank", "peak_bytes", "phases"} per rank, in rank order
    timelines: list[dict]  # {"t_s", "bytes"} per rank
    spec: RunSpec  # the profiled run, resolved
    device: torch.device
    autocast_dtype: torch.dtype | None


def profile_memory(cfg: Config, *, steps: int, out_dir: Path, compare_naive: bool = False) -> dict:
    """Profile ``steps`` training steps after a warm-up; returns the ``memory_profile.json`` content.

    With ``compare_naive`` the same steps run a second time with the all-logits reference loss
    (``megatrain.mtp_loss.mtp_loss_naive``) in place of the sequential-heads node; its profile
    goes under the key ``"naive"``.
    """
    if steps < 1:
        raise UserError(f"--steps must be at least 1, got {steps}")
    out_dir = Path(out_dir).expanduser()
    measured = _measure(cfg, steps, out_dir, naive=False)
    profile = _profile_dict(measured, steps)
    naive = None
    if compare_naive:
        naive = _measure(cfg, steps, out_dir, naive=True)
        profile["naive"] = _profile_dict(naive, steps)
    if _rank() == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "memory_profile.json", json.dumps(profile, indent=1) + "\n")
        plot_timeline(profile["ranks"], measured.timelines, out_dir / "memory_timeline.png",
                      title=_title(profile, "sequential heads"))
        if naive is not None:
            plot_timeline(profile["naive"]["ranks"], naive.timelines, out_dir / "memory_timeline_naive.png",
                          title=_title(profile, "naive all-logits loss"))
        print(format_report(profile), flush=True)
        print(f"wrote {out_dir / 'memory_profile.json'} and {out_dir / 'memory_timeline.png'}", flush=True)
    return profile


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _title(profile: dict, loss: str) -> str:
    m = profile["model"]
    return (f"n_future={m['n_future']} ({m['head_type']} heads), dim {m['dim']}, vocab {m['vocab_size']}, "
            f"{m['layout']}: {loss}")


def _profile_dict(measured: _Measured, steps: int) -> dict:
    spec = measured.spec
    cfg, p = spec.config, spec.config.parallel
    ce_dtype = measured.autocast_dtype or torch.float32
    tokens = spec.micro_batch * cfg.data.seq_len  # what each head's loss sees at a time on a rank
    return {
        "baseline": BASELINE,
        "device": measured.device.type,
        "warmup_steps": WARMUP_STEPS,
        "steps": steps,
        "model": {"n_layers": cfg.model.n_layers, "n_future": cfg.model.n_future,
                  "head_type": cfg.model.head_type, "dim": cfg.model.dim,
                  "vocab_size": cfg.model.vocab_size, "layout": f"dp{p.dp} tp{p.tp} pp{p.pp}",
                  "tokens_per_microbatch": tokens},
        # what one head's logits would take if they were materialised: tokens x vocab (this rank's
        # tp shard) x bytes of the dtype the heads' cross-entropy runs in
        "naive_logits_bytes_per_head": tokens * (cfg.model.vocab_size // p.tp) * ce_dtype.itemsize,
        "ranks": measured.ranks,
    }


def _profiling_config(cfg: Config, run_dir: Path) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.run.dir = str(run_dir)
    cfg.checkpoint.resume = False
    cfg.checkpoint.async_save = False
    cfg.train.eval_every = 0  # no validation windows held in memory
    cfg.logging.progress = False
    return cfg


def _counter(device: torch.device, out_dir: Path, rank: int, naive: bool):
    if device.type == "cuda":
        suffix = "_naive" if naive else ""
        return CudaAllocatorCounter(device, out_dir / f"rank{rank}_snapshot{suffix}.pickle")
    return CpuAllocationCounter()


def _measure(cfg: Config, steps: int, out_dir: Path, naive: bool) -> _Measured:
    cfg = _profiling_config(cfg, out_dir / ("run_naive" if naive else "run"))
    env = init_distributed()  # setup joins too; joining first lets rank 0 clear the scratch run dir
    spec = resolve(cfg, world_size=env.world_size)
    _fresh_scratch_run_dir(spec.run_dir.path, env.rank)
    device, autocast_dtype = spec.device(env.local_rank)
    # Whatever an earlier measurement in this process left must be gone before the counter starts:
    # a block freed while it counts but allocated while an earlier one counted would be subtracted.
    gc.collect()
    counter = _counter(device, out_dir, env.rank, naive)
    run = None
    counter.start()
    try:
        try:
            with recording(counter):
                run = setup(spec)
                if naive:
                    for stage in run.engine.stages:
                        stage.loss_fn = naive_mtp_loss
                for step in range(WARMUP_STEPS + steps):
                    with counter.step(step):
                        train_step(run)
        finally:
            counter.stop()
        mine = counter.result(list(range(WARMUP_STEPS, WARMUP_STEPS + steps)))
        everyone = _gather({"rank": env.rank, **mine})
        if run.logger.writer is not None:
            _log_tensorboard(run.logger.writer, everyone, "memory_naive" if naive else "memory")
    finally:
        if run is not None:
            run.logger.close()
            if run.lock is not None:
                run.lock.release()
    timelines = [r.pop("timeline") for r in everyone]
    for entry in everyone:
        entry["heads"] = head_summary(entry["phases"])  # None on ranks without heads
    return _Measured(everyone, timelines, spec, device, autocast_dtype)


def _fresh_scratch_run_dir(run_dir: Path, rank: int) -> None:
    """Empty the profile's own run dir (an earlier profile's, recognised by its marker file), so
    that nothing of it is resumed or archived. A folder there that a profile did not make is left
    alone: the user is asked to pick another --out."""
    foreign = False
    if rank == 0:
        foreign = run_dir.exists() and not (run_dir / _SCRATCH_MARKER).exists()
        if not foreign:
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            (run_dir / _SCRATCH_MARKER).write_text("the training run of `megatrain profile memory`; the "
                                                   "next profile with the same --out replaces it\n")
    (foreign,) = agree_flags([foreign])  # also the barrier: no rank starts before the folder is ready
    if foreign:
        raise UserError(f"{run_dir} exists and was not made by `megatrain profile memory`, which runs its "
                        f"training there; pass another --out or move {run_dir} away")


def _gather(mine: dict) -> list[dict]:
    if not dist.is_initialized():
        return [mine]
    everyone: list = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, mine)
    return everyone


def _log_tensorboard(writer, ranks: list[dict], prefix: str) -> None:
    """Each phase's peak per profiled step (the largest over microbatches and stages of a rank)."""
    for entry in ranks:
        for (name, step), peak in per_phase_step_peaks(entry["phases"]).items():
            writer.add_scalar(f"{prefix}/rank{entry['rank']}/{name}/peak_bytes", peak, step)
        writer.add_scalar(f"{prefix}/rank{entry['rank']}/step_peak_bytes", entry["peak_bytes"], 0)
    writer.flush()


def naive_mtp_loss(model, trunk_hidden, targets, head_scales, ignore_index=-100, impl="auto", sink=None,
                   embedded=None):
    """``mtp_loss``'s signature and results around ``mtp_loss_naive``: every head's logits stay
    alive until the trunk's backward. Per-head losses and hits are not computed (zeros)."""
    n = model.n_future
    total = mtp_loss_naive(model, trunk_hidden, targets, head_scales.to(trunk_hidden.device), ignore_index,
                           embedded=embedded)
    n_valid = (targets != ignore_index).flatten(1).sum(1).cpu()
    return total, HeadStats(torch.zeros(n, dtype=torch.float64), torch.zeros(n, dtype=torch.int64), n_valid)
