"""Benchmark rows below a training run: the GPU-only step, and the device loader's stores and augmentation alone."""

from __future__ import annotations

import time

from raytrain_yolo.bench.context import BenchContext, free_gpu
from raytrain_yolo.bench.report import Report


def gpu_only(ctx: BenchContext, report: Report, batch: int, steps: int = 20, ddp: str | None = None) -> None:
    """Forward + loss + backward + optimizer step on a real batch already on the device. `ddp`: None (no wrapper,
    as one GPU trains), "unused" (DDP searching for unused parameters, as Ultralytics wraps) or "plain" (DDP without
    that search, as raytrain_yolo wraps detect), on a world of 1."""
    import torch
    from ultralytics.models.yolo.detect import DetectionTrainer
    from ultralytics.utils.torch_utils import autocast

    trainer = DetectionTrainer(overrides={**ctx.common, "batch": batch, "workers": 0,
                                          "device": "cpu" if ctx.ns.cpu else 0,
                                          "project": str(ctx.work / "gpu_only"), "name": "step", "exist_ok": True})
    trainer._setup_train()
    batch_data = trainer.preprocess_batch(next(iter(trainer.train_loader)))
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    model = trainer.model
    if ddp:
        from raytrain_yolo.train.adapter import ddp_wrap

        _one_process_group(trainer.device.type == "cuda")
        model = ddp_wrap(model, trainer.device.index, find_unused=ddp == "unused", static_graph=False)

    def step():
        with autocast(trainer.amp, device=trainer.device.type):
            loss, _ = model(batch_data)
        trainer.scaler.scale(loss.sum()).backward()
        trainer.scaler.step(trainer.optimizer)
        trainer.scaler.update()
        trainer.optimizer.zero_grad()

    for _ in range(5):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    seconds = time.perf_counter() - t0
    label = f"gpu-only-b{batch}" + (f"-ddp-{ddp}" if ddp else "")
    report.record({"row": label, "kind": "gpu_only", "batch": batch, "amp": ctx.amp, "ddp": ddp,
                   "images_per_second": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps})
    trainer.train_loader.close() if hasattr(trainer.train_loader, "close") else None
    trainer = model = None  # free the GPU before the next row
    free_gpu()


def augment_only(ctx: BenchContext, report: Report, batch: int, steps: int = 10) -> None:
    """The device loader's augmentation alone (decoded store, a set of 2 batches): what it costs per batch."""
    loader, ready_s = _device_loader(ctx, ctx.data, batch, "decoded", fraction=min(1.0, 2 * batch / ctx.ns.images))
    seconds, done, _ = _time_batches(loader, steps, not ctx.ns.cpu)
    report.record({"row": f"augment-only-b{batch}", "kind": "augment_only", "batch": batch, "amp": "-",
                   "images_per_second": done / seconds, "ms_per_step": 1000 * seconds / steps,
                   "decode_images_per_second": len(loader.dataset) / ready_s})
    loader.close()
    free_gpu()


def store(ctx: BenchContext, report: Report, kind: str, batch: int, big: bool = False, steps: int = 10) -> None:
    """One device-loader store over the whole set (--images, or --big-images with `big`): time until it is
    ready, bytes held per image and where, the first batch, and augmented images/s (decode included)."""
    images = ctx.ns.big_images if big else ctx.ns.images
    loader, ready_s = _device_loader(ctx, ctx.big_data() if big else ctx.data, batch, kind)
    held_bytes, held_in = loader.dataset.held
    seconds, done, first_s = _time_batches(loader, steps, not ctx.ns.cpu)
    report.record({"row": f"store-{kind}" + ("-big" if big else ""), "kind": "store", "store": kind, "images": images,
                   "batch": batch, "mb_per_image": held_bytes / 1e6 / images, "gb_held": held_bytes / 1e9,
                   "held_in": held_in, "device_mb_per_image": held_bytes / 1e6 / images if held_in == "device" else 0.0,
                   "ready_s": ready_s, "first_batch_s": first_s, "images_per_second": done / seconds})
    loader.close()
    free_gpu()


def _device_loader(ctx: BenchContext, data_yaml: str, batch: int, kind: str, fraction: float = 1.0):
    """A one-rank device loader over `data_yaml`'s train split with store `kind`; (loader, seconds to build)."""
    import torch
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    from raytrain_yolo.train.augment import AugmentHyp
    from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader

    device = torch.device("cpu" if ctx.ns.cpu else "cuda", 0)
    cfg = get_cfg(overrides={**ctx.common, "data": data_yaml, "batch": batch, "fraction": fraction})
    data = check_det_dataset(data_yaml)
    source = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=32)
    t0 = time.perf_counter()
    loader = DeviceLoader(DeviceDataset(source, AugmentHyp.from_args(cfg), device, kind), batch, 0, 1, seed=0)
    return loader, time.perf_counter() - t0


def _time_batches(loader, steps: int, cuda: bool) -> tuple[float, int, float]:
    """Seconds for `steps` batches after a first one (which warms up the kernels), the images in them, and the
    first one's seconds."""
    import torch

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    it, done = iter(loader), 0
    t0 = first = 0.0
    t_start = time.perf_counter()
    for i in range(steps + 1):
        try:
            b = next(it)
        except StopIteration:
            it = iter(loader)
            b = next(it)
        if i == 0:
            sync()
            first, t0 = time.perf_counter() - t_start, time.perf_counter()
        else:
            done += len(b["img"])
    sync()
    return time.perf_counter() - t0, done, first


def _one_process_group(cuda: bool) -> None:
    """A world of one process, so DDP's per-step overhead can be measured on one device."""
    import torch.distributed as dist

    from raytrain_yolo.core.cluster import free_local_port

    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{free_local_port()}", rank=0,
                                world_size=1)
