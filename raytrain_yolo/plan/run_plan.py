"""`RunPlan`: what one run is, resolved once, and the record of it kept with the run."""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from raytrain_yolo.core import storage
from raytrain_yolo.core.config import RunSpec

PLAN_FILE = "plan.json"  # beside the run's checkpoints: <storage>/<name>/plan.json
PLAN_VERSION = 1


@dataclass(frozen=True)
class RunPlan:
    """A checked request, frozen: the only input of `train.launch.launch`.

    - `spec`: the request with its name, storage and workers resolved (the workers fitted to the cluster);
    - `train_args`: the Ultralytics arguments exactly as `YOLO(model).train(**args)` resolves them (the user's keys
      over a `cfg=` file's, or over the checkpoint's own `imgsz`/`single_cls`, over the embedded defaults), paths
      absolute; `task` the model's task;
    - `finished`: the summary of the run of this name when it already finished with this plan (nothing to train);
    - `taken`: lines naming what a resumed run takes from this request that it was not started with (what
      Ultralytics' resume may change: `rerun.RESUME_MAY_CHANGE`).
    Treat the mappings as read-only: `spec`/`train_args` of a plan are copies owned by it.
    """

    spec: RunSpec
    train_args: dict[str, Any]
    task: str
    finished: dict[str, Any] | None = None
    taken: tuple[str, ...] = field(default=())

    def args(self) -> dict[str, Any]:
        """A copy of the Ultralytics arguments, for a worker to extend."""
        return copy.deepcopy(self.train_args)

    def record(self) -> dict[str, Any]:
        """What is kept with the run (`plan.json`, each checkpoint's state): JSON, every URI's credentials masked.
        `asked` is what a rerun compares (rerun.compare); the rest says where and how it ran."""
        s = self.spec
        asked = {"train_args": self.train_args, "task": self.task, "loader": s.loader, "prefetch": s.prefetch,
                 "synthetic": asdict(s.synthetic) if s.is_synthetic else None}
        out = {
            "version": PLAN_VERSION,
            "name": s.name,
            "storage_path": s.storage_path,
            "asked": asked,
            "scaling": asdict(s.scaling),
            "max_failures": s.max_failures,
            "tracking": {"enabled": s.tracking.enabled, "uri": s.tracking.uri, "experiment": s.tracking.experiment,
                         "register_model": s.tracking.register_model},
            "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        return json.loads(storage.redact(json.dumps(out, default=str)))


def write_record(plan: RunPlan) -> str:
    """`<run>/plan.json`, rewritten by every attempt (a resume that took a change records it). Returns its path."""
    path = f"{plan.spec.run_dir}/{PLAN_FILE}"
    storage.write_text(path, json.dumps(plan.record(), indent=2))
    return path


def read_record(run_dir: str) -> dict[str, Any] | None:
    """The plan recorded with the run at `run_dir`; None for a new run (or one made before plans were kept)."""
    try:
        text = storage.read_text(f"{run_dir}/{PLAN_FILE}")
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None
