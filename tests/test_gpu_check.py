"""benchmarks/gpu_check.py is not dead code: its CPU smoke mode runs every table-building path at
tiny sizes (the Triton rows in the interpreter), and without CUDA it refuses with the install
command instead of failing somewhere inside."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_check.py"


def _run(*args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, str(SCRIPT), *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_cpu_smoke_builds_both_tables(tmp_path):
    out = tmp_path / "report.md"
    docs_before = (REPO / "docs" / "benchmarks.md").read_text()
    proc = _run("--cpu-smoke", "--repeats", "1", "--steps", "1", "--warmup", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = out.read_text()
    for row in ("| 96x32x500 | gemm floor (3 matmuls) |", "| 96x32x500 | megatrain triton |",
                "| 96x32x500 | megatrain triton (rows) |", "| 96x32x500 | megatrain triton (tiles) |",
                "| 96x32x500 | megatrain triton (cap 1 MiB) |",
                "| 1 | False | sdpa |", "| 4 | False | sdpa |"):
        assert row in report, f"missing {row!r} in:\n{report}"
    assert "matches the float64 truth" in proc.stdout
    train_rows = [line for line in report.split("| loss |")[1].splitlines() if line.startswith("| ")]
    losses = [float(line.strip(" |").split("|")[-1]) for line in train_rows]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses), report  # finite
    assert (REPO / "docs" / "benchmarks.md").read_text() == docs_before  # CPU never appends


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_exits_with_the_install_command():
    proc = _run(timeout=120)
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "needs a CUDA GPU" in proc.stderr, proc.stderr[-2000:]
    assert "download.pytorch.org/whl/cu128" in proc.stderr and "--cpu-smoke" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_mfu_peak_is_known_for_h100_and_h200_only_by_name():
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert gpu_check.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check.peak_tflops("NVIDIA L4", None) is None  # unknown: no made-up MFU
    assert gpu_check.peak_tflops("NVIDIA L4", 121.0) == 121.0
    cases = gpu_check.train_cases(smoke=False, xformers=True)
    assert {(1, True, "sdpa"), (4, True, "sdpa"), (4, False, "xformers")} <= set(cases)
    assert all(not compile_ for _, compile_, _ in gpu_check.train_cases(smoke=True, xformers=False))
