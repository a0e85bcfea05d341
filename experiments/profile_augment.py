"""Where the device loader's time goes: torch.profiler over a few augmented batches (issue 15's next wall).

    python experiments/profile_augment.py DATA_YAML BATCH [IMGSZ]      # prints the top ops by CUDA and CPU time
"""
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile
from ultralytics.cfg import get_cfg
from ultralytics.data import build_yolo_dataset
from ultralytics.data.utils import check_det_dataset

from raytrain_yolo.train.augment import AugmentHyp
from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader

data_yaml, batch = sys.argv[1], int(sys.argv[2])
imgsz = int(sys.argv[3]) if len(sys.argv) > 3 else 640
cuda = torch.cuda.is_available()
device = torch.device("cuda", 0) if cuda else torch.device("cpu")
cfg = get_cfg(overrides={"imgsz": imgsz, "data": data_yaml, "fraction": 0.25 if cuda else 1.0})
data = check_det_dataset(data_yaml)
source = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=32)
loader = DeviceLoader(DeviceDataset(source, AugmentHyp.from_args(cfg), device), batch, 0, 1, seed=0)
it = iter(loader)
next(it)  # warm-up
sync = torch.cuda.synchronize if cuda else (lambda: None)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
sync()
t0 = time.perf_counter()
with profile(activities=acts) as prof:
    for _ in range(2):
        try:
            next(it)
        except StopIteration:
            it = iter(loader)
            next(it)
    sync()
print(f"{2 * batch / (time.perf_counter() - t0):.0f} images/s under the profiler, batch {batch}")
for key in (["self_cuda_time_total"] if cuda else []) + ["self_cpu_time_total"]:
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=40))
