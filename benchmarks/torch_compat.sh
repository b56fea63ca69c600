#!/usr/bin/env bash
# The CPU suite's core against the lent GPU machines' versions (torch 2.11, triton 3.6, numpy
# 2.4+), on this CPU machine, before any GPU is lent. Not part of CI: it installs a 4.7 GB venv
# (the PyPI torch 2.11.0 wheel is the CUDA build; it imports and runs on a CPU box).
#
#   bash benchmarks/torch_compat.sh [VENV]        # default /tmp/megatrain_torch_compat
#
# Runs the model, loss, kernel, single-process trainer, tensor/pipeline/FSDP parallel, head
# gradient, inference and checkpoint tests with numpy 2.4 (the image holds 2.5), then the Triton
# kernel tests in the interpreter with numpy < 2.4 (triton 3.6's interpreter cannot run beside
# numpy >= 2.4; compiled GPU kernels are unaffected). Prints pytest's summary of each run.
set -uo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/megatrain_torch_compat}
TORCH=${COMPAT_TORCH:-2.11.0}
TRITON=${COMPAT_TRITON:-3.6.0}
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
# torch and triton first, pinned; megatrain's own requirements then find them satisfied
"${PIP[@]}" install "torch==$TORCH" "triton==$TRITON" "numpy==2.4.6" || exit 2
"${PIP[@]}" install -e ".[data,hf,dev]" || exit 2
"$VENV/bin/python" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', \
triton.__version__, 'numpy', numpy.__version__)"
export OMP_NUM_THREADS=1
CORE=(tests/test_model.py tests/test_mtp_loss.py tests/test_kernels_reference.py tests/test_kernels_tp.py
      tests/test_trainer.py tests/test_parallel_topology.py tests/test_parallel_pp.py
      tests/test_parallel_fsdp.py tests/test_parallel_tp.py tests/test_head_grads.py
      tests/test_inference.py tests/test_checkpoint.py tests/test_trainer_bf16.py
      tests/test_trainer_parallel.py tests/test_gpu_check.py)
echo "== core tests, numpy 2.4 =="
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -rfs "${CORE[@]}" \
    --deselect "tests/test_kernels_tp.py::test_vocab_parallel_equals_single_process[triton]" 2>&1 | tail -40
core=${PIPESTATUS[0]}
echo "== Triton kernels in the interpreter, numpy < 2.4 =="
"${PIP[@]}" install "numpy==2.3.5" || exit 2
TRITON_INTERPRET=1 "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_kernels_triton.py \
    tests/test_kernels_tp.py -k triton 2>&1 | tail -8
kernels=${PIPESTATUS[0]}
"${PIP[@]}" install "numpy==2.4.6"
echo "core tests: exit $core; Triton kernel tests: exit $kernels"
[ "$core" -eq 0 ] && [ "$kernels" -eq 0 ]
