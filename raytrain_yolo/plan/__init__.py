"""The run plan: one request resolved once, on the driver, before Ray starts (`prepare(spec) -> RunPlan`).

Its floor sits above `core/` (the checks it calls) and below the jobs (`fit`, the sweeps, the benchmark) and
`train/launch.py`, which runs a plan and checks nothing itself; nothing in `core/` or `data/` imports it.

- `run_plan.py`: the frozen `RunPlan`, and the record of it kept with the run (`plan.json`, secrets masked);
- `rerun.py`: a rerun with the same `--name` compared with that record (finished, resumable, refused);
- `prepare.py`: the steps in order: request, rerun, inputs, cluster.
"""

from raytrain_yolo.plan.prepare import prepare
from raytrain_yolo.plan.run_plan import RunPlan

__all__ = ["RunPlan", "prepare"]
