"""The GPU check is ready for the day a GPU is lent: ``benchmarks/gpu_check.sh`` installs the
carried wheels and megatrain without a network and runs every section end to end (at tiny sizes on
the CPU, the Triton kernels in the interpreter), writing the files a device run returns; the
budget skips rows with a reason, and a failing section does not stop the others."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatrain.kernels import interpreter_problem

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS = REPO / "benchmarks"
SECTION_TITLES = ("**1. Fused linear + cross-entropy**", "**2. Training step**",
                  "**3. Memory planner vs the device**", "**4. Decoding cost per forward**")
WHEEL_CAP_BYTES = 20 << 20


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PYTHONPATH")}
    env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHON=sys.executable, **extra)
    return env


def _gpu_check(*args, timeout=120):
    return subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), *args], env=_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def carried_wheels(tmp_path_factory):
    """benchmarks/gpu_wheels.sh's folder, downloaded once (PyPI is reachable here, not on the device)."""
    folder = tmp_path_factory.mktemp("wheels") / "gpu_wheels"
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_wheels.sh"), str(folder)], env=_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return folder


def test_carried_wheels_are_the_listed_ones_for_python_312_and_under_the_cap(carried_wheels):
    listed = [line.split("==")[0].replace("-", "_") for line in
              (BENCHMARKS / "gpu_wheels.txt").read_text().splitlines() if line and not line.startswith("#")]
    names = sorted(p.name for p in carried_wheels.glob("*.whl"))
    assert sorted(n.split("-")[0].lower() for n in names) == sorted(listed), names
    assert all(("py3-none-any" in n or "cp312" in n) for n in names), names  # installable on the image
    assert not any(n.startswith(("torch-", "triton-", "nvidia")) for n in names), names
    assert sum(p.stat().st_size for p in carried_wheels.iterdir()) < WHEEL_CAP_BYTES


def test_carried_omegaconf_is_the_version_the_suite_runs():
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (BENCHMARKS / "gpu_wheels.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    assert pins["omegaconf"] == version("omegaconf")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU rehearsal of the device run")
@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"),
                    reason="`unshare -n` (no network, like the lent machines) needs root")
def test_gpu_check_sh_installs_without_network_and_runs_every_section(carried_wheels, tmp_path):
    out = tmp_path / "out"
    docs_before = (REPO / "docs" / "benchmarks.md").read_text()
    proc = subprocess.run(["unshare", "-n", "--", "bash", str(BENCHMARKS / "gpu_check.sh"),
                           "--repeats", "1", "--steps", "1", "--warmup", "1"],
                          env=_env(OUT=str(out), GPU_WHEELS=str(carried_wheels)), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    log = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, log
    assert sorted(p.name for p in out.iterdir()) == ["check.log", "memory_profile.json", "report.md",
                                                      "results.json", "smoke.log"], log
    assert "smoke ok" in (out / "smoke.log").read_text()
    report = (out / "report.md").read_text()
    for title in SECTION_TITLES:
        assert title in report, report
    assert "**failed**" not in report and "s in all." in report, report
    triton_rows = ["| 96x32x500 | megatrain triton |", "| 96x32x500 | megatrain triton (rows) |",
                   "| 96x32x500 | megatrain triton (tiles) |", "| 96x32x500 | megatrain triton (cap 1 MiB) |"]
    if interpreter_problem():  # e.g. triton 3.6 with numpy 2.4 (benchmarks/torch_compat.sh)
        assert f"No Triton rows: {interpreter_problem()}" in report, report
        triton_rows = []
    for row in ("| 96x32x500 | gemm floor (3 matmuls) |", *triton_rows, "| 1 | False | sdpa |",
                "| 4 | False | sdpa |", "| heads |", "| **rank peak** |", "| 1 |", "| 8 |"):
        assert row in report, f"missing {row!r} in:\n{report}"
    results = json.loads((out / "results.json").read_text())
    assert [r["n_future"] for r in results["train"]] == [1, 4]
    assert all(0 < r["loss"] < 100 for r in results["train"])
    assert 0.9 < results["memory"]["measured_peak_bytes"] / results["memory"]["planned_peak_bytes"] < 1.1
    assert [r["batch"] for r in results["decode"]] == [1, 8]
    assert "matches the float64 truth" in (out / "check.log").read_text()  # the kernel check ran
    assert (REPO / "docs" / "benchmarks.md").read_text() == docs_before  # CPU never appends


def test_gpu_check_sh_without_carried_wheels_says_how_to_get_them(tmp_path):
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")],
                          env=_env(OUT=str(tmp_path), GPU_WHEELS=str(tmp_path / "none")), cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "bash benchmarks/gpu_wheels.sh" in proc.stdout


def test_a_spent_budget_skips_every_row_with_the_reason(tmp_path):
    proc = _gpu_check("--cpu-smoke", "--budget-s", "0", "--out-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = (tmp_path / "report.md").read_text()
    for title in SECTION_TITLES:
        assert title in report, report
    assert report.count("skipped: 0 s of the 0 s budget left") >= 4, report  # shape, rows, sections


def test_a_failing_section_is_recorded_and_the_next_runs(tmp_path, capsys):
    sys.path.insert(0, str(BENCHMARKS))
    try:
        from gpu_check_report import Report
    finally:
        sys.path.remove(str(BENCHMARKS))
    report = Report(tmp_path, "title", "preamble")
    with report.guarded("first"):
        report.set("first", "table so far")
        raise ValueError("no kernel image for this device")
    with report.guarded("second"):
        report.set("second", "second table")
    text = (tmp_path / "report.md").read_text()
    assert "table so far\n\n**failed**: `ValueError: no kernel image for this device`" in text
    assert "second table" in text and "had not finished" in text
    report.finish()
    assert "s in all." in (tmp_path / "report.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_without_cuda_exits_and_names_the_device_command():
    proc = _gpu_check()
    assert proc.returncode == 1, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert "needs a CUDA GPU" in proc.stderr and "bash benchmarks/gpu_check.sh" in proc.stderr
    assert "--cpu-smoke" in proc.stderr and "Traceback" not in proc.stderr


def test_mfu_peak_is_known_for_h100_and_h200_only_by_name():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_check_train
    finally:
        sys.path.remove(str(BENCHMARKS))
    assert gpu_check_train.peak_tflops("NVIDIA H200", None) == 989.0
    assert gpu_check_train.peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.0
    assert gpu_check_train.peak_tflops("NVIDIA L4", None) is None  # unknown: no made-up MFU
    assert gpu_check_train.peak_tflops("NVIDIA L4", 121.0) == 121.0
    cases = gpu_check_train.train_cases(smoke=False, xformers=True)
    assert {(1, True, "sdpa"), (4, True, "sdpa"), (4, False, "xformers")} <= set(cases)
    assert all(not compile_ for _, compile_, _ in gpu_check_train.train_cases(smoke=True, xformers=False))


def test_a_failing_provider_gets_its_row_and_the_others_are_still_timed():
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import fused_ce
    finally:
        sys.path.remove(str(BENCHMARKS))

    def broken(hidden, weight, targets):
        raise RuntimeError("built for another triton")

    providers = {"gemm floor (3 matmuls)": None, "broken library": broken, "torch eager": fused_ce.eager_loss}
    rows = fused_ce.bench_shape((48, 16, 100), torch.float32, "cpu", providers, 1, interpret=False)
    assert [r[1] for r in rows] == ["gemm floor (3 matmuls)", "broken library (failed: RuntimeError)",
                                    "torch eager"]
    assert rows[2][2] > 0 and rows[1][2] != rows[1][2]  # timed; NaN for the failed one
