"""The benchmark's rows, the ratios the issues ask for, and bench.json/bench.md rewritten after every row."""

from __future__ import annotations

import json
import os
import platform
import time
from typing import Any

from raytrain_yolo.bench.context import MODEL, BenchContext, versions


class Report:
    """Rows as measured (each a dict with at least `row`; `images_per_second` where a speed was measured)."""

    def __init__(self, ctx: BenchContext):
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        previous = ctx.out / "bench.json"
        if ctx.ns.append and previous.is_file():  # a later part of the same benchmark, on the same machine
            self.rows = json.loads(previous.read_text())["rows"]

    def record(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        print(f"[bench] {row}", flush=True)
        self.write()

    def ratios(self) -> dict[str, float | None]:
        return {**self._device_ratios(), **self._store_ratios(), **self._headline_ratios()}

    def _ips(self) -> dict[str, float | None]:
        return {r["row"]: r.get("images_per_second") for r in self.rows}

    def _ratio(self, a: str, b: str) -> float | None:
        ips = self._ips()
        return round(ips[a] / ips[b], 3) if ips.get(a) and ips.get(b) else None

    def _device_ratios(self) -> dict[str, float | None]:
        ips, ms = self._ips(), {r["row"]: r.get("ms_per_step") for r in self.rows}
        batches = self.ctx.ns.device_batch
        per_batch = {f"device loader/GPU-only at b{b}": self._ratio(f"device-b{b}", f"gpu-only-b{b}") for b in batches}
        ddp_cost = {f"DDP find_unused_parameters cost, b{r['batch']} (ms/step)":
                    round(ms[r["row"]] - ms[r["row"].replace("-unused", "-plain")], 1)
                    for r in self.rows if r["row"].endswith("-ddp-unused") and ms.get(r["row"].replace("-unused", "-plain"))}
        aug_share = {f"augmentation share of the device-loader step at b{b}":
                     round(ms[f"augment-only-b{b}"] / (1000 * b / ips[f"device-b{b}"]), 3)
                     for b in batches if ms.get(f"augment-only-b{b}") and ips.get(f"device-b{b}")}
        switches = {f"{r['row']}/device-b{r['batch']} (a step-time switch)": self._ratio(r["row"], f"device-b{r['batch']}")
                    for r in self.rows if r.get("kind") == "raytrain" and r["row"].startswith(f"device-b{r.get('batch')}-")}
        return {**per_batch, **ddp_cost, **aug_share, **switches}

    def _store_ratios(self) -> dict[str, float | None]:
        """Issue 24: the JPEG store against the decoded one, same batch (targets: >= 0.9 of the speed, <= 0.2 of
        the bytes)."""
        out = {f"jpeg/decoded store images/s at b{b} (target >= 0.9)": self._ratio(f"device-jpeg-b{b}", f"device-b{b}")
               for b in self.ctx.ns.device_batch}
        held = {r["row"]: r for r in self.rows if r.get("kind") == "store"}
        jpeg, decoded = held.get("store-jpeg"), held.get("store-decoded")
        if jpeg and decoded:
            out["jpeg/decoded bytes per image (target <= 0.2)"] = round(
                jpeg["mb_per_image"] / decoded["mb_per_image"], 3)
        return out

    def _headline_ratios(self) -> dict[str, float | None]:
        ips = self._ips()
        big = f"b{self.ctx.ns.big_batch}"
        tuned_or_big = "tuned" if ips.get("tuned") else f"raytrain-{big}"
        maps = {r["row"]: r.get("mAP50-95") for r in self.rows if r.get("kind") == "accuracy"}
        fastest_device = max((v for k, v in ips.items() if k.startswith("device-") and v), default=None)
        return {
            "fastest device-loader row, images/s (target >= 3000)": round(fastest_device, 1) if fastest_device else None,
            "device loader/native defaults": round(fastest_device / ips["native-defaults"], 3)
            if fastest_device and ips.get("native-defaults") else None,
            **{f"mAP50-95 {loader}/ultralytics loader (same epochs)": round(maps[f"map-{loader}"] / maps["map-ultralytics"], 3)
               for loader in ("device", "device-jpeg")
               if maps.get(f"map-{loader}") is not None and maps.get("map-ultralytics")},
            "raytrain/native, defaults (target >= 0.98)": self._ratio("raytrain-defaults", "native-defaults"),
            f"raytrain/native, {big} (target >= 0.98)": self._ratio(f"raytrain-{big}", f"native-{big}"),
            "tuned/native defaults (target >= 5)": self._ratio("tuned", "native-defaults"),
            f"end-to-end/GPU-only at {big} (target >= 0.9)": self._ratio(f"raytrain-{big}", f"gpu-only-{big}"),
            "best end-to-end/GPU-only at its batch": self._ratio(tuned_or_big, f"gpu-only-{big}"),
        }

    def write(self) -> None:
        ns = self.ctx.ns
        meta = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": self.ctx.device_name, "cpus": os.cpu_count(),
                "images": ns.images, "imgsz": ns.imgsz, "model": MODEL, "window_steps": ns.window_steps,
                "windows": ns.windows, "python": platform.python_version(), "versions": versions()}
        doc = {"meta": meta, "rows": self.rows, "ratios": self.ratios()}
        (self.ctx.out / "bench.json").write_text(json.dumps(doc, indent=2, default=str))
        lines = [f"# Benchmark: {meta['device']}, {meta['cpus']} CPU cores, {meta['date']}", "",
                 f"YOLO26n from `{MODEL}`, {ns.images} synthetic JPEGs at {ns.imgsz} px, SGD, steady-state "
                 f"images/s over {ns.windows} windows of {ns.window_steps} steps. Versions: "
                 + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()), ""]
        lines += self._speed_table() + self._store_table() + self._accuracy_table()
        lines += ["", "| ratio | value |", "| --- | --- |"]
        lines += [f"| {k} | {v if v is not None else 'n/a'} |" for k, v in doc["ratios"].items()]
        (self.ctx.out / "bench.md").write_text("\n".join(lines) + "\n")

    def _speed_table(self) -> list[str]:
        lines = ["| row | images | batch | workers | amp | images/s | GPU GB |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in self.rows:
            if r.get("kind") in ("accuracy", "store"):
                continue
            lines.append(f"| {r['row']} | {r.get('images', self.ctx.ns.images)} | {r.get('batch')} | "
                         f"{r.get('workers', '-')} | {r.get('amp')} | {fmt(r.get('images_per_second'), 1)} | "
                         f"{fmt(r.get('gpu_mem_gb'), 1)} |")
        return lines

    def _store_table(self) -> list[str]:
        rows = [r for r in self.rows if r.get("kind") == "store"]
        if not rows:
            return []
        lines = ["", "| store | images | MB per image | held in | GB held | ready (s) | first batch (s) | augmented images/s |",
                 "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        return lines + [f"| {r['store']} | {r['images']} | {fmt(r['mb_per_image'])} | {r['held_in']} | "
                        f"{fmt(r['gb_held'], 2)} | {fmt(r['ready_s'], 1)} | {fmt(r['first_batch_s'], 2)} | "
                        f"{fmt(r.get('images_per_second'), 1)} |" for r in rows]

    def _accuracy_table(self) -> list[str]:
        acc = [r for r in self.rows if r.get("kind") == "accuracy"]
        if not acc:
            return []
        lines = ["", "| loader | epochs | batch | mAP50 | mAP50-95 | images/s |", "| --- | --- | --- | --- | --- | --- |"]
        return lines + [f"| {r['loader']} | {r['epochs']} | {r['batch']} | {fmt(r.get('mAP50'))} | "
                        f"{fmt(r.get('mAP50-95'))} | {fmt(r.get('images_per_second'), 1)} |" for r in acc]


def fmt(v, digits: int = 3) -> str:
    return f"{v:.{digits}f}" if isinstance(v, (int, float)) else "n/a"
