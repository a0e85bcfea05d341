"""From a RunPlan to a finished Ray Train run: the TorchTrainer, the summary.

`fit`, every `tune` trial and the benchmark call `launch(plan)` with a plan `raytrain_yolo.plan.prepare` made;
it checks nothing itself. Nothing else builds a TorchTrainer.
"""

from __future__ import annotations

import functools
import json
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytrain_yolo.core import console, storage
from raytrain_yolo.core.cluster import on_this_node, worker_env
from raytrain_yolo.core.config import RunSpec
from raytrain_yolo.core.tracking import RunTracker, client_settings, failed_on_error
from raytrain_yolo.data import sync
from raytrain_yolo.plan.run_plan import RunPlan, write_record
from raytrain_yolo.train.restarts import RestartClock, RestartWaitExceeded
from raytrain_yolo.train.watchdog import RankHang, Watchdog, start_board

# Ray Train waits this long for its workers to be placed, then fails (it retried forever by default). The check
# before training makes this a last resort, for resources taken between the check and the start.
START_TIMEOUT_ENV = "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"
MIN_START_TIMEOUT_S = 60.0
_USER_START_TIMEOUT = os.environ.get(START_TIMEOUT_ENV)


@dataclass
class LaunchResult:
    spec: RunSpec
    summary: dict[str, Any]
    summary_path: str


def start_attempts(spec: RunSpec) -> int:
    """Ray Train's `controller_failure_limit`: how many worker-group starts may time out (each after
    RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) before the run ends, over the whole run. Elastic runs: unlimited (Ray's
    default; they start with what is there and grow). Without --max-failures, or with --restart-wait 0: none (the
    check before training waited as --wait-for-resources allowed). With them: unlimited for Ray, and `restart_clock`
    bounds each restart's wait by --restart-wait."""
    if spec.scaling.min_workers:
        return -1
    return -1 if restart_clock(spec) else 0


def restart_clock(spec: RunSpec) -> RestartClock | None:
    """The controller callback that ends a restart waiting longer than --restart-wait for its workers
    (train/restarts.py): for fixed-size runs with --max-failures and a --restart-wait above 0."""
    if spec.scaling.min_workers or spec.max_failures == 0 or spec.restart_wait_s <= 0:
        return None
    return RestartClock(spec.restart_wait_s, start_timeout_s(spec))


def start_timeout_s(spec: RunSpec) -> float:
    """How long Ray Train waits for one worker-group start: the user's RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, else
    the larger of 60 s and --wait-for-resources."""
    return float(_USER_START_TIMEOUT) if _USER_START_TIMEOUT else max(MIN_START_TIMEOUT_S, spec.resource_wait_s)


def _fit_watched(fit, board, spec: RunSpec):
    """`fit()` (the trainer's, or a warm group's run) under the hang watchdog (train/watchdog.py) when there is a
    progress board, and the hangs it ended (one line each; a run restarted after one completes). A run that ends
    because of a hang ends with its line."""
    if board is None:
        return fit(), []
    import ray

    try:
        with Watchdog(board, spec.run_dir, spec.hang_timeout_s) as dog:
            try:
                return fit(), dog.lines
            except Exception:
                if dog.lines:  # Ray's error says a worker died; this says why (Ray's stays the context, for --debug)
                    raise RankHang(dog.lines[-1].removeprefix("hang: ")) from None
                raise
    finally:
        ray.kill(board)  # a library caller's process runs many launches: no board outlives its run


def step_checkpoints(spec: RunSpec, callbacks, warm: bool = False) -> bool:
    """Whether a preemption notice gets a checkpoint at the step (train/preemption.py): fit runs that restart
    (--max-failures), of a fixed size above one worker, on Ultralytics' loader (its DistributedSampler's order),
    with Ray Train's preemption watcher on (its default). Not elastic runs (a step's place in the epoch depends on
    the number of ranks), sweep trials (Tune's report forwarder in `callbacks`, or a `warm` group's job: every
    report is a Tune result) or throughput windows."""
    watcher = os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "1").lower() not in ("0", "false")
    fixed = not spec.scaling.min_workers and (spec.scaling.num_workers or 0) > 1
    return callbacks is None and not warm and spec.max_failures > 0 and spec.window_steps == 0 and fixed and watcher \
        and not spec.loader.startswith("device")


def _fit(trainer):
    """`trainer.fit()`; a run that RestartClock ended raises its one line (Ray wraps it in a ControllerError)."""
    try:
        return trainer.fit()
    except Exception as e:
        failure = getattr(e, "controller_failure", None)
        if isinstance(failure, RestartWaitExceeded):
            raise RestartWaitExceeded(str(failure)) from None
        raise


def worker_config(plan: RunPlan, tracking: dict | None = None, callbacks=None, progress=None, board=None,
                  warm: bool = False) -> dict:
    """What every rank's `run_worker` receives (Ray Train's `train_loop_config`, or a `warm` group's job).
    `progress`: a `ray.util.queue.Queue` that rank 0 puts each epoch's metrics on, for the driver's console;
    `board`: the ranks' progress board (train/watchdog.py)."""
    import ray

    spec = plan.spec
    return {"spec": _worker_spec(spec), "train_args": plan.args(), "task": plan.task, "tracking": _by_reference(tracking),
            "log_file": console.log_path(spec.storage_path, spec.name), "progress": progress,
            "progress_board": board, "step_checkpoints": step_checkpoints(spec, callbacks, warm),
            "plan": plan.record(),
            "driver_node": ray.get_runtime_context().get_node_id() if ray.is_initialized() else None}


def group_configs(spec: RunSpec, num_workers: int):
    """Ray Train's TorchConfig and ScalingConfig for `num_workers` ranks of `spec` (a run's, or a warm group's:
    sweep/warm.py); sets the worker-group start timeout (start_timeout_s) for Ray Train's controller."""
    from ray.train import ScalingConfig
    from ray.train.torch import TorchConfig

    s = spec.scaling
    if _USER_START_TIMEOUT is None:  # Ray Train passes it on to its controller
        os.environ[START_TIMEOUT_ENV] = f"{start_timeout_s(spec):g}"
    return TorchConfig(backend=s.backend, timeout_s=int(s.pg_timeout_s)), ScalingConfig(
        num_workers=(s.min_workers, num_workers) if s.min_workers else num_workers,
        elastic_resize_monitor_interval_s=s.resize_check_s,
        use_gpu=s.use_gpu,
        resources_per_worker={"CPU": s.cpus_per_worker},
    )


def build_trainer(plan: RunPlan, config: dict | None = None, callbacks=None):
    """The run's TorchTrainer, its ranks given `config` (default: `worker_config(plan)`)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain_yolo.train.worker import train_loop_per_worker

    spec, train_args = plan.spec, plan.train_args
    storage_path, storage_filesystem = storage.ray_storage(spec.storage_path, spec.storage_wait_s)
    torch_config, scaling_config = group_configs(spec, spec.scaling.num_workers)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=config or worker_config(plan, callbacks=callbacks),
        torch_config=torch_config,
        scaling_config=scaling_config,
        run_config=RunConfig(
            name=spec.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            # A worker group that cannot start within the timeout above is retried only as start_attempts says.
            # --max-failures bounds preemption restarts too (Ray retries those without limit by default).
            failure_config=FailureConfig(max_failures=spec.max_failures, max_preemption_failures=spec.max_failures,
                                         controller_failure_limit=start_attempts(spec)),
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.keep_checkpoints,
                # Ray keeps the latest checkpoint whatever its score; with validation off there is no fitness.
                checkpoint_score_attribute="fitness" if train_args.get("val", True) else None,
                checkpoint_score_order="max",
            ),
            worker_runtime_env={"env_vars": worker_env()},
            callbacks=[*(callbacks or []), *filter(None, [restart_clock(spec)])],
        ),
    )


def _published_log(spec: RunSpec, log_file: str) -> str:
    """With object storage: where the run's log is once the run ended. The driver's node's log (when anything on it
    wrote one) is copied beside the run as `run.log`; every other node's went to `logs/<ip>.log` from its workers.
    A copy that failed leaves the node-local path."""
    if console.publish_log(log_file, f"{spec.run_dir}/run.log"):
        return f"{spec.run_dir}/run.log"
    if not Path(log_file).exists():  # no worker on the driver's node, nothing printed here: the nodes' logs
        return f"{spec.run_dir}/logs/"
    return log_file


def _worker_spec(spec: RunSpec) -> dict[str, Any]:
    """The spec as the workers receive it, with the tracking URI's credentials masked: rank 0 reaches MLflow
    through `tracking` (_by_reference), and nothing else on a worker reads the URI."""
    d = spec.to_dict()
    if d["tracking"]["uri"]:
        d["tracking"]["uri"] = storage.redact(d["tracking"]["uri"])
    return d


def _by_reference(tracking: dict[str, Any] | None):
    """The MLflow target as rank 0 receives it: a reference into Ray's object store, not the values. Ray Train shows
    `train_loop_config` in its dashboard and writes it to disk in its state export (RAY_TRAIN_ENABLE_STATE_TRACKING
    with the export API on), and this holds the tracking URI as given (a password in it) and the `MLFLOW_*`
    settings (credentials): neither may be written at rest."""
    import ray

    return ray.put(tracking) if tracking else None


def launch(plan: RunPlan, callbacks=None, show_epochs: bool = False, group=None) -> LaunchResult:
    """Run one planned training job end to end and write `<storage>/<name>/summary.json` (and `plan.json`).

    `callbacks` are Ray Train callbacks for the controller (a tune trial passes Tune's report forwarder).
    `show_epochs`: print one line per epoch here (the `fit` command line). `group`: a warm worker group's lease
    (sweep/warm.py, a sweep trial's): the job runs on its ranks instead of a Ray Train run of its own, with the
    same MLflow run, summary and folder (its checkpoints are its Tune trial's). A plan whose run already finished (`plan.finished`) is its summary:
    nothing starts.
    """
    started = time.monotonic()
    spec, train_args, task = plan.spec, plan.train_args, plan.task
    if plan.finished is not None:
        return LaunchResult(spec, plan.finished, f"{spec.run_dir}/summary.json")
    log_file = console.log_path(spec.storage_path, spec.name)
    if show_epochs:
        print(f"run {spec.name}: {spec.scaling.num_workers} x {'GPU' if spec.scaling.use_gpu else 'CPU'} workers; "
              f"full log: {log_file}", flush=True)
    tracker = RunTracker(spec) if spec.tracking.enabled else None
    tracking = None
    if tracker:
        run_id = tracker.start(run_params(spec, train_args, task))
        tracking = {"uri": tracker.uri, "run_id": run_id, "client_settings": client_settings()}
    with failed_on_error(tracker):
        untrained = None
        if _want_untrained(spec):
            with console.output_to(None if spec.verbose else log_file):
                untrained = untrained_metrics(spec, train_args, task)
        progress = _progress_queue() if show_epochs else None
        write_record(plan)
        board = start_board() if spec.hang_timeout_s != 0 else None
        config = worker_config(plan, tracking, callbacks, progress, board, warm=group is not None)
        fit = functools.partial(group.run, spec, config) if group else functools.partial(
            _fit, build_trainer(plan, config, callbacks))
        with console.EpochPrinter(progress, train_args["epochs"]) if progress is not None else nullcontext():
            result, hangs = _fit_watched(fit, board, spec)
        drop_unregistered_checkpoints(spec.run_dir)
        summary = build_summary(spec, train_args, task, result, untrained)
        summary["hangs"] = hangs
        if storage.is_uri(spec.storage_path):
            log_file = _published_log(spec, log_file)
        summary.update(wall_seconds=round(time.monotonic() - started, 1), log_file=log_file)
        if tracker:
            summary.update(tracking_uri=tracker.uri, mlflow_run_id=tracker.run_id)
        path = f"{spec.run_dir}/summary.json"
        write_summary(path, summary)
    if tracker:
        unsent = tracker.finish("FAILED" if summary.get("error") else "FINISHED", summary)
        if unsent:
            summary["tracking_unsent"] = [*summary["tracking_unsent"], *unsent]
            write_summary(path, summary)
    return LaunchResult(spec, summary, path)


def write_summary(path: str, summary: dict[str, Any]) -> None:
    """`summary.json` at a path or URI, with the credentials of every URI in it masked (storage.redact)."""
    storage.write_text(path, storage.redact(json.dumps(summary, indent=2, default=str)))


def drop_unregistered_checkpoints(run_dir: str) -> None:
    """Delete checkpoint folders Ray never registered: uploads cut short when a worker or node died.

    After that, the checkpoints under the run are exactly the ones Ray reports (its snapshot lists them)."""
    text = storage.read_text(f"{run_dir}/checkpoint_manager_snapshot.json")
    if not text:
        return
    state = json.loads(text)
    kept = {r["checkpoint_dir_name"] for r in state.get("checkpoint_results") or []}
    if latest := state.get("latest_checkpoint_result"):
        kept.add(latest["checkpoint_dir_name"])
    for name in storage.list_dirs(run_dir, prefix="checkpoint_"):
        if name not in kept:
            storage.delete_dir(f"{run_dir}/{name}")


def _progress_queue():
    """Rank 0's epoch lines to the driver's console; on the driver's node, so that a lost node never takes it."""
    from ray.util.queue import Queue

    return Queue(actor_options=on_this_node())


def run_params(spec: RunSpec, train_args: dict[str, Any], task: str) -> dict[str, Any]:
    """What only the driver knows: Ray scaling and the run's place; rank 0 adds Ultralytics' full arguments."""
    s = spec.scaling
    return {
        "ray/num_workers": s.num_workers,
        "ray/use_gpu": s.use_gpu,
        "ray/gpus": s.num_workers if s.use_gpu else 0,
        "ray/cpus_per_worker": s.cpus_per_worker,
        "ray/backend": s.backend,
        "ray/max_failures": spec.max_failures,
        "ray/storage_path": spec.storage_path,
        "task": task,
        "loader": spec.loader,
        "dataset": "synthetic" if spec.is_synthetic else train_args.get("data"),
        "model_config": train_args.get("model"),
    }


def _want_untrained(spec: RunSpec) -> bool:
    return spec.is_synthetic if spec.validate_untrained is None else spec.validate_untrained


def untrained_metrics(spec: RunSpec, train_args: dict[str, Any], task: str = "detect") -> dict[str, float]:
    """Validate the model before any training step, on the driver, so the summary can show what training bought."""
    from ultralytics import YOLO

    from raytrain_yolo.data.synthetic import ensure_synthetic
    from raytrain_yolo.train.adapter import keep_offline

    keep_offline()

    data = str(ensure_synthetic(spec.synthetic, task)) if spec.is_synthetic else train_args["data"]
    if storage.is_uri(data):
        data = sync.localize(data)
    model = YOLO(train_args["model"])
    metrics = model.val(
        data=data, imgsz=train_args.get("imgsz", 640), batch=16, device="cpu", plots=False, verbose=False, workers=0,
        split=train_args.get("split") or "val",  # the split the trainer validates on
    )
    return {k: float(v) for k, v in metrics.results_dict.items()}


SUMMARY_METRICS = ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/precision(B)", "metrics/recall(B)")
# Each task's own metrics (Ultralytics' keys: (B) boxes, also oriented ones for obb; (P) pose; (M) masks) and losses.
TASK_METRICS = {
    "detect": ("metrics/mAP50(B)", "metrics/mAP50-95(B)"),
    "obb": ("metrics/mAP50(B)", "metrics/mAP50-95(B)"),
    "pose": ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/mAP50(P)", "metrics/mAP50-95(P)"),
    "segment": ("metrics/mAP50(B)", "metrics/mAP50-95(B)", "metrics/mAP50(M)", "metrics/mAP50-95(M)"),
}
TASK_LOSSES = {"pose": ("train/pose_loss",), "segment": ("train/seg_loss",), "obb": ("train/angle_loss",)}


def build_summary(spec, train_args, task, result, untrained) -> dict[str, Any]:
    ret = result.return_value or {}
    history = ret.get("history", [])
    final = history[-1] if history else {}
    ckpt_dir = storage.as_uri(result.checkpoint.path, spec.storage_path) if result.checkpoint else None

    def pick(name: str) -> str | None:
        path = f"{ckpt_dir}/{name}" if ckpt_dir else None
        return path if path and storage.is_file(path) else None

    summary = {
        "name": spec.name,
        "task": task,
        "data": ret.get("data") or train_args.get("data"),  # the data.yaml trained on (the generated one if embedded)
        "loader": spec.loader,
        # the group that trained the last epoch (an elastic run may end at another size than it started)
        "world_size": int(final.get("system/world_size") or len(ret.get("workers") or []) or spec.scaling.num_workers),
        "resumed_from_epoch": ret.get("resumed_from"),
        "resumed_from_step": ret.get("resumed_from_step"),  # of the epoch after it: a preemption's step checkpoint
        "device": "cuda" if spec.scaling.use_gpu else "cpu",
        "device_name": ret.get("device_name"),
        "backend": spec.scaling.backend,
        "epochs_requested": train_args.get("epochs"),
        "epochs_completed": int(final.get("epoch", 0)),
        "metrics": {k: v for k, v in final.items() if k.startswith(("metrics/", "train/", "val/"))},
        "untrained_metrics": untrained,
        "first_epoch_metrics": {k: v for k, v in (history[0] if history else {}).items() if k.startswith(("metrics/", "train/"))},
        "images_per_second": ret.get("images_per_second"),
        "best_checkpoint": pick("best.pt"),
        "last_checkpoint": pick("last.pt"),
        "ray_result_path": storage.as_uri(result.path, spec.storage_path),
        "ultralytics_dir": ret.get("save_dir"),
        "train_args": train_args,
        "workers": ret.get("workers"),
        "history": history,
        "error": str(result.error).splitlines()[0] if result.error else None,
        "tracking_unsent": ret.get("tracking_unsent") or [],  # what never reached MLflow (a server outage)
        "stopped_early": ret.get("stopped_early"),  # {"epoch", "epochs", "reason"}: the trainer ended the run
    }
    return summary


def _stopped(summary: dict[str, Any]) -> str:
    early = summary.get("stopped_early")
    return f"  (stopped early at epoch {early['epoch']} of {early['epochs']}: {early['reason']})" if early else ""


def format_summary(summary: dict[str, Any], path: str) -> str:
    """A readable two-column table of what matters most, credentials in URIs masked."""
    m, u = summary.get("metrics") or {}, summary.get("untrained_metrics") or {}
    first = summary.get("first_epoch_metrics") or {}
    rows = [
        ("run", summary["name"]),
        ("task / device", f"{summary['task']} on {summary['world_size']} x {summary['device_name'] or summary['device']}"),
        ("data", summary.get("data") or "n/a"),
        ("train loader", summary.get("loader", "ultralytics")),
        ("epochs", f"{summary['epochs_completed']} of {summary['epochs_requested']}" + _stopped(summary)),
    ]
    for key in TASK_METRICS.get(summary["task"], SUMMARY_METRICS[:2]):
        if key in m:
            before = f"  (untrained {u[key]:.3f})" if key in u else ""
            rows.append((key, f"{m[key]:.3f}{before}"))
    for key in ("train/box_loss", "train/cls_loss", *TASK_LOSSES.get(summary["task"], ())):
        if key in m:
            was = f"  (epoch 1: {first[key]:.3f})" if key in first else ""
            rows.append((key, f"{m[key]:.3f}{was}"))
    ips = summary.get("images_per_second")
    rows.append(("images/s (steady, global)", f"{ips:.1f}" if ips else "n/a"))
    if summary.get("wall_seconds"):
        minutes, seconds = divmod(int(summary["wall_seconds"]), 60)
        rows.append(("wall time", f"{minutes} min {seconds} s (Ray start-up included)"))
    rows += [
        ("best checkpoint", summary["best_checkpoint"] or "none"),
        ("last checkpoint", summary["last_checkpoint"] or "none"),
        ("ray result", summary["ray_result_path"]),
    ]
    for key in ("tracking_uri", "mlflow_run_id"):
        if summary.get(key):
            rows.append((key.replace("_", " "), summary[key]))
    if summary.get("tracking_unsent"):
        rows.append(("not in mlflow", ", ".join(summary["tracking_unsent"])))
    if summary.get("log_file"):
        rows.append(("log", summary["log_file"]))
    rows.append(("summary", path))
    rows = [(k, storage.redact(str(v))) for k, v in rows]
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])

