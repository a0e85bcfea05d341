"""Per-trial start-up that the run plan removed, measured: what each sweep trial checked before its first step
before the plan (old main's `launch()` ran `preflight.check_run`: the label scan of every split), and what it checks
now (`plan.prepare(spec, inputs_checked=True)`: the request only; the sweep's driver scanned once, and left
Ultralytics' labels/*.cache that the trial's workers then read instead of scanning).

    python experiments/trial-startup/measure.py OLD_CHECKOUT IMAGES [REPEATS]

OLD_CHECKOUT: a checkout of the commit before the plan (e.g. `git worktree add /tmp/old e878124`). Prints one JSON
line per measurement; the README of this folder records a run. Runs on CPU, no Ray."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

OLD = """
import sys, time
from raytrain_yolo.core.config import RunSpec, TrackingSpec
from raytrain_yolo.core.preflight import check_run
spec = RunSpec(train={"data": sys.argv[1], "model": "yolo26n.yaml", "imgsz": 64, "epochs": 1, "batch": 16},
               tracking=TrackingSpec(enabled=False), storage_path=sys.argv[2], name="old")
t = time.perf_counter(); check_run(spec); print(time.perf_counter() - t)
"""
NEW = """
import sys, time
from raytrain_yolo.core.config import RunSpec, TrackingSpec
from raytrain_yolo.plan.request import check_inputs, check_request
spec = RunSpec(train={"data": sys.argv[1], "model": "yolo26n.yaml", "imgsz": 64, "epochs": 1, "batch": 16},
               tracking=TrackingSpec(enabled=False), storage_path=sys.argv[2], name="new")
t = time.perf_counter(); spec, args, task = check_request(spec); request = time.perf_counter() - t
if sys.argv[3] == "driver":
    t = time.perf_counter(); check_inputs(spec, args, task); print(request, time.perf_counter() - t)
else:
    print(request, 0.0)
"""
WORKER = """
import sys, time
from ultralytics.cfg import DEFAULT_CFG
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import check_det_dataset
cfg = check_det_dataset(sys.argv[1])
t = time.perf_counter()
YOLODataset(img_path=cfg["train"], imgsz=64, augment=False, hyp=DEFAULT_CFG, data=cfg, task="detect")
print(time.perf_counter() - t)
"""


def run(code: str, pythonpath: str, *args: str) -> list[float]:
    env = {**os.environ, "PYTHONPATH": pythonpath, "YOLO_OFFLINE": "1", "YOLO_VERBOSE": "False"}
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return [float(x) for x in out.stdout.split()]


def drop_caches(data: Path) -> None:
    for cache in (data.parent / "labels").glob("*.cache"):
        cache.unlink()


def main() -> None:
    old, images = sys.argv[1], int(sys.argv[2])
    repeats = int(sys.argv[3]) if len(sys.argv) > 3 else 2
    here = str(Path(__file__).resolve().parents[2])
    from raytrain_yolo.core.config import SyntheticSpec
    from raytrain_yolo.data.synthetic import ensure_synthetic

    t = time.perf_counter()
    data = ensure_synthetic(SyntheticSpec(train=images, val=max(64, images // 20), imgsz=64))
    print(json.dumps({"dataset": str(data), "train": images, "made_s": round(time.perf_counter() - t, 1)}), flush=True)
    store = "/tmp/trial-startup-runs"
    for i in range(repeats):
        drop_caches(data)
        old_trial = run(OLD, old, str(data), store)[0]  # before: every trial scanned again (no cache written)
        worker_cold = run(WORKER, here, str(data))[0]  # before: the first trial's rank 0 scanned and wrote it
        drop_caches(data)
        request, driver_scan = run(NEW, here, str(data), store, "driver")  # now: the sweep's driver, once
        new_trial = run(NEW, here, str(data), store, "trial")[0]  # now: each trial
        worker_warm = run(WORKER, here, str(data))[0]  # now: the workers read the driver's cache
        print(json.dumps({"repeat": i + 1, "old_trial_check_s": round(old_trial, 2),
                          "new_trial_check_s": round(new_trial, 2), "sweep_driver_scan_s": round(driver_scan, 2),
                          "sweep_driver_request_s": round(request, 2), "worker_dataset_cold_s": round(worker_cold, 2),
                          "worker_dataset_from_cache_s": round(worker_warm, 2)}), flush=True)


if __name__ == "__main__":
    main()
