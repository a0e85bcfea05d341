"""The embedded synthetic dataset: simple shapes on noisy backgrounds, in YOLO format, for every task.

detect: boxes. pose: the same images, each shape with 3 keypoints (top, bottom-left, bottom-right), so
`kpt_shape: [3, 3]` and `flip_idx: [0, 2, 1]`. segment: the same images, each shape's polygon. obb: elongated
shapes (rectangle, ellipse, triangle) rotated by any angle, labelled by their 4 corners.

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

from raytrain_yolo.core.config import SyntheticSpec

CLASSES = ("square", "circle", "triangle")
OBB_CLASSES = ("rectangle", "ellipse", "triangle")
TASKS = ("detect", "pose", "segment", "obb")
KPT_SHAPE, FLIP_IDX = (3, 3), (0, 2, 1)  # top, bottom-left, bottom-right; a left-right flip swaps the last two
FORMAT = 2  # bump when the generator's output changes, so caches of the old bytes are not reused


def cache_root() -> Path:
    """`RAYTRAIN_YOLO_CACHE`, else `~/.cache/raytrain_yolo`."""
    return Path(os.environ.get("RAYTRAIN_YOLO_CACHE") or Path.home() / ".cache" / "raytrain_yolo")


def dataset_dir(spec: SyntheticSpec, task: str = "detect") -> Path:
    extra = {} if task == "detect" else {"task": task}  # detect keeps its cache names
    key = hashlib.sha1(json.dumps({**vars(spec), "format": FORMAT, **extra}, sort_keys=True).encode()).hexdigest()[:10]
    kind = "shapes" if task == "detect" else f"shapes-{task}"
    return cache_root() / "synthetic" / f"{kind}-{spec.imgsz}px-{spec.train}-{spec.val}-s{spec.seed}-{key}"


def ensure_synthetic(spec: SyntheticSpec, task: str = "detect") -> Path:
    """Return the `data.yaml` of the dataset for `spec` and `task`, generating it first if needed."""
    if task not in TASKS:
        raise ValueError(f"no synthetic data for task '{task}'; tasks: {', '.join(TASKS)}")
    root = dataset_dir(spec, task)
    yaml_path = root / "data.yaml"
    if yaml_path.is_file():
        return yaml_path
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    try:
        jobs = [(tmp, split, i, spec.imgsz, spec.seed, task) for split, n in (("train", spec.train), ("val", spec.val))
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
        (tmp / "data.yaml").write_text(_data_yaml(root, task))
        try:
            tmp.rename(root)
        except OSError:  # another process finished first; its copy is identical
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return yaml_path


def _data_yaml(root: Path, task: str) -> str:
    classes = OBB_CLASSES if task == "obb" else CLASSES
    names = "\n".join(f"  {i}: {n}" for i, n in enumerate(classes))
    text = f"path: {root}\ntrain: images/train\nval: images/val\nnc: {len(classes)}\nnames:\n{names}\n"
    if task == "pose":
        text += f"kpt_shape: {list(KPT_SHAPE)}\nflip_idx: {list(FLIP_IDX)}\n"
    return text


def _write_one(job: tuple) -> None:
    """One image and its label file; its own RNG stream, so any number of processes give the same bytes."""
    import cv2

    root, split, i, size, seed, task = job
    rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
    img, labels = render_obb_image(size, rng) if task == "obb" else render_image(size, rng, task)
    cv2.imwrite(str(root / "images" / split / f"{i:06d}.jpg"), img, [cv2.IMWRITE_JPEG_QUALITY, 92])
    (root / "labels" / split / f"{i:06d}.txt").write_text(
        "".join(f"{row[0]} " + " ".join(f"{v:.6f}" for v in row[1:]) + "\n" for row in labels)
    )


def render_image(size: int, rng: np.random.Generator, task: str = "detect") -> tuple[np.ndarray, list[tuple]]:
    """One image (BGR uint8) with 1-4 non-overlapping shapes and their normalised label rows: class, then xywh
    (detect), xywh and keypoints (pose), or the polygon (segment). The pixels do not depend on the task."""
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
        labels.append((cls, *_shape_label(cls, x0, y0, s, task, size)))
    return img, labels


def _shape_label(cls: int, x0: int, y0: int, s: int, task: str, size: int) -> tuple[float, ...]:
    cx, cy, r = x0 + s / 2, y0 + s / 2, s / 2
    xywh = (cx / size, cy / size, s / size, s / size)
    if task == "detect":
        return xywh
    if cls == 1:  # circle: its top point and the points at 45 degrees below left and right
        d = r * np.sqrt(0.5)
        kpts = [(cx, y0), (cx - d, cy + d), (cx + d, cy + d)]
        poly = [(cx + r * np.sin(a), cy - r * np.cos(a)) for a in np.linspace(0, 2 * np.pi, 16, endpoint=False)]
    else:  # square and triangle share the top-centre and the bottom corners
        kpts = [(cx, y0), (x0, y0 + s), (x0 + s, y0 + s)]
        poly = [(x0, y0), (x0 + s, y0), (x0 + s, y0 + s), (x0, y0 + s)] if cls == 0 else kpts
    if task == "pose":
        return (*xywh, *(v for x, y in kpts for v in (x / size, y / size, 2.0)))
    return tuple(v for x, y in poly for v in (x / size, y / size))


def render_obb_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, list[tuple]]:
    """One image with 1-4 elongated shapes rotated by any angle; label rows: class and the 4 corners (normalised)."""
    import cv2

    base = rng.integers(40, 200, size=3)
    img = np.clip(base + rng.normal(0, 12, size=(size, size, 3)), 0, 255).astype(np.uint8)
    labels, boxes = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _try in range(20):
            w = float(rng.uniform(size / 6, size / 2.5))
            h = w * float(rng.uniform(0.35, 0.65))
            theta = float(rng.uniform(0, np.pi))
            c, s_ = np.cos(theta), np.sin(theta)
            half = np.array([[-w, -h], [w, -h], [w, h], [-w, h]]) / 2
            local = half @ np.array([[c, s_], [-s_, c]])  # rotate by theta
            lo, hi = local.min(0), local.max(0)
            cx, cy = (float(rng.uniform(-lo[i], size - hi[i])) for i in range(2))
            box = (cx + lo[0], cy + lo[1], cx + hi[0], cy + hi[1])
            if all(box[2] <= b[0] or box[0] >= b[2] or box[3] <= b[1] or box[1] >= b[3] for b in boxes):
                break
        else:
            continue
        cls = int(rng.integers(0, len(OBB_CLASSES)))
        color = tuple(int(v) for v in (base + rng.choice([-1, 1], size=3) * rng.integers(60, 110, size=3)) % 256)
        corners = local + (cx, cy)
        if cls == 0:
            cv2.fillPoly(img, [np.round(corners).astype(np.int32)], color)
        elif cls == 1:
            cv2.ellipse(img, (round(cx), round(cy)), (round(w / 2), round(h / 2)), np.degrees(theta), 0, 360, color, -1)
        else:  # apex at the middle of one long side, base along the other
            tri = np.array([[0, -h / 2], [-w / 2, h / 2], [w / 2, h / 2]]) @ np.array([[c, s_], [-s_, c]]) + (cx, cy)
            cv2.fillPoly(img, [np.round(tri).astype(np.int32)], color)
        boxes.append(box)
        labels.append((cls, *(float(np.clip(v, 0, size)) / size for v in corners.ravel())))
    return img, labels
