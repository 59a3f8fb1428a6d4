#!/usr/bin/env bash
# The GPU check, on a machine with CUDA, no Ray and no package index (issue 17), within ~8 minutes:
#   1. the environment (GPU, torch, CUDA) -> $OUT/environment.txt
#   2. the carried wheels installed into a venv that sees the machine's torch (benchmarks/device_prepare.sh made them)
#   3. pytest -m cuda: the fused step on CUDA against float32 on the CPU, float32 tiles against one whole pass, the
#      in-process engine on a real slide -> $OUT/cuda-tests.xml
#   4. benchmarks/run.py --sections gpu: the paper U-Net and the bundled model per tile and batch (Mpx/s, TFLOP/s,
#      fraction of peak), eager NCHW / channels_last / torch.compile / CUDA graphs, and segment_slide end to end on a
#      ~10-gigapixel synthetic slide (rendered there) and on the carried real slide -> $OUT/gpu.json
# Every step logs to $OUT/steps.log; a failed step does not stop the next.
#
# On the GPU machine (the device tool):  run(command="bash benchmarks/device_check.sh", carry=[".device"], timeout_s=540)
# Here, to check the script on the CPU (every step but the CUDA ones, toy sizes):  bash benchmarks/device_check.sh --dry-run
set -uo pipefail
OUT=${OUT:-/tmp/device-check}
mkdir -p "$OUT"
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
CARRY=.device
SLIDE="$CARRY/slides/cmu-1-small-region.svs"
[[ -f "$SLIDE" ]] || SLIDE=../shared/data/slides/cmu-1-small-region.svs
PY=${PYTHON:-python3}
[[ $DRY == 1 && -x .venv/bin/python ]] && PY=.venv/bin/python
# the tests read slides/<name> under WSI_TEST_DATA: the carried copy there, ../shared/data here
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" WSI_TEST_DATA="${WSI_TEST_DATA:-$(dirname "$(dirname "$SLIDE")")}"
log() { echo "[device_check $(date -u +%H:%M:%S)] $*" | tee -a "$OUT/steps.log"; }
step() {  # step NAME TIMEOUT COMMAND...: run, log the outcome, never stop the script
    local name=$1 limit=$2; shift 2
    log "start $name"
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    log "end $name rc=$rc ($(tail -n 1 "$OUT/$name.log" | cut -c1-160))"
}

log "dry run: $DRY; out: $OUT; python: $PY"
{ nvidia-smi 2>&1 || echo "no nvidia-smi"; $PY -c "import sys, torch; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print(torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no CUDA device'); print('cpus', __import__('os').cpu_count())"; } > "$OUT/environment.txt" 2>&1
log "environment: $(tail -n 3 "$OUT/environment.txt" | tr '\n' ' ')"

if [[ $DRY == 0 ]]; then
    $PY -m venv --system-site-packages /tmp/device-venv && PY=/tmp/device-venv/bin/python
    step install 120 "$PY" -m pip install --no-index --find-links "$CARRY/wheels" "zarr>=3.1,<4" "dask[array]>=2026.3" \
        openslide-python openslide-bin imagecodecs tqdm
else
    log "install: skipped in the dry run (the wheels are cp312; this machine's packages are installed)"
fi
$PY -c "import zarr, dask, openslide, imagecodecs, tqdm, torch" >> "$OUT/steps.log" 2>&1 && log "imports: ok" || log "imports: MISSING (see above)"

step cuda-tests 150 "$PY" -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py --junitxml "$OUT/cuda-tests.xml"

if [[ $DRY == 0 ]]; then
    step gpu 330 "$PY" benchmarks/run.py --sections gpu --workdir /tmp/wsi-bench --json "$OUT/gpu.json" \
        --gpu-tiles 388 900 1284 2052 --gpu-batches 1 4 16 --gpu-slide-gpx 10 --gpu-mosaic-base 4096 \
        --gpu-e2e-tile 1024 --gpu-real-slide "$SLIDE"
else
    step gpu 600 "$PY" benchmarks/run.py --sections gpu --workdir /tmp/wsi-bench --json "$OUT/gpu.json" \
        --gpu-dry-run --gpu-tiles 132 --gpu-batches 1 2 --gpu-slide-gpx 0.004 --gpu-e2e-tile 128 \
        --gpu-real-slide "$SLIDE"
fi
log "done; files: $(ls "$OUT" | tr '\n' ' ')"
