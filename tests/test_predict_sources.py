"""Issue 40: `predict` reads every source form `YOLO(model).predict(source=...)` reads from files, and only those
files: a folder at Ultralytics' depth, globs (`**` for deeper), `.txt` lists with relative lines and folder lines,
videos frame by frame; it refuses live sources in one line before the model loads, names and counts what it does
not read, and a predict that failed half-way leaves a folder the same command replaces."""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest

from raytrain_yolo.core.config import ScalingSpec, SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic
from test_predict import CONF, assert_same_objects, by_image
from test_predict_images import read_rows

FRAMES = 5


def layout(root):
    """A folder as people leave them: 2 images at the top, 2 in a subfolder, a video of FRAMES frames, notes."""
    ims = [cv2.imread(str(p)) for p in sorted((ensure_synthetic(SyntheticSpec(train=8, val=8, imgsz=64)).parent /
                                                "images" / "train").glob("*.jpg"))[:4]]
    (root / "sub").mkdir(parents=True)
    for i, im in enumerate(ims):
        cv2.imwrite(str(root / ("sub" if i >= 2 else ".") / f"im{i}.jpg"), im)
    video = cv2.VideoWriter(str(root / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (64, 64))
    for i in range(FRAMES):
        video.write(ims[i % 4])
    video.release()
    (root / "notes.txt.bak").write_text("not an image")
    return root


def ultralytics_paths(source) -> list[str]:
    """The file of every result `YOLO(model).predict(source)` gives, in order (a video's path once per frame)."""
    from ultralytics import YOLO

    return [r.path for r in YOLO("yolo26n.yaml").predict(source=source, device="cpu", verbose=False, stream=True)]


@pytest.mark.quick
def test_every_file_source_form_lists_what_ultralytics_reads(tmp_path, monkeypatch):
    from raytrain_yolo.data.sources import resolve_source

    root = layout(tmp_path / "photos")
    (tmp_path / "lists").mkdir()
    # A list whose lines are relative to the list (not to where the command runs), and a folder line.
    (tmp_path / "lists" / "some.txt").write_text("../photos/sub/im2.jpg\n../photos/sub\n")
    monkeypatch.chdir(tmp_path)
    cases = {"photos": 2, "photos/*.jpg": 2, "photos/**/*.jpg": 4, str(tmp_path / "lists" / "some.txt"): 3}
    for source, images in cases.items():
        src = resolve_source(source)
        theirs = ultralytics_paths(source)
        assert src.images + [v for v in src.videos for _ in range(FRAMES)] == theirs, (source, src, theirs)
        assert len(src.images) == images, source
    folder = resolve_source("photos")
    assert folder.videos == [str(root / "clip.avi")]
    assert folder.skipped == [{"path": str(root / "notes.txt.bak"),
                               "reason": "not an image or video file (Ultralytics' predictor does not read it)"}]


@pytest.mark.quick
def test_live_sources_are_refused_before_the_model_loads(tmp_path, capfd, monkeypatch):
    from conftest import refused_in_process

    for source, words in (("0", "webcam or a live stream"), ("rtsp://127.0.0.1:1/cam", "webcam or a live stream"),
                          ("screen", "screen capture"), ("https://127.0.0.1:1/a.jpg", "is a URL")):
        line = refused_in_process("predict", ["--storage-path", tmp_path, "model=missing.pt", f"source={source}"],
                                  capfd, monkeypatch)
        assert words in line and "missing.pt" not in line, line  # the model was never looked at


@pytest.mark.quick
def test_a_folder_a_failed_predict_left_is_replaced_by_the_same_command(tmp_path):
    from raytrain_yolo.predict import IN_PROGRESS, check_output

    out = tmp_path / "preds"
    out.mkdir()
    (out / IN_PROGRESS).write_text("{}")
    (out / "part-0.parquet").write_bytes(b"half")
    assert check_output(str(out)) is True


def test_a_folder_with_a_video_gives_ultralytics_rows_per_frame(task_run, ray_local, tmp_path, capsys):
    """Images at the folder's top level and every frame of its video, each frame's rows those of Ultralytics' result
    for that frame (`frame` from 1); the subfolder is not read (Ultralytics' depth) and the other file is named."""
    from ultralytics import YOLO

    from raytrain_yolo.predict import predict

    _, s = task_run("detect")
    model = s["last_checkpoint"]
    root = layout(tmp_path / "photos")
    out = tmp_path / "preds"
    summary = predict(model, str(root), str(out), ScalingSpec(num_workers=1, use_gpu=False), conf=CONF, batch=2,
                      save_txt=True, save_conf=True)
    assert (summary["images"], summary["predicted"], summary["videos"], summary["frames"]) == (2, 2, 1, FRAMES)
    assert summary["skipped_count"] == 1 and "notes.txt.bak" in capsys.readouterr().err
    assert json.loads((out / "_summary.json").read_text())["skipped"][0]["path"].endswith("notes.txt.bak")
    assert not (out / "_in_progress.json").exists()
    rows = read_rows(out)
    ours = by_image([{**r, "image": f"{r['image']}#{r['frame'] or 0}"} for r in rows])
    theirs, frame = {}, 0
    from raytrain_yolo.train.adapter import result_rows

    for r in YOLO(model).predict(source=str(root), conf=CONF, device="cpu", verbose=False, stream=True,
                                 save_txt=True, save_conf=True, project=str(tmp_path / "theirs"), name="u"):
        frame = frame + 1 if r.path.endswith(".avi") else 0
        theirs[f"{r.path}#{frame}"] = result_rows(r)
    # save_txt: Ultralytics' label files (`<stem>.txt`, a video's `<stem>_<frame>.txt`), under _labels/ beside the
    # Parquet files (which a Parquet reader of the folder skips).
    labels = {f.name: f.read_text() for f in (out / "_labels").iterdir()}
    assert labels and labels == {f.name: f.read_text() for f in (tmp_path / "theirs" / "u" / "labels").iterdir()}
    assert any(name.startswith("clip_") for name in labels), sorted(labels)
    assert {k.rsplit("#", 1)[1] for k in theirs if k.startswith(str(root / "clip.avi"))} == \
        {str(i) for i in range(1, FRAMES + 1)}
    assert set(ours) <= set(theirs) and {k for k, v in theirs.items() if v} == set(ours)
    assert assert_same_objects(ours, theirs) > 0
    assert all(np.isfinite(r["confidence"]) for r in rows)
