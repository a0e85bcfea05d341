"""The only module that knows Ultralytics' trainer internals: a Ray-aware subclass of the task's trainer.

Import it inside a Ray Train worker only. `ultralytics.utils` reads RANK/LOCAL_RANK/WORLD_SIZE from the
environment when first imported, and Ray Train sets them in each worker just before the training function
runs; Ultralytics' module-level RANK then agrees with Ray's ranks on every code path that reads it.

What the subclass changes, and why (see also ../shared/notes/ultralytics-on-ray.md):
- world size and device come from Ray, never from Ultralytics' `device=` string, so Ultralytics neither
  spawns its own `torch.distributed.run` nor scales the loss by 0 on CPU;
- `_setup_ddp` only pins the device: Ray already made the process group (nccl or gloo);
- the device is Ray's `torch.device` for this worker, passed as `cuda:N`, and checked after Ultralytics parsed
  it: a mismatch fails at start-up instead of training two workers on one GPU;
- CPU workers are wrapped in DDP here (Ultralytics passes `device_ids=[None]`, which torch rejects for CPU
  modules), so gloo workers are real DDP. Detection models are wrapped with `find_unused_parameters=False`
  (every YOLO26 detect parameter gets a gradient each step; checked in tests/test_gpu_path.py); on GPUs
  Ultralytics' own wrap is redone the same way;
- with `--trace-samples`, `preprocess_batch` notes the files of every batch the loop really trained on;
- datasets (and their `labels/*.cache`) are built by global rank 0 first, then by the others, which read its
  cache: Ultralytics' guard is per node (each node's local rank 0 writes), so on a dataset shared by several
  nodes every node would write the same cache file at once;
- `rect=True` is turned off with Ultralytics' own warning when there is more than one rank, as Ultralytics' multi-GPU
  path does (the ranks would get different numbers of batches and wait for each other forever);
- with `time=`, rank 0's re-estimated epoch count is broadcast before the warmup and schedule are rebuilt from it
  (`_get_warmup_iterations`), so no rank trains on a schedule of its own;
- `final_eval`'s validation is skipped: its standalone validator assumes CUDA on DDP ranks and needs `best.pt` on
  every node; the per-epoch validation (distributed across ranks) already gives the final metrics. Its stripping of
  the final weights stays;
- a preemption notice's checkpoint at the step (train/preemption.py): `save_step_checkpoint` runs Ultralytics' own
  `save_model()` into the step checkpoint only (not `last.pt`, not `best.pt`), `optimizer_step` counts the steps
  (one is taken only right after a step), the train loader's DistributedSampler is wrapped to resume an epoch at a
  step in the same order, and `resume_training` starts such a checkpoint at its own epoch;
- Ultralytics' own MLflow and Ray Tune callbacks are removed from this trainer (we log and report once, ourselves),
  without touching the user's global Ultralytics settings.
- `keep_offline()`: with YOLO_OFFLINE set, Ultralytics still asks GitHub (a HEAD request) whether `Arial.ttf`
  exists, on every dataset check; offline, the font is taken from disk or not at all (plots fall back to
  PIL's default font). The driver calls it too, before its untrained-baseline validation.
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ultralytics import __version__ as ULTRALYTICS_VERSION
from ultralytics.data.utils import IMG_FORMATS
from ultralytics.models import yolo
from ultralytics.utils import LOGGER, RANK, USER_CONFIG_DIR, WORLD_SIZE, env_bool
from ultralytics.utils.torch_utils import torch_distributed_zero_first

# Ultralytics integrations that would duplicate what raytrain_yolo does itself.
_DUPLICATE_CALLBACK_MODULES = ("ultralytics.utils.callbacks.mlflow", "ultralytics.utils.callbacks.raytune")

# Like Ultralytics: BatchNorm buffers are not synced every forward (torch 2.13 renamed the switch).
_NO_BUFFER_SYNC = (
    {"forward_sync_buffers": False}
    if "forward_sync_buffers" in inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    else {"broadcast_buffers": False}
)

# Ultralytics trainer methods the mixins override or call: if a release renames one, training would go on
# silently wrong (a CPU loss scaled by 0, a second process group), so trainer_class() refuses it up front.
OVERRIDDEN = ("_setup_ddp", "_build_train_pipeline", "_setup_train", "final_eval", "get_dataloader",
              "preprocess_batch", "resume_training", "_get_warmup_iterations", "optimizer_step", "save_model")
# The image files Ultralytics' predictor takes from a folder or a list (suffixes, lower case, no dot).
IMAGE_FORMATS = frozenset(IMG_FORMATS)
# Tasks whose every trainable parameter gets a gradient each step, so DDP need not search for unused ones.
NO_UNUSED_PARAMETERS = {"detect"}

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
                "import raytrain_yolo.train.adapter only inside the training function"
            )
        overrides = dict(overrides)
        overrides["device"] = "cpu" if device.type == "cpu" else f"{device.type}:{device.index}"
        if device.type == "cpu":
            overrides["amp"] = False  # AMP is CUDA-only; keeps every rank's autocast the same
        super().__init__(overrides=overrides, _callbacks=_callbacks)
        if self.device != device:
            raise RuntimeError(
                f"Ultralytics {ULTRALYTICS_VERSION} chose device {self.device} but Ray assigned {device} to this "
                "worker: install the Ultralytics version raytrain_yolo pins (pyproject.toml)"
            )
        if world_size > 1 and self.args.rect:  # as Ultralytics' own multi-GPU path: ranks would get unequal batches
            LOGGER.warning("'rect=True' is incompatible with Multi-GPU training, setting 'rect=False'")
            self.args.rect = False
        self.traced_files: list[str] | None = None  # a list: note every trained batch's files (--trace-samples)
        # Step checkpoints on a preemption notice (train/preemption.py): on when the worker sets `step_checkpoints`;
        # `step_resume`: the step checkpoint's state this run resumes from.
        self.step_checkpoints, self.step_resume, self.step_sampler = False, None, None
        self.optimizer_steps, self.warmup_iterations = 0, -1
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
        """Runs right after Ultralytics' DDP wrap in `_setup_train` (skipped on CPU): wrap, or rewrap, here."""
        unused = self.args.task not in NO_UNUSED_PARAMETERS and not self.args.compile
        if self._wrap_cpu_ddp:
            self._wrap_cpu_ddp = False
            self.world_size = self._ray_world_size
            self.model = ddp_wrap(self.model, None, unused, bool(self.args.compile))
        elif isinstance(self.model, nn.parallel.DistributedDataParallel) and self.model.find_unused_parameters and not unused:
            self.model = ddp_wrap(self.model.module, self.device.index, False, bool(self.args.compile))
        super()._build_train_pipeline()

    def _get_warmup_iterations(self, num_batches):
        """With `time=`, Ultralytics re-estimates the epoch count from each rank's own clock after every epoch, right
        before this call, then rebuilds the warmup and the learning-rate schedule from it: ranks that disagree train
        on different schedules. Rank 0's count is taken by all, decided once and broadcast, as its stop is."""
        if self.args.time and self._ray_world_size > 1 and dist.is_available() and dist.is_initialized():
            epochs = [self.epochs]
            dist.broadcast_object_list(epochs, src=0)
            self.epochs = self.args.epochs = epochs[0]
        self.warmup_iterations = super()._get_warmup_iterations(num_batches)
        return self.warmup_iterations

    def optimizer_step(self):
        super().optimizer_step()
        self.optimizer_steps += 1  # every rank steps at the same batches: a step checkpoint is taken only after one

    def resume_training(self, ckpt):
        """A step checkpoint (train/preemption.py) holds the epoch in progress; Ultralytics resumes at the epoch
        after the one a checkpoint holds, so it is handed the epoch before."""
        if ckpt is not None and self.resume and self.step_resume:
            ckpt = {**ckpt, "epoch": ckpt["epoch"] - 1}
            if self.step_sampler is None:  # no distributed order to skip in: the epoch again, from its start
                LOGGER.warning(f"resuming epoch {ckpt['epoch'] + 2} from its start, not at its step "
                               f"{self.step_resume['step']}: this loader cannot skip its first batches")
        super().resume_training(ckpt)

    def save_step_checkpoint(self, path: Path) -> None:
        """Ultralytics' own `save_model()` in the middle of an epoch (model, EMA, optimizer, scaler, epoch, early
        stopping), written to `path` only: not to `last.pt` (the epoch's), not to `best.pt` (its fitness would be
        the last validation's, not these weights'), and no `save_period` copy."""
        kept, unused = (self.last, self.best, self.save_period), path.with_name(f"unused-{path.name}")
        self.last, self.best, self.save_period = path, unused, -1
        try:
            self.save_model()
        finally:
            self.last, self.best, self.save_period = kept
            unused.unlink(missing_ok=True)

    def preprocess_batch(self, batch):
        if self.traced_files is not None:
            self.traced_files.extend(batch["im_file"])
        if self.step_sampler is not None and self.step_sampler.awaiting_first:
            self.step_sampler.first_batch(batch["im_file"][0])
        return super().preprocess_batch(batch)

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        """Global rank 0 builds the dataset (and writes its label cache) before any other rank on any node. The
        device loader orders its own dataset build so (loader.build), and agrees on its store with a collective
        of all ranks after it, which must not run while the other ranks wait here."""
        device_train = mode == "train" and str(getattr(self, "device_loader", "")).startswith("device")
        if rank == -1 or device_train or not (dist.is_available() and dist.is_initialized()):
            return super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        with torch_distributed_zero_first(RANK):  # RANK, not LOCAL_RANK: one writer per cluster
            loader = super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        if mode == "train" and (self.step_checkpoints or self.step_resume):
            from raytrain_yolo.train.preemption import install

            self.step_sampler = install(loader, loader.dataset.im_files, self.step_resume)
        return loader

    def final_eval(self):
        """Ultralytics' final validation is skipped under Ray (see the module docstring); its stripping of the final
        weights is kept: rank 0's `last.pt`/`best.pt` lose the optimizer state, as Ultralytics leaves them."""
        from ultralytics.utils.torch_utils import strip_optimizer

        if RANK in {-1, 0}:
            for f in (self.last, self.best):
                if f.exists():
                    strip_optimizer(f)


class DeviceLoaderMixin:
    """`--loader device`: training batches decoded and augmented on the training device (loader.py).

    Only the train loader changes; validation, the loss and the loop are Ultralytics' own.
    """

    def get_dataloader(self, dataset_path, batch_size=16, rank=0, mode="train"):
        if mode != "train":
            return super().get_dataloader(dataset_path, batch_size=batch_size, rank=rank, mode=mode)
        from raytrain_yolo.train.loader import build

        return build(self, dataset_path, batch_size)

    def resume_training(self, ckpt):
        """A resumed run goes on with the next epoch's order and draws, on one worker too."""
        super().resume_training(ckpt)
        self.train_loader.sampler.set_epoch(self.start_epoch)


def _local_font(font: str = "Arial.ttf") -> Path | None:
    """Ultralytics' `check_font` without its download: the settings folder, then matplotlib's known fonts."""
    from matplotlib import font_manager

    name = Path(font).name
    if (USER_CONFIG_DIR / name).exists():
        return USER_CONFIG_DIR / name
    found = [f.fname for f in font_manager.fontManager.ttflist if font in f.fname and Path(f.fname).exists()]
    return Path(found[0]) if found else None


def keep_offline() -> None:
    """With YOLO_OFFLINE set, no font look-up on the network (see the module docstring)."""
    if not env_bool("YOLO_OFFLINE"):
        return
    import ultralytics.data.utils
    import ultralytics.utils.plotting

    for module in (ultralytics.data.utils, ultralytics.utils.plotting):
        module.check_font = _local_font


@contextmanager
def offline_dataset_check():
    """While it is open, Ultralytics' `check_det_dataset` looks for its font on disk only when YOLO_OFFLINE is set
    (its `check_font` asks GitHub otherwise: a second of waiting offline, a download online). For the driver's
    preflight: the swap is undone on exit, so the process keeps Ultralytics as it was."""
    import ultralytics.data.utils as data_utils

    if not env_bool("YOLO_OFFLINE") or data_utils.check_font is _local_font:
        yield
        return
    original, data_utils.check_font = data_utils.check_font, _local_font
    try:
        yield
    finally:
        data_utils.check_font = original


def trainer_class(task: str, loader: str = "ultralytics", prefetch: bool = False) -> type:
    """The Ray-aware trainer for an Ultralytics task (detect, pose, segment, obb); `loader`/`prefetch` as RunSpec's."""
    try:
        base = TASK_TRAINERS[task]
    except KeyError:
        raise ValueError(f"task '{task}' is not supported; use one of {', '.join(TASK_TRAINERS)}") from None
    missing = [name for name in OVERRIDDEN if not callable(getattr(base, name, None))]
    if missing:
        raise RuntimeError(
            f"Ultralytics {ULTRALYTICS_VERSION} has no {base.__name__}.{', .'.join(missing)}, which raytrain_yolo "
            "adapts: install the Ultralytics version raytrain_yolo pins (pyproject.toml)"
        )
    mixins = (RayTrainerMixin, DeviceLoaderMixin) if loader.startswith("device") else (RayTrainerMixin,)
    return type(f"Ray{base.__name__}", (*mixins, base), {"device_loader": loader, "device_prefetch": prefetch})


def ddp_wrap(module: nn.Module, device_index: int | None, find_unused: bool, static_graph: bool) -> nn.Module:
    """DDP as Ultralytics builds it (no per-forward buffer sync), with our choice of `find_unused_parameters`."""
    return nn.parallel.DistributedDataParallel(
        module, device_ids=None if device_index is None else [device_index], find_unused_parameters=find_unused,
        static_graph=static_graph, **_NO_BUFFER_SYNC,
    )


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# --- Validation outside training (val.py) ------------------------------------------------------------------------
# Ultralytics validates in one process, or under DDP gathers every rank's statistics with `gather_stats`. Here
# Ray tasks play the ranks: each validates a shard of Ultralytics' own batches, and the driver's validator merges
# their statistics in its `gather_stats` before Ultralytics' metric code runs once, exactly as on rank 0.


def val_args(model: str, overrides: dict) -> dict:
    """The arguments `YOLO(model).val(**overrides)` validates with (the checkpoint's imgsz, rect batches)."""
    from ultralytics import YOLO

    return {**YOLO(model).overrides, "rect": True, **overrides, "mode": "val"}


PLOTTED_BATCHES = 3  # BaseValidator.__call__ plots batches 0-2 (`batch_i < 3`) when plots=True


class ShardValidatorMixin:
    """Put before a task's validator. `shard=(i, n)`: validate batches i, i+n, ... and keep the raw statistics in
    `shard_result`; `shard=None`: validate nothing, merge `shard_results` and compute the metrics.

    The dataset, its rect batch shapes and its batch order are Ultralytics' own, so every image is letterboxed as
    in a single-process `model.val()`, and the merged statistics are put back in batch order. So are the outputs
    Ultralytics writes as it validates: `save_json`'s predictions (and, for a custom detect dataset, the ground truth
    its COCO evaluation builds), and `save_txt`'s label files, which each shard writes in a folder of its own and
    hands over; the merging validator writes `predictions.json`, evaluates it as Ultralytics does, and writes every
    image's label file.
    """

    shard: tuple[int, int] | None = None
    shard_results: list = []

    def get_dataloader(self, dataset_path, batch_size):
        loader = super().get_dataloader(dataset_path, batch_size)
        n, bs = len(loader.dataset), loader.batch_size
        self._batches = batches = [list(range(i, min(i + bs, n))) for i in range(0, n, bs)]
        self._batch_ids = list(range(self.shard[0], len(batches), self.shard[1])) if self.shard else []
        return torch.utils.data.DataLoader(
            loader.dataset, batch_sampler=[batches[i] for i in self._batch_ids], num_workers=loader.num_workers,
            collate_fn=loader.dataset.collate_fn, pin_memory=loader.pin_memory,
        )

    def init_metrics(self, model):
        super().init_metrics(model)
        self._ends, self._marks, self._plot_threads = [], [], []
        if self.shard and getattr(self, "eval_ids", None) is not None:  # the dataset index of each image it sees
            self.eval_ids = [i for b in self._batch_ids for i in self._batches[b]]

    def update_metrics(self, preds, batch):
        super().update_metrics(preds, batch)
        self._ends.append(len(self.metrics.stats["tp"]))  # where each batch's per-image entries end
        self._marks.append(self._json_lengths())  # and its JSON entries

    def plot_val_samples(self, batch, ni):
        if self._plotted(ni):
            self._in_background(super().plot_val_samples, batch, self._batch_ids[ni] if self.shard else ni)

    def plot_predictions(self, batch, preds, ni, *args, **kwargs):
        if self._plotted(ni):
            self._in_background(super().plot_predictions, batch, preds, self._batch_ids[ni] if self.shard else ni,
                                *args, **kwargs)

    def _plotted(self, ni: int) -> bool:
        """Ultralytics plots its first PLOTTED_BATCHES batches (`val_batch{i}_labels.jpg`, `_pred.jpg`); `ni` counts
        this shard's batches, so a shard plots the batches among the first ones that are its own, under their
        number in Ultralytics' order (a shard's first batches come first: `_batch_ids[ni] >= ni`)."""
        return not self.shard or self._batch_ids[ni] < PLOTTED_BATCHES

    def _in_background(self, plot, *args, **kwargs) -> None:
        """Run one of Ultralytics' plot calls, keeping the threads it starts (`plot_images` is `@threaded`): the
        shard hands its files over only once they are written (_shard_outputs)."""
        import threading

        before = set(threading.enumerate())
        plot(*args, **kwargs)
        self._plot_threads += [t for t in threading.enumerate() if t not in before]

    def _json_lengths(self) -> tuple[int, int, int, int]:
        gdict = self.gdict if getattr(self, "build_gdict", False) else None
        return (len(getattr(self, "jdict", None) or []), len(getattr(self, "pred_counts", None) or []),
                len(gdict["images"]) if gdict else 0, len(gdict["annotations"]) if gdict else 0)

    def _shard_outputs(self) -> dict:
        """This shard's save_json entries per batch, and its save_txt label files (name -> text)."""
        gdict = self.gdict if getattr(self, "build_gdict", False) else None
        parts, start = {}, (0, 0, 0, 0)
        for b, end in zip(self._batch_ids, self._marks):
            parts[b] = {"jdict": (self.jdict or [])[start[0]:end[0]],
                        "pred_counts": (getattr(self, "pred_counts", None) or [])[start[1]:end[1]],
                        "images": gdict["images"][start[2]:end[2]] if gdict else [],
                        "annotations": gdict["annotations"][start[3]:end[3]] if gdict else []}
            start = end
        labels = {f.name: f.read_text() for f in (self.save_dir / "labels").glob("*.txt")} if self.args.save_txt else {}
        for thread in self._plot_threads:
            thread.join()
        plots = {f.name: f.read_bytes() for f in self.save_dir.glob("val_batch*")} if self.args.plots else {}
        return {"json": parts, "labels": labels, "plots": plots}

    def _merge_outputs(self) -> None:
        """The shards' save_json entries in batch order, and their label files, as one process would have them."""
        parts = {b: part for r in self.shard_results for b, part in r["outputs"]["json"].items()}
        order = sorted(parts)
        self.jdict = [x for b in order for x in parts[b]["jdict"]]
        if getattr(self, "pred_counts", None) is not None:
            self.pred_counts = [x for b in order for x in parts[b]["pred_counts"]]
        if getattr(self, "build_gdict", False):
            for key in ("images", "annotations"):
                self.gdict[key] = [x for b in order for x in parts[b][key]]
        if self.args.save_txt:
            for r in self.shard_results:
                for name, text in r["outputs"]["labels"].items():
                    (self.save_dir / "labels" / name).write_text(text)
        if self.args.plots:  # the shards' plots of Ultralytics' first batches, under Ultralytics' names
            for r in self.shard_results:
                for name, data in r["outputs"]["plots"].items():
                    (self.save_dir / name).write_bytes(data)

    def _image_metric_groups(self):
        return [m for m in (getattr(self.metrics, k, None) for k in ("box", "seg", "pose")) if hasattr(m, "image_metrics")]

    def gather_stats(self):
        if self.shard:
            starts = [0, *self._ends[:-1]]
            self.shard_result = {
                "batches": {b: {k: v[s:e] for k, v in self.metrics.stats.items()}
                            for b, s, e in zip(self._batch_ids, starts, self._ends)},
                "image_metrics": [dict(m.image_metrics) for m in self._image_metric_groups()],
                "confusion": self.confusion_matrix.matrix,
                "seen": self.seen,
                "outputs": self._shard_outputs(),
            }
            return
        merged = {}
        for r in self.shard_results:
            merged.update(r["batches"])
        for key in self.metrics.stats:
            self.metrics.stats[key] = [x for b in sorted(merged) for x in merged[b][key]]
        for r in self.shard_results:
            for group, part in zip(self._image_metric_groups(), r["image_metrics"]):
                group.image_metrics.update(part)
            self.confusion_matrix.matrix = self.confusion_matrix.matrix + r["confusion"]
        self.seen = sum(r["seen"] for r in self.shard_results)
        self._merge_outputs()

    def get_stats(self):
        return {} if self.shard else super().get_stats()

    def finalize_metrics(self):
        if self.shard:
            self.shard_result["speed"] = dict(self.speed)  # ms per image of the whole split, this shard's share
            return
        self.speed = {k: sum(r["speed"][k] for r in self.shard_results) for k in self.speed}
        super().finalize_metrics()

    def print_results(self):
        if not self.shard:
            from ultralytics.utils import LOGGER

            LOGGER.info(self.get_desc())
            super().print_results()


def sharded_validator(model: str, args: dict, shard: tuple[int, int] | None, shard_results: list | None = None):
    """The task's Ultralytics validator with ShardValidatorMixin, set up for one shard (or for the merge)."""
    from ultralytics import YOLO

    yolo = YOLO(model)
    base = yolo._smart_load("validator")
    cls = type(f"Sharded{base.__name__}", (ShardValidatorMixin, base), {"shard": shard,
                                                                       "shard_results": shard_results or []})
    return yolo, cls(args=args, _callbacks=yolo.callbacks)


# --- Batch prediction (predict.py) -------------------------------------------------------------------------------
# Ultralytics' predictor letterboxes, runs and post-processes in one process. Here CPU workers letterbox (the
# predictor's own LetterBox and parameters) and model actors run the predictor's preprocess (with its letterbox
# step skipped), inference and postprocess, so each image gets what `YOLO(model).predict(image)` gives it.


def predict_args(model: str, overrides: dict) -> dict:
    """The arguments `YOLO(model).predict(**overrides)` predicts with, and how it letterboxes images."""
    from ultralytics import YOLO
    from ultralytics.utils.checks import check_imgsz

    yolo = YOLO(model)
    args = {**yolo.overrides, "conf": 0.25, "batch": 1, "save": False, "mode": "predict", "rect": True,
            "verbose": False, **overrides}
    stride = max(int(yolo.model.stride.max()), 32)  # AutoBackend's stride for a .pt model
    letterbox = {"new_shape": check_imgsz(args.get("imgsz", 640), stride=stride, min_dim=2),
                 "auto": bool(args["rect"]), "stride": stride}  # one image per Ultralytics batch: same shapes
    channels = yolo.model.yaml.get("channels", 3) if hasattr(yolo.model, "yaml") else 3  # AutoBackend's rule
    return {"args": args, "letterbox": letterbox, "task": yolo.task, "read_flag": read_flag(channels)}


def read_flag(channels: int) -> int:
    """The OpenCV read flag Ultralytics' LoadImagesAndVideos uses for a model of `channels` input channels:
    grayscale (H, W, 1) for 1, BGR (H, W, 3) for 3, every band as stored otherwise."""
    import cv2

    return {1: cv2.IMREAD_GRAYSCALE, 3: cv2.IMREAD_COLOR}.get(channels, cv2.IMREAD_UNCHANGED)


def read_image(data: bytes, name: str, flag: int, tmp_dir: str) -> np.ndarray | None:
    """One image file's bytes decoded as Ultralytics' predictor decodes the file: `ultralytics.utils.patches.imread`
    (EXIF orientation, 16-bit to 8-bit, the first TIFF page, the PIL fallback for AVIF/HEIC, an empty file read
    as nothing). That reader takes a path and chooses by its suffix, so the bytes go to a file in `tmp_dir` named
    with `name`'s suffix first. Returns an (H, W, C) uint8 array, or None for a file it cannot read."""
    import os

    from ultralytics.utils.patches import imread

    suffix = os.path.splitext(name)[1]
    path = os.path.join(tmp_dir, f"image{suffix}")
    with open(path, "wb") as f:
        f.write(data)
    try:
        return imread(path, flags=flag)
    except Exception:  # a decoder that raises instead of returning None: unreadable all the same
        return None
    finally:
        os.remove(path)


def letterbox(images: list, new_shape, auto: bool, stride: int) -> list:
    """Ultralytics' LetterBox, as its predictor applies it to one BGR image at a time."""
    from ultralytics.data.augment import LetterBox

    lb = LetterBox(new_shape, auto=auto, stride=stride)
    return [lb(image=im) for im in images]


class _Letterboxed:
    """Images arrive letterboxed by the CPU workers: the predictor's own letterbox step is skipped."""

    def pre_transform(self, im):
        return im


class BatchPredictor:
    """The task's Ultralytics predictor on letterboxed BGR images: `__call__` returns its `Results`."""

    def __init__(self, model: str, args: dict):
        from ultralytics import YOLO

        yolo = YOLO(model)
        base = yolo._smart_load("predictor")
        self.predictor = type(f"Letterboxed{base.__name__}", (_Letterboxed, base), {})(
            overrides=args, _callbacks=yolo.callbacks)
        self.predictor.setup_model(yolo.model, verbose=False)
        from ultralytics.data.loaders import SourceTypes

        self.predictor.source_type = SourceTypes()  # image files, as `predict(source=folder)` sees them

    def __call__(self, images: list, paths: list[str], orig_shapes: list[tuple[int, int]]) -> list:
        """Images of one shape (a group), their paths and original (h, w): one `Results` per image, in order.

        Inference runs on the whole group; the postprocess (NMS) runs image by image, as in Ultralytics' predict
        (batch=1). Its NMS stops after 2.0 + 0.05 x batch seconds and leaves the rest of the batch without objects
        (only a log line says so), so a dense group on a busy CPU would lose its last images."""
        p = self.predictor
        # Results only read the original image's shape: a zero-strided view stands in for it.
        origs = [np.broadcast_to(np.zeros(1, np.uint8), (h, w, 3)) for h, w in orig_shapes]
        results = []
        with torch.inference_mode():
            im = p.preprocess(list(images))
            preds = p.inference(im)
            for i, path in enumerate(paths):
                p.batch = ([path], [origs[i]], [""])
                results += p.postprocess(_image_of(preds, i, len(paths)), im[i : i + 1], [origs[i]])
        return results


def _image_of(preds, i: int, n: int):
    """Image `i` of a batch of `n` in the model's output (tensors batch-first, inside tuples, lists and dicts)."""
    if isinstance(preds, torch.Tensor):
        return preds[i : i + 1] if preds.ndim and preds.shape[0] == n else preds
    if isinstance(preds, (tuple, list)):
        return type(preds)(_image_of(x, i, n) for x in preds)
    if isinstance(preds, dict):
        return {k: _image_of(v, i, n) for k, v in preds.items()}
    return preds


def result_rows(r) -> list[dict]:
    """One row per object of an Ultralytics `Results`: class, confidence, box (xyxy, original pixels), and the
    task's extra: keypoints (K x [x, y, conf]), polygon (N x [x, y]), or obb (xywhr) and its corners."""
    rows = []
    objs = r.obb if r.obb is not None else r.boxes
    if objs is None:
        return rows
    cls, conf, xyxy = objs.cls.tolist(), objs.conf.tolist(), objs.xyxy.tolist()
    kpts = r.keypoints.data.tolist() if r.keypoints is not None else None
    polys = [p.tolist() for p in r.masks.xy] if r.masks is not None else None
    for i in range(len(cls)):
        row = {"class": int(cls[i]), "name": r.names[int(cls[i])], "confidence": conf[i], "box": xyxy[i]}
        if kpts is not None:
            row["keypoints"] = kpts[i]
        if polys is not None:
            row["polygon"] = polys[i]
        if r.obb is not None:
            row["obb"] = objs.xywhr[i].tolist()
            row["corners"] = objs.xyxyxyxy[i].tolist()
        rows.append(row)
    return rows
