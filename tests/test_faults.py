"""Issue 6: a worker or the driver dies; the training finishes, nothing is lost or counted twice."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from conftest import load_summary, mlflow_runs, run_cli, start_cli, train_worker_pids, wait_for

EPOCHS = 4
ARGS = ("--cpu", "--no-validate-untrained", "--num-workers", 2, "--synthetic-train", 64, "--synthetic-val", 16, f"epochs={EPOCHS}", "imgsz=96")
PER_EPOCH = ("metrics/mAP50B", "train/box_loss", "lr/pg0", "throughput/epoch_seconds")


def registered_checkpoint(run_dir: Path) -> bool:
    """A checkpoint Ray has registered (its snapshot names one), not just a folder being uploaded."""
    snapshot = run_dir / "checkpoint_manager_snapshot.json"
    try:
        return bool(json.loads(snapshot.read_text()).get("checkpoint_results"))
    except (OSError, ValueError):
        return False


def assert_complete_once(storage: Path, name: str, uri: str):
    s = load_summary(storage, name)
    assert s["epochs_completed"] == EPOCHS
    assert [h["epoch"] for h in s["history"]] == list(range(1, EPOCHS + 1)), "each epoch once, in order"
    assert s["resumed_from_epoch"] and s["resumed_from_epoch"] >= 1, "the restart must resume, not start over"
    rows = list(csv.DictReader(open(Path(s["last_checkpoint"]).parent / "results.csv")))
    assert [int(float(r["epoch"])) for r in rows] == list(range(1, EPOCHS + 1))
    client, runs = mlflow_runs(uri)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    for key in PER_EPOCH:
        steps = [m.step for m in client.get_metric_history(runs[0].info.run_id, key)]
        assert sorted(steps) == list(range(1, EPOCHS + 1)), (key, steps)
    return s


def test_worker_killed_with_max_failures_restarts_from_the_checkpoint(tmp_path, mlflow_server):
    """Logged to a real MLflow server over HTTP (the session's): after the restart the server has exactly the one
    run, FINISHED, with its parameters, each per-epoch metric once per epoch and its artifacts (test_tracking's
    checks; the server's run was once a launch of its own there)."""
    from test_tracking import check_one_finished_run

    uri = mlflow_server
    log = tmp_path / "fit.log"
    # The workers' temporary folder, this test's own (Ray's session folder stays where it always is).
    worker_tmp = Path(tempfile.mkdtemp(prefix="rt-faults-"))
    env = {"TMPDIR": str(worker_tmp), "RAY_TMPDIR": tempfile.gettempdir()}
    fit = start_cli("fit", *ARGS, "--storage-path", tmp_path, "--name", "ft", "--tracking-uri", uri,
                    "--max-failures", 1, log_path=log, env=env)
    try:
        wait_for(lambda: registered_checkpoint(tmp_path / "ft"), 300, what="the first checkpoint")
        victim = wait_for(lambda: train_worker_pids(fit.pid), 30, what="worker pids")[-1]
        os.kill(victim, signal.SIGKILL)
        rc = fit.wait(timeout=600)
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
        left = [p.name for p in worker_tmp.glob("raytrain-yolo-resume-*")]
        shutil.rmtree(worker_tmp, ignore_errors=True)
    assert rc == 0, log.read_text()[-3000:]
    s = assert_complete_once(tmp_path, "ft", uri)
    check_one_finished_run(uri, s, "ft", epochs=EPOCHS)
    assert victim not in [w["pid"] for w in s["workers"]], "the finished run must be the restarted worker group"
    assert not left, f"each restored checkpoint's local copy must be removed once loaded: {left}"


def test_driver_killed_then_same_command_resumes(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = (*ARGS, "--storage-path", tmp_path, "--name", "again", "--tracking-uri", uri)
    fit = start_cli("fit", *cmd, log_path=tmp_path / "first.log")
    try:
        wait_for(lambda: registered_checkpoint(tmp_path / "again"), 300, what="the first checkpoint")
    finally:
        os.killpg(fit.pid, signal.SIGKILL)  # the driver and the local Ray it started: a lost head machine
        fit.wait(timeout=60)
    assert not (tmp_path / "again" / "summary.json").exists()
    proc = run_cli("fit", *cmd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_complete_once(tmp_path, "again", uri)
