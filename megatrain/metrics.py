"""Metrics sinks: metrics.jsonl (one object per logged step), TensorBoard, a progress bar."""

from __future__ import annotations

import json
import resource
from pathlib import Path

import torch

from megatrain.files import atomic_write_text
from megatrain.run_dir import RunDir


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: max allocated on GPU, max resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past ``last_step`` (written by a run that died after its last checkpoint),
    and lines that are not JSON: a crash or a full disk can tear the line being written."""
    if not path.is_file():
        return
    kept, torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            torn += bool(line.strip())
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    if torn:
        print(f"{path}: dropped {torn} damaged line(s) (torn by a crash or a full disk)", flush=True)
    atomic_write_text(path, "".join(line + "\n" for line in kept))


class MetricsLogger:
    """Writes a run's metrics.jsonl and TensorBoard events (``RunDir`` names them)."""

    def __init__(self, run_dir: RunDir, *, tensorboard: bool, progress: bool, total_steps: int,
                 start_step: int, enabled: bool = True):
        self.enabled = enabled
        self.jsonl = open(run_dir.metrics_path, "a") if enabled else None
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(run_dir.tensorboard_dir), purge_step=start_step + 1)
        self.bar = None
        if enabled and progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                            dynamic_ncols=True)

    def log_train(self, record: dict) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        step = record["step"]
        if self.writer:
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
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()
        if self.writer:
            for i, (loss, acc) in enumerate(zip(head_losses, head_accuracy)):
                self.writer.add_scalar(f"val_loss/head_{i + 1}", loss, step)
                self.writer.add_scalar(f"val_accuracy/head_{i + 1}", acc, step)
        message = f"step {step}: val loss per head " + " ".join(f"{x:.3f}" for x in head_losses)
        if self.bar:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
        if self.writer:
            self.writer.close()
        if self.jsonl:
            self.jsonl.close()
