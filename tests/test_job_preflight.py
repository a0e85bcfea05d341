"""Issue 17, part 4: val and predict go through fit's node check (check_nodes) for what their workers
read: model=, data= or source=. A single node cannot lack a driver's file, so this checks the probe each other
node runs (a plain function here, a Ray task there) and the flags; tests/multinode.py has the real nodes."""

from __future__ import annotations

import pytest

import uuid

from raytrain_yolo.plan.nodes import check_nodes, probe_node


pytestmark = pytest.mark.quick  # no training run, no Ray cluster

def test_probe_names_the_first_input_a_node_lacks(tmp_path):
    model = tmp_path / "best.pt"
    model.write_bytes(b"x")
    inputs = {f"model={model}": str(model), "source=/only-on-the-driver": str(tmp_path / "only-on-the-driver"),
              "data=/nope": str(tmp_path / "nope")}
    answer = probe_node({}, uuid.uuid4().hex, None, [], "", inputs)
    assert answer["missing"] == "source=/only-on-the-driver" and not answer["gloo_loopback"]
    assert probe_node({}, "t", None, [], "", {f"model={model}": str(model)})["missing"] is None
    assert probe_node({}, "t", None, [], "gloo")["missing"] is None  # fit's call: no inputs


def test_val_and_predict_take_allow_node_local():
    from raytrain_yolo import predict, val

    for module in (val, predict):
        ns = module.build_parser().parse_args(["--allow-node-local", "model=m.pt"])
        assert ns.allow_node_local is True
        assert module.build_parser().parse_args(["model=m.pt"]).allow_node_local is False
