"""Issue 3: every run, metric and checkpoint recorded in MLflow, once; failures. (The default local store, with a
registered model, is test_job_sources.py's `registered` run, which its val and predict tests use; a real MLflow
server over HTTP is test_faults.py's fault run, which this module's checks run on.)"""

from __future__ import annotations

import os
import signal
from types import SimpleNamespace

import pytest

from conftest import free_port, mlflow_runs, shared_head, shared_head_pids, start_cli, train_workers, wait_for

PER_EPOCH = ("metrics/mAP50B", "metrics/mAP50-95B", "metrics/precisionB", "metrics/recallB", "train/box_loss",
             "train/cls_loss", "lr/pg0", "throughput/images_per_second", "throughput/epoch_seconds")


def check_one_finished_run(uri: str, summary: dict, name: str, epochs: int, workers: int = 2,
                           batch: int = 16, images: tuple[int, int] = (64, 16)):
    """The store's default experiment has exactly this one run, FINISHED, with its parameters (the defaults: 2
    workers, batch 16, 64 training and 16 val images), each per-epoch metric once per `epochs`, and its artifacts."""
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1, [r.info.run_name for r in runs]
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert summary["mlflow_run_id"] == run.info.run_id and summary["tracking_uri"] == uri
    p = run.data.params
    assert p["ray/num_workers"] == str(workers) and p["ray/backend"] == "gloo" and p["ray/cpus_per_worker"] == "1.0"
    assert p["batch"] == str(batch) and p["epochs"] == str(epochs) and p["optimizer"] == "SGD"
    assert (p["data/train_images"], p["data/val_images"]) == tuple(map(str, images)) and p["device_name"] == "cpu"
    for pkg in ("ray", "ultralytics", "torch", "mlflow"):
        assert p[f"version/{pkg}"], pkg
    assert run.data.tags["ray.world_size"] == str(workers)
    assert run.data.tags["ray.result_path"] == summary["ray_result_path"]
    for key in PER_EPOCH:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert steps == list(range(1, epochs + 1)), (key, steps)
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"results.csv", "args.yaml", "summary.json", "weights"} <= top
    weights = {a.path for a in client.list_artifacts(run.info.run_id, "weights")}
    assert weights == {"weights/best.pt", "weights/last.pt"}
    return client, run


def test_run_killed_mid_way_is_marked_failed(tmp_path):
    """Issue 41 on a real run: a worker slowed down after the first checkpoint (stopped 4 s of every 5 for 15 s,
    --hang-timeout 20) is left alone; then frozen (SIGSTOP) with --max-failures 0 (until issue 41 a frozen one
    left the run silent for the process group's 3 hours, and this test SIGKILLed it): within --hang-timeout plus a
    minute the watchdog names it and kills it, and the run ends: exit 1 with that line, and the MLflow run FAILED.
    On the session's shared head (once a local Ray of its own, ~5 s more; the worker is found by its Ray process
    title among the head's processes)."""
    import time

    import psutil

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    log = tmp_path / "fit.log"
    head = shared_head()
    head.wait_idle()
    fit = start_cli("fit", "--cpu", "--num-workers", 2, "--synthetic-train", 64, "--synthetic-val", 16, "epochs=6",
                    "imgsz=96", "--storage-path", tmp_path, "--name", "dies", "--tracking-uri", uri,
                    "--max-failures", 0, "--hang-timeout", 20, log_path=log, env=head.driver_env)
    pids = []
    try:
        wait_for(lambda: list((tmp_path / "dies").glob("checkpoint_*")), 300, what="the first checkpoint")
        pids = wait_for(lambda: train_workers(shared_head_pids()), 30, what="worker pids")
        for _ in range(3):  # slowed down (stopped 4 s of every 5) but progressing: never taken for a hang
            os.kill(pids[-1], signal.SIGSTOP)
            time.sleep(4)
            os.kill(pids[-1], signal.SIGCONT)
            time.sleep(1)
        assert fit.poll() is None and "hang:" not in log.read_text(), log.read_text()[-3000:]
        os.kill(pids[-1], signal.SIGSTOP)
        frozen = time.monotonic()
        rc = fit.wait(timeout=300)
        took = time.monotonic() - frozen
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
        if pids and psutil.pid_exists(pids[-1]):  # never left stopped on the shared head
            os.kill(pids[-1], signal.SIGKILL)
    out = log.read_text()
    assert rc == 1 and took < 20 + 60, (took, out[-3000:])
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: training failed: RankHang: rank ") and f", pid {pids[-1]})" in last, out[-2000:]
    _, runs = mlflow_runs(uri)
    assert [r.info.status for r in runs] == ["FAILED"]



class CuttableLink:
    """A real TCP path to the MLflow server that the test cuts (new connections refused, open ones closed, as when
    a server is restarted or a network partitions) or stalls (connections accepted and kept open, nothing passes
    either way, as from a server that hangs), and restores: the server and its store stay as they were."""

    def __init__(self, target: str):
        import socket
        import threading

        self._socket, self._threading = socket, threading
        self.target = target.rsplit(":", 1)[1]
        self.port = free_port()
        self.listener = None
        self.conns: list = []
        self.flowing = threading.Event()
        self.flowing.set()

    def stall(self) -> None:
        """Until `resume()`: every byte, either way, on open and new connections, waits."""
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        self.listener = self._socket.create_server(("127.0.0.1", self.port))
        self._threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        try:  # wakes the accept() blocked in the other thread (close alone leaves the port listening on Linux)
            self.listener.shutdown(self._socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(self._socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        self.conns.clear()

    def _accept(self, listener) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            server = self._socket.create_connection(("127.0.0.1", int(self.target)))
            self.conns += [client, server]
            for a, b in ((client, server), (server, client)):
                self._threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, src, dst) -> None:
        socket = self._socket
        try:
            while data := src.recv(65536):
                self.flowing.wait()
                dst.sendall(data)
        except OSError:
            pass
        finally:  # both ends, and both directions: the peer (a pooled keep-alive connection) sees the close at once
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()


def test_a_tracking_outage_mid_run_ends_nothing_and_loses_nothing(mlflow_server, capfd, monkeypatch, tmp_path):
    """Issue 22: the path to a real MLflow server is cut between epochs and restored: rank 0's logger says so
    once, keeps the epochs it could not send and sends them, in order, once the server answers; what never reached
    it is named (for summary.json). The driver's end of the run does not fail either."""
    from mlflow import MlflowClient

    from raytrain_yolo.core.config import RunSpec, TrackingSpec
    from raytrain_yolo.core.tracking import EpochLogger, RunTracker

    # MLflow's own retries (7, with backoff, by default) would make the first failure take minutes here.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    link = CuttableLink(mlflow_server)
    link.up()
    try:
        client = MlflowClient(mlflow_server)  # the test's own view, never cut
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        notes: list[str] = []  # what the worker hands to the driver's console
        logger = EpochLogger(link.uri, run_id, notify=notes.append)
        logger.log_epoch({"epoch": 1, "lr/pg0": 0.1, "metrics/mAP50(B)": 0.5})
        link.cut()
        logger.log_epoch({"epoch": 2, "lr/pg0": 0.2, "metrics/mAP50(B)": 0.6})
        logger.log_epoch({"epoch": 3, "lr/pg0": 0.3, "metrics/mAP50(B)": 0.7})
        out = capfd.readouterr().out
        assert out.count("does not answer") == 1 and "training goes on" in out, out
        assert logger.unsent() == ["epoch 2's metrics", "epoch 3's metrics"]
        link.up()
        logger.log_epoch({"epoch": 4, "lr/pg0": 0.4, "metrics/mAP50(B)": 0.8})
        assert "answers again" in capfd.readouterr().out and logger.unsent() == []
        assert [n.split(" ", 4)[4].split(" (")[0].split(";")[0] for n in notes] == ["does not answer", "answers again"]
        history = client.get_metric_history(run_id, "metrics/mAP50B")
        assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.6), (3, 0.7), (4, 0.8)]
        link.cut()
        logger.log_epoch({"epoch": 5, "lr/pg0": 0.5})
        assert logger.unsent() == ["epoch 5's metrics"]
        tracker = RunTracker(RunSpec(tracking=TrackingSpec(uri=link.uri)))
        tracker.client, tracker.run_id = MlflowClient(link.uri), run_id
        assert tracker.finish("FINISHED", {"best_checkpoint": None}) == ["summary.json", "run status FINISHED"]
        assert "did not get summary.json" in capfd.readouterr().err
        assert client.get_run(run_id).info.status == "RUNNING"  # the server never heard the end: it says so
        # A restarted rank 0 whose server does not answer yet: it cannot ask which epochs the server has, and
        # replays the checkpoint's history (epochs 1-5; the server has 1-4). When the server answers, the question
        # goes first and each replayed epoch the answer holds is skipped (epochs 1-4 were logged twice before).
        again = EpochLogger(link.uri, run_id)
        again.sync_history([{"epoch": e, "lr/pg0": e / 10, "metrics/mAP50(B)": 0.4 + e / 10} for e in range(1, 6)])
        assert again.unsent()[0] == "the run's logged epochs" and len(again.unsent()) == 6
        link.up()
        again.log_epoch({"epoch": 6, "lr/pg0": 0.6, "metrics/mAP50(B)": 1.0})
        assert again.unsent() == []
        assert sorted(m.step for m in client.get_metric_history(run_id, "lr/pg0")) == [1, 2, 3, 4, 5, 6]
        # After the last epoch (log_outputs) a server that does not answer is asked again every few seconds, for as
        # long as MLflow's own retries would wait: here 3 retries at a backoff factor of 40 (40 + 80 + 120 s). It
        # answers again 2 s into the wait; the files arrive at the next try. With MLflow's own retries the call
        # slept through its backoff (its next try 80 s in), and a run's command ended minutes after the server came
        # back (2026-12-02: a 2-epoch job on the namespace cluster took 3 min 23 s after a 60-s outage).
        import threading

        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "40")
        out_dir = tmp_path / "train"
        (out_dir / "weights").mkdir(parents=True)
        (out_dir / "results.csv").write_text("epoch,lr/pg0\n6,0.6\n")
        link.cut()
        threading.Timer(2.0, link.up).start()
        end = threading.Thread(target=again.log_outputs, daemon=True,
                               args=(SimpleNamespace(wdir=out_dir / "weights", save_dir=out_dir),))
        end.start()
        end.join(timeout=40)
        assert not end.is_alive(), "the end of the run still waited on MLflow's backoff after the server answered"
        assert again.unsent() == [] and [f.path for f in client.list_artifacts(run_id)] == ["results.csv"]
    finally:
        link.cut()


@pytest.mark.quick
def test_ultralytics_own_tracking_callbacks_are_dropped(synthetic_cache, tmp_path):
    """With Ultralytics' MLflow and Ray Tune integrations on in its settings (its defaults; the suite's own settings
    file turns them off, conftest.py), its trainer registers their callbacks and ours drops them: they would log
    every epoch to MLflow a second time under other names, and report to a Tune session that is not theirs."""
    import torch
    from ultralytics.models import yolo
    from ultralytics.utils import SETTINGS

    from raytrain_yolo.core.config import SyntheticSpec
    from raytrain_yolo.data.synthetic import ensure_synthetic
    from raytrain_yolo.train.adapter import _DUPLICATE_CALLBACK_MODULES, trainer_class

    def integration_callbacks(trainer) -> set[str]:
        return {f.__module__ for fns in trainer.callbacks.values() for f in fns
                if f.__module__.startswith(_DUPLICATE_CALLBACK_MODULES)}

    args = dict(model="yolo26n.yaml", data=str(ensure_synthetic(SyntheticSpec(train=4, val=4, imgsz=64))),
                imgsz=64, workers=0, device="cpu", plots=False, project=str(tmp_path))
    saved = {k: SETTINGS[k] for k in ("mlflow", "raytune")}
    SETTINGS.update(mlflow=True, raytune=True)
    try:
        theirs = yolo.detect.DetectionTrainer(overrides=args)
        ours = trainer_class("detect")(overrides=args, device=torch.device("cpu"), world_size=1)
    finally:
        SETTINGS.update(saved)
    assert integration_callbacks(theirs) == set(_DUPLICATE_CALLBACK_MODULES)  # what there is to drop
    assert integration_callbacks(ours) == set()


def test_mlflow_holds_the_epochs_of_the_attempt_whose_checkpoint_was_registered(mlflow_server):
    """Issue 39: an attempt reported epoch 2 and was lost before Ray registered epoch 2's checkpoint; the restart
    resumes from epoch 1 and trains epoch 2 again. Rank 0 hands an epoch to MLflow only once its checkpoint is
    registered (the next report, or the run's end), so MLflow holds the retrained values, once (it held the lost
    attempt's box_loss 5.0008 and skipped the retrained 5.5748 as already logged). And no model version is
    registered for a run that holds no weights/best.pt (its `models:/` would fail in val and predict)."""
    from mlflow import MlflowClient

    from raytrain_yolo.core.config import RunSpec, TrackingSpec
    from raytrain_yolo.core.tracking import AfterRegistration, EpochLogger, RunTracker

    client = MlflowClient(mlflow_server)
    run_id = client.create_run(client.create_experiment("stale-epochs")).info.run_id
    lost = AfterRegistration(EpochLogger(mlflow_server, run_id).log_epoch)
    lost({"epoch": 1, "lr/pg0": 0.1, "train/box_loss": 5.5})
    lost({"epoch": 2, "lr/pg0": 0.2, "train/box_loss": 5.0008})  # the attempt dies here: no flush
    restart = EpochLogger(mlflow_server, run_id)
    restart.sync_history([{"epoch": 1, "lr/pg0": 0.1, "train/box_loss": 5.5}])  # the registered checkpoint's
    again = AfterRegistration(restart.log_epoch)
    again({"epoch": 2, "lr/pg0": 0.2, "train/box_loss": 5.5748})
    assert sorted(m.step for m in client.get_metric_history(run_id, "lr/pg0")) == [1], "epoch 2 before registration"
    again.flush()
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/box_loss"))
    assert history == [(1, 5.5), (2, 5.5748)], history
    tracker = RunTracker(RunSpec(tracking=TrackingSpec(uri=mlflow_server, register_model="no-weights")))
    tracker.client, tracker.run_id = client, run_id
    unsent = tracker.finish("FINISHED", {"best_checkpoint": "/somewhere/best.pt"})
    assert unsent == ["model version of no-weights"], unsent
    assert not client.search_model_versions("name='no-weights'")


@pytest.mark.quick
def test_every_local_store_form_mlflow_documents_is_made_absolute(tmp_path, monkeypatch):
    """Issue 39: `file:./mlruns` was taken for a folder named `file:.` in each trial's working directory; every
    local form MLflow documents names one absolute store, and a server or `databricks` is left as given."""
    from raytrain_yolo.core.config import RunSpec, TrackingSpec
    from raytrain_yolo.core.tracking import resolve_uri

    monkeypatch.chdir(tmp_path)
    store = (tmp_path / "mlruns").as_uri()
    for uri in ("mlruns", "./mlruns", "file:./mlruns", f"file:{tmp_path}/mlruns", store):
        assert resolve_uri(RunSpec(tracking=TrackingSpec(uri=uri))) == store, uri
    assert resolve_uri(RunSpec(tracking=TrackingSpec(uri="sqlite:///m.db"))) == f"sqlite:///{tmp_path / 'm.db'}"
    for uri in ("databricks", "databricks://profile", "http://user:pw@host:5000", "postgresql://u@db/mlflow"):
        assert resolve_uri(RunSpec(tracking=TrackingSpec(uri=uri))) == uri


def test_a_run_and_experiment_a_platform_hands_over_are_used(tmp_path, monkeypatch):
    """Issue 39: as Ultralytics' MLflow integration does, MLFLOW_EXPERIMENT_NAME names the experiment (the flag
    wins) and a run handed over in MLFLOW_RUN_ID is logged into instead of a new one; a handed run that is not in
    the store is refused before Ray, naming the variable."""
    from mlflow import MlflowClient

    from raytrain_yolo import fit
    from raytrain_yolo.core.cli import spec_from_args
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.core.tracking import RunTracker, check_reachable, resolve_uri

    uri = f"sqlite:///{tmp_path / 'platform.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("platform")).info.run_id
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    argv = ["--tracking-uri", uri, "--storage-path", str(tmp_path), "--name", "r"]
    assert spec_from_args(fit.build_parser().parse_args(argv), []).tracking.experiment == "from-env"
    spec = spec_from_args(fit.build_parser().parse_args([*argv, "--experiment", "flag"]), [])
    assert spec.tracking.experiment == "flag"
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    check_reachable(resolve_uri(spec), spec.tracking.experiment)
    assert RunTracker(spec).start({"ray/num_workers": 2}) == run_id
    run = client.get_run(run_id)
    assert run.data.params["ray/num_workers"] == "2" and run.info.status == "RUNNING"
    assert len(client.search_runs([run.info.experiment_id])) == 1 and client.get_experiment_by_name("flag") is None
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)
    with pytest.raises(UserError, match="MLFLOW_RUN_ID=0+ is not a run in"):
        check_reachable(resolve_uri(spec), spec.tracking.experiment)


def test_a_registered_version_is_loaded_only_while_its_weights_are_the_registered_ones(tmp_path):
    """Issue 44, 5: a `.pt` is a pickle, so `models:/` weights are trusted input; what can be checked is: rank 0
    records best.pt's SHA-256 as it uploads it, registration copies it onto the version, and val/predict compare
    the file before loading it. A changed file is refused in one line."""
    from mlflow import MlflowClient

    from raytrain_yolo.core.config import RunSpec, TrackingSpec
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.core.tracking import WEIGHTS_DIGEST_TAG, EpochLogger, RunTracker, file_sha256
    from raytrain_yolo.plan.job import resolve_model
    from test_plan import tiny_checkpoint

    uri = f"sqlite:///{tmp_path / 'registry.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("weights")).info.run_id
    save_dir = tmp_path / "train"
    (save_dir / "weights").mkdir(parents=True)
    best = tiny_checkpoint(save_dir / "weights" / "best.pt", imgsz=64)
    EpochLogger(uri, run_id).log_outputs(SimpleNamespace(wdir=save_dir / "weights", save_dir=save_dir))
    tracker = RunTracker(RunSpec(tracking=TrackingSpec(uri=uri, register_model="shapes")))
    tracker.client, tracker.run_id = client, run_id
    assert tracker.finish("FINISHED", {"best_checkpoint": str(best)}) == []
    version = client.get_model_version("shapes", "1")
    assert version.tags[WEIGHTS_DIGEST_TAG] == file_sha256(best)
    local = resolve_model("models:/shapes/1", uri)
    assert file_sha256(local) == file_sha256(best)
    with open(local, "ab") as f:
        f.write(b"\0")  # the node's copy changed after registration
    with pytest.raises(UserError, match="is not the file that was registered"):
        resolve_model("models:/shapes/1", uri)
