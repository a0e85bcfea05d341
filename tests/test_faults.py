"""Issues 6 and 22: a worker dies, the tracking server goes away, then the driver dies; the training finishes,
nothing is lost or counted twice."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from conftest import (SNAPSHOT, load_summary, mlflow_runs, registered_in, run_cli, start_cli, train_worker_pids,
                      wait_for)

EPOCHS = 4
HANG_TIMEOUT = 30  # seconds without progress on every rank: far above a step, a validation batch or a checkpoint here
ARGS = ("--cpu", "--no-validate-untrained", "--num-workers", 2, "--synthetic-train", 64, "--synthetic-val", 16, f"epochs={EPOCHS}", "imgsz=96")
PER_EPOCH = ("metrics/mAP50B", "train/box_loss", "lr/pg0", "throughput/epoch_seconds")


def registered_checkpoints(run_dir: Path) -> int:
    """How many checkpoints Ray has registered for the run in a local folder (conftest.registered_in)."""
    try:
        return len(registered_in(json.loads((run_dir / SNAPSHOT).read_text())))
    except (OSError, ValueError):
        return 0


def our_temp_folders() -> set[str]:
    """Our temporary folders in this machine's temp folder (a run's per-node scratch folder: staged and restored
    checkpoints, Ultralytics' save folder when the storage is `s3://`): a run must remove each one it made."""
    import glob

    return set(glob.glob(f"{tempfile.gettempdir()}/raytrain-yolo-*"))


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


def test_worker_then_driver_killed_the_same_run_finishes_once(tmp_path, mlflow_server):
    """One 2-rank run on a local folder meets three faults (once two runs, one fault each: a launch fewer, issue 20;
    a worker lost before the first checkpoint is test_multinode's fixed-size run's first fault, on the shared folder):
    1. a worker freezes (SIGSTOP) once the first checkpoint is registered, and the other rank waits for it in the
       next all-reduce (issue 41: once, the run stayed silent for the process group's 3 hours): after
       `--hang-timeout` the watchdog names the frozen rank (its pid, its state), writes every rank's stack under the
       run's folder and kills it; `--max-failures 1` restarts the worker group from that checkpoint, and each
       restore's temporary copy is removed once loaded;
    2. from that moment the MLflow server is unreachable (the path to it cut: new connections refused, open ones
       closed), across the restart, the next epoch and 3.: training goes on and says so;
    3. once the restarted group has registered a later checkpoint, the driver and the local Ray it started are killed
       (a lost head machine): no summary yet. The server answers again, and the same command, run again, resumes
       from the latest checkpoint and sends what MLflow missed from the checkpoint's history.
    The run logs to the session's real MLflow server over HTTP: at the end the server has exactly the one run,
    FINISHED, with its parameters, each per-epoch metric once per epoch and its artifacts (test_tracking's checks)."""
    from test_tracking import CuttableLink, check_one_finished_run

    link = CuttableLink(mlflow_server)
    link.up()
    uri, run_dir = link.uri, tmp_path / "ft"
    log = tmp_path / "fit.log"
    # The workers' temporary folder, this test's own (Ray's session folder stays where it always is). MLflow's own
    # retries stay as they are by default: they held rank 0, and every rank, for minutes in a cut (tracking.EpochLogger).
    worker_tmp = Path(tempfile.mkdtemp(prefix="rt-faults-"))
    env = {"TMPDIR": str(worker_tmp), "RAY_TMPDIR": tempfile.gettempdir()}
    cmd = (*ARGS, "--storage-path", tmp_path, "--name", "ft", "--tracking-uri", uri, "--max-failures", 1,
           "--hang-timeout", HANG_TIMEOUT)
    fit = start_cli("fit", *cmd, log_path=log, env=env)
    try:
        wait_for(lambda: registered_checkpoints(run_dir) >= 1 or fit.poll() is not None, 300,
                 what="the first checkpoint")
        assert fit.poll() is None, log.read_text()[-3000:]
        first = wait_for(lambda: train_worker_pids(fit.pid), 30, what="worker pids")
        victim = first[-1]
        link.cut()
        os.kill(victim, signal.SIGSTOP)
        # A restart and an epoch take about 30 s here; while rank 0 still used MLflow's retries in a cut, its first
        # call to the server sat in their backoff (about 4 minutes by MLflow's defaults), so this bound catches that.
        wait_for(lambda: registered_checkpoints(run_dir) >= 2 or fit.poll() is not None, 180 + HANG_TIMEOUT,
                 what="a checkpoint after the restart, with the tracking server cut")
        assert fit.poll() is None, log.read_text()[-3000:]
        restarted = set(train_worker_pids(fit.pid))
        left = [p.name for p in worker_tmp.glob("raytrain-yolo-*/rank*-restored")]
    finally:
        os.killpg(fit.pid, signal.SIGKILL)  # the driver and the local Ray it started: a lost head machine
        fit.wait(timeout=60)
        shutil.rmtree(worker_tmp, ignore_errors=True)
    try:
        text = log.read_text()
        assert restarted and victim not in restarted and not restarted & set(first[:-1]), "a new worker group trains"
        assert not left, f"each restored checkpoint's local copy must be removed once loaded: {left}"
        assert not (run_dir / "summary.json").exists(), text[-3000:]
        assert "does not answer" in text and "training goes on" in text, text[-3000:]
        hang = [line for line in text.splitlines() if line.startswith("hang: rank ")]
        assert len(hang) == 1 and f", pid {victim})" in hang[0] and "process state T" in hang[0], text[-3000:]
        stacks = {p.name: p.read_text() for p in run_dir.glob("hangs/*/rank*.txt")}
        assert len(stacks) == 2, stacks
        assert sum(f"pid {victim}:" in t and "process state T" in t for t in stacks.values()) == 1, stacks
        assert sum("most recent call first" in t for t in stacks.values()) == 1, stacks  # the waiting rank's stack
        link.up()
        proc = run_cli("fit", *cmd)
        assert proc.returncode == 0, proc.stderr[-3000:]
        s = assert_complete_once(tmp_path, "ft", uri)
        # Issue 41, 1: each rank's mean step time and data wait, in the summary and in MLflow.
        assert all(w["step_s"] > 0 and w["data_wait_s"] > 0 and w["steps"] >= 2 for w in s["workers"]), s["workers"]
        _, runs = mlflow_runs(uri)
        assert {f"ranks/{r}/{k}" for r in (0, 1) for k in ("step_s", "data_wait_s")} <= set(runs[0].data.metrics)
        check_one_finished_run(uri, s, "ft", epochs=EPOCHS)
        assert s["resumed_from_epoch"] >= 2, "the rerun resumes from the restarted group's checkpoint"
        assert not s.get("tracking_unsent"), s.get("tracking_unsent")
    finally:
        link.cut()
