#!/usr/bin/env bash
# Issue 42, 1 and 3: the throughput sweep with warm trials (the default) against a Ray Train run per trial
# (--fresh-trials), each with ASHA (the default) and with its full grid (--no-early-stop), on one grid, each twice.
# Per trial: what came before Ultralytics' trainer (Tune, Ray Train, worker processes, imports: the first report's
# time from the trial's start minus the time since the trainer build began) and Ultralytics' own build to the first
# step. Run from the repository root with the venv active, on an otherwise idle machine:
#     bash experiments/warm-trials.sh [OUT_DIR]
# Writes each sweep's folder and log, timings.txt (wall seconds per sweep) and trials.jsonl (one line per trial).
set -euo pipefail
out=${1:-/tmp/warm-trials}
mkdir -p "$out"
grid=(--cpu --batch 4,8,16 --loader ultralytics,device --window-steps 3 --windows 4 --grace-windows 1
      --max-concurrent 1 --synthetic-train 64 --synthetic-val 8 imgsz=64 --no-tracking --storage-path "$out")
for rep in 1 2; do
  for trials in fresh warm; do
    for mode in grid asha; do
      extra=(); [ "$mode" = grid ] && extra+=(--no-early-stop); [ "$trials" = fresh ] && extra+=(--fresh-trials)
      name="$trials-$mode-$rep"
      start=$(date +%s.%N)
      python -m raytrain_yolo.tune "${grid[@]}" "${extra[@]}" --name "$name" > "$out/$name.log" 2>&1
      end=$(date +%s.%N)
      echo "$name $(echo "$end - $start" | bc)" | tee -a "$out/timings.txt"
    done
  done
done
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
with open(out / "trials.jsonl", "w") as f:
    for result in sorted(out.glob("*/trial_*/result.json")):
        rows = [json.loads(line) for line in result.read_text().splitlines() if line.strip()]
        first = next((r for r in rows if "startup/since_trainer_s" in r), None)
        if first is None:
            continue
        f.write(json.dumps({"sweep": result.parts[-3], "trial": result.parts[-2], "batch": first["config"].get("batch"),
                            "loader": first["config"].get("loader"), "windows": len(rows),
                            "first_report_s": round(first["time_total_s"], 2),
                            "before_ultralytics_s": round(first["time_total_s"] - first["startup/since_trainer_s"], 2),
                            "trainer_build_s": round(first["startup/trainer_s"], 2)}) + "\n")
print((out / "trials.jsonl").read_text())
PY
