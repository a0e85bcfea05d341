"""The embedded synthetic detection dataset: simple shapes on noisy backgrounds, in YOLO format.

Deterministic from its spec (same seed, same bytes), generated once into a cache directory and reused.
Generation writes to a temporary folder and renames it into place, so concurrent workers on one node
never see a half-written dataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from raytrain_yolo.config import SyntheticSpec

CLASSES = ("square", "circle", "triangle")
FORMAT = 2  # bump when the generator's output changes, so caches of the old bytes are not reused


def cache_root() -> Path:
    """`RAYTRAIN_YOLO_CACHE`, else `~/.cache/raytrain_yolo`."""
    return Path(os.environ.get("RAYTRAIN_YOLO_CACHE") or Path.home() / ".cache" / "raytrain_yolo")


def dataset_dir(spec: SyntheticSpec) -> Path:
    key = hashlib.sha1(json.dumps({**vars(spec), "format": FORMAT}, sort_keys=True).encode()).hexdigest()[:10]
    return cache_root() / "synthetic" / f"shapes-{spec.imgsz}px-{spec.train}-{spec.val}-s{spec.seed}-{key}"


def ensure_synthetic(spec: SyntheticSpec) -> Path:
    """Return the `data.yaml` of the dataset for `spec`, generating it first if needed."""
    root = dataset_dir(spec)
    yaml_path = root / "data.yaml"
    if yaml_path.is_file():
        return yaml_path
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        jobs = [(tmp, split, i, spec.imgsz, spec.seed) for split, n in (("train", spec.train), ("val", spec.val))
                for i in range(n)]
        for split in ("train", "val"):
            (tmp / "images" / split).mkdir(parents=True)
            (tmp / "labels" / split).mkdir(parents=True)
        procs = min(os.cpu_count() or 1, 16) if len(jobs) >= 512 else 1
        if procs > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(procs) as pool:
                list(pool.map(_write_one, jobs, chunksize=64))
        else:
            for job in jobs:
                _write_one(job)
        (tmp / "data.yaml").write_text(_data_yaml(root))
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return yaml_path


def _data_yaml(root: Path) -> str:
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(CLASSES))
    return f"path: {root}\ntrain: images/train\nval: images/val\nnc: {len(CLASSES)}\nnames:\n{names}\n"


def _write_one(job: tuple) -> None:
    """One image and its label file; its own RNG stream, so any number of processes give the same bytes."""
    import cv2

    root, split, i, size, seed = job
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    img, labels = render_image(size, rng)
    cv2.imwrite(str(root / "images" / split / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    (root / "labels" / split / f"{i:06d}.txt").write_text(
        "".join(f"{c} {x:.6f} {y:.6f} {w:.6f} {h:.6f}\n" for c, x, y, w, h in labels)
    )


def render_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
    """One image (BGR uint8) with 1-4 non-overlapping shapes and their normalised xywh boxes."""
    import cv2

    base = rng.integers(40, 200, size=3)
    img = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    labels, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(20):
            s = int(rng.integers(size // 8, size // 3))
            x0, y0 = (int(v) for v in rng.integers(0, size - s, size=2))
            box = (x0, y0, x0 + s, y0 + s)
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(CLASSES)))
        color = tuple(int(c) for c in (base + rng.choice([-1, 1], size=3) * rng.integers(60, 110, size=3)) % 256)
        x1, y1 = x0 + s - 1, y0 + s - 1
        if cls == 0:
            cv2.rectangle(img, (x0, y0), (x1, y1), color, -1)
        elif cls == 1:
            cv2.circle(img, (x0 + s // 2, y0 + s // 2), s // 2, color, -1)
        else:
            pts = np.array([[x0 + s // 2, y0], [x0, y1], [x1, y1]], np.int32)
            cv2.fillPoly(img, [pts], color)
        boxes.append(box)
        labels.append((cls, (x0 + s / 2) / size, (y0 + s / 2) / size, s / size, s / size))
    return img, labels
