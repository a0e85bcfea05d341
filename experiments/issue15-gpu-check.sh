#!/usr/bin/env bash
# Issue 15's GPU proof, in ONE device call (the device tool gives a session 15 minutes in all, starts included).
# Prepare here:  bash ../shared/device/make-kit.sh   (.devkit/kit.tar.xz), and test this script on CPU:
#                  CPU_SMOKE=1 bash experiments/issue15-gpu-check.sh /tmp/issue15-smoke
# Run there:     bash experiments/issue15-gpu-check.sh $OUT     (carry .devkit; KIT=path if it lies elsewhere;
#                EXTRA_SITE=path to pure-Python wheels unpacked for what the machine lacks: pytest, pluggy, iniconfig)
# Everything goes to $OUT as it finishes, so a run cut short still brings back what it measured:
#   gpu.txt           the card
#   pytest-gpu.txt    the GPU tests of tests/test_gpu_path.py (one GPU worker trains; CUDA augment == CPU)
#   bench/bench.md    in this order: device loader at batch 512/256/128, the GPU-only step at the same batches,
#                     augmentation alone at 512, plain Ultralytics (its defaults, and batch 128 with all cores),
#                     DDP with/without find_unused_parameters, mAP after the same epochs with each loader, and
#                     compile=True (last: what the time limit cuts first)
set -uo pipefail
OUT=${1:-/tmp/issue15-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 RAYTRAIN_YOLO_CACHE=/tmp/rycache RAY_DEDUP_LOGS=0
if [[ -z ${CPU_SMOKE:-} ]]; then
  mkdir -p /tmp/site && tar -xJf "${KIT:-.devkit/kit.tar.xz}" -C /tmp/site
  export PYTHONPATH=/tmp/site:$PWD${EXTRA_SITE:+:$EXTRA_SITE}
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader > "$OUT/gpu.txt" 2>&1
  nproc >> "$OUT/gpu.txt"
  IMAGES=4096 IMGSZ=640 BATCHES=512,256,128 BIG=128 MAP_EPOCHS=4 COMPILE_B=512 WIN=10 NWIN=2 CPU=
else
  export PYTHONPATH=$PWD
  IMAGES=48 IMGSZ=64 BATCHES=16,8 BIG=16 MAP_EPOCHS=1 COMPILE_B=16 WIN=2 NWIN=2 CPU=--cpu
fi
python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), sys.version)" >> "$OUT/gpu.txt"

# The 4096-image set is made while the GPU tests run (the tests use their own tiny sets).
python -c "from raytrain_yolo.core.config import SyntheticSpec as S; from raytrain_yolo.data.synthetic import ensure_synthetic as e; \
print(e(S(train=$IMAGES, val=256, imgsz=$IMGSZ, seed=0)))" > "$OUT/data.txt" 2>&1 &
data_pid=$!

timeout 120 python -m pytest tests/test_gpu_path.py -q -p no:cacheprovider -k "gpu_worker or on_cuda" \
  > "$OUT/pytest-gpu.txt" 2>&1
echo "pytest exit $?" >> "$OUT/pytest-gpu.txt"
tail -3 "$OUT/pytest-gpu.txt"
wait $data_pid

timeout ${BENCH_TIMEOUT:-400} python -m raytrain_yolo.bench $CPU --images $IMAGES --imgsz $IMGSZ --val-images 256 \
  --only device,gpu,augment,native,map,ddp,compile --device-batch $BATCHES --big-batch $BIG \
  --map-epochs $MAP_EPOCHS --compile-batch $COMPILE_B --window-steps $WIN --windows $NWIN \
  --out "$OUT/bench" --work /tmp/bench > "$OUT/bench.log" 2>&1
echo "bench exit $?" >> "$OUT/bench.log"
grep -E '^\[bench\]|Error' "$OUT/bench.log" | cut -c1-400
cat "$OUT/bench/bench.md" 2>/dev/null
