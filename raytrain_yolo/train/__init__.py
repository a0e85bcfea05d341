"""One training run on Ray Train: the launch (resources, TorchTrainer, summary), the per-worker loop,
the Ultralytics adapter, and the GPU-resident loader with its batched augmentation."""
