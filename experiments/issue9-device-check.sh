#!/usr/bin/env bash
# Issue 9's GPU proof on one GPU machine (H100/H200, 16 cores), in two calls that each fit the device
# tool's 10-minute limit (estimated 5-6 minutes each):
# Prepare here:   bash ../shared/device/make-kit.sh          (builds .devkit/kit.tar.xz)
# Run there:      device run, carry .devkit:
#                   bash experiments/issue9-device-check.sh $OUT native,device,gpu     # throughput
#                   bash experiments/issue9-device-check.sh $OUT map,compile           # mAP, compile
#                 ($OUT is the folder the device tool brings back; copy it to experiments/results/ after)
# Throughput rows: plain Ultralytics (defaults, batch 128), --loader device at batch 128/256/512 and the
# GPU-only step at the same batches. Then mAP after the same 10 epochs with each loader, and the device
# loader with torch.compile. Rows accumulate in /tmp/issue9 while the machine stays warm, so the second
# call's bench.md holds both; each call copies it to the folder given.
set -euo pipefail
DEST=${1:-/tmp/issue9-out}
PARTS=${2:-native,device,gpu}
mkdir -p /tmp/site "$DEST" && tar -xJf .devkit/kit.tar.xz -C /tmp/site
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 RAYTRAIN_YOLO_CACHE=/tmp/rycache
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || true
python -m raytrain_yolo.bench --append --only "$PARTS" --device-batch 128,256,512 --map-epochs 10 \
    --out /tmp/issue9 --work /tmp/bench 2>&1 | grep -E '^\[bench\]|Error|error' || true
cp /tmp/issue9/bench.md /tmp/issue9/bench.json "$DEST"/
cat "$DEST/bench.md"
