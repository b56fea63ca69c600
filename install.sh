#!/usr/bin/env bash
# One-step installer: a virtual environment in .venv with the CPU torch 2.13.0 wheel, numpy and
# megatrain with all its extras. Idempotent. Usage: bash install.sh && .venv/bin/megatrain train
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned, so nothing later resolves "torch" to a CUDA build.
$PIP install "torch==2.13.0" numpy
$PIP install -e ".[data,slurm,dev]"
echo "megatrain installed in $(pwd)/.venv — run: .venv/bin/megatrain train"
