"""Issue 22: fault paths that need no training run. A retry's parameters, save=False, the driver's network
interface names, and credentials inside URIs. Real MLflow stores and files; no Ray."""

from __future__ import annotations

import json
import shutil

import pytest

from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.core.errors import UserError

pytestmark = pytest.mark.quick


def test_save_false_is_refused_before_ray_starts(tmp_path):
    """Ray Train restarts from the last.pt in each checkpoint, and the run ends with best.pt/last.pt: without
    save, a restart failed with "Resume checkpoint not found"."""
    from raytrain_yolo.core.preflight import check_run

    def spec(**kw) -> RunSpec:
        return RunSpec(train={"save": False, "epochs": 1}, scaling=ScalingSpec(num_workers=1, use_gpu=False),
                       synthetic=SyntheticSpec(train=8, val=4), tracking=TrackingSpec(enabled=False),
                       storage_path=str(tmp_path), name="nosave", **kw)

    with pytest.raises(UserError) as e:
        check_run(spec())
    msg = str(e.value)
    assert msg.startswith("save=False") and "drop save=False" in msg and "\n" not in msg, msg
    check_run(spec(window_steps=2, max_windows=1))  # a throughput trial never checkpoints: save=False is its own


def test_the_driver_network_interface_names_stay_on_the_driver(monkeypatch):
    """Each node's own GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME apply: the driver's interface name (eth0) may not
    exist on another node (ens5), and gloo/NCCL then fail there."""
    from raytrain_yolo.core.cluster import worker_env

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "driver-eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "driver-eth0")
    monkeypatch.setenv("YOLO_CONFIG_DIR", "/tmp/yolo-config")
    env = worker_env()
    assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env
    assert env["YOLO_CONFIG_DIR"] == "/tmp/yolo-config" and env["YOLO_OFFLINE"] == "1"
