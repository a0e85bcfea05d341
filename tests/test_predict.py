"""Issue 17, part 3: `raytrain_yolo.predict` runs Ultralytics' predictor in Ray Data and writes Parquet rows that
equal Ultralytics' own model.predict()."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import refused_in_process, run_cli
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

N_IMAGES = 240
CONF = 0.001  # low: a 2-epoch model is unsure of everything, and the comparison needs objects
SLACK = 1e-4  # objects this close to CONF may fall on either side of it in one run and not in the other


def ultralytics_objects(model: str, source, **kw) -> dict[str, list[dict]]:
    from ultralytics import YOLO

    from raytrain_yolo.train.adapter import result_rows

    out = {}
    for r in YOLO(model).predict(source=source, conf=CONF, device="cpu", verbose=False, stream=True, **kw):
        out[r.path] = result_rows(r)
    return out


def by_image(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in rows:
        out.setdefault(row["image"], []).append(row)
    return out


def assert_same_objects(ours: dict[str, list[dict]], theirs: dict[str, list[dict]], keys=("box",)) -> int:
    """Every object above CONF + SLACK on one side has its twin on the other: class, confidence to 1e-4, and
    box (and the task's `keys`) to 1e-3 px. Returns how many objects were compared."""
    compared = 0
    for a_side, b_side in ((ours, theirs), (theirs, ours)):
        for image, objs in a_side.items():
            for o in objs:
                if o["confidence"] < CONF + SLACK:
                    continue
                twins = [t for t in b_side.get(image, []) if t["class"] == o["class"]
                         and abs(t["confidence"] - o["confidence"]) < 1e-4
                         and np.abs(np.subtract(t["box"], o["box"])).max() < 1e-3]
                assert twins, (image, o)
                for k in keys:
                    assert min(np.abs(np.subtract(t[k], o[k])).max() for t in twins) < 1e-3, (image, k, o)
                compared += 1
    return compared


@pytest.fixture(scope="module")
def images():
    return ensure_synthetic(SyntheticSpec(train=N_IMAGES, val=8, imgsz=64)).parent / "images" / "train"


def test_predict_cli_on_two_workers_equals_ultralytics(task_run, images, tmp_path):
    import pyarrow.parquet as pq

    _, s = task_run("detect")
    out = tmp_path / "preds"
    proc = run_cli("predict", "--cpu", "--num-workers", 2, "--storage-path", tmp_path, "--output", out,
                   f"model={s['last_checkpoint']}", f"source={images}", f"conf={CONF}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = pq.read_table(out)
    assert table.column_names == ["image", "frame", "class", "name", "confidence", "box"]
    assert set(table.column("frame").to_pylist()) == {None}  # images: no video frame
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images"] == N_IMAGES and summary["workers"] == 2 and summary["images_per_second"] > 0
    theirs = ultralytics_objects(s["last_checkpoint"], str(images))
    assert len(theirs) == N_IMAGES
    assert assert_same_objects(by_image(table.to_pylist()), theirs) > 0  # not a comparison of nothing


# segment is left out: its 2-epoch checkpoint keeps no mask above any threshold yet (measured), so its rows
# would be empty on both sides. pose is test_predict_images' dense case (the same checks, on its 12 dense images:
# once a case here, a predict job more).
@pytest.mark.parametrize("task,keys", [("obb", ("box", "obb", "corners"))])
def test_predict_library_call_for_every_task(task_run, ray_local, task, keys, tmp_path):
    import pyarrow.parquet as pq

    from raytrain_yolo.core.config import ScalingSpec
    from raytrain_yolo.predict import predict

    _, s = task_run(task)
    val = sorted(str(p) for p in (ensure_synthetic(SyntheticSpec(train=8, val=16, imgsz=64), task).parent
                                  / "images" / "val").glob("*.jpg"))
    summary = predict(s["last_checkpoint"], val, str(tmp_path / "out"), ScalingSpec(num_workers=2, use_gpu=False),
                      conf=CONF, batch=4)
    rows = pq.read_table(tmp_path / "out").to_pylist()
    extra = {"pose": "keypoints", "obb": "obb"}[task]
    assert summary["task"] == task and rows and all(extra in r for r in rows)
    assert assert_same_objects(by_image(rows), ultralytics_objects(s["last_checkpoint"], val), keys) > 0


def test_predict_refuses_bad_input_in_one_line(task_run, images, tmp_path, capfd, monkeypatch):
    _, s = task_run("detect")
    (tmp_path / "empty").mkdir()
    cases = [
        ((f"model={s['last_checkpoint']}", f"source={tmp_path / 'nope'}"), "not found"),
        ((f"model={s['last_checkpoint']}", f"source={tmp_path / 'empty'}"), "holds no images"),
        ((f"model={s['last_checkpoint']}",), "no source= given"),
        (("model=models:/nothing/1", f"source={images}", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"),
         "not found in the MLflow registry"),
        # an --output that cannot be written (here: under a file), named as the user named it (issue 21, part 5)
        ((f"model={s['last_checkpoint']}", f"source={tmp_path / 'empty'}", "--output", tmp_path / "a-file" / "preds"),
         f"cannot write to --output {tmp_path / 'a-file' / 'preds'} ("),
    ]
    (tmp_path / "a-file").write_text("not a folder")
    for args, words in cases:
        last = refused_in_process("predict", ["--storage-path", tmp_path, *args], capfd, monkeypatch)
        assert words in last, (args, last)
