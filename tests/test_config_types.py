"""Issue 14: a --config file's values are type-checked when it is read, with one line naming the key and the fix."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from conftest import run_cli
from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.core.errors import UserError


pytestmark = pytest.mark.quick  # no training run, no Ray cluster

def test_a_quoted_number_ends_at_once_with_one_line(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text('scaling:\n  num_workers: "4"\n')
    proc = run_cli("fit", "--config", cfg, "--no-tracking", "--storage-path", tmp_path, timeout=120, ray="none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: --config {cfg}: scaling.num_workers: '4' is a string"), last
    assert "whole number" in last and "num_workers: 4" in last
    assert "Traceback" not in proc.stderr


def _wrong_value(hint) -> object:
    """A value of the wrong type for a field typed `hint`."""
    args = set(typing.get_args(hint)) or {hint}
    if str in args or dict in args or typing.get_origin(hint) is dict:
        return 12
    return "12"


SECTIONS = {"scaling": ScalingSpec, "synthetic": SyntheticSpec, "tracking": TrackingSpec}


@pytest.mark.parametrize("section, field", [
    (section, f.name) for section, typ in [(None, RunSpec), *SECTIONS.items()] for f in dataclasses.fields(typ)
])
def test_every_typed_field_is_checked(section, field):
    typ = SECTIONS[section] if section else RunSpec
    hint = typing.get_type_hints(typ)[field]
    values = {field: _wrong_value(hint)}
    with pytest.raises(UserError) as e:
        RunSpec.from_dict({section: values} if section else values)
    where = f"{section}.{field}" if section else field
    assert str(e.value).startswith(f"{where}: "), str(e.value)


@pytest.mark.parametrize("values", [
    {"scaling": {"num_workers": 4, "cpus_per_worker": 2, "use_gpu": None}},
    {"scaling": {"cpus_per_worker": 0.5, "use_gpu": True}},
    {"resource_wait_s": 30, "max_failures": -1, "validate_untrained": False, "train": {"batch": 8}},
])
def test_right_types_pass(values):
    RunSpec.from_dict(values)


def test_bool_is_not_a_number():
    with pytest.raises(UserError, match="synthetic.train: True is a boolean"):
        RunSpec.from_dict({"synthetic": {"train": True}})
