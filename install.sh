#!/usr/bin/env bash
# One-step installer: a virtual environment in .venv with the CPU torch 2.13.0 wheel, numpy and
# megatrain with all its extras (DeepSpeed and transformers included). Idempotent.
# Usage: bash install.sh && .venv/bin/megatrain train
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip --disable-pip-version-check -q"
# pip -q is silent for minutes: say what is happening and how long it usually takes
echo "[install] 1/3 torch 2.13.0 (CPU) and numpy into $(pwd)/.venv (~1 min)"
# torch first, pinned, so nothing later resolves "torch" to a CUDA build.
$PIP install "torch==2.13.0" numpy
echo "[install] 2/3 megatrain and its extras: datatrove, DeepSpeed, transformers, submitit, ... (~2 min)"
# DS_BUILD_OPS=0: DeepSpeed compiles no ops at install (CPU/GPU ops are JIT-built on first use);
# the CPU torch installed above already satisfies its torch requirement.
DS_BUILD_OPS=0 $PIP install -e ".[data,slurm,dev,deepspeed,hf,eval,profile]"
echo "[install] 3/3 the evaluation sandbox (bubblewrap)"
# `megatrain eval humaneval` runs model-written code only inside a bubblewrap sandbox. As root (CI)
# install it from apt; otherwise say how, since nothing here can install it without root.
if ! command -v bwrap >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get install -y -q bubblewrap >/dev/null ||
            { apt-get update -q >/dev/null && apt-get install -y -q bubblewrap >/dev/null; } ||
            echo "warning: apt-get could not install bubblewrap; \`megatrain eval humaneval\` needs it" >&2
    else
        echo "note: \`megatrain eval humaneval\` needs bubblewrap (bwrap), which is missing:" \
             "sudo apt-get install bubblewrap" >&2
    fi
fi
echo "megatrain installed in $(pwd)/.venv — run: .venv/bin/megatrain train"
