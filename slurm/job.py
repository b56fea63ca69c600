"""What runs inside the SLURM job: one ``TrainJob`` call per task (rank).

The preemption/time-limit design is in DESIGN.md. In short: SLURM's signals only set a flag; the
trainer polls it after each step, saves a DCP checkpoint at that step boundary and returns; then
rank 0 requeues the job itself (``scontrol requeue``) and every rank exits without a result, so
the next run of the same job id resumes from that checkpoint.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import submitit

import megatrain
from megatrain.errors import UserError
from megatrain.slurm import registry

# torch and megatrain.parallel are imported only where used: this module is unpickled at job
# start, and every second spent importing before the signal handlers are installed is a window in
# which SLURM's time-limit signal (USR2, default action: terminate) kills the job outright.

# Exit status of a run that stopped on a signal after checkpointing (128 + SIGTERM, as if killed):
# the job was requeued (by us or by SLURM) or cancelled, and no result file is written.
EXIT_STOPPED = 143
# After a SIGTERM-only stop, how long rank 0 waits for the checkpoint signal that may follow it.
# Waiting costs nothing when none comes: a cancel or a preemption SLURM requeues itself ends in
# SIGKILL (after KillWait or the partition's GraceTime). 20 s was once too short on a loaded
# machine, where the second `scancel --signal` of a preemption reached the task late.
TERM_GRACE_S = 60.0


class RequeueBudgetExhausted(UserError):
    """The job was told to stop again but has used all its requeues; its checkpoint is on disk."""


class JobSetupError(UserError):
    """The job's environment cannot run the training (rendezvous address, restart count)."""


class StopSignals:
    """Flags set by SLURM's signals; the handlers do nothing else (they run mid-step).

    SIGUSR2 (``--signal=USR2@delay``: time limit near, or submitit's preemption signal) asks for
    checkpoint + requeue. SIGTERM (``scancel``, or a preemption SLURM requeues by itself) asks for
    checkpoint + exit; SLURM decides what happens next.
    """

    def __init__(self, requeue_signal: int):
        self.requeue_signal = requeue_signal
        self.requeue = False
        self.terminate = False
        self.received_at: float | None = None
        self.terminated_at: float | None = None
        self.requeue_asked_at: float | None = None

    def install(self) -> StopSignals:
        # Replaces submitit's handlers, which checkpoint from inside the handler and exit at once:
        # that would interrupt a training step half-way (see DESIGN.md).
        signal.signal(self.requeue_signal, self._on_requeue)
        signal.signal(signal.SIGTERM, self._on_terminate)
        return self

    def _on_requeue(self, signum, frame) -> None:
        self.requeue = True
        self.received_at = self.received_at or time.time()
        self.requeue_asked_at = self.requeue_asked_at or time.time()

    def _on_terminate(self, signum, frame) -> None:
        self.terminate = True
        self.received_at = self.received_at or time.time()
        self.terminated_at = self.terminated_at or time.time()

    @property
    def stop(self) -> bool:
        return self.requeue or self.terminate

    def agreed_stop(self, step: int | None = None) -> bool:
        """``stop`` agreed by all ranks (the trainer's ``should_stop``, polled after each step):
        every rank must stop after the same step, or the ranks that go on hang in the next
        collective. Both flags are agreed, so rank 0 knows a requeue was asked even if only
        another rank saw the signal. This is the step's one stop collective."""
        from megatrain.parallel.comm import agree_flags

        self.requeue, self.terminate = agree_flags([self.requeue, self.terminate])
        return self.stop


def export_distributed_env() -> submitit.helpers.TorchDistributedEnvironment:
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT from SLURM (what torchrun would set).

    MASTER_ADDR is the first node of the allocation, or ``$MEGATRAIN_MASTER_ADDR`` when set: the
    emulated local cluster's node names do not resolve and every node is 127.0.0.1.
    """
    env = submitit.helpers.TorchDistributedEnvironment()
    override = os.environ.get("MEGATRAIN_MASTER_ADDR")
    if override:
        env.master_addr = override
    else:
        try:
            socket.getaddrinfo(env.master_addr, None)
        except socket.gaierror:
            if env.world_size > env.local_world_size:
                raise JobSetupError(
                    f"the first node of the job, {env.master_addr!r}, does not resolve; export "
                    f"MEGATRAIN_MASTER_ADDR=<its address> before `megatrain submit`") from None
            env.master_addr = "127.0.0.1"  # one node: every rank is on this host
    # LOCAL_RANK picks the GPU in the trainer; keep every GPU of the node visible.
    return env.export(set_cuda_visible_devices=False, overwrite=True)


class TrainJob(submitit.helpers.Checkpointable):
    """One training run as a requeueable SLURM job.

    ``train_fn(cfg, should_stop) -> result`` (default ``megatrain.trainer.train``) must resume from
    ``run.dir/checkpoints/latest`` and, when ``should_stop()`` turns true, save a checkpoint and
    return with ``result.stopped_early``. Other callables with that contract serve tests.
    """

    def __init__(self, cfg, max_requeues: int, time_min: int, signal_delay_s: int,
                 train_fn: Callable | None = None):
        self.cfg = cfg
        self.max_requeues = max_requeues
        self.time_min = time_min
        self.signal_delay_s = signal_delay_s
        self.train_fn = train_fn

    def __call__(self) -> dict:
        started = time.time()
        job_env = submitit.JobEnvironment()
        job_id = job_env.job_id
        restart = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        run_dir = Path(self.cfg.run.dir).expanduser()
        rank = job_env.global_rank
        log = registry.add_event if rank == 0 else (lambda *a, **k: None)

        signals = StopSignals(job_env._usr_sig()).install()
        if restart > self.max_requeues:  # SLURM requeued it (node failure, preemption) once too often
            message = (f"job {job_id} was requeued {restart} times, more than its budget of "
                       f"{self.max_requeues} (--max-requeues); the latest checkpoint in {run_dir} is "
                       f"intact: resubmit with the same command to continue")
            log(run_dir, job_id, "failed", state="FAILED", restart=restart, error=message)
            raise RequeueBudgetExhausted(message)
        dist_env = export_distributed_env()
        log(run_dir, job_id, "started", state="RUNNING", restart=restart, node=socket.gethostname(),
            world_size=dist_env.world_size, master=f"{dist_env.master_addr}:{dist_env.master_port}",
            code=str(Path(megatrain.__file__).parent))
        print(f"[megatrain.slurm] job {job_id} run {restart + 1} rank {dist_env.rank}/"
              f"{dist_env.world_size} on {socket.gethostname()}, master {dist_env.master_addr}:"
              f"{dist_env.master_port}", flush=True)

        train_fn = self.train_fn
        if train_fn is None:
            from megatrain.trainer import train as train_fn
        try:
            result = train_fn(self.cfg, should_stop=signals.agreed_stop)
        except BaseException as err:
            log(run_dir, job_id, "failed", state="FAILED", restart=restart,
                error=f"{type(err).__name__}: {err}"[:2000])
            raise

        if not result.stopped_early:
            log(run_dir, job_id, "completed", state="COMPLETED", restart=restart, step=result.step)
            from megatrain.parallel.process_group import shutdown_distributed

            # leave together; skip interpreter teardown once submitit has written the result
            shutdown_distributed(at_exit=True)
            return {"job_id": job_id, "step": result.step, "head_losses": list(result.head_losses),
                    "restarts": restart, "run_dir": str(result.run_dir)}

        if rank != 0:  # rank 0 alone decides and requeues; the others leave no result either
            raise SystemExit(EXIT_STOPPED)
        if not signals.requeue:
            print(f"[megatrain.slurm] stopped by SIGTERM after step {result.step}, checkpoint saved; "
                  f"waiting up to {TERM_GRACE_S:.0f} s for the checkpoint signal that a preemption "
                  f"sends next", flush=True)
            # SIGTERM first: a preemption that sends the checkpoint signal next (submitit's
            # convention), a cancel, or a preemption SLURM requeues by itself. Both latter end in
            # SIGKILL; wait for whichever comes.
            deadline = time.monotonic() + TERM_GRACE_S
            while not signals.requeue and time.monotonic() < deadline:
                time.sleep(0.1)
        if not signals.requeue:
            log(run_dir, job_id, "stopped", restart=restart, step=result.step, reason="SIGTERM")
            print(f"[megatrain.slurm] stopped by SIGTERM after step {result.step}; checkpoint "
                  f"saved; not requeued by megatrain", flush=True)
            raise SystemExit(EXIT_STOPPED)

        if signals.terminated_at is not None and signals.requeue_asked_at is not None:
            late = signals.requeue_asked_at - signals.terminated_at
            print(f"[megatrain.slurm] the checkpoint signal came {abs(late):.1f} s "
                  f"{'after' if late >= 0 else 'before'} SIGTERM", flush=True)
        reason = self._stop_reason(signals.received_at or time.time(), started)
        if restart >= self.max_requeues:
            message = (f"job {job_id} stopped at step {result.step} ({reason}) with its requeue "
                       f"budget spent ({restart} of --max-requeues={self.max_requeues}); the "
                       f"checkpoint of step {result.step} is in {run_dir / 'checkpoints'}: resubmit "
                       f"with the same command to continue")
            log(run_dir, job_id, "failed", state="FAILED", restart=restart, step=result.step,
                reason=reason, error=message)
            raise RequeueBudgetExhausted(message)
        print(f"[megatrain.slurm] {reason}: checkpointed step {result.step}, requeueing job "
              f"{job_id} ({restart + 1} of {self.max_requeues} requeues used)", flush=True)
        try:
            done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                                  timeout=60)
            error = done.stderr.strip() if done.returncode != 0 else None
        except (OSError, subprocess.TimeoutExpired) as err:  # no scontrol here, or it hung
            error = str(err)
        if error is not None:
            message = (f"`scontrol requeue {job_id}` failed after checkpointing step "
                       f"{result.step}: {error}; resubmit with the same command")
            log(run_dir, job_id, "failed", state="FAILED", restart=restart, step=result.step,
                error=message)
            raise RuntimeError(message)
        # recorded once SLURM has accepted it, so jobs.json never shows a requeue that failed
        log(run_dir, job_id, "requeued", state="REQUEUED", restart=restart, step=result.step,
            reason=reason)
        raise SystemExit(EXIT_STOPPED)  # no result file: the job is not over

    def _stop_reason(self, signalled_at: float, started: float) -> str:
        remaining = self.time_min * 60 - (signalled_at - started)
        # SLURM checks time limits about every 30 s: the signal may come that much late
        return "time limit" if remaining <= self.signal_delay_s + 60 else "preemption"

    def checkpoint(self, *args, **kwargs):
        """submitit calls this only if a signal arrives before ``__call__`` installed its own
        handlers, i.e. before training started: requeue the same job unchanged."""
        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
