#!/usr/bin/env bash
# One-step installer: a virtual environment in .venv with the CPU torch 2.13.0 wheel, numpy and
# megatrain with all its extras (DeepSpeed and transformers included). Idempotent.
# Usage: bash install.sh && .venv/bin/megatrain train
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# torch first, pinned, so nothing later resolves "torch" to a CUDA build.
$PIP install "torch==2.13.0" numpy
# DS_BUILD_OPS=0: DeepSpeed compiles no ops at install (CPU/GPU ops are JIT-built on first use);
# the CPU torch installed above already satisfies its torch requirement.
DS_BUILD_OPS=0 $PIP install -e ".[data,slurm,dev,deepspeed,hf]"
echo "megatrain installed in $(pwd)/.venv — run: .venv/bin/megatrain train"
