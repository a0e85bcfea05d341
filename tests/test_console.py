"""Issue 14: a default `fit` as a new user runs it: a readable console, the full log in the run folder, offline.

One run, from a fresh working directory, with nothing but the embedded defaults made small. It runs with all
outbound connections impossible (its own network namespace with only loopback up, where this machine allows
one) and with every Python process of the run (the CLI, Ray's processes, the Train workers) recording each
attempt to reach another host (tests/netaudit/sitecustomize.py).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT, load_summary

EPOCHS = 2  # one line per epoch: two epochs tell lines apart from a single line
NETAUDIT = Path(__file__).parent / "netaudit"


def _isolated() -> list[str]:
    """A command prefix that runs in a new network namespace with only loopback, when this machine allows it."""
    if not (shutil.which("unshare") and shutil.which("ip")):
        return []
    probe = subprocess.run(["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True)
    return ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh"] if probe.returncode == 0 else []


@pytest.fixture(scope="module")
def default_fit(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("newuser")
    audit = cwd / "network-attempts.log"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "YOLO_OFFLINE", "MLFLOW_TRACKING_URI", "RAY_AUTH_MODE",
                        "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S")}  # Ray's defaults
    # A new user's Ultralytics settings: its defaults, written on first use (the suite's own has MLflow off, conftest).
    env.update(PYTHONUNBUFFERED="1", NETAUDIT_LOG=str(audit), YOLO_CONFIG_DIR=str(cwd / "ultralytics-settings"),
               PYTHONPATH=os.pathsep.join([str(NETAUDIT), str(ROOT), env.get("PYTHONPATH", "")]))
    prefix = _isolated()
    proc = subprocess.run(
        [*prefix, sys.executable, "-m", "raytrain_yolo.fit", "--name", "first", "--synthetic-train", "64",
         "--synthetic-val", "16", f"epochs={EPOCHS}", "imgsz=96"],
        capture_output=True, text=True, timeout=900, env=env, cwd=cwd,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    storage = cwd / "runs" / "raytrain"
    return proc, storage, load_summary(storage, "first"), audit, bool(prefix)


def test_one_line_per_epoch_then_the_table(default_fit):
    proc, storage, summary, _, _ = default_fit
    out = proc.stdout.splitlines()
    if out and out[0].startswith("Creating new Ultralytics Settings"):  # a new machine: Ultralytics says so, once
        notice, out = out[:3], out[3:]
        assert "yolo settings" in notice[-1], proc.stdout
    log = storage / "first" / "run.log"
    assert str(log) in out[0], "the first line names the log file"
    epochs = [line for line in out if line.startswith("epoch ")]
    assert len(epochs) == EPOCHS, proc.stdout
    for n, line in enumerate(epochs, 1):
        assert line.startswith(f"epoch {n}/{EPOCHS}") and "box " in line and "mAP50(B) " in line, line
        assert re.search(r"\d+\.\d img/s", line) and "ETA " in line, line
    table = [line for line in out if line.startswith(("run ", "epochs ", "metrics/mAP50(B) ", "summary "))]
    assert len(table) >= 4, proc.stdout
    # Nothing else: no worker output, no Ray progress reports (a 20-epoch run printed ~530 lines before).
    assert len(out) <= EPOCHS + 25, proc.stdout
    # Ray's own start-up warnings only (in the namespace, also that it found no route to guess its node IP).
    errs = [line for line in proc.stderr.splitlines() if line.strip() and "network_util.cc" not in line]
    assert len(errs) <= 2 and all("WARNING" in line for line in errs), proc.stderr
    for noise in ("RayTrainWorker", "TrainController", "Reporting training result", "Epoch    GPU_mem"):
        assert noise not in proc.stdout + proc.stderr, noise


def test_the_log_file_holds_the_full_worker_log(default_fit):
    _, storage, summary, _, _ = default_fit
    text = (storage / "first" / "run.log").read_text(errors="replace")
    world = summary["world_size"]
    for rank in range(world):
        assert f"rank {rank} of {world}" in text
    assert f"Starting training for {EPOCHS} epochs" in text  # Ultralytics, rank 0
    assert text.count("Reporting training result") >= EPOCHS * world  # Ray Train, every rank
    assert "all         16" in text  # Ultralytics' validation table, driver (untrained baseline) and rank 0


def test_one_store_in_the_working_directory(default_fit):
    proc, storage, summary, _, _ = default_fit
    cwd = storage.parent.parent
    assert summary["tracking_uri"] == f"sqlite:///{cwd / 'mlflow.db'}"
    assert (cwd / "mlflow.db").is_file()


# Ray's dashboard asks the cloud metadata service what machine it runs on when it starts, whatever the usage-stats
# setting (ray/_common/usage/usage_lib.py, get_cloud_from_metadata_requests); Ray has no setting to stop it, and
# `include_dashboard=False` still loads exactly that module. Everything else must stay on this machine.
RAY_CLOUD_PROBE = ("169.254.169.254", "metadata.google.internal")


def test_no_network_calls(default_fit):
    _, _, summary, audit, isolated = default_fit
    lines = audit.read_text().splitlines() if audit.exists() else []
    attempts = "\n".join(line for line in lines
                          if not ("ray/dashboard/dashboard.py" in line and any(h in line for h in RAY_CLOUD_PROBE)))
    assert attempts == "", f"the run tried to reach other hosts (isolated={isolated}):\n{attempts[:3000]}"
    assert summary["untrained_metrics"] is not None  # the driver's Ultralytics validation ran too
