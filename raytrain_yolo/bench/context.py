"""What every benchmark row shares: the command line's settings, the synthetic data, the base training arguments."""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

os.environ.setdefault("YOLO_OFFLINE", "1")

from raytrain_yolo.core.config import ScalingSpec, SyntheticSpec  # noqa: E402
from raytrain_yolo.data.synthetic import ensure_synthetic  # noqa: E402

MODEL = "yolo26n.yaml"
DEFAULTS = {"batch": 16, "workers": 8}  # Ultralytics' own defaults


@dataclass
class BenchContext:
    """ns: the parsed command line (cli.py); out: where bench.json/bench.md go; work: the runs' own folders;
    data: the synthetic data.yaml (--images at --imgsz); common: the training arguments every row shares."""

    ns: argparse.Namespace
    out: Path
    work: Path
    data: str
    device_name: str
    common: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_args(cls, ns: argparse.Namespace) -> BenchContext:
        out = Path(ns.out)
        out.mkdir(parents=True, exist_ok=True)
        data = str(ensure_synthetic(SyntheticSpec(train=ns.images, val=ns.val_images, imgsz=ns.imgsz, seed=0)))
        common = {"data": data, "model": MODEL, "imgsz": ns.imgsz, "optimizer": "SGD", "epochs": 1000,
                  "val": False, "plots": False, "save": False, "seed": 0}
        if ns.cpu:
            common["amp"] = False
        return cls(ns, out, Path(ns.work or ns.out), data, device_name(ns.cpu), common)

    def one_worker(self) -> ScalingSpec:
        """Every Ray row trains on one worker: one GPU (or one CPU for the smoke test)."""
        return ScalingSpec(num_workers=1, use_gpu=not self.ns.cpu, cpus_per_worker=1)

    @property
    def amp(self) -> str:
        return "fp32" if self.ns.cpu else "fp16"

    def big_data(self) -> str:
        """The --big-images set (made on first use, in the synthetic cache): the COCO-sized store question."""
        return str(ensure_synthetic(SyntheticSpec(train=self.ns.big_images, val=self.ns.val_images,
                                                  imgsz=self.ns.imgsz, seed=1)))


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def free_gpu() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def device_name(cpu: bool) -> str:
    import torch

    if not cpu and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"CPU ({platform.processor() or platform.machine()})"


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "torchvision", "ray", "ultralytics"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "?"
    return out
