#!/usr/bin/env bash
# Issue 42's accuracy-sweep target: a 2-trial, one-epoch `tune --objective map` (warm trials, and --fresh-trials)
# against Ultralytics' own tuner doing the same two iterations on the same data
# (YOLO("yolo26n.yaml").tune(iterations=2, epochs=1)), wall time of each whole command. Run from the repository root with the venv active, on an otherwise idle machine:
#     bash experiments/accuracy-vs-ultralytics-tuner.sh [OUT_DIR] [TRAIN_IMAGES]
set -euo pipefail
out=${1:-/tmp/acc-vs-ul}; images=${2:-2000}
mkdir -p "$out"
data=$(python -c "from raytrain_yolo.core.config import SyntheticSpec; from raytrain_yolo.data.synthetic import ensure_synthetic; print(ensure_synthetic(SyntheticSpec(train=$images, val=100, imgsz=64)))")
for rep in 1 2; do
  start=$(date +%s.%N)
  (cd "$out" && YOLO_OFFLINE=1 python -c "
from ultralytics import YOLO
YOLO('yolo26n.yaml').tune(data='$data', epochs=1, iterations=2, imgsz=64, batch=16, plots=False, save=False,
                          device='cpu', project='$out/ultralytics-$rep', name='tune', optimizer='SGD')
") > "$out/ultralytics-$rep.log" 2>&1
  end=$(date +%s.%N); echo "ultralytics $rep $(echo "$end - $start" | bc)" | tee -a "$out/timings.txt"
  for mode in warm fresh; do  # warm trials (the default since issue 42), then a Ray Train run per trial
    flag=(); [ "$mode" = fresh ] && flag=(--fresh-trials)
    start=$(date +%s.%N)
    python -m raytrain_yolo.tune --objective map --cpu --trials 2 --scheduler none "data=$data" epochs=1 imgsz=64 \
        batch=16 --no-tracking "${flag[@]}" --storage-path "$out" --name "ours-$mode-$rep" > "$out/ours-$mode-$rep.log" 2>&1
    end=$(date +%s.%N); echo "raytrain_yolo-$mode $rep $(echo "$end - $start" | bc)" | tee -a "$out/timings.txt"
  done
done
# Per trial, from Tune's own records: each trial's time_total_s and its epoch's training steps
# (throughput/epoch_seconds); the rest is start-up, data loading, validation and the checkpoint.
python - "$out" <<'PY'
import json, pathlib, sys
for exp in sorted(pathlib.Path(sys.argv[1]).glob("ours-*")):
    for t in sorted(exp.glob("trial_*/result.json")):
        r = [json.loads(line) for line in t.read_text().splitlines() if line.strip()][-1]
        print(exp.name, t.parent.name, f"trial {r['time_total_s']:.1f} s", f"epoch {r.get('throughput/epoch_seconds', float('nan')):.1f} s")
PY
