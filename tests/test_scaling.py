"""Issue 2: DDP scaling is right: 1 and 2 workers with the same global batch and seed train alike."""

from __future__ import annotations

import pytest

from conftest import total_train_loss
from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.train.launch import launch


def small_spec(storage, name: str, workers: int) -> RunSpec:
    return RunSpec(
        train={"epochs": 4, "batch": 16, "imgsz": 128},
        scaling=ScalingSpec(num_workers=workers, use_gpu=False),
        synthetic=SyntheticSpec(train=96, val=32),
        tracking=TrackingSpec(enabled=False),
        storage_path=str(storage),
        name=name,
        validate_untrained=False,
    )


@pytest.mark.usefixtures("ray_local")
def test_one_and_two_workers_reach_comparable_losses(tmp_path):
    one = launch(small_spec(tmp_path, "w1", 1)).summary
    two = launch(small_spec(tmp_path, "w2", 2)).summary
    assert one["world_size"] == 1 and two["world_size"] == 2
    for s in (one, two):
        assert total_train_loss(s["history"][-1]) < total_train_loss(s["history"][0]), "both must learn"
    l1, l2 = total_train_loss(one["metrics"]), total_train_loss(two["metrics"])
    # A loss scaled by 0 (no learning) or by 2x (double step) shows up as a gap far beyond run-to-run noise.
    assert abs(l1 - l2) / l1 < 0.15, (l1, l2)
