#!/usr/bin/env bash
# Prepare what a GPU machine without a package index needs for benchmarks/device_check.sh, into .device/
# (git-ignored, carried with the run: `run(carry=[".device"], ...)`, 64 MiB at most):
#   .device/wheels/  cp312 manylinux wheels of the project's imports the GPU machine lacks (zarr, dask, OpenSlide,
#                    imagecodecs for JPEG tiles, tqdm, and their small dependencies); numpy and pillow are left
#                    out (the machine has them, and they are 23 MB)
#   .device/slides/  a real slide for the end-to-end run: a transient copy of ../shared's cmu-1-small-region.svs,
#                    never committed (.device/ is ignored)
# Usage, from the repository root on this machine:  bash benchmarks/device_prepare.sh
set -euo pipefail
CARRY=.device
PIP=${PIP:-.venv/bin/pip}
SHARED=${SHARED:-../shared}
rm -rf "$CARRY"
mkdir -p "$CARRY/wheels" "$CARRY/slides"
"$PIP" download --quiet --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$CARRY/wheels" "zarr>=3.1,<4" "dask[array]>=2026.3" "openslide-python>=1.4" "openslide-bin>=4.0" \
    "imagecodecs>=2024.1" "tqdm>=4.66" "crc32c" 2>&1 | grep -v "^WARNING: Location" || true
rm -f "$CARRY"/wheels/numpy-*.whl "$CARRY"/wheels/pillow-*.whl
cp "$SHARED/data/slides/cmu-1-small-region.svs" "$CARRY/slides/"
du -sh "$CARRY"
ls "$CARRY/wheels"
