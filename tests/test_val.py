"""Issue 17, part 2: `raytrain_yolo.val` shards validation over Ray workers and equals Ultralytics' model.val()."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import KillFirst, refused_in_process, run_cli


def ultralytics_val(summary: dict, **kw) -> tuple[dict, object]:
    from ultralytics import YOLO

    m = YOLO(summary["last_checkpoint"]).val(**{"data": summary["data"], "plots": False, "device": "cpu",
                                                "verbose": False, **kw})
    return m.results_dict, m


def assert_same_metrics(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert f"{ours[k]:.3g}" == f"{v:.3g}" and ours[k] == pytest.approx(v, abs=1e-9), (k, ours[k], v)


def test_val_cli_on_two_workers_equals_ultralytics(task_run, tmp_path):
    _, s = task_run("detect")
    out = tmp_path / "metrics.json"
    # batch=6 over 16 images: 3 batches, so the two workers get unequal shards (2 and 1). model= and data= are
    # relative to the command's working directory, which the workers (on the session's head) do not share.
    here = Path(s["data"]).parent
    # Issue 40: with save_json, save_txt and save_conf, every image's label file and one predictions.json with
    # every image's entries, as Ultralytics writes them (the shards' files are merged, none overwrites another).
    # And plots=True: Ultralytics' plots of its first three batches (here one worker has batches 0 and 2, the other
    # batch 1), and the curves and confusion matrix from the merged statistics.
    # On split=test (a data.yaml whose test: entry is the val images): outputs on any split, as Ultralytics'.
    outputs = ("save_json=True", "save_txt=True", "save_conf=True", "plots=True", "split=test")
    spec = yaml.safe_load((here / "data.yaml").read_text())
    (here / "with-test.yaml").write_text(yaml.safe_dump({**spec, "test": spec["val"]}))
    proc = run_cli("val", "--cpu", "--num-workers", 2, "--storage-path", tmp_path, "--name", "v", "--output", out,
                   f"model={os.path.relpath(s['last_checkpoint'], here)}", "data=with-test.yaml", "batch=6", *outputs,
                   timeout=300, cwd=here)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got == json.loads((tmp_path / "v" / "val.json").read_text())
    assert got["workers"] == 2 and got["images"] == 16 and got["split"] == "test" and got["task"] == "detect"
    theirs, m = ultralytics_val(s, batch=6, save_json=True, save_txt=True, save_conf=True, plots=True,
                                data=str(here / "with-test.yaml"), split="test", project=str(tmp_path / "theirs"),
                                name="u")
    assert_same_metrics(got["metrics"], theirs)
    mine, their_dir = tmp_path / "v" / "ultralytics", tmp_path / "theirs" / "u"
    assert got["outputs"]["predictions_json"] == str(mine / "predictions.json")
    assert json.loads((mine / "predictions.json").read_text()) == json.loads((their_dir / "predictions.json").read_text())
    labels = {f.name: f.read_text() for f in (mine / "labels").glob("*.txt")}
    assert labels and labels == {f.name: f.read_text() for f in (their_dir / "labels").glob("*.txt")}
    assert got["outputs"]["label_files"] == len(labels)
    plots = sorted(f.name for f in mine.iterdir() if f.suffix in (".jpg", ".png"))
    assert plots == sorted(f.name for f in their_dir.iterdir() if f.suffix in (".jpg", ".png")), plots
    assert {f"val_batch{i}_{kind}.jpg" for i in range(3) for kind in ("labels", "pred")} <= set(plots), plots
    for name in (p for p in plots if p.startswith("val_batch")):  # the same images, boxes and labels
        a, b = (np.asarray(Image.open(d / name).convert("RGB"), dtype=np.int16) for d in (mine, their_dir))
        assert a.shape == b.shape and np.abs(a - b).mean() < 1.0, name
    row = ("%22s" + "%11i" * 2 + "%11.3g" * 4) % ("all", 16, m.nt_per_class.sum(), *m.mean_results())
    assert row in proc.stdout  # Ultralytics' own table, printed once by the driver


@pytest.mark.parametrize("task", ["pose", "segment", "obb"])
def test_val_library_call_equals_ultralytics_for_every_task(task_run, ray_local, task, tmp_path):
    from raytrain_yolo.core.config import ScalingSpec
    from raytrain_yolo.val import validate

    _, s = task_run(task)
    # Issue 22's val cell, in the segment case: a shard's worker is SIGKILLed while it validates; Ray runs the task
    # again (a task's own retries) and the metrics are still Ultralytics'.
    fault = KillFirst(r"ray::_validate_shard") if task == "segment" else contextlib.nullcontext()
    with fault:
        got = validate(s["last_checkpoint"], s["data"], scaling=ScalingSpec(num_workers=2, use_gpu=False),
                       storage_path=str(tmp_path), name=task, batch=4)
    assert task != "segment" or fault.killed, "no shard was running to lose"
    assert got["task"] == task and got["images"] == 16
    assert_same_metrics(got["metrics"], ultralytics_val(s, batch=4)[0])
    if task == "pose":  # 2 epochs find no boxes yet, but some keypoints: the comparison is not only of zeros
        assert got["metrics"]["metrics/mAP50(P)"] > 0


def test_val_refuses_bad_input_in_one_line(task_run, tmp_path, capfd, monkeypatch):
    _, s = task_run("detect")
    cases = [
        ((f"model={s['last_checkpoint']}", f"data={s['data']}", "split=test"), "has no 'test:' entry"),
        (("model=yolo26n.yaml", f"data={s['data']}"), "no trained weights"),
        ((f"model={s['last_checkpoint']}",), "no data= given"),
        ((f"model={s['last_checkpoint']}", f"data={s['data']}", "device=0"), "--gpu/--cpu"),
    ]
    for args, words in cases:
        last = refused_in_process("val", ["--storage-path", tmp_path, *args], capfd, monkeypatch)
        assert words in last, (args, last)
