"""Shared fixtures: real Ray, real Ultralytics, tiny synthetic data generated once per test session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """One dataset cache for the whole session, shared by in-process runs and CLI subprocesses."""
    cache = os.environ.get("RAYTRAIN_YOLO_CACHE") or str(tmp_path_factory.mktemp("synthetic-cache"))
    os.environ["RAYTRAIN_YOLO_CACHE"] = cache
    return Path(cache)


@pytest.fixture(scope="module")
def ray_local():
    """A local Ray for in-process launches in one test module (2 CPUs, as CI has)."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    yield ray
    ray.shutdown()


def run_cli(module: str, *args: str, timeout: float = 900, env: dict | None = None, cwd=None):
    """Run `python -m raytrain_yolo.<module> args...` as users do; return the CompletedProcess."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env.pop("RAY_ADDRESS", None) if env is None or "RAY_ADDRESS" not in env else None
    return subprocess.run(
        [sys.executable, "-m", f"raytrain_yolo.{module}", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


def load_summary(storage: Path, name: str) -> dict:
    return json.loads((storage / name / "summary.json").read_text())


def total_train_loss(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("train/") and k.endswith("_loss"))
