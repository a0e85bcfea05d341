"""The benchmark's command line, and the order its parts run in (the most informative first: a GPU session's time
limit cuts from the end)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import raytrain_yolo.bench as package
from raytrain_yolo.bench import step, training
from raytrain_yolo.bench.context import DEFAULTS, BenchContext
from raytrain_yolo.bench.report import Report


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m raytrain_yolo.bench", description=package.__doc__.splitlines()[0])
    p.add_argument("--out", default="experiments/results/bench", help="where bench.json and bench.md go")
    p.add_argument("--work", help="where the runs' own folders go (default: --out)")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--imgsz", type=int, default=640)
    p.add_argument("--val-images", type=int, default=256, help="validation images (the map part's mAP)")
    p.add_argument("--map-epochs", type=int, default=10, help="epochs of each map run")
    p.add_argument("--device-batch", default="128,256", type=int_list, help="batches of the device-loader rows")
    p.add_argument("--compile-batch", type=int, default=256, help="batch of the device loader + compile row")
    p.add_argument("--big-images", type=int, default=120_000, help="training images of the big part's set")
    p.add_argument("--window-steps", type=int, default=20)
    p.add_argument("--windows", type=int, default=3)
    p.add_argument("--big-batch", type=int, default=128)
    p.add_argument("--max-workers", type=int, default=min(16, os.cpu_count() or 1))
    p.add_argument("--sweep-batch", default="128,256", type=int_list)
    p.add_argument("--only", default="native,raytrain,gpu,tune", help="which parts to run (module docstring)")
    p.add_argument("--cpu", action="store_true", help="CPU smoke test of the script itself")
    p.add_argument("--append", action="store_true", help="add rows to an existing <out>/bench.json")
    return p


def plan(ctx: BenchContext, report: Report) -> list[tuple[str, Callable[[], None]]]:
    """(part, row) in the order they run."""
    ns, big = ctx.ns, ctx.ns.big_batch
    batches = sorted(ns.device_batch, reverse=True)  # the largest first: the 3000 images/s question
    steps: list[tuple[str, Callable[[], None]]] = []
    for b in batches:
        steps.append(("device", lambda b=b: training.raytrain(ctx, report, f"device-b{b}", b, 0, loader="device")))
        steps.append(("store", lambda b=b: training.raytrain(ctx, report, f"device-jpeg-b{b}", b, 0,
                                                             loader="device-jpeg")))
    steps += [("switches", row) for row in switch_rows(ctx, report, batches[0])]
    steps += [("store", lambda kind=kind: step.store(ctx, report, kind, batches[0])) for kind in ("decoded", "jpeg")]
    if "device" in ns.only.split(","):
        steps += [("gpu", lambda b=b: step.gpu_only(ctx, report, b)) for b in batches]
    if not ("device" in ns.only.split(",") and big in batches):
        steps.append(("gpu", lambda: step.gpu_only(ctx, report, big)))
    steps += [
        ("augment", lambda: step.augment_only(ctx, report, batches[0])),
        ("native", lambda: training.native(ctx, report, "native-defaults", DEFAULTS["batch"], DEFAULTS["workers"])),
        ("native", lambda: training.native(ctx, report, f"native-b{big}", big, ns.max_workers)),
        ("raytrain", lambda: training.raytrain(ctx, report, "raytrain-defaults", DEFAULTS["batch"], DEFAULTS["workers"])),
        ("raytrain", lambda: training.raytrain(ctx, report, f"raytrain-b{big}", big, ns.max_workers)),
        ("tune", lambda: training.tuned(ctx, report)),
        ("ddp", lambda: step.gpu_only(ctx, report, big, ddp="unused")),
        ("ddp", lambda: step.gpu_only(ctx, report, big, ddp="plain")),
        *[("map", lambda loader=loader: training.accuracy(ctx, report, loader))
          for loader in ("ultralytics", "device", "device-jpeg")],
        ("compile", lambda: training.raytrain(ctx, report, f"device-b{ns.compile_batch}-compile", ns.compile_batch, 0,
                                              {"compile": True}, loader="device")),
        ("big", lambda: step.store(ctx, report, "jpeg", batches[0], big=True)),
        ("big", lambda: training.raytrain(ctx, report, f"device-jpeg-{ns.big_images}-b{batches[0]}", batches[0], 0,
                                          loader="device-jpeg", data=ctx.big_data(), images=ns.big_images)),
    ]
    return steps


# Issue 23's step-time switches, each alone and all together, on the device loader (Ultralytics' own compile modes:
# "default" compiles the model, "reduce-overhead" also captures CUDA graphs; channels-last is Ultralytics' CUDA
# default already, so the row turns it off to show what it buys).
# The cheap ones first: a compiled row spends a minute or more compiling before its windows.
SWITCHES = {"prefetch": ({}, True), "nchw": ({"channels_last": False}, False), "compile": ({"compile": True}, False),
            "cudagraphs": ({"compile": "reduce-overhead"}, False), "all": ({"compile": "reduce-overhead"}, True)}


def switch_rows(ctx: BenchContext, report: Report, batch: int) -> list[Callable[[], None]]:
    return [lambda name=name, extra=extra, prefetch=prefetch: training.raytrain(
                ctx, report, f"device-b{batch}-{name}", batch, 0, extra, loader="device", prefetch=prefetch)
            for name, (extra, prefetch) in SWITCHES.items()]


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    parts = set(ns.only.split(","))
    ctx = BenchContext.from_args(ns)
    report = Report(ctx)
    for part, row in plan(ctx, report):
        if part in parts:
            try:
                row()
            except Exception as e:  # noqa: BLE001 - keep measuring the other rows
                report.record({"row": f"{part}-failed", "error": f"{type(e).__name__}: {str(e)[:300]}"})
    report.write()
    print((ctx.out / "bench.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
