"""Issue 17, part 4: where val and predict take their model and images from. A model `fit --register-model NAME`
registered in a real MLflow store (sqlite) is named `models:/NAME/1` and gives what its checkpoint file gives; images
under an s3:// prefix (moto's S3 server) give the Parquet rows the same images give from a local folder, and the
rows can go to s3:// too. One 1-epoch checkpoint and one local Ray serve the module."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import load_summary, run_cli
from raytrain_yolo.core.config import ScalingSpec
from test_datasync import s3, upload  # noqa: F401 - the moto server fixture
from test_tracking import CuttableLink, check_one_finished_run

pytestmark = pytest.mark.usefixtures("s3")  # first: the local Ray's workers inherit its endpoint and keys


@pytest.fixture(scope="module")
def s3_link(request):
    """moto's endpoint behind a TCP path a test can cut (new connections refused, open ones closed): the module's
    local Ray starts after this, so its workers, like this process, reach S3 through it; up, it changes nothing.
    `link.direct` is a boto3 client to moto itself, past the cut."""
    link = CuttableLink(os.environ["AWS_ENDPOINT_URL"])
    link.direct = request.getfixturevalue("s3")
    link.up()
    direct, os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL"], link.uri
    try:
        yield link
    finally:
        link.cut()
        os.environ["AWS_ENDPOINT_URL"] = direct


@pytest.fixture(scope="module")
def ray_local(s3_link):
    """A local Ray of this process's own, not the session's shared head: its workers must inherit the moto
    server's endpoint and keys from this process, as every node of a real cluster has its own."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()

NAME = "shapes-jobs"
CONF = 0.001  # a 1-epoch model is unsure of everything: a low threshold keeps objects to compare


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """One 1-epoch, 1-worker fit of 64 px images, registered as NAME version 1, with the default local store: no
    --tracking-uri and no MLFLOW_TRACKING_URI, so the store is `mlflow.db` in the working directory (a temporary
    folder: the store's artifacts, ./mlruns beside it, stay out of the repository), and the storage path `runs` is
    relative to it."""
    base = tmp_path_factory.mktemp("registry")
    proc = run_cli("fit", "--cpu", "--num-workers", 1, "--storage-path", "runs", "--name", "reg",
                   "--register-model", NAME, "--no-validate-untrained", "--synthetic-train", 16, "--synthetic-val", 8,
                   "--synthetic-size", 64, "model=yolo26n.yaml", "epochs=1", "imgsz=64", "batch=8", cwd=base,
                   env={"MLFLOW_TRACKING_URI": None}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = load_summary(base / "runs", "reg")
    assert summary["best_checkpoint"], summary
    return f"sqlite:///{base / 'mlflow.db'}", summary, base, proc


def test_default_local_store_one_run_with_params_metrics_and_loadable_weights(registered):
    """The store is `mlflow.db` in the working directory and has the one run, its parameters and metrics, weights
    and the registered model (once test_tracking's own run, a launch more)."""
    from ultralytics import YOLO

    uri, summary, base, proc = registered
    assert (base / "mlflow.db").is_file()
    assert "mlflow run id" in proc.stdout and summary["mlflow_run_id"] in proc.stdout
    client, run = check_one_finished_run(uri, summary, "reg", epochs=1, workers=1, batch=8, images=(16, 8))
    local = client.download_artifacts(run.info.run_id, "weights/last.pt", str(base))
    assert YOLO(local).task == "detect"
    versions = client.search_model_versions(f"name='{NAME}'")
    assert [v.run_id for v in versions] == [run.info.run_id]


def test_val_and_predict_run_a_registered_model(registered, ray_local, tmp_path):
    """`models:/NAME/1` gives what its checkpoint gives in plain Ultralytics: the same metrics and the same objects
    (once compared with our own val and predict of the checkpoint file, two jobs more: those equal Ultralytics in
    test_val and test_predict)."""
    import pyarrow.parquet as pq
    from mlflow import MlflowClient

    from raytrain_yolo.predict import predict
    from raytrain_yolo.val import validate
    from test_predict import assert_same_objects, by_image, ultralytics_objects
    from test_val import assert_same_metrics, ultralytics_val

    uri, s, _, _ = registered
    versions = MlflowClient(uri).search_model_versions(f"name='{NAME}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", s["mlflow_run_id"])]
    one = ScalingSpec(num_workers=1, use_gpu=False)

    by_name = validate(f"models:/{NAME}/1", s["data"], scaling=one, storage_path=str(tmp_path), name="vn",
                       tracking_uri=uri, batch=4)
    # the registry's URI stays this call's: nothing later in this process (or its children) logs there by default
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri
    assert by_name["model"] != s["best_checkpoint"] and by_name["model"].endswith("best.pt")  # the registry's copy
    import tempfile  # downloaded once per model version into one cache folder (was a new temporary copy per job)

    assert Path(by_name["model"]).is_relative_to(Path(tempfile.gettempdir()) / "raytrain-yolo-registry")
    assert by_name["images"] == 8
    assert_same_metrics(by_name["metrics"], ultralytics_val({**s, "last_checkpoint": s["best_checkpoint"]}, batch=4)[0])

    images = sorted(str(p) for p in (Path(s["data"]).parent / "images" / "val").glob("*.jpg"))
    out = tmp_path / "preds-name"
    summary = predict(f"models:/{NAME}/1", images, str(out), one, conf=CONF, batch=4, tracking_uri=uri)
    assert summary["images"] == len(images) and summary["model"] == by_name["model"], "val's download, reused"
    ours = by_image(pq.read_table(out).to_pylist())
    assert assert_same_objects(ours, ultralytics_objects(s["best_checkpoint"], images)) > 0


def test_predict_from_and_to_object_storage_equals_a_local_folder(registered, ray_local, tmp_path):
    import boto3
    import pyarrow.parquet as pq
    from pyarrow import fs as pafs

    from raytrain_yolo.predict import predict

    _, s, _, _ = registered
    folder = Path(s["data"]).parent / "images" / "val"
    upload(boto3.client("s3"), folder, "jobs/images")  # the moto server the module's s3 fixture started
    one = ScalingSpec(num_workers=1, use_gpu=False)
    remote = predict(s["best_checkpoint"], "s3://datasets/jobs/images", "s3://datasets/jobs/preds", one,
                     conf=CONF, batch=4)
    local = predict(s["best_checkpoint"], str(folder), str(tmp_path / "preds"), one, conf=CONF, batch=4)
    assert remote["images"] == local["images"] == len(list(folder.glob("*.jpg"))) > 0
    assert remote["output"] == "s3://datasets/jobs/preds"
    # A bucket that does not exist is found before Ray does any work, and named as the user named it.
    from raytrain_yolo.core.errors import UserError

    with pytest.raises(UserError, match=r"^cannot write to --output s3://no-such-bucket/preds \("):
        predict(s["best_checkpoint"], str(folder), "s3://no-such-bucket/preds", one, conf=CONF, batch=4)

    s3fs, root = pafs.FileSystem.from_uri("s3://datasets/jobs/preds")
    assert s3fs.get_file_info(f"{root}/_summary.json").type == pafs.FileType.File

    def rows(table, prefix: str) -> list[dict]:
        out = [{**r, "image": r["image"].removeprefix(prefix)} for r in table.to_pylist()]
        assert all(r["image"].count("/") == 0 for r in out), out[:1]  # every row named an image under the prefix
        return sorted(out, key=lambda r: (r["image"], -r["confidence"], r["box"]))

    theirs = rows(pq.read_table(root, filesystem=s3fs), "s3://datasets/jobs/images/")
    ours = rows(pq.read_table(tmp_path / "preds"), f"{folder.resolve()}/")
    assert ours and theirs == ours


def test_val_to_object_storage_leaves_no_local_folder(registered, ray_local, tmp_path, monkeypatch):
    """Issue 44, 7: `val --storage-path s3://...` made a folder literally named `s3:` where it ran (Ultralytics
    makes its `project=` with pathlib); the metrics go to the bucket and nothing stays behind here."""
    from pyarrow import fs as pafs

    from raytrain_yolo.val import validate

    _, s, _, _ = registered
    monkeypatch.chdir(tmp_path)
    out = validate(s["best_checkpoint"], s["data"], scaling=ScalingSpec(num_workers=1, use_gpu=False),
                   storage_path="s3://datasets/vals", name="vs3", batch=4)
    assert out["images"] > 0 and out["output_dir"] == "s3://datasets/vals/vs3"
    s3fs, root = pafs.FileSystem.from_uri("s3://datasets/vals/vs3")
    assert s3fs.get_file_info(f"{root}/val.json").type == pafs.FileType.File
    assert not list(tmp_path.iterdir()), list(tmp_path.iterdir())


def test_s3_endpoint_refusing_connections_for_30_s_is_waited_out_then_a_lost_driver_resumes_from_it(
        s3_link, ray_local, tmp_path):
    """Three of issue 22's cells in one `fit` (2 gloo workers, checkpoints in s3://, a real MLflow store):
    1. the S3 endpoint down for 30 s: once the first checkpoint is registered the endpoint refuses every connection
       for 30 s. Uploads wait (--storage-wait, default 120 s) and the run goes on without a restart (--max-failures
       0: a failed upload would end it). Before: pyarrow's 3 attempts (~2 s) and the run ended when an upload gave
       up (a worker's checkpoint: WorkerGroupError; or the controller's checkpoint snapshot: ControllerError;
       experiments/faults.md);
    2. the S3 endpoint unresponsive for 30 s: once a checkpoint after the cut is registered, the endpoint accepts
       connections and answers nothing, on open connections too (a hung server; the long tier SIGSTOPped moto until
       2026-12-02): the run waits it out as well, without a restart;
    3. the driver killed and the command rerun, on s3://: once a checkpoint after the stall is registered the driver
       is SIGKILLed (its job's actors go with it; the module's local Ray, this process's, stays, as a cluster's head
       does when a submitting machine is lost). The same command resumes from the checkpoint in the bucket: one
       MLflow run, each epoch once, the stored checkpoint folders exactly the registered ones.
    9 epochs of 16 images at 64 px (0.6-2.5 s each on 2 cores): after each outage, epochs are left for the next."""
    import json
    import signal
    import time

    from conftest import SNAPSHOT, latest_epoch_in, registered_in, start_cli, wait_for

    epochs, prefix, uri = 9, "runs-cut/cut", f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = ("fit", "--cpu", "--num-workers", 2, "--no-validate-untrained", "--synthetic-train", 16, "--synthetic-val", 8,
           "--synthetic-size", 64, f"epochs={epochs}", "imgsz=64", "batch=8", "--storage-path", "s3://datasets/runs-cut",
           "--name", "cut", "--tracking-uri", uri)
    env = {"RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}  # its workers reach S3 through the link

    def snapshot() -> dict:  # Ray's registered checkpoints, read from moto directly, not through the link
        try:
            body = s3_link.direct.get_object(Bucket="datasets", Key=f"{prefix}/{SNAPSHOT}")["Body"]
        except Exception:  # noqa: BLE001 - not written yet
            return {}
        return json.loads(body.read())

    def registered() -> list[str]:
        return registered_in(snapshot())

    def latest_epoch() -> int:
        return latest_epoch_in(snapshot())

    def summary_stored() -> bool:
        return bool(s3_link.direct.list_objects_v2(Bucket="datasets", Prefix=f"{prefix}/summary.json").get("Contents"))

    from test_faults import our_temp_folders

    temp = our_temp_folders()
    log = tmp_path / "first.log"
    fit = start_cli(*cmd, env=env, log_path=log)
    try:
        wait_for(lambda: latest_epoch() or fit.poll() is not None, 300, what="the first checkpoint")
        assert fit.poll() is None, log.read_text()[-3000:]
        s3_link.cut()
        time.sleep(30)
        held = latest_epoch()
        waiting = fit.poll() is None  # the epochs take seconds: a live run here waits on the store
        s3_link.up()
        assert waiting and held < epochs, "the cut must have met an upload:\n" + log.read_text()[-3000:]
        wait_for(lambda: latest_epoch() > held or fit.poll() is not None, 300, interval=0.2,
                 what="a checkpoint after the cut")
        assert fit.poll() is None, "the run ended instead of waiting out the cut:\n" + log.read_text()[-3000:]
        s3_link.stall()
        time.sleep(30)
        stalled = latest_epoch()
        waiting = fit.poll() is None
        s3_link.resume()
        assert waiting and stalled < epochs, "the stall must have met an upload:\n" + log.read_text()[-3000:]
        wait_for(lambda: latest_epoch() > stalled or fit.poll() is not None, 300, interval=0.2,
                 what="a checkpoint after the stall")
        assert fit.poll() is None, "the run ended instead of waiting out the stall:\n" + log.read_text()[-3000:]
    finally:
        s3_link.resume()
        os.killpg(fit.pid, signal.SIGKILL)  # the driver
        fit.wait(timeout=60)
    assert not summary_stored(), log.read_text()[-3000:]
    resumable = latest_epoch()

    proc = run_cli(*cmd, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads(s3_link.direct.get_object(Bucket="datasets", Key=f"{prefix}/summary.json")["Body"].read())
    assert not s["error"] and s["epochs_completed"] == epochs, s["error"]
    assert [h["epoch"] for h in s["history"]] == list(range(1, epochs + 1)), "each epoch once, in order"
    assert s["resumed_from_epoch"] >= resumable > stalled > held, "the rerun resumes from the checkpoint after both"
    keys = [k["Key"] for k in s3_link.direct.list_objects_v2(Bucket="datasets", Prefix=f"{prefix}/checkpoint_")["Contents"]]
    stored = {k.split("/")[2] for k in keys if k.count("/") > 2}  # checkpoint folders, not the snapshot beside them
    assert stored == set(registered()) and s["last_checkpoint"].startswith(f"s3://datasets/{prefix}/checkpoint_")
    assert s["best_checkpoint"].endswith("best.pt") and s["last_checkpoint"].endswith("last.pt")
    assert {f"{prefix}/{s['last_checkpoint'].split('/')[-2]}/{f}" for f in ("best.pt", "last.pt")} <= set(keys)
    check_one_finished_run(uri, s, "cut", epochs=epochs, batch=8, images=(16, 8))
    # The workers' scratch folders (this machine is their node): the rerun removes the killed run's too.
    assert our_temp_folders() <= temp, f"left in the temp folder: {our_temp_folders() - temp}"
