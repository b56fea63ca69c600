#!/usr/bin/env bash
# Downloads the wheels the GPU check needs that the lent GPU machines' image lacks (the list, with
# why each is there: benchmarks/gpu_wheels.txt) into an ignored folder, for Python 3.12 on
# manylinux x86-64, and checks that the folder stays under its size cap.
# Usage (here, where PyPI is reachable): bash benchmarks/gpu_wheels.sh [FOLDER]   (default .gpu_wheels)
# Then carry FOLDER with the device call and run `bash benchmarks/gpu_check.sh` there.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=${1:-.gpu_wheels}
CAP_MIB=20
PYTHON=${PYTHON:-.venv/bin/python}
[ -x "$PYTHON" ] || PYTHON=python3
mapfile -t WHEELS < <(grep -v -e '^#' -e '^[[:space:]]*$' benchmarks/gpu_wheels.txt)
PARTIAL="$DEST.partial"
rm -rf "$PARTIAL"
mkdir -p "$PARTIAL"
# --no-deps: each wheel's own needs are the image's (torch, triton, PyYAML); --only-binary and the
# target tags make pip choose what installs on the device, not what installs here.
"$PYTHON" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PARTIAL" "${WHEELS[@]}"
size_kib=$(du -sk "$PARTIAL" | cut -f1)
if [ "$size_kib" -gt $((CAP_MIB * 1024)) ]; then
    echo "error: the carried wheels take ${size_kib} KiB, over the ${CAP_MIB} MiB cap (the device call" \
         "carries at most 64 MiB with the working tree); trim benchmarks/gpu_wheels.txt" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$PARTIAL" "$DEST"
echo "$(ls "$DEST" | wc -l) wheels, ${size_kib} KiB, in $DEST: carry it (device run: carry=[\"$DEST\"]) and run" \
     "bash benchmarks/gpu_check.sh there"
