#!/usr/bin/env bash
# Issue 42, 3: the throughput sweep's cost with ASHA against its full grid (--no-early-stop), on one grid, each
# twice, and how far ASHA's winner is from the grid's best. Run from the repository root with the venv active, on an
# otherwise idle machine: bash experiments/asha-vs-grid.sh [OUT_DIR]. Writes each sweep's output folder and timing.
set -euo pipefail
out=${1:-/tmp/asha-vs-grid}
mkdir -p "$out"
grid=(--cpu --batch 4,8,16 --loader ultralytics,device --window-steps 3 --windows 4 --grace-windows 1
      --max-concurrent 1 --synthetic-train 64 --synthetic-val 8 imgsz=64 --no-tracking --storage-path "$out")
for rep in 1 2; do
  for mode in grid asha; do
    extra=(); [ "$mode" = grid ] && extra=(--no-early-stop)
    start=$(date +%s.%N)
    python -m raytrain_yolo.tune "${grid[@]}" "${extra[@]}" --name "$mode-$rep" > "$out/$mode-$rep.log" 2>&1
    end=$(date +%s.%N)
    echo "$mode $rep $(echo "$end - $start" | bc)" | tee -a "$out/timings.txt"
  done
done
