"""A copy of the megatrain source a job runs from, so edits after ``submit`` cannot change it.

The installed package is copied as it is imported (``megatrain/`` plus the ``slurm``, ``kernels``
and ``data_pipelines`` folders that setup.py maps into it) to ``run.dir/code/<stamp>/megatrain``;
the job puts ``run.dir/code/<stamp>`` first on ``PYTHONPATH``. Caches and compiled files are left
out. A requeued job reruns the same sbatch script, hence the same snapshot.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
from pathlib import Path

import megatrain

SUBPACKAGES = ("slurm", "kernels", "data_pipelines")
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.pyo", "*.so", ".pytest_cache",
                                "*.egg-info", ".git")


def package_dirs() -> dict[str, Path]:
    """Destination (relative to the snapshot root) -> source folder of each installed part."""
    root = Path(megatrain.__file__).resolve().parent
    dirs = {"megatrain": root}
    for name in SUBPACKAGES:
        spec = importlib.util.find_spec(f"megatrain.{name}")
        if spec is None or not spec.submodule_search_locations:
            continue
        src = Path(list(spec.submodule_search_locations)[0]).resolve()
        if src.parent != root:  # an editable install maps it from outside the package folder
            dirs[f"megatrain/{name}"] = src
    return dirs


def write_snapshot(dest: Path) -> Path:
    """Copy the installed megatrain source under ``dest``; return the folder to put on PYTHONPATH."""
    for rel, src in package_dirs().items():
        shutil.copytree(src, dest / rel, ignore=IGNORE, dirs_exist_ok=True)
    return dest


def git_revision() -> dict:
    """Commit and dirtiness of the source tree, when it is a git checkout (else empty)."""
    root = Path(megatrain.__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {}
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return {"git_commit": commit.stdout.strip(), "git_dirty": bool(dirty.stdout.strip())}
    except (OSError, subprocess.SubprocessError):
        return {}
