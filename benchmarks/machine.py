"""The machine a benchmark ran on, for the tables in docs/benchmarks.md."""

import os
import platform
from pathlib import Path


def machine_name() -> str:
    """GPU name when CUDA is visible, else the CPU model and core count."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name()
    except ImportError:
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'}, {os.cpu_count()} cores"
