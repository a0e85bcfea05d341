"""The only module that knows Ultralytics' trainer internals: a Ray-aware subclass of the task's trainer.

Import it inside a Ray Train worker only. `ultralytics.utils` reads RANK/LOCAL_RANK/WORLD_SIZE from the
environment when first imported, and Ray Train sets them in each worker just before the training function
runs; Ultralytics' module-level RANK then agrees with Ray's ranks on every code path that reads it.

What the subclass changes, and why (see also ../shared/notes/ultralytics-on-ray.md):
- world size and device come from Ray, never from Ultralytics' `device=` string, so Ultralytics neither
  spawns its own `torch.distributed.run` nor scales the loss by 0 on CPU;
- `_setup_ddp` only pins the device: Ray already made the process group (nccl or gloo);
- CPU workers are wrapped in DDP here (Ultralytics passes `device_ids=[None]`, which torch rejects for CPU
  modules), so gloo workers are real DDP;
- `final_eval` is skipped: its standalone validator assumes CUDA on DDP ranks and needs `best.pt` on every
  node; the per-epoch validation (distributed across ranks) already gives the final metrics;
- Ultralytics' own MLflow and Ray Tune callbacks are removed from this trainer (we log and report once, ourselves),
  without touching the user's global Ultralytics settings.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn

from ultralytics.models import yolo
from ultralytics.utils import RANK, WORLD_SIZE

# Ultralytics integrations that would duplicate what raytrain_yolo does itself.
_DUPLICATE_CALLBACK_MODULES = ("ultralytics.utils.callbacks.mlflow", "ultralytics.utils.callbacks.raytune")

# Like Ultralytics: BatchNorm buffers are not synced every forward (torch 2.13 renamed the switch).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

TASK_TRAINERS = {
    "detect": yolo.detect.DetectionTrainer,
    "pose": yolo.pose.PoseTrainer,
    "segment": yolo.segment.SegmentationTrainer,
    "obb": yolo.obb.OBBTrainer,
}


class RayTrainerMixin:
    """Put before an Ultralytics trainer class: `class T(RayTrainerMixin, DetectionTrainer)`."""

    def __init__(self, *, overrides: dict, device: torch.device, world_size: int, _callbacks=None):
        expected = RANK if WORLD_SIZE > 1 else -1
        if world_size != max(WORLD_SIZE, 1) or (world_size > 1 and expected < 0):
            raise RuntimeError(
                f"Ultralytics was imported before Ray set WORLD_SIZE (sees {WORLD_SIZE}, Ray has {world_size}); "
                "import raytrain_yolo.adapter only inside the training function"
            )
        overrides = dict(overrides)
        overrides["device"] = "cpu" if device.type == "cpu" else str(device.index)
        if device.type == "cpu":
            overrides["amp"] = False  # AMP is CUDA-only; keeps every rank's autocast the same
        super().__init__(overrides=overrides, _callbacks=_callbacks)
        self._ray_world_size = world_size
        # GPU: Ultralytics' own DDP wrap works once it knows the world size. CPU: wrap later ourselves.
        self.world_size = world_size if device.type != "cpu" else 0
        self._wrap_cpu_ddp = device.type == "cpu" and world_size > 1
        self.ddp = False  # never Ultralytics' own subprocess launcher
        for event, fns in self.callbacks.items():
            self.callbacks[event] = [f for f in fns if not f.__module__.startswith(_DUPLICATE_CALLBACK_MODULES)]

    def _setup_ddp(self):
        """Ray made the process group and chose the device; only pin it as current."""
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)

    def _build_train_pipeline(self):
        if self._wrap_cpu_ddp:  # runs right after Ultralytics' (skipped) DDP wrap in _setup_train
            self._wrap_cpu_ddp = False
            self.world_size = self._ray_world_size
            self.model = nn.parallel.DistributedDataParallel(
                self.model, find_unused_parameters=not bool(self.args.compile), **_NO_BUFFER_SYNC
            )
        super()._build_train_pipeline()

    def final_eval(self):
        """Skipped under Ray: see the module docstring."""


class DeviceLoaderMixin:
    """`--loader device`: training batches decoded and augmented on the training device (loader.py).

    Only the train loader changes; validation, the loss and the loop are Ultralytics' own.
    """

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        if mode != "train":
            return super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        from raytrain_yolo.loader import build

        return build(self, dataset_path, batch_size)


def trainer_class(task: str, loader: str = "ultralytics") -> type:
    """The Ray-aware trainer for an Ultralytics task (detect, pose, segment, obb)."""
    try:
        base = TASK_TRAINERS[task]
    except KeyError:
        raise ValueError(f"task '{task}' is not supported; use one of {', '.join(TASK_TRAINERS)}") from None
    mixins = (RayTrainerMixin, DeviceLoaderMixin) if loader == "device" else (RayTrainerMixin,)
    return type(f"Ray{base.__name__}", (*mixins, base), {})


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
