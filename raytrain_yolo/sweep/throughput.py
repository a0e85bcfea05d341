"""Throughput sweeps with Ray Tune: each trial is a real, short `launch()` of the training loop.

A trial trains until it has measured `windows` windows of `window_steps` steady steps and reports images/s
after each window, so ASHA can stop slow trials early. Trials take turns on worker groups kept up for the sweep
(sweep/warm.py; rank 0's reports come back through the pool), or with `--fresh-trials` each runs a Ray Train run
of its own (its reports through Ray Train's `TuneReportCallback`). Impossible
points (batch not divisible by the workers, AMP on CPU, more loader workers than a node has cores) and crashes
(out of memory) become rows with a reason; the sweep goes on.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

import yaml

from raytrain_yolo.core import storage
from raytrain_yolo.core.config import RunSpec, check_batch, check_name, default_name, resolve_train_args
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.tracking import client_settings, use_client_settings
from raytrain_yolo.sweep.trials import close_trial_runs, fit_tuner, trial_name
from raytrain_yolo.sweep.warm import warm_pool
from raytrain_yolo.train.worker import IPS_KEY

# Knobs a sweep can turn: Ultralytics arguments, plus Ray's worker count.
TRAIN_KNOBS = ("batch", "workers", "amp", "cache", "compile", "channels_last", "deterministic")
KNOBS = TRAIN_KNOBS + ("num_workers", "loader", "prefetch")
TRIAL_DRIVER_CPU = 0.1  # the trial function only waits on its TorchTrainer; its workers get the rest
TRIAL_RESOURCE_GRACE_S = 30.0  # a trial waits at most this long for the resources a finished trial still holds


@dataclass
class SweepSpace:
    """Values to try for each knob; knobs left empty keep the base configuration's value."""

    batch: list[int] = field(default_factory=list)
    workers: list[int] = field(default_factory=list)
    amp: list[str] = field(default_factory=list)  # fp16, bf16, fp32
    cache: list[str] = field(default_factory=list)  # none, ram, disk
    compile: list[Any] = field(default_factory=list)
    channels_last: list[bool] = field(default_factory=list)
    deterministic: list[bool] = field(default_factory=list)
    num_workers: list[int] = field(default_factory=list)
    loader: list[str] = field(default_factory=list)  # ultralytics, device, device-decoded, device-jpeg, ...
    prefetch: list[bool] = field(default_factory=list)  # device loaders: the next batch built during the step

    def grid(self) -> dict[str, list]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v}


@dataclass
class SweepBudget:
    window_steps: int = 10  # steady steps per measurement window
    windows: int = 4  # windows per trial (ASHA's max_t)
    grace_windows: int = 1  # windows every trial gets before ASHA may stop it
    early_stop: bool = True
    max_concurrent: int | None = None  # default: as many trials as the cluster's GPUs (or CPUs) fit at once
    warm: bool = True  # trials run on worker groups kept for the sweep (sweep/warm.py); False: a Ray Train run each


def default_space(use_gpu: bool, gpus_per_trial: int, cpus_per_node: int, gpu_mem_gb: float) -> SweepSpace:
    """Sensible first grid for the hardware found: batch per GPU 16..128 (by memory), loader workers, AMP, cache."""
    if not use_gpu:
        return SweepSpace(batch=[8, 16], amp=["fp32"], cache=["none", "ram"])
    per_gpu = [16, 64, 128] if gpu_mem_gb >= 24 else [16, 32, 64]
    cores = max(1, cpus_per_node // max(gpus_per_trial, 1))
    return SweepSpace(
        batch=[b * gpus_per_trial for b in per_gpu],
        workers=sorted({min(8, cores), cores}),
        amp=["fp16", "bf16"],
        cache=["none", "ram"],
    )


def knob_args(knobs: dict[str, Any]) -> dict[str, Any]:
    """Knob values as Ultralytics arguments (`cache: none` means False)."""
    args = {k: v for k, v in knobs.items() if k in TRAIN_KNOBS}
    if "cache" in args and str(args["cache"]).lower() in ("none", "false"):
        args["cache"] = False
    return args


def best_config(base: RunSpec, knobs: dict[str, Any]) -> dict[str, Any]:
    """A `--config` file for `fit`: the base configuration with the winning knobs, optimizer named."""
    train = {**base.train, **knob_args(knobs)}
    if str(train.get("optimizer", "auto")).lower() == "auto":
        train["optimizer"] = "SGD"  # what the trials measured; `auto` picks by run length
    scaling = dataclasses.asdict(base.scaling)
    if "num_workers" in knobs:
        scaling["num_workers"] = knobs["num_workers"]
    out = {"train": train, "scaling": scaling, "loader": knobs.get("loader", base.loader),
           "prefetch": knobs.get("prefetch", base.prefetch)}
    if base.is_synthetic:
        out["synthetic"] = dataclasses.asdict(base.synthetic)
    return out


def trial_spec(base: RunSpec, knobs: dict[str, Any], trial_name: str, budget: SweepBudget) -> RunSpec:
    spec = RunSpec.from_dict({**base.to_dict(), **best_config(base, knobs)})  # what best.yaml would run
    # Train long enough to fill the windows; no per-epoch validation, plots or checkpoints in a trial.
    spec.train.update(epochs=1000, val=False, plots=False, save=False)
    spec.train.pop("patience", None)
    spec.window_steps, spec.max_windows = budget.window_steps, budget.windows
    return as_trial(spec, base, trial_name)


def worker_cpus_beside_trial(cpus: float, workers: int, cpus_per_worker: float) -> float:
    """Each CPU worker's share when `workers` of them and their trial (TRIAL_DRIVER_CPU) share the cluster's `cpus`:
    at most `cpus_per_worker`, in steps of 0.05 CPU (seen: a 1-CPU driver starves 2 x 1-CPU workers). Both sweeps
    size their trials with it. Raises UserError when nothing is left for the workers."""
    share = min(cpus_per_worker, math.floor((cpus - TRIAL_DRIVER_CPU) / workers * 20) / 20)
    if share <= 0:
        raise UserError(f"{workers} workers per trial do not fit the cluster's {cpus:g} CPUs next to the trial "
                        "itself: lower --num-workers")
    return share


def trials_side_by_side(use_gpu: bool, workers_per_trial: int, cpus_per_worker: float) -> int:
    """How many trials the cluster's *free* resources hold at once now (at least 1): each trial's workers and the
    trial itself (TRIAL_DRIVER_CPU). On a shared cluster, counting the total would start trials whose workers find
    no free CPUs or GPUs, wait, and are then recorded failed; Tune holds the others until one ends."""
    import ray

    free = ray.available_resources()
    if use_gpu:
        return max(1, int(free.get("GPU", 0) + 1e-6) // workers_per_trial)
    need = workers_per_trial * cpus_per_worker + TRIAL_DRIVER_CPU
    return max(1, int((float(free.get("CPU", 0)) + 1e-6) // need))


def as_trial(spec: RunSpec, base: RunSpec, name: str) -> RunSpec:
    """What every sweep's trial run shares: its folder under the sweep's `trials/`, no untrained validation, and a
    bounded wait for the CPUs a trial Tune just stopped or paused still holds (its Train controller dies with the
    trial; Ray Train's PlacementGroupCleaner removes the workers' placement group about a second later)."""
    spec.storage_path, spec.name = f"{base.run_dir}/trials", name
    spec.validate_untrained = False
    spec.resource_wait_s = max(spec.resource_wait_s, TRIAL_RESOURCE_GRACE_S)
    return spec


def infeasible_reason(spec: RunSpec, max_node_cpus: int) -> str | None:
    """Points that cannot run, known before starting them."""
    t = spec.train
    try:
        check_batch(t.get("batch", 16), spec.scaling.num_workers, spec.scaling.min_workers)
    except UserError as e:
        return str(e)
    if not spec.scaling.use_gpu and t.get("amp") in ("fp16", "bf16"):
        return f"amp={t['amp']} needs a GPU (CPU workers train in fp32)"
    workers = t.get("workers")
    if isinstance(workers, int) and workers > max_node_cpus:
        return f"workers={workers} dataloader workers exceed the {max_node_cpus} CPUs of the largest node"
    return None


def run_trial(config: dict[str, Any], mlflow_settings: dict[str, str] | None = None, base: dict | None = None,
              pool=None) -> None:
    """Tune's function trainable: one real training launch, reporting images/s per window. `mlflow_settings`: the
    sweep driver's MLflow client settings (tracking.client_settings); `base`: the sweep's RunSpec as a dict. Both
    reach the trial through Ray's object store (`tune.with_parameters`), never Tune's param_space, which Tune
    writes to params.json/params.pkl/result.json and prints: they may hold credentials (a tracking URI's).
    `pool`: the sweep's warm groups (sweep/warm.GroupPool), or None for a Ray Train run of the trial's own."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from raytrain_yolo.core.cli import root_cause
    from raytrain_yolo.plan import prepare
    from raytrain_yolo.train.launch import launch

    use_client_settings(mlflow_settings)
    base = RunSpec.from_dict(base)
    budget = SweepBudget(**config["budget"])
    knobs = {k: config[k] for k in KNOBS if k in config}
    spec = trial_spec(base, knobs, tune.get_context().get_trial_name(), budget)
    done = {IPS_KEY: 0.0, "window": budget.windows + 1}  # ends the trial for ASHA; 0 images/s sorts it last
    reason = infeasible_reason(spec, config["max_node_cpus"])
    if reason:
        tune.report({**done, "status": "infeasible", "reason": reason})
        return
    try:
        if pool is not None:
            from raytrain_yolo.sweep.warm import WarmTrial

            launch(prepare(spec, inputs_checked=True, placed=True),
                   group=WarmTrial(pool, lambda metrics, _: tune.report(metrics)))
        else:
            launch(prepare(spec, inputs_checked=True), callbacks=[TuneReportCallback()])
    except UserError as e:
        tune.report({**done, "status": "infeasible", "reason": str(e)})
    except Exception as e:  # noqa: BLE001 - a crashed trial is a result (out of memory is the usual one)
        cause = root_cause(e)
        status = "out of memory" if "out of memory" in cause.lower() else "failed"
        tune.report({**done, "status": status, "reason": cause[:300]})


@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    paths: dict[str, str]


def summarize_trial(result, knobs_present: list[str], budget: SweepBudget) -> dict[str, Any]:
    config = result.config or {}  # None for a trial that never reported (its actor did not start: a lost node)
    row: dict[str, Any] = {k: config.get(k) for k in knobs_present}
    row["trial"] = result.path.rstrip("/").rsplit("/", 1)[-1] if result.path else None
    df = result.metrics_dataframe
    records = [] if df is None else df.to_dict("records")
    windows = [r for r in records if not isinstance(r.get("status"), str) and r.get(IPS_KEY) is not None]
    ips = [float(r[IPS_KEY]) for r in windows]
    status_rec = next((r for r in reversed(records) if isinstance(r.get("status"), str)), None)
    row["windows"] = len(ips)
    row["images_per_second"] = sum(ips) / len(ips) if ips else None
    mem = [r.get("system/gpu_mem_gb") for r in windows]  # missing in a row of the dataframe reads as NaN
    row["gpu_mem_gb"] = max((float(m) for m in mem if m is not None and not math.isnan(m)), default=None)
    if status_rec:
        row["status"], row["reason"] = status_rec["status"], status_rec.get("reason")
    elif result.error:
        from raytrain_yolo.core.cli import root_cause

        row["status"], row["reason"] = "failed", root_cause(result.error)[:300]
    elif len(ips) >= budget.windows:
        row["status"], row["reason"] = "ok", None
    else:
        row["status"], row["reason"] = "stopped early", f"slower than the others after {len(ips)} windows (ASHA)"
    return row


def run_sweep(base: RunSpec, space: SweepSpace, budget: SweepBudget) -> SweepResult:
    """Run the sweep and write results.parquet, best.yaml and throughput.png under `<storage>/<name>/`."""
    from raytrain_yolo.core.cluster import connect_ray
    from raytrain_yolo.core.tracking import RunTracker, failed_on_error, resolve_uri

    connect_ray(base.verbose)
    base.name = check_name(base.name or default_name("tune"))
    base.storage_path = storage.normalise(base.storage_path)
    if base.tracking.enabled:  # trials run in folders of their own: give them this sweep's store, resolved here
        base.tracking.uri = resolve_uri(base)
    grid, max_node_cpus = size_trials(base, space, budget)
    base = check_once(base, budget)

    tracker = RunTracker(base) if base.tracking.enabled else None
    if tracker:
        tracker.start({f"sweep/{k}": ",".join(map(str, v)) for k, v in grid.items()} | {
            "sweep/window_steps": budget.window_steps, "sweep/windows": budget.windows})
        base.tracking.parent_run_id = tracker.run_id
    with failed_on_error(tracker):
        tune_grid, rows = split_known_infeasible(base, grid, budget, max_node_cpus)
        with warm_pool(base, budget.max_concurrent, budget.warm) as pool:
            grid_results = fit_tuner(build_tuner(base, tune_grid, budget, max_node_cpus, pool), "the throughput "
                                     f"sweep ranked nothing; its trials so far are in {storage.redact(base.run_dir)}/trials")
        rows += [summarize_trial(r, list(grid), budget) for r in grid_results]
        rows.sort(key=lambda r: (r["status"] != "ok", -(r["images_per_second"] or 0.0)))
        best = next((r for r in rows if r["status"] == "ok"), None)
        if tracker:  # the trials ASHA stopped, or that failed, could not end their own runs
            close_trial_runs(base, rows, done="ok")
        paths = write_outputs(base, rows, best, list(grid))
    if tracker:
        tracker.finished(paths.values())
    return SweepResult(rows, best, paths)


def check_once(base: RunSpec, budget: SweepBudget) -> RunSpec:
    """What every trial would check again, checked once for the sweep: the dataset (Ultralytics' label scan),
    storage, the tracking server (plan.request.check_run; trials then skip it), and with warm groups each node's
    view of the data and tracking server (trials on a warm group do not join the cluster again). Returns the base
    as checked (the data's root pinned)."""
    from raytrain_yolo.plan.request import check_run

    checked, train_args, _ = check_run(RunSpec.from_dict(base.to_dict()))
    if budget.warm:
        from raytrain_yolo.plan.prepare import check_node_paths

        check_node_paths(checked, train_args)
    base.data_root = checked.data_root
    if not base.is_synthetic and not storage.is_uri(str(train_args["data"])):
        base.train["data"] = train_args["data"]  # resolved on this machine: every trial reads the same file
    return base


def size_trials(base: RunSpec, space: SweepSpace, budget: SweepBudget) -> tuple[dict[str, list], int]:
    """Fit the trials to the cluster, once, before any starts: the device and worker count when not given, each
    worker's CPUs next to the trial itself, the widest trial checked against what is free now, the base arguments
    validated, and how many trials run side by side. Returns the grid to sweep and the largest node's CPUs."""
    import ray

    from raytrain_yolo.plan.resources import LOCAL_CPU_WORKERS, resolve_scaling

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    max_node_cpus = int(max((n["Resources"].get("CPU", 0) for n in nodes), default=1))
    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), int(total.get("GPU", 0))
    s = base.scaling
    if s.use_gpu is None:
        s.use_gpu = gpus > 0
    if s.num_workers is None and not space.num_workers:
        s.num_workers = max(gpus, 1) if s.use_gpu else LOCAL_CPU_WORKERS
    most_workers = max(space.num_workers or [s.num_workers])
    if not s.use_gpu:  # room for the trial driver next to its workers
        s.cpus_per_worker = worker_cpus_beside_trial(cpus, most_workers, s.cpus_per_worker)
    # The largest trial must fit the free resources now, beside the trial itself; each trial checks again.
    widest = RunSpec.from_dict(base.to_dict())
    widest.scaling.num_workers = most_workers
    resolve_scaling(widest, extra_cpus=TRIAL_DRIVER_CPU)
    resolve_train_args(base)  # validate the base configuration once, before any trial
    grid = space.grid() or dataclasses.asdict(default_space(s.use_gpu, most_workers, max_node_cpus, _gpu_mem_gb()))
    if budget.max_concurrent is None:
        budget.max_concurrent = trials_side_by_side(s.use_gpu, most_workers, s.cpus_per_worker)
    return grid, max_node_cpus


def split_known_infeasible(base: RunSpec, grid: dict[str, list], budget: SweepBudget,
                           max_node_cpus: int) -> tuple[dict[str, list], list[dict[str, Any]]]:
    """The grid Tune runs, and a results row for each point left out of it. A knob value with which no point can
    run (amp=bf16 on CPU workers, more loader workers than a node has cores: `infeasible_reason`) leaves the grid,
    and its points become `infeasible` rows here: Tune would start a trial for each only for it to report that
    (about 3 s a trial on 2 cores). Other points that cannot run (a batch that one swept worker count does not
    divide) stay in the grid and end at once in their trial. When no point can run, the grid stays whole."""
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    reasons = [infeasible_reason(trial_spec(base, p, "preflight", budget), max_node_cpus) for p in points]
    kept = {k: [v for v in values if any(r is None for p, r in zip(points, reasons) if p[k] == v)]
            for k, values in grid.items()}
    if not all(kept.values()):
        return grid, []
    rows = [{**p, "trial": None, "windows": 0, "images_per_second": None, "gpu_mem_gb": None,
             "status": "infeasible", "reason": r}
            for p, r in zip(points, reasons) if any(p[k] not in kept[k] for k in grid)]
    return kept, rows


def build_tuner(base: RunSpec, grid: dict[str, list], budget: SweepBudget, max_node_cpus: int, pool=None):
    """Ray Tune's grid search over `grid`, one `run_trial` per point; ASHA stops the slow points at its rungs
    (--early-stop), else every point runs its windows."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    scheduler = (
        # max_t one past the budget: a trial that keeps up ends on its own (clean Train shutdown, summary,
        # FINISHED MLflow run); ASHA only stops the slow ones, at its rungs.
        ASHAScheduler(time_attr="window", max_t=budget.windows + 1, grace_period=budget.grace_windows,
                      reduction_factor=2)
        if budget.early_stop else FIFOScheduler()
    )
    param_space = {k: tune.grid_search(v) for k, v in grid.items()}
    param_space.update(budget=dataclasses.asdict(budget), max_node_cpus=max_node_cpus)
    storage_path, storage_filesystem = storage.ray_storage(base.storage_path, base.storage_wait_s)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(run_trial, mlflow_settings=client_settings(), base=base.to_dict(),
                                                 pool=pool),
                            {"CPU": TRIAL_DRIVER_CPU}),
        param_space=param_space,
        tune_config=tune.TuneConfig(metric=IPS_KEY, mode="max", scheduler=scheduler,
                                    max_concurrent_trials=budget.max_concurrent,
                                    # one name for the trial's folder, Train run and MLflow run (close_trial_runs)
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=base.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  verbose=1),
    )


def _gpu_mem_gb() -> float:
    """GPU memory of this machine's first GPU, for the default grid (0 when none is visible here)."""
    try:
        import torch

        return torch.cuda.get_device_properties(0).total_memory / 1e9 if torch.cuda.is_available() else 0.0
    except Exception:  # noqa: BLE001
        return 0.0


def write_outputs(base: RunSpec, rows: list[dict], best: dict | None, knobs: list[str]) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = base.run_dir
    cols = [*knobs, "images_per_second", "gpu_mem_gb", "windows", "status", "reason", "trial"]
    table = pa.table({c: [_plain(r.get(c)) for r in rows] for c in cols})
    paths = {"results": f"{run_dir}/results.parquet", "plot": f"{run_dir}/throughput.png"}
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(paths["results"], buf.getvalue().to_pybytes())
    if best:
        cfg = best_config(base, {k: best[k] for k in knobs})
        header = (
            f"# Fastest configuration found by `python -m raytrain_yolo.tune` ({base.name}, "
            f"{time.strftime('%Y-%m-%d')}): {best['images_per_second']:.1f} images/s.\n"
            "# Use it as is: python -m raytrain_yolo.fit --config best.yaml\n"
        )
        paths["best"] = f"{run_dir}/best.yaml"
        storage.write_text(paths["best"], header + yaml.safe_dump(cfg, sort_keys=False))
    plot_throughput(rows, paths["plot"])
    storage.write_text(f"{run_dir}/sweep.json", json.dumps({"rows": rows, "best": best}, indent=2, default=str))
    paths["json"] = f"{run_dir}/sweep.json"
    return paths


def _plain(v):
    return str(v) if isinstance(v, (list, dict)) else v


def plot_throughput(rows: list[dict], path: str) -> None:
    """images/s against global batch, one line per AMP mode (best over the other knobs)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    series: dict[str, dict[int, float]] = {}
    for r in rows:
        if r["images_per_second"] and r["status"] in ("ok", "stopped early") and r.get("batch") is not None:
            line = series.setdefault(str(r.get("amp", "default")), {})
            line[r["batch"]] = max(line.get(r["batch"], 0.0), r["images_per_second"])
    for amp, pts in sorted(series.items()):
        xs = sorted(pts)
        ax.plot(xs, [pts[x] for x in xs], marker="o", label=f"amp={amp}")
    ax.set_xlabel("global batch")
    ax.set_ylabel("images/s (steady state)")
    ax.set_title("Training throughput per configuration")
    ax.grid(alpha=0.3)
    if series:
        ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def format_table(rows: list[dict], knobs: list[str]) -> str:
    head = [*knobs, "images/s", "GPU GB", "windows", "status", "reason"]
    body = [
        [*(str(r.get(k)) for k in knobs),
         f"{r['images_per_second']:.1f}" if r["images_per_second"] else "-",
         f"{r['gpu_mem_gb']:.1f}" if r.get("gpu_mem_gb") else "-",
         str(r["windows"]), r["status"], (r.get("reason") or "")[:70]]
        for r in rows
    ]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])

