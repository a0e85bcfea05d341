#!/usr/bin/env bash
# Issue 17: images/s of `raytrain_yolo.predict` with 1 and 2 CPU workers on the same images and checkpoint.
# usage: experiments/predict-bench.sh CHECKPOINT.pt [IMAGES] [SIZE]   (prints one line per worker count)
set -euo pipefail
CK=$1; N=${2:-480}; SIZE=${3:-160}
DIR=$(python -c "from raytrain_yolo.core.config import SyntheticSpec; from raytrain_yolo.data.synthetic import ensure_synthetic; \
print(ensure_synthetic(SyntheticSpec(train=$N, val=8, imgsz=$SIZE)).parent / 'images' / 'train')")
OUT=$(mktemp -d)
for W in 1 2; do
  python -m raytrain_yolo.predict --cpu --num-workers $W --storage-path "$OUT" --output "$OUT/w$W" \
      model="$CK" source="$DIR" imgsz=$SIZE batch=16 > "$OUT/w$W.log" 2>&1
  python -c "import json; s=json.load(open('$OUT/w$W/_summary.json')); print(f\"workers={s['workers']} images={s['images']} seconds={s['seconds']:.1f} images_per_second={s['images_per_second']:.1f}\")"
done
