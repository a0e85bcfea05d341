"""`python -m raytrain_yolo.bench`: plain Ultralytics vs raytrain_yolo vs the GPU-only step vs the tuner's pick.

All rows are steady-state images/s measured the same way (worker.ThroughputMeter: per-step timestamps, each
epoch's first 20% of steps skipped, windows of --window-steps steps), in one run on one machine, on the same
synthetic dataset. Results go to <out>/bench.json and <out>/bench.md as each row finishes, so a run cut short
still leaves what it measured.

    python -m raytrain_yolo.bench --out experiments/results            # one GPU: the full benchmark
    python -m raytrain_yolo.bench --cpu --images 64 --imgsz 64 --window-steps 2 --windows 2   # smoke test
    python -m raytrain_yolo.bench --only device,gpu,map --out ...   # issue 9: the device loader and its mAP

Parts: device (`--loader device` rows, largest batch first), gpu (GPU-only step), augment (the device loader's
augmentation alone), native, raytrain, tune, map (the same short training run with each loader, validation mAP
side by side), ddp (the GPU-only step under DDP with and without `find_unused_parameters`, on a world of 1),
compile (device loader with torch.compile).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")

from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec  # noqa: E402
from raytrain_yolo.data.synthetic import ensure_synthetic  # noqa: E402
from raytrain_yolo.train.worker import IPS_KEY, ThroughputMeter  # noqa: E402

MODEL = "yolo26n.yaml"
DEFAULTS = {"batch": 16, "workers": 8}  # Ultralytics' own defaults


class Bench:
    def __init__(self, ns: argparse.Namespace):
        self.ns = ns
        self.out = Path(ns.out)  # bench.json, bench.md
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(ns.work or ns.out)  # the runs' own folders (weights, checkpoints)
        self.rows: list[dict[str, Any]] = []
        previous = self.out / "bench.json"
        if ns.append and previous.is_file():  # a later part of the same benchmark, on the same machine
            self.rows = json.loads(previous.read_text())["rows"]
        self.data = str(ensure_synthetic(SyntheticSpec(train=ns.images, val=ns.val_images, imgsz=ns.imgsz, seed=0)))
        self.device_name = _device_name(ns.cpu)
        self.common = {"data": self.data, "model": MODEL, "imgsz": ns.imgsz, "optimizer": "SGD", "epochs": 1000,
                       "val": False, "plots": False, "save": False, "seed": 0}
        if ns.cpu:
            self.common["amp"] = False

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(f"[bench] {row}", flush=True)
        self.write()

    # 1-2. plain Ultralytics
    def native(self, label: str, batch: int, workers: int) -> None:
        from ultralytics import YOLO

        meter = ThroughputMeter(window_steps=self.ns.window_steps)
        windows: list[float] = []

        def on_batch_end(trainer):
            if meter.on_train_batch_end(trainer):
                windows.append(meter.take_window())
            if len(windows) >= self.ns.windows:
                trainer.stop = True

        model = YOLO(MODEL)
        model.add_callback("on_train_epoch_start", meter.on_train_epoch_start)
        model.add_callback("on_train_batch_end", on_batch_end)
        t0 = time.time()
        # save=True: plain `model.train()` insists on a checkpoint at the end (written after the windows)
        model.train(**{**self.common, "save": True}, batch=batch, workers=workers, device="cpu" if self.ns.cpu else 0,
                    project=str(self.work / "native"), name=label, exist_ok=True, verbose=False)
        self.record({"row": label, "kind": "native", "batch": batch, "workers": workers, "amp": self._amp(),
                     "images_per_second": _mean(windows), "windows": windows, "wall_s": round(time.time() - t0, 1)})
        _free_gpu()

    # 3. the same configurations through raytrain_yolo (Ray Train, one worker)
    def raytrain(self, label: str, batch: int, workers: int, extra: dict | None = None,
                 loader: str = "ultralytics") -> None:
        from raytrain_yolo.train.launch import launch

        spec = RunSpec(
            train={**self.common, "batch": batch, "workers": workers, **(extra or {})},
            scaling=self._one_worker(),
            tracking=TrackingSpec(enabled=False), storage_path=str(self.work / "ray"), name=label, loader=loader,
            window_steps=self.ns.window_steps, max_windows=self.ns.windows, validate_untrained=False,
        )
        t0 = time.time()
        summary = launch(spec).summary
        windows = [h[IPS_KEY] for h in summary["history"] if "window" in h]
        mem = max((h.get("system/gpu_mem_gb", 0) for h in summary["history"]), default=None)
        self.record({"row": label, "kind": "raytrain", "loader": loader, "batch": batch, "workers": workers,
                     "amp": self._amp(), **(extra or {}), "images_per_second": _mean(windows), "windows": windows,
                     "gpu_mem_gb": mem, "wall_s": round(time.time() - t0, 1)})

    # 4. the GPU-only step: a real batch already on the device, forward + loss + backward + optimizer step
    def gpu_only(self, batch: int, steps: int = 20, ddp: str | None = None) -> None:
        """`ddp`: None (no wrapper, as one GPU trains), "unused" (DDP searching for unused parameters, as
        Ultralytics wraps) or "plain" (DDP without that search, as raytrain_yolo wraps detect), on a world of 1."""
        import torch
        from ultralytics.models.yolo.detect import DetectionTrainer
        from ultralytics.utils.torch_utils import autocast

        trainer = DetectionTrainer(overrides={**self.common, "batch": batch, "workers": 0,
                                              "device": "cpu" if self.ns.cpu else 0,
                                              "project": str(self.work / "gpu_only"), "name": "step", "exist_ok": True})
        trainer._setup_train()
        batch_data = trainer.preprocess_batch(next(iter(trainer.train_loader)))
        cuda = trainer.device.type == "cuda"
        sync = torch.cuda.synchronize if cuda else (lambda: None)
        model = trainer.model
        if ddp:
            from raytrain_yolo.train.adapter import ddp_wrap

            _one_process_group(cuda)
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
        self.record({"row": label, "kind": "gpu_only", "batch": batch, "amp": self._amp(), "ddp": ddp,
                     "images_per_second": batch * steps / seconds, "ms_per_step": 1000 * seconds / steps})
        trainer.train_loader.close() if hasattr(trainer.train_loader, "close") else None
        trainer = model = None  # free the GPU before the next row
        _free_gpu()

    # 4b. the device loader's augmentation alone: what it costs per batch, without the step
    def augment_only(self, batch: int, steps: int = 10) -> None:
        import torch
        from ultralytics.cfg import get_cfg
        from ultralytics.data import build_yolo_dataset
        from ultralytics.data.utils import check_det_dataset

        from raytrain_yolo.train.augment import AugmentHyp
        from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader

        device = torch.device("cpu" if self.ns.cpu else "cuda", 0)
        cfg = get_cfg(overrides={**self.common, "batch": batch, "fraction": min(1.0, 2 * batch / self.ns.images)})
        data = check_det_dataset(self.data)
        source = build_yolo_dataset(cfg, data["train"], batch, data, mode="train", stride=32)
        t0 = time.perf_counter()
        loader = DeviceLoader(DeviceDataset(source, AugmentHyp.from_args(cfg), device), batch, 0, 1, seed=0)
        load_s = time.perf_counter() - t0
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        it, done, t0 = iter(loader), 0, 0.0
        for i in range(steps + 1):
            try:
                b = next(it)
            except StopIteration:
                it = iter(loader)
                b = next(it)
            if i == 0:  # the first batch warms up the kernels
                sync()
                t0 = time.perf_counter()
            else:
                done += len(b["img"])
        sync()
        seconds = time.perf_counter() - t0
        self.record({"row": f"augment-only-b{batch}", "kind": "augment_only", "batch": batch, "amp": "-",
                     "images_per_second": done / seconds, "ms_per_step": 1000 * seconds / steps,
                     "decode_images_per_second": len(loader.dataset) / load_s})
        loader.close()
        _free_gpu()

    # 5. what the tuner picks when given a few minutes
    def tuned(self) -> None:
        from raytrain_yolo.sweep.throughput import SweepBudget, SweepSpace, run_sweep

        base = RunSpec(train={"data": self.data, "model": MODEL, "imgsz": self.ns.imgsz, "optimizer": "SGD"},
                       scaling=self._one_worker(),
                       tracking=TrackingSpec(enabled=False), storage_path=str(self.work / "tune"), name="sweep")
        space = SweepSpace(batch=self.ns.sweep_batch, workers=[self.ns.max_workers],
                           amp=["fp32"] if self.ns.cpu else ["fp16", "bf16"])
        # No early stopping here: every trial ends by itself, so a stopped trial's GPU is never waited for.
        budget = SweepBudget(window_steps=self.ns.window_steps, windows=self.ns.windows, grace_windows=1,
                             max_concurrent=1, early_stop=False)
        t0 = time.time()
        res = run_sweep(base, space, budget)
        b = res.best or {}
        self.record({"row": "tuned", "kind": "raytrain-tuned", "batch": b.get("batch"), "workers": b.get("workers"),
                     "amp": b.get("amp"), "images_per_second": b.get("images_per_second"),
                     "trials": [{k: r.get(k) for k in ("batch", "workers", "amp", "images_per_second", "status")}
                                for r in res.rows], "wall_s": round(time.time() - t0, 1)})

    # 6. validation mAP after the same short training with each loader: same data, seed, epochs, batch
    def accuracy(self, loader: str) -> None:
        from raytrain_yolo.train.launch import launch

        epochs = self.ns.map_epochs
        train = {**self.common, "batch": self.ns.big_batch, "workers": self.ns.max_workers, "epochs": epochs,
                 "val": True, "save": True, "close_mosaic": max(1, epochs // 5)}
        spec = RunSpec(train=train, scaling=self._one_worker(),
                       tracking=TrackingSpec(enabled=False), storage_path=str(self.work / "map"),
                       name=f"map-{loader}", loader=loader, validate_untrained=False)
        t0 = time.time()
        s = launch(spec).summary
        m = s.get("metrics", {})
        self.record({"row": f"map-{loader}", "kind": "accuracy", "loader": loader, "batch": self.ns.big_batch,
                     "amp": self._amp(), "epochs": epochs, "mAP50": m.get("metrics/mAP50(B)"),
                     "mAP50-95": m.get("metrics/mAP50-95(B)"), "images_per_second": s.get("images_per_second"),
                     "wall_s": round(time.time() - t0, 1)})

    def _one_worker(self) -> ScalingSpec:
        """Every Ray row trains on one worker: one GPU (or one CPU for the smoke test)."""
        return ScalingSpec(num_workers=1, use_gpu=not self.ns.cpu, cpus_per_worker=1)

    def _amp(self) -> str:
        return "fp32" if self.ns.cpu else "fp16"

    def ratios(self) -> dict[str, float | None]:
        ips = {r["row"]: r.get("images_per_second") for r in self.rows}
        big = f"b{self.ns.big_batch}"

        def ratio(a, b):
            return round(ips[a] / ips[b], 3) if ips.get(a) and ips.get(b) else None

        tuned_or_big = "tuned" if ips.get("tuned") else f"raytrain-{big}"
        maps = {r["row"]: r.get("mAP50-95") for r in self.rows if r.get("kind") == "accuracy"}
        fastest_device = max((v for k, v in ips.items() if k.startswith("device-") and v), default=None)
        per_batch = {f"device loader/GPU-only at b{b}": ratio(f"device-b{b}", f"gpu-only-b{b}")
                     for b in self.ns.device_batch}
        ms = {r["row"]: r.get("ms_per_step") for r in self.rows}
        ddp_cost = {f"DDP find_unused_parameters cost, b{r['batch']} (ms/step)":
                    round(ms[r["row"]] - ms[r["row"].replace("-unused", "-plain")], 1)
                    for r in self.rows if r["row"].endswith("-ddp-unused") and ms.get(r["row"].replace("-unused", "-plain"))}
        aug_share = {f"augmentation share of the device-loader step at b{b}":
                     round(ms[f"augment-only-b{b}"] / (1000 * b / ips[f"device-b{b}"]), 3)
                     for b in self.ns.device_batch if ms.get(f"augment-only-b{b}") and ips.get(f"device-b{b}")}
        return {
            **per_batch,
            **ddp_cost,
            **aug_share,
            "fastest device-loader row, images/s (target >= 3000)": round(fastest_device, 1) if fastest_device else None,
            "device loader/native defaults": round(fastest_device / ips["native-defaults"], 3)
            if fastest_device and ips.get("native-defaults") else None,
            "mAP50-95 device/ultralytics loader (same epochs)": round(maps["map-device"] / maps["map-ultralytics"], 3)
            if maps.get("map-device") is not None and maps.get("map-ultralytics") else None,
            "raytrain/native, defaults (target >= 0.98)": ratio("raytrain-defaults", "native-defaults"),
            f"raytrain/native, {big} (target >= 0.98)": ratio(f"raytrain-{big}", f"native-{big}"),
            "tuned/native defaults (target >= 5)": ratio("tuned", "native-defaults"),
            f"end-to-end/GPU-only at {big} (target >= 0.9)": ratio(f"raytrain-{big}", f"gpu-only-{big}"),
            "best end-to-end/GPU-only at its batch": ratio(tuned_or_big, f"gpu-only-{big}"),
        }

    def write(self) -> None:
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": self.device_name, "cpus": os.cpu_count(),
                "images": self.ns.images, "imgsz": self.ns.imgsz, "model": MODEL, "window_steps": self.ns.window_steps,
                "windows": self.ns.windows, "python": platform.python_version(), "versions": _versions()}
        doc = {"meta": meta, "rows": self.rows, "ratios": self.ratios()}
        (self.out / "bench.json").write_text(json.dumps(doc, indent=2, default=str))
        lines = [f"# Benchmark: {meta['device']}, {meta['cpus']} CPU cores, {meta['date']}", "",
                 f"YOLO26n from `{MODEL}`, {self.ns.images} synthetic JPEGs at {self.ns.imgsz} px, SGD, steady-state "
                 f"images/s over {self.ns.windows} windows of {self.ns.window_steps} steps. Versions: "
                 + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), "",
                 "| row | batch | workers | amp | images/s | GPU GB |", "| --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            if r.get("kind") == "accuracy":
                continue
            v = r.get("images_per_second")
            lines.append(f"| {r['row']} | {r.get('batch')} | {r.get('workers', '-')} | {r.get('amp')} | "
                         f"{v:.1f} |" if v else f"| {r['row']} | {r.get('batch')} | {r.get('workers', '-')} | "
                         f"{r.get('amp')} | n/a |")
            lines[-1] += f" {r['gpu_mem_gb']:.1f} |" if r.get("gpu_mem_gb") else " - |"
        acc = [r for r in self.rows if r.get("kind") == "accuracy"]
        if acc:
            lines += ["", "| loader | epochs | batch | mAP50 | mAP50-95 | images/s |", "| --- | --- | --- | --- | --- | --- |"]
            lines += [f"| {r['loader']} | {r['epochs']} | {r['batch']} | {_fmt(r.get('mAP50'))} | "
                      f"{_fmt(r.get('mAP50-95'))} | {_fmt(r.get('images_per_second'), 1)} |" for r in acc]
        lines += ["", "| ratio | value |", "| --- | --- |"]
        lines += [f"| {k} | {v if v is not None else 'n/a'} |" for k, v in doc["ratios"].items()]
        (self.out / "bench.md").write_text("\n".join(lines) + "\n")


def _fmt(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"


def _one_process_group(cuda: bool) -> None:
    """A world of one process, so DDP's per-step overhead can be measured on one device."""
    import socket

    import torch.distributed as dist

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _device_name(cpu: bool) -> str:
    import torch

    if not cpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "ray", "ultralytics"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m raytrain_yolo.bench", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/bench", help="where bench.json and bench.md go")
    p.add_argument("--work", help="where the runs' own folders go (default: --out)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--val-images", type=int, default=256, help="validation images (the map part's mAP)")
    p.add_argument("--map-epochs", type=int, default=10, help="epochs of each map run")
    p.add_argument("--device-batch", default="128,256", type=lambda s: [int(x) for x in s.split(",")],
                   help="batches of the device-loader rows")
    p.add_argument("--compile-batch", type=int, default=256, help="batch of the device loader + compile row")
    p.add_argument("--window-steps", type=int, default=20)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--big-batch", type=int, default=128)
    p.add_argument("--max-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--sweep-batch", default="128,256", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--only", default="native,raytrain,gpu,tune", help="which parts to run")
    p.add_argument("--cpu", action="store_true", help="CPU smoke test of the script itself")
    p.add_argument("--append", action="store_true", help="add rows to an existing <out>/bench.json")
    ns = p.parse_args(argv)
    parts = set(ns.only.split(","))
    bench = Bench(ns)
    big = ns.big_batch
    device_batches = sorted(ns.device_batch, reverse=True)  # the largest first: the 3000 images/s question
    steps = [
        *[("device", lambda b=b: bench.raytrain(f"device-b{b}", b, 0, loader="device")) for b in device_batches],
        *[("gpu", lambda b=b: bench.gpu_only(b)) for b in device_batches if "device" in parts],
        ("gpu", lambda: bench.gpu_only(big)) if not ("device" in parts and big in device_batches) else None,
        ("augment", lambda: bench.augment_only(device_batches[0])),
        ("native", lambda: bench.native("native-defaults", DEFAULTS["batch"], DEFAULTS["workers"])),
        ("native", lambda: bench.native(f"native-b{big}", big, ns.max_workers)),
        ("raytrain", lambda: bench.raytrain("raytrain-defaults", DEFAULTS["batch"], DEFAULTS["workers"])),
        ("raytrain", lambda: bench.raytrain(f"raytrain-b{big}", big, ns.max_workers)),
        ("tune", bench.tuned),
        ("ddp", lambda: bench.gpu_only(big, ddp="unused")),
        ("ddp", lambda: bench.gpu_only(big, ddp="plain")),
        ("map", lambda: bench.accuracy("ultralytics")),
        ("map", lambda: bench.accuracy("device")),
        ("compile", lambda: bench.raytrain(f"device-b{ns.compile_batch}-compile", ns.compile_batch, 0,
                                           {"compile": True}, loader="device")),
    ]
    steps = [st for st in steps if st]
    for part, fn in steps:
        if part in parts:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 - keep measuring the other rows
                bench.record({"row": f"{part}-failed", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print((bench.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
