"""Issue 17, part 4: a model `fit --register-model NAME` registered in a real MLflow store (sqlite) is named
`models:/NAME/1` by val and predict, and gives what its checkpoint file gives when named by path."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import load_summary, run_cli
from raytrain_yolo.config import ScalingSpec

NAME = "shapes-jobs"
CONF = 0.001  # a 1-epoch model is unsure of everything: a low threshold keeps objects to compare


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One 1-epoch, 1-worker fit of 64 px images, registered as NAME version 1. Its cwd is a temporary folder, so
    the store's artifacts (./mlruns beside a sqlite store) stay out of the repository."""
    base = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{base / 'mlflow.db'}"
    proc = run_cli("fit", "--cpu", "--num-workers", 1, "--storage-path", base / "runs", "--name", "reg",
                   "--tracking-uri", uri, "--register-model", NAME, "--synthetic-train", 16, "--synthetic-val", 8,
                   "--synthetic-size", 64, "model=yolo26n.yaml", "epochs=1", "imgsz=64", "batch=8", cwd=base,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = load_summary(base / "runs", "reg")
    assert summary["best_checkpoint"], summary
    return uri, summary, base


def test_val_and_predict_run_a_registered_model(registered, ray_local, tmp_path):
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from raytrain_yolo.predict import predict
    from raytrain_yolo.val import validate

    uri, s, _ = registered
    versions = MlflowClient(uri).search_model_versions(f"name='{NAME}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", s["mlflow_run_id"])]
    one = ScalingSpec(num_workers=1, use_gpu=False)

    by_name = validate(f"models:/{NAME}/1", s["data"], scaling=one, storage_path=str(tmp_path), name="vn",
                       tracking_uri=uri, batch=4)
    by_path = validate(s["best_checkpoint"], s["data"], scaling=one, storage_path=str(tmp_path), name="vp", batch=4)
    assert by_name["model"] != by_path["model"] and by_name["model"].endswith("best.pt")  # the registry's copy
    assert by_name["images"] == by_path["images"] > 0
    assert by_name["metrics"] == by_path["metrics"]

    images = sorted(str(p) for p in (Path(s["data"]).parent / "images" / "val").glob("*.jpg"))
    rows = {}
    for label, model, kw in (("name", f"models:/{NAME}/1", {"tracking_uri": uri}), ("path", s["best_checkpoint"], {})):
        out = tmp_path / f"preds-{label}"
        summary = predict(model, images, str(out), one, conf=CONF, batch=4, **kw)
        assert summary["images"] == len(images)
        rows[label] = sorted(pq.read_table(out).to_pylist(), key=lambda r: (r["image"], -r["confidence"], r["box"]))
    assert rows["name"] and rows["name"] == rows["path"]
