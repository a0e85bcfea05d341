"""Issue 2: the real Ultralytics loop in a Ray TorchTrainer with CPU (gloo) DDP workers."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from conftest import load_summary, run_cli, total_train_loss
from raytrain_yolo.config import SyntheticSpec
from raytrain_yolo.data import ensure_synthetic

N_TRAIN = 99  # odd on purpose: the DistributedSampler pads one index to split it over 2 ranks
EPOCHS = 4


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory):
    storage = tmp_path_factory.mktemp("core")
    proc = run_cli(
        "fit", "--cpu", "--num-workers", 2, "--storage-path", storage, "--name", "ddp2", "--trace-samples",
        "--no-tracking", "--synthetic-train", N_TRAIN, "--synthetic-val", 32,
        f"epochs={EPOCHS}", "batch=16", "imgsz=128",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, storage, load_summary(storage, "ddp2")


def test_summary_has_the_promised_keys(ddp_run):
    proc, storage, s = ddp_run
    assert "summary" in proc.stdout and str(storage / "ddp2" / "summary.json") in proc.stdout
    assert s["world_size"] == 2 and s["device"] == "cpu" and s["backend"] == "gloo"
    assert s["epochs_completed"] == EPOCHS
    for key in ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "train/box_loss", "train/cls_loss"):
        assert key in s["metrics"], key
    assert s["images_per_second"] > 0
    assert Path(s["last_checkpoint"]).is_file() and Path(s["best_checkpoint"]).is_file()
    assert Path(s["ray_result_path"]).is_dir()
    assert [h["epoch"] for h in s["history"]] == list(range(1, EPOCHS + 1))


def test_ranks_are_real_ddp(ddp_run):
    _, _, s = ddp_run
    workers = sorted(s["workers"], key=lambda w: w["rank"])
    assert [w["rank"] for w in workers] == [0, 1]
    assert workers[0]["pid"] != workers[1]["pid"]
    assert all(w["loss_scale"] == 2 for w in workers), "Ultralytics must scale the loss by Ray's world size"
    assert workers[0]["params_sha256"] == workers[1]["params_sha256"], "DDP must keep parameters identical"


def test_each_epoch_the_ranks_split_the_dataset(ddp_run):
    _, _, s = ddp_run
    r0, r1 = (sorted(s["workers"], key=lambda w: w["rank"])[i]["samples"] for i in (0, 1))
    assert len(r0) == len(r1) == EPOCHS
    for epoch, (a, b) in enumerate(zip(r0, r1)):
        assert a["epoch"] == b["epoch"] == epoch, "set_epoch must be called on the sampler every epoch"
        both = a["indices"] + b["indices"]
        assert set(both) == set(range(N_TRAIN))
        assert len(both) == N_TRAIN + 1  # padded to a multiple of 2
        assert sum(c - 1 for c in Counter(both).values()) == 1  # overlap only by the padding
    assert r0[0]["indices"] != r0[1]["indices"], "each epoch must reshuffle"


def test_loss_falls(ddp_run):
    _, _, s = ddp_run
    first, last = s["history"][0], s["history"][-1]
    assert total_train_loss(last) < total_train_loss(first)


def test_last_checkpoint_loads_and_predicts(ddp_run):
    from ultralytics import YOLO

    _, _, s = ddp_run
    model = YOLO(s["last_checkpoint"])
    assert model.task == "detect"
    val_dir = ensure_synthetic(SyntheticSpec(train=N_TRAIN, val=32)).parent / "images" / "val"
    image = sorted(val_dir.glob("*.jpg"))[0]
    results = model.predict(str(image), imgsz=128, device="cpu", verbose=False)
    assert len(results) == 1 and results[0].boxes is not None
