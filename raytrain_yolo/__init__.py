"""raytrain_yolo: Ultralytics YOLO26 training on Ray Train workers, tuned with Ray Tune, tracked in MLflow.

Entry points: `python -m raytrain_yolo.fit` (train), `python -m raytrain_yolo.tune` (throughput sweep).
Nothing here imports Ultralytics at module level: it reads RANK/WORLD_SIZE when first imported, which must
happen inside each Ray Train worker.

Offline by default, on the driver as in the workers: Ultralytics decides whether it is online when first
imported (DNS look-ups, then usage events and downloads when it is), so YOLO_OFFLINE is set before any of our
modules imports it. A user's own YOLO_OFFLINE wins.
"""

import os

os.environ.setdefault("YOLO_OFFLINE", "1")

__version__ = "0.1.0"
