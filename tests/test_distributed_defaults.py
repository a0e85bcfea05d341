"""Issue 13: defaults that hold across nodes, checked on the TorchTrainer that `launch()` builds (no Ray started)."""

from __future__ import annotations

import pytest

from raytrain_yolo.core.cli import spec_from_args
from raytrain_yolo.core.config import RunSpec, ScalingSpec
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.fit import build_parser
from raytrain_yolo.plan.request import check_run
from raytrain_yolo.plan import RunPlan
from raytrain_yolo.train.launch import build_trainer

ARGS = {"batch": 16, "epochs": 1, "model": "yolo26n.yaml"}


pytestmark = pytest.mark.quick  # no training run, no Ray cluster

def trainer_for(*argv: str):
    spec = spec_from_args(build_parser().parse_args(list(argv)), [])
    spec.scaling.num_workers, spec.scaling.use_gpu, spec.name = 2, False, "x"
    return spec, build_trainer(RunPlan(spec, ARGS, "detect"))


def test_process_group_timeout_is_ultralytics_three_hours_and_configurable():
    _, t = trainer_for()
    assert t.backend_config.timeout_s == 3 * 3600  # torch's default is 30 minutes
    _, t = trainer_for("--process-group-timeout", "600")
    assert t.backend_config.timeout_s == 600


def test_max_failures_bounds_preemption_restarts_too():
    """Ray 2.60 retries preemptions without limit unless told (`max_preemption_failures=-1`): --max-failures is the
    bound for both kinds of restart."""
    _, t = trainer_for("--max-failures", "2")
    assert t.run_config.failure_config.max_failures == 2
    assert t.run_config.failure_config.max_preemption_failures == 2
    _, t = trainer_for()
    assert t.run_config.failure_config.max_preemption_failures == 0


def test_elastic_range_and_resize_check_reach_ray():
    spec, t = trainer_for("--num-workers", "1-2", "--resize-check", "5")
    assert t.scaling_config.num_workers == (1, 2)
    assert t.scaling_config.elastic_resize_monitor_interval_s == 5


def test_bad_values_are_one_line(tmp_path):
    for argv, words in ((["--process-group-timeout", "0"], "--process-group-timeout"),
                        (["--resize-check", "-1"], "--resize-check")):
        spec = spec_from_args(build_parser().parse_args([*argv, "--storage-path", str(tmp_path)]), [])
        with pytest.raises(UserError, match=words):
            check_run(spec)


def test_allow_node_local_flag():
    spec = spec_from_args(build_parser().parse_args(["--allow-node-local"]), [])
    assert spec.allow_node_local and not RunSpec().allow_node_local
    assert ScalingSpec().pg_timeout_s == 10800
