"""The accuracy sweep's search space and metric (`tune --objective map`), checked with Ultralytics' own argument
rules before Ray starts."""

from __future__ import annotations

from typing import Any

from raytrain_yolo.core.config import SearchDim
from raytrain_yolo.core.errors import UserError

NOT_SEARCHABLE = {
    "epochs": "it is every trial's length (ASHA's budget): set it as epochs=N",
    "data": "a sweep tunes one dataset: set it as data=...",
    "model": "a sweep tunes one model: set it as model=...",
}
TASK_METRICS = {"detect": "DetMetrics", "segment": "SegmentMetrics", "pose": "PoseMetrics", "obb": "OBBMetrics"}


def check_space(raw: Any, where: str, num_workers: int | None) -> dict[str, SearchDim]:
    """Ultralytics' tuner form `key: [min, max]` (an optional third number, Ultralytics' mutation gain, is
    ignored), plus `key: {min:, max:, log: true}`, `key: {choices: [...]}` and fixed values `key: value`.
    Each bound and choice must pass Ultralytics' own argument checks."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from raytrain_yolo.core.config import check_batch, validate_train_args

    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where} must map Ultralytics arguments to ranges, e.g. lr0: [1.0e-5, 1.0e-2]")
    space: dict[str, SearchDim] = {}
    for key, value in raw.items():
        if key in NOT_SEARCHABLE:
            raise UserError(f"'{key}' in {where} cannot be searched: {NOT_SEARCHABLE[key]}")
        dim = _dim(key, value, where)
        default = DEFAULT_CFG_DICT.get(key)
        for v in dim.values:
            try:
                validate_train_args({key: v})
            except UserError as e:
                raise UserError(f"{key}: {value} in {where}: {str(e).split(' (fix', 1)[0]}") from None
        if dim.kind == "range":
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise UserError(f"{key}: {value} in {where} is a range but {key} is not a number: "
                                f"list the values instead, {key}: {{choices: [...]}}")
            dim = SearchDim("range", dim.values, dim.log, integer=isinstance(default, int))
        if key == "batch" and num_workers:
            for v in dim.values:
                check_batch(v, num_workers)
        space[key] = dim
    return space


def _dim(key: str, value: Any, where: str) -> SearchDim:
    fix = f"write {key}: [min, max], {key}: {{choices: [a, b]}} or {key}: value"
    if isinstance(value, dict):
        if set(value) == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
            return SearchDim("choice", tuple(value["choices"]))
        if {"min", "max"} <= set(value) <= {"min", "max", "log"}:
            return _range(key, [value["min"], value["max"]], where, log=bool(value.get("log", False)))
        raise UserError(f"{key}: {value} in {where} is not a range or a list of choices: {fix}")
    if isinstance(value, list):
        if 2 <= len(value) <= 3 and all(_number(v) for v in value):
            return _range(key, value[:2], where)
        raise UserError(f"{key}: {value} in {where} is not [min, max]: {fix}")
    return SearchDim("fixed", (value,))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range(key: str, bounds: list, where: str, log: bool = False) -> SearchDim:
    lo, hi = bounds
    if not (_number(lo) and _number(hi)) or lo >= hi:
        raise UserError(f"{key}: [{lo}, {hi}] in {where} must have min < max (for one value write {key}: {lo})")
    if log and lo <= 0:
        raise UserError(f"{key}: log range in {where} must start above 0, not {lo}")
    return SearchDim("range", (lo, hi), log)


def check_metric(name: str, task: str) -> str:
    """The metric ASHA/PBT/Optuna follow: `fitness` or one of the task's validation metrics (all: higher is
    better). Short forms name the box metric: `mAP50-95` is `metrics/mAP50-95(B)`."""
    from ultralytics.utils import metrics

    names = ["fitness", *getattr(metrics, TASK_METRICS.get(task, "DetMetrics"))().keys]
    for full in names:
        if name in (full, full.removeprefix("metrics/"), full.removeprefix("metrics/").removesuffix("(B)")):
            return full
    raise UserError(f"--metric {name} is not a {task} validation metric: use one of {', '.join(names)}")
