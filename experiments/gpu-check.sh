#!/usr/bin/env bash
# Issues 23 and 24 on the GPU, in ONE device call (a session gets 15 minutes of device time, starts included).
# Prepare here:  bash ../shared/device/make-kit.sh   (.devkit/kit.tar.xz), and test this script on CPU:
#                  CPU_SMOKE=1 bash experiments/gpu-check.sh /tmp/gpu-smoke
# Run there:     bash experiments/gpu-check.sh $OUT        (carry .devkit; KIT=path if it lies elsewhere)
# Every row goes to $OUT/bench/bench.{json,md} as soon as it is measured, most informative first, so a run cut
# short still brings back what it measured:
#   1. the device loader at the largest batches, decoded store and JPEG store side by side (issue 24: >= 0.9),
#      then both stores alone over the 4096-image set: bytes per image, where held, time to ready, first batch
#   2. the COCO-sized set (120,000 JPEGs at 640 px, made there while 1 runs): the JPEG store's start-up and
#      bytes, then training images/s on it (issue 24's target: it trains at all on one card)
#   3. issue 23's step-time switches at the largest batch, each alone and all together (--prefetch, compile,
#      CUDA graphs, NCHW), then the GPU-only step at the same batches
#   4. mAP after the same epochs: Ultralytics' loader, the decoded store, the JPEG store; then compile=True
# The timeouts (T1..T4, seconds) add up to about 13 minutes with the kit's start: leave T4 out for a rerun.
set -uo pipefail
OUT=${1:-/tmp/gpu-check-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAYTRAIN_YOLO_CACHE=/tmp/rycache RAY_DEDUP_LOGS=0
if [[ -z ${CPU_SMOKE:-} ]]; then
  mkdir -p /tmp/site && tar -xJf "${KIT:-.devkit/kit.tar.xz}" -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  nproc >> "$OUT/gpu.txt"
  IMAGES=4096 BIG_IMAGES=${BIG_IMAGES:-120000} IMGSZ=640 BATCHES=512,256 BIG=256 MAP_EPOCHS=4 WIN=10 NWIN=2 CPU=
else
  export PYTHONPATH=$PWD
  IMAGES=48 BIG_IMAGES=96 IMGSZ=64 BATCHES=16,8 BIG=16 MAP_EPOCHS=1 WIN=2 NWIN=2 CPU=--cpu
fi
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version)" >> "$OUT/gpu.txt"

# Both sets are made first, the big one in the background while the first parts run.
python -c "from raytrain_yolo.core.config import SyntheticSpec as S; from raytrain_yolo.data.synthetic import ensure_synthetic as e; \
print(e(S(train=$IMAGES, val=256, imgsz=$IMGSZ, seed=0)))" > "$OUT/data.txt" 2>&1
( time python -c "from raytrain_yolo.core.config import SyntheticSpec as S; from raytrain_yolo.data.synthetic import ensure_synthetic as e; \
print(e(S(train=$BIG_IMAGES, val=256, imgsz=$IMGSZ, seed=1)))" ) > "$OUT/big-data.txt" 2>&1 &
big_pid=$!

bench() {  # bench PARTS TIMEOUT: one call of the benchmark, appending to the same bench.json
  timeout "$2" python -m raytrain_yolo.bench $CPU --append --images $IMAGES --big-images $BIG_IMAGES --imgsz $IMGSZ \
    --val-images 256 --only "$1" --device-batch $BATCHES --big-batch $BIG --compile-batch $BIG \
    --map-epochs $MAP_EPOCHS --window-steps $WIN --windows $NWIN --out "$OUT/bench" --work /tmp/bench \
    >> "$OUT/bench.log" 2>&1
  echo "bench $1 exit $?" >> "$OUT/bench.log"
}
bench device,store "${T1:-240}"
wait $big_pid
bench big "${T2:-150}"
bench switches,gpu "${T3:-200}"
bench map,compile "${T4:-200}"
grep -E '^\[bench\]|Error|exit' "$OUT/bench.log" | cut -c1-400
cat "$OUT/bench/bench.md" 2>/dev/null
