"""``benchmarks/data_prepare.py`` runs end to end at a tiny size and prints its tables."""

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # two pipelines plus a tokenizer fit: ~20-40 s on 2 busy cores
def test_data_prepare_benchmark_prints_both_tables(tmp_path):
    done = subprocess.run(
        [sys.executable, "benchmarks/data_prepare.py", "--mb", "0.5", "--tasks", "1", "--no-scaling",
         "--out-md", "", "--work-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ")]
    assert any(r.startswith("| floor: read -> tokenize | 1 |") for r in rows), done.stdout
    full = [r for r in rows if r.startswith("| full pipeline | 1 |")]
    assert len(full) == 1 and float(full[0].split("|")[6]) > 0, done.stdout  # its wall time
    assert any(r.startswith("| 0.5 MB, tasks 1 |") for r in rows), done.stdout  # the stage table
