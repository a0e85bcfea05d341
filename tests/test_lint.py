"""Names that do not exist fail only when their line runs; pyflakes finds them in every line, in a second."""

from __future__ import annotations

import pytest

import subprocess
import sys

from conftest import ROOT


pytestmark = pytest.mark.quick  # no training run, no Ray cluster

def test_no_undefined_names():
    proc = subprocess.run([sys.executable, "-m", "pyflakes", "raytrain_yolo", "tests"], cwd=ROOT,
                          capture_output=True, text=True)
    errors = [line for line in proc.stdout.splitlines() if "undefined name" in line or "redefinition" in line]
    assert not errors, "\n".join(errors)
