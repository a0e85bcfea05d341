"""Issue 21, part 1: preflight's dataset checks are Ultralytics' own (check_det_dataset, verify_image_label), so it
accepts what Ultralytics trains on and refuses, in one line before Ray starts, what Ultralytics would fail on."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from raytrain_yolo import fit
from raytrain_yolo.plan.dataset import check_data
from raytrain_yolo.plan.request import check_run
from raytrain_yolo.core.config import RunSpec, SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

pytestmark = pytest.mark.quick
TINY = SyntheticSpec(train=8, val=4, imgsz=64)


def copy_dataset(task: str, dst: Path, path: str | None = None) -> Path:
    """The tiny synthetic dataset of `task` copied to `dst`; its data.yaml's `path:` set to `path` (default: dst)."""
    src = ensure_synthetic(TINY, task).parent
    shutil.copytree(src, dst)
    data = dst / "data.yaml"
    data.write_text(data.read_text().replace(f"path: {src}", f"path: {path or dst}"))
    return data


def ultralytics_counts(data: Path, split: str, task: str = "detect") -> tuple[int, int]:
    """(images, objects) of Ultralytics' own YOLODataset for a split: what its training loop sees."""
    from ultralytics.cfg import DEFAULT_CFG
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    cfg = check_det_dataset(str(data))
    ds = YOLODataset(img_path=cfg[split], imgsz=64, augment=False, hyp=DEFAULT_CFG, data=cfg, task=task)
    return len(ds.labels), sum(len(lb["cls"]) for lb in ds.labels)


def refused(capsys, data: Path, *args) -> str:
    """fit in this process: exit 2 and one plain `error:` line, before Ray starts."""
    import ray

    code = fit.main(["--cpu", "--no-tracking", "--storage-path", str(data.parent / "runs"), f"data={data}", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), (code, err)
    assert "\x1b" not in err[0] and "Traceback" not in err[0], err[0]
    assert not ray.is_initialized()
    return err[0]


def test_polygon_labels_train_a_detect_model(tmp_path):
    # Ultralytics turns each polygon into its box and trains a detect model on every image.
    data = copy_dataset("segment", tmp_path / "d")
    found = check_data(str(data), "detect")
    for split in ("train", "val"):
        s = found.splits[split]
        assert (s.images, s.instances) == ultralytics_counts(data, split), split
        assert s.images == len(list((tmp_path / "d" / "images" / split).glob("*.jpg"))) and not s.skipped
    start = time.perf_counter()
    check_data(str(data), "detect")
    assert time.perf_counter() - start < 0.5  # 8 + 4 images, and no font look-up on the network


def test_names_written_without_a_space_after_the_colon(capsys, tmp_path):
    data = copy_dataset("detect", tmp_path / "d")
    data.write_text(data.read_text().replace(": square", ":square").replace(": circle", ":circle")
                    .replace(": triangle", ":triangle"))
    last = refused(capsys, data)
    for words in (f"data={data}", "'names' must be list or dict, not str", "`0: square`", "fix the data.yaml"):
        assert words in last, (words, last)


def test_label_files_named_unlike_their_images(capsys, tmp_path):
    # Plain Ultralytics training: "train: No labels found in .../labels/train.cache" (a ValueError, in colour).
    data = copy_dataset("detect", tmp_path / "d")
    for f in (tmp_path / "d" / "labels" / "train").glob("*.txt"):
        f.rename(f.with_name(f"img_{f.name}"))
    last = refused(capsys, data)
    for words in (f"{tmp_path}/d/labels/train", "img_000000.txt", "000000.txt", "000000.jpg",
                  "name each label file like its image"):
        assert words in last, (words, last)


def test_relative_path_is_resolved_as_ultralytics_does(tmp_path, monkeypatch):
    # configs/data.yaml says `path: datasets/shapes`: Ultralytics resolves it from the working directory.
    copy_dataset("detect", tmp_path / "datasets" / "shapes", path="datasets/shapes")
    (tmp_path / "configs").mkdir()
    (tmp_path / "datasets" / "shapes" / "data.yaml").rename(tmp_path / "configs" / "data.yaml")
    monkeypatch.chdir(tmp_path)
    spec = RunSpec(train={"data": "configs/data.yaml", "model": "yolo26n.yaml"}, storage_path=str(tmp_path / "runs"))
    spec.tracking.enabled = False
    spec, train_args, _ = check_run(spec)
    root = tmp_path / "datasets" / "shapes"
    assert spec.data_root == str(root) and train_args["data"] == str(tmp_path / "configs" / "data.yaml")

    from ultralytics.data.utils import check_det_dataset

    from raytrain_yolo.data.sync import pin_root

    here = check_det_dataset(train_args["data"], autodownload=False)
    monkeypatch.chdir(tmp_path / "configs")  # a worker elsewhere trains on the root the driver resolved
    there = check_det_dataset(pin_root(train_args["data"], spec.data_root), autodownload=False)
    assert (there["train"], there["val"]) == (here["train"], here["val"]) == (f"{root}/images/train",
                                                                               f"{root}/images/val")


def test_corrupt_pair_refused_or_skipped_as_ultralytics_does(capsys, tmp_path):
    data = copy_dataset("detect", tmp_path / "d")
    label = tmp_path / "d" / "labels" / "train" / "000003.txt"
    label.write_text(label.read_text() + "9 0.5 0.5 0.2 0.2\n")
    last = refused(capsys, data)
    for words in (f"{tmp_path}/d/images/train/000003.jpg", str(label), "Label class 9 exceeds dataset class count 3",
                  "--allow-bad-labels", "fix the file"):
        assert words in last, (words, last)

    found = check_data(str(data), "detect", allow_bad_labels=True)
    out = capsys.readouterr().out
    assert "train: 1 of 8 image/label pairs skipped" in out and "000003.jpg" in out, out
    assert (found.splits["train"].images, found.splits["train"].instances) == ultralytics_counts(data, "train")
    assert found.splits["train"].images == 7



def test_the_check_is_ultralytics_label_scan_and_leaves_its_cache_for_the_run(tmp_path):
    """Issue 39: the dataset check runs Ultralytics' own scan over every image of each split (no cap) and writes the
    `labels/<split>.cache` Ultralytics' datasets read: the dataset the trainer builds next reuses it (the file is not
    written again), and a second check reads it instead of scanning. `fraction=` keeps the share Ultralytics
    trains on."""
    data = copy_dataset("detect", tmp_path / "d")
    found = check_data(str(data), "detect")
    caches = {split: tmp_path / "d" / "labels" / f"{split}.cache" for split in ("train", "val")}
    assert all(c.is_file() for c in caches.values()), sorted(p.name for p in (tmp_path / "d" / "labels").iterdir())
    written = {split: c.stat().st_mtime_ns for split, c in caches.items()}
    for split in ("train", "val"):
        assert (found.splits[split].images, found.splits[split].instances) == ultralytics_counts(data, split)
    again = check_data(str(data), "detect")
    assert {split: c.stat().st_mtime_ns for split, c in caches.items()} == written, "scanned again"
    assert again.splits["train"].images == found.splits["train"].images == TINY.train
    half = check_data(str(data), "detect", fraction=0.5)
    assert half.splits["train"].images == TINY.train // 2 and half.splits["val"].images == TINY.val
