#!/usr/bin/env bash
# Issue 9's GPU proof in one go, on one GPU machine (about 8-10 minutes on an H100/H200, 16 cores).
# Prepare here:   bash ../shared/device/make-kit.sh          (builds .devkit/kit.tar.xz)
# Run there:      device run, carry .devkit:  bash experiments/issue9-device-check.sh $OUT/issue9
#                 ($OUT is the folder the device tool brings back; copy it to experiments/results/ after)
# Rows, all in one run: plain Ultralytics (defaults, batch 128), --loader device at batch 128/256/512,
# the GPU-only step at the same batches, the device loader with torch.compile, and mAP after the same
# 10 epochs with each loader. Results: $OUT/bench.md and bench.json, written as each row finishes.
set -euo pipefail
mkdir -p /tmp/site && tar -xJf .devkit/kit.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAYTRAIN_YOLO_CACHE=/tmp/rycache
OUT=${OUT:-${1:-/tmp/issue9}}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m raytrain_yolo.bench --only native,device,gpu,map,compile --device-batch 128,256,512 \
    --map-epochs 10 --out "$OUT" --work /tmp/bench 2>&1 | grep -E '^\[bench\]|^\||^#|Error|error' || true
cat "$OUT/bench.md"
