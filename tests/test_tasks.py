"""Issue 17, part 1: pose, segment and obb train through the same path as detect, on their own embedded data."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_cli, total_train_loss
from raytrain_yolo.plan.dataset import check_data
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.data.synthetic import ensure_synthetic

TASK_KEYS = {
    "pose": ("metrics/mAP50(P)", "metrics/mAP50-95(P)", "train/pose_loss"),
    "segment": ("metrics/mAP50(M)", "metrics/mAP50-95(M)", "train/seg_loss"),
    "obb": ("metrics/mAP50(B)", "metrics/mAP50-95(B)"),
}


@pytest.mark.parametrize("task", ["pose", "segment", "obb"])
def test_task_trains_on_its_embedded_data(task_run, task):
    from ultralytics import YOLO

    proc, s = task_run(task)
    assert s["task"] == task and s["world_size"] == 2 and s["epochs_completed"] == 2
    for key in TASK_KEYS[task]:
        assert key in s["metrics"], key
        assert key.split("/")[1] in proc.stdout, f"{key} missing from the printed table"
    assert total_train_loss(s["history"][-1]) < total_train_loss(s["history"][0])
    data = yaml.safe_load(Path(s["data"]).read_text())  # the summary names the data.yaml it trained on
    assert Path(s["data"]).parent.name.startswith(f"shapes-{task}-") and s["data"] in proc.stdout
    if task == "pose":
        assert data["kpt_shape"] == [3, 3] and data["flip_idx"] == [0, 2, 1]

    model = YOLO(s["last_checkpoint"])
    assert model.task == task
    image = sorted((Path(s["data"]).parent / "images" / "val").glob("*.jpg"))[0]
    r = model.predict(str(image), imgsz=64, conf=0.001, device="cpu", verbose=False)[0]
    if task == "pose":
        assert r.keypoints is not None and tuple(r.keypoints.data.shape[1:]) == (3, 3)
    elif task == "segment":
        assert r.masks is not None and len(r.masks.xy) == len(r.boxes)
    else:
        assert r.obb is not None and r.obb.xywhr.shape[1] == 5


@pytest.mark.quick
@pytest.mark.parametrize("task", ["detect", "pose", "segment", "obb"])
def test_embedded_labels_pass_preflight_and_ultralytics(task):
    data = ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64), task)
    check_data(str(data), task)
    from ultralytics.data.utils import check_det_dataset, verify_image_label

    cfg = check_det_dataset(str(data))
    nkpt, ndim = cfg.get("kpt_shape", (0, 0))
    for img in sorted((data.parent / "images" / "train").glob("*.jpg")):
        label = data.parent / "labels" / "train" / f"{img.stem}.txt"
        out = verify_image_label((str(img), str(label), "", task == "pose", cfg["nc"], nkpt, ndim, False))
        assert out[-1] == "" and out[6] == 1, out[-1]  # no message, one file found, nothing corrupt
        assert (len(out[3]) > 0) == (task in ("segment", "obb"))


BAD_LINES = {  # (the label file's new text, Ultralytics' reason for skipping the image)
    "pose": ("0 0.5 0.5 0.2 0.2 0.5 0.4 2\n", ("labels require 14 columns each",)),
    "segment": (None, ("labels mix segment and detection rows",)),  # a box row appended to the polygons
    "obb": ("5 0.1 0.1 0.2 0.1 0.2 0.2 0.1 0.2\n", ("Label class 5 exceeds dataset class count 3",)),
}


@pytest.mark.quick
@pytest.mark.parametrize("task", sorted(BAD_LINES))
def test_preflight_names_file_and_line_of_a_bad_task_label(task, tmp_path):
    import shutil

    src = ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64), task).parent
    shutil.copytree(src, tmp_path / "d")
    data = tmp_path / "d" / "data.yaml"
    data.write_text(data.read_text().replace(f"path: {src}", f"path: {tmp_path / 'd'}"))
    label = tmp_path / "d" / "labels" / "train" / "000002.txt"
    text, words = BAD_LINES[task]
    label.write_text(text or label.read_text() + "0 0.1 0.1 0.2 0.2\n")
    with pytest.raises(UserError) as e:
        check_data(str(data), task)
    msg = str(e.value)
    assert "\n" not in msg and "000002.jpg" in msg and "000002.txt" in msg and "--allow-bad-labels" in msg, msg
    for w in words:
        assert w in msg, (w, msg)


@pytest.mark.quick
def test_pose_keypoint_outside_the_image_and_missing_kpt_shape(tmp_path):
    import shutil

    src = ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64), "pose").parent
    shutil.copytree(src, tmp_path / "d")
    data = tmp_path / "d" / "data.yaml"
    data.write_text(data.read_text().replace(f"path: {src}", f"path: {tmp_path / 'd'}"))
    (tmp_path / "d" / "labels" / "val" / "000001.txt").write_text(
        "0 0.5 0.5 0.2 0.2 0.5 0.4 2 1.5 0.6 2 0.6 0.6 2\n")
    with pytest.raises(UserError, match=r"000001.txt: Ultralytics would skip .*out of bounds coordinates \[1.5\]"):
        check_data(str(data), "pose")
    data.write_text(data.read_text().replace("kpt_shape: [3, 3]", "kpt_shape: [3]"))
    with pytest.raises(UserError, match=r"kpt_shape: \[keypoints, 2 or 3\]"):
        check_data(str(data), "pose")


@pytest.mark.quick
def test_device_loader_refuses_other_tasks_in_one_line(tmp_path):
    for model in ("yolo26n-seg.yaml", "yolo26n-obb.yaml"):
        proc = run_cli("fit", "--loader", "device", "--no-tracking", "--storage-path", tmp_path, f"model={model}",
                       timeout=90, ray="none")
        assert proc.returncode == 2, proc.stderr[-2000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: --loader device") and "--loader ultralytics" in last, last
