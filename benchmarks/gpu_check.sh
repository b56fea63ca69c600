#!/usr/bin/env bash
# The GPU check in one command, for a lent GPU machine: no network there, its own Python 3.12,
# torch and triton, and only the working tree (with the carried wheels) travels.
#
#   here:   bash benchmarks/gpu_wheels.sh          # once: the wheels the image lacks, into .gpu_wheels/
#   device: bash benchmarks/gpu_check.sh           # carry .gpu_wheels; $OUT comes back
#
# 1. installs the carried wheels into a temporary folder (pip --no-index --no-deps --target: nothing
#    replaces the image's torch or triton) and links this checkout's megatrain there (no build);
# 2. a smoke check of about 30 s (CUDA visible, one tiny MTP step in bf16 with the Triton loss, one
#    generation); if it fails the check stops there, with the device time left for a rerun;
# 3. the full check (benchmarks/gpu_check.py) within a hard budget (GPU_CHECK_BUDGET_S, default
#    420 s, cut so that the whole script ends within GPU_CHECK_TOTAL_S, default 570 s: the device
#    tool stops a command at 600 s), writing report.md, results.json and memory_profile.json into
#    $OUT as it goes, and the whole log (check.log); the report is appended to docs/benchmarks.md
#    on a GPU.
# Without CUDA every section runs at tiny sizes on the CPU (gpu_check.py --cpu-smoke): the test.
# Extra arguments go to gpu_check.py, e.g. --sections memory,decode to rerun what a run missed
# (with GPU_CHECK_SKIP_SMOKE=1 and a smaller GPU_CHECK_TOTAL_S).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=${GPU_WHEELS:-.gpu_wheels}
BUDGET_S=${GPU_CHECK_BUDGET_S:-420}
TOTAL_S=${GPU_CHECK_TOTAL_S:-570}
SMOKE_S=${GPU_CHECK_SMOKE_S:-90}
if [ -z "${OUT:-}" ]; then
    OUT=$(mktemp -d -t gpu_check.XXXXXX)
fi
mkdir -p "$OUT"

main() {
echo "[gpu_check.sh] $(date -u +%FT%TZ) on $(hostname); output in $OUT"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    echo "error: no carried wheels in $WHEELS: run \`bash benchmarks/gpu_wheels.sh\` where PyPI is" \
         "reachable and carry $WHEELS with the device call"
    return 2
fi
SITE=$(mktemp -d -t gpu_check_site.XXXXXX)
PIP=("$PYTHON" -m pip install --disable-pip-version-check -q --no-index --no-deps --no-compile
     --target "$SITE")
if ! "${PIP[@]}" "$WHEELS"/*.whl || ! "$PYTHON" benchmarks/link_megatrain.py "$SITE"; then
    echo "error: installing the carried wheels or megatrain into $SITE failed (see above)"
    return 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODE=()
if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"; then
    echo "[gpu_check.sh] no CUDA device visible: every section runs at tiny sizes on the CPU"
    MODE=(--cpu-smoke)
fi

if [ "${GPU_CHECK_SKIP_SMOKE:-0}" = 1 ]; then  # a rerun on a machine that passed it
    echo "[gpu_check.sh] smoke skipped (GPU_CHECK_SKIP_SMOKE=1)"
else
    echo "[gpu_check.sh] smoke (at most ${SMOKE_S} s)"
    if ! timeout "$SMOKE_S" "$PYTHON" benchmarks/gpu_check.py --smoke "${MODE[@]}" 2>&1 | tee "$OUT/smoke.log"; then
        echo "error: the smoke check failed (log: $OUT/smoke.log); the full check was not started"
        return 1
    fi
fi

# what is left of the whole allowance; the python budget leaves 45 s of it for the report and a
# row that overruns its estimate
left=$((TOTAL_S - SECONDS))
budget=$((BUDGET_S < left - 45 ? BUDGET_S : left - 45))
echo "[gpu_check.sh] full check (budget ${budget} s, stopped after $((left - 5)) s)"
timeout $((left - 5)) "$PYTHON" benchmarks/gpu_check.py --budget-s "$budget" --out-dir "$OUT" \
    "${MODE[@]}" "$@"
status=$?
if [ $status -eq 124 ]; then
    echo "[gpu_check.sh] the full check ran past its budget and was stopped; $OUT/report.md holds" \
         "what it measured"
fi
echo "[gpu_check.sh] done (status $status): $(ls "$OUT" | tr '\n' ' ')"
return $status
}

main "$@" 2>&1 | tee -a "$OUT/check.log"
