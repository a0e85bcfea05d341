"""The floors of the package hold (issue 39): `core/` and `data/` import nothing above them, `plan/` no job and
no sweep; and no function of `plan/` is over 60 lines. Read from the source, in a second."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "raytrain_yolo"
ABOVE = {  # folder -> the subpackages and job modules it must not import (at module level or inside a function)
    "core": ("plan", "train", "sweep", "bench", "fit", "tune", "val", "predict"),
    "data": ("plan", "train", "sweep", "bench", "fit", "tune", "val", "predict"),
    "plan": ("sweep", "bench", "fit", "tune", "val", "predict"),
}

pytestmark = pytest.mark.quick  # no training run, no Ray cluster


def imported(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def test_no_floor_imports_one_above_it():
    wrong = []
    for folder, above in ABOVE.items():
        for path in (PACKAGE / folder).rglob("*.py"):
            for module in imported(path):
                parts = module.split(".")
                if parts[0] == "raytrain_yolo" and len(parts) > 1 and parts[1] in above:
                    wrong.append(f"{path.relative_to(PACKAGE)} imports {module}")
    assert not wrong, wrong


def test_plan_functions_are_short():
    long = [f"{p.name}:{n.name} {n.end_lineno - n.lineno + 1} lines" for p in (PACKAGE / "plan").rglob("*.py")
            for n in ast.walk(ast.parse(p.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))
            and n.end_lineno - n.lineno + 1 > 60]
    assert not long, long
