"""Metrics sinks: metrics.jsonl (one object per logged step), TensorBoard, a progress bar.

A full disk is one error whichever sink meets it first: a metrics line is appended whole or not at
all (``append_whole``), and TensorBoard's writer thread, which would print its own traceback and
fail again at every later call, is kept quiet so that its error reaches the training as the same
``DiskFullError`` at the next call.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading

import torch

from megatrain.files import append_whole, disk_full, disk_full_is_reported, is_out_of_space
from megatrain.run_dir import RunDir


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: max allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class MetricsLogger:
    """Writes a run's metrics.jsonl and TensorBoard events (``RunDir`` names them)."""

    def __init__(self, run_dir: RunDir, *, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.run_dir = run_dir
        self.jsonl = self.writer = self.bar = None
        if enabled:
            with disk_full_is_reported(run_dir.metrics_path):
                self.jsonl = os.open(run_dir.metrics_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            _quiet_tensorboard_disk_full()
            try:
                with self._tensorboard_disk_full():
                    self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard_dir),
                                                purge_step=start_step + 1)
            except BaseException:
                self.close(quietly=True)
                raise
        if enabled and progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def _append(self, record: dict) -> None:
        append_whole(self.jsonl, json.dumps(record) + "\n", self.run_dir.metrics_path)

    @contextlib.contextmanager
    def _tensorboard_disk_full(self):
        """TensorBoard's calls re-raise its writer thread's error (a full disk): say it as ours."""
        try:
            yield
        except OSError as err:
            if not is_out_of_space(err):
                raise
            raise disk_full(self.run_dir.tensorboard_dir, after="metrics.jsonl is intact") from None

    def log_train(self, record: dict) -> None:
        if not self.enabled:
            return
        self._append(record)
        step = record["step"]
        if self.writer:
            with self._tensorboard_disk_full():
                self.writer.add_scalar("loss/total", record["loss"], step)
                for i, (loss, acc) in enumerate(zip(record["head_losses"], record["head_accuracy"])):
                    self.writer.add_scalar(f"loss/head_{i + 1}", loss, step)
                    self.writer.add_scalar(f"accuracy/head_{i + 1}", acc, step)
                for key in ("lr", "grad_norm", "tokens_per_s", "peak_mem_bytes"):
                    self.writer.add_scalar(f"train/{key}", record[key], step)
        if self.bar:
            heads = " ".join(f"{x:.2f}" for x in record["head_losses"])
            self.bar.set_postfix_str(f"loss {record['loss']:.3f} heads [{heads}] "
                                     f"{record['tokens_per_s']:.0f} tok/s")

    def advance(self, n: int = 1) -> None:
        if self.bar:
            self.bar.update(n)

    def log_eval(self, step: int, head_losses: list[float], head_accuracy: list[float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "val_head_losses": head_losses, "val_head_accuracy": head_accuracy,
                  "val_loss": sum(head_losses)}
        self._append(record)
        if self.writer:
            with self._tensorboard_disk_full():
                for i, (loss, acc) in enumerate(zip(head_losses, head_accuracy)):
                    self.writer.add_scalar(f"val_loss/head_{i + 1}", loss, step)
                    self.writer.add_scalar(f"val_accuracy/head_{i + 1}", acc, step)
        message = f"step {step}: val loss per head " + " ".join(f"{x:.3f}" for x in head_losses)
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self, quietly: bool = False) -> None:
        """Close every sink, even when one fails; then raise the first failure, unless ``quietly``
        (the run is already ending on an error, which is the one to report)."""
        errors = []
        if self.bar:
            self.bar.close()
        if self.writer:
            try:
                with self._tensorboard_disk_full():
                    self.writer.close()  # flushes what is queued
            except Exception as err:  # noqa: BLE001 - raised below, after the other sinks closed
                errors.append(err)
            self.writer = None
        if self.jsonl is not None:
            os.close(self.jsonl)
            self.jsonl = None
        if errors and not quietly:
            raise errors[0]


def _quiet_tensorboard_disk_full() -> None:
    """Stop TensorBoard's writer thread from printing a traceback for a full disk: the thread
    keeps its error and TensorBoard re-raises it at the next call from the training, which
    reports it (``_tensorboard_disk_full``). Any other thread error still goes to the hook that
    was there. Installed by each logger unless already in place (a test runner may swap hooks)."""
    previous = threading.excepthook
    if getattr(previous, "quiets_tensorboard_disk_full", False):
        return

    def hook(args):
        from_tensorboard = type(args.thread).__module__.startswith("tensorboard.")
        if from_tensorboard and args.exc_value is not None and is_out_of_space(args.exc_value):
            return
        previous(args)

    hook.quiets_tensorboard_disk_full = True
    threading.excepthook = hook
