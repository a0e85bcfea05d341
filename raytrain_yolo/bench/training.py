"""Benchmark rows that train: plain Ultralytics, raytrain_yolo on one worker, the tuner's pick, mAP per loader."""

from __future__ import annotations

import time

from raytrain_yolo.bench.context import BenchContext, free_gpu, mean
from raytrain_yolo.bench.report import Report
from raytrain_yolo.core.config import RunSpec, TrackingSpec
from raytrain_yolo.train.worker import IPS_KEY, ThroughputMeter


def native(ctx: BenchContext, report: Report, label: str, batch: int, workers: int) -> None:
    """Plain `YOLO(model).train(...)`, stopped after --windows measurement windows."""
    from ultralytics import YOLO

    meter = ThroughputMeter(window_steps=ctx.ns.window_steps)
    windows: list[float] = []

    def on_batch_end(trainer):
        if meter.on_train_batch_end(trainer):
            windows.append(meter.take_window())
        if len(windows) >= ctx.ns.windows:
            trainer.stop = True

    model = YOLO(ctx.common["model"])
    model.add_callback("on_train_epoch_start", meter.on_train_epoch_start)
    model.add_callback("on_train_batch_end", on_batch_end)
    t0 = time.time()
    # save=True: plain `model.train()` insists on a checkpoint at the end (written after the windows)
    model.train(**{**ctx.common, "save": True}, batch=batch, workers=workers, device="cpu" if ctx.ns.cpu else 0,
                project=str(ctx.work / "native"), name=label, exist_ok=True, verbose=False)
    report.record({"row": label, "kind": "native", "batch": batch, "workers": workers, "amp": ctx.amp,
                   "images_per_second": mean(windows), "windows": windows, "wall_s": round(time.time() - t0, 1)})
    free_gpu()


def raytrain(ctx: BenchContext, report: Report, label: str, batch: int, workers: int, extra: dict | None = None,
             loader: str = "ultralytics", data: str | None = None, images: int | None = None,
             prefetch: bool = False) -> None:
    """The same configuration through raytrain_yolo (Ray Train, one worker); `data`/`images`: another set."""
    from raytrain_yolo.plan import prepare
    from raytrain_yolo.train.launch import launch

    train = {**ctx.common, "batch": batch, "workers": workers, **(extra or {}), **({"data": data} if data else {})}
    spec = RunSpec(train=train, scaling=ctx.one_worker(), tracking=TrackingSpec(enabled=False),
                   storage_path=str(ctx.work / "ray"), name=label, loader=loader, prefetch=prefetch,
                   window_steps=ctx.ns.window_steps, max_windows=ctx.ns.windows, validate_untrained=False)
    t0 = time.time()
    summary = launch(prepare(spec)).summary
    windows = [h[IPS_KEY] for h in summary["history"] if "window" in h]
    mem = max((h.get("system/gpu_mem_gb", 0) for h in summary["history"]), default=None)
    report.record({"row": label, "kind": "raytrain", "loader": loader, "prefetch": prefetch,
                   "images": images or ctx.ns.images,
                   "batch": batch, "workers": workers, "amp": ctx.amp, **(extra or {}),
                   "images_per_second": mean(windows), "windows": windows, "gpu_mem_gb": mem,
                   "wall_s": round(time.time() - t0, 1), "error": summary.get("error")})


def tuned(ctx: BenchContext, report: Report) -> None:
    """What the throughput tuner picks when given a few minutes."""
    from raytrain_yolo.sweep.throughput import SweepBudget, SweepSpace, run_sweep

    base = RunSpec(train={"data": ctx.data, "model": ctx.common["model"], "imgsz": ctx.ns.imgsz, "optimizer": "SGD"},
                   scaling=ctx.one_worker(), tracking=TrackingSpec(enabled=False),
                   storage_path=str(ctx.work / "tune"), name="sweep")
    space = SweepSpace(batch=ctx.ns.sweep_batch, workers=[ctx.ns.max_workers],
                       amp=["fp32"] if ctx.ns.cpu else ["fp16", "bf16"])
    # No early stopping here: every trial ends by itself, so a stopped trial's GPU is never waited for.
    budget = SweepBudget(window_steps=ctx.ns.window_steps, windows=ctx.ns.windows, grace_windows=1,
                         max_concurrent=1, early_stop=False)
    t0 = time.time()
    res = run_sweep(base, space, budget)
    b = res.best or {}
    report.record({"row": "tuned", "kind": "raytrain-tuned", "batch": b.get("batch"), "workers": b.get("workers"),
                   "amp": b.get("amp"), "images_per_second": b.get("images_per_second"),
                   "trials": [{k: r.get(k) for k in ("batch", "workers", "amp", "images_per_second", "status")}
                              for r in res.rows], "wall_s": round(time.time() - t0, 1)})


def accuracy(ctx: BenchContext, report: Report, loader: str) -> None:
    """Validation mAP after the same short training with each loader: same data, seed, epochs, batch."""
    from raytrain_yolo.plan import prepare
    from raytrain_yolo.train.launch import launch

    epochs = ctx.ns.map_epochs
    train = {**ctx.common, "batch": ctx.ns.big_batch, "workers": ctx.ns.max_workers,
             "epochs": epochs, "val": True, "save": True, "close_mosaic": max(1, epochs // 5)}
    spec = RunSpec(train=train, scaling=ctx.one_worker(), tracking=TrackingSpec(enabled=False),
                   storage_path=str(ctx.work / "map"), name=f"map-{loader}", loader=loader, validate_untrained=False)
    t0 = time.time()
    s = launch(prepare(spec)).summary
    m = s.get("metrics", {})
    report.record({"row": f"map-{loader}", "kind": "accuracy", "loader": loader, "batch": ctx.ns.big_batch,
                   "amp": ctx.amp, "epochs": epochs, "mAP50": m.get("metrics/mAP50(B)"),
                   "mAP50-95": m.get("metrics/mAP50-95(B)"), "images_per_second": s.get("images_per_second"),
                   "wall_s": round(time.time() - t0, 1)})
