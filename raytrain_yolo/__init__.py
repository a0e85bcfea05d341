"""raytrain_yolo: Ultralytics YOLO26 training on Ray Train workers, tuned with Ray Tune, tracked in MLflow.

Entry points: `python -m raytrain_yolo.fit` (train), `python -m raytrain_yolo.tune` (throughput sweep).
Nothing here imports Ultralytics at module level: it reads RANK/WORLD_SIZE when first imported, which must
happen inside each Ray Train worker.
"""

__version__ = "0.1.0"
