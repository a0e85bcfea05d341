"""Issue 4: a real Ray Tune throughput sweep over real training trials on CPU workers.

The sweep runs as the README shows it, minus the size: no --num-workers and no --storage-path, from a fresh folder
(once test_resources' default sweep, a launch of its own): each trial's workers and the trial itself must fit the
machine together (they did not: it hung), and the runs land in that folder. Its --tracking-uri is the session's
MLflow server with a password in the URI, as platforms hand it over (issue 39): it must reach no file at rest.
Two dimensions, batch and AMP (until 2026-12-02 also `--loader ultralytics,device`: two trials more, about 90 s of
2 cores, given to issue 22's fault cells; a grid dimension is a grid dimension, and the device loader trains in
test_augment and test_tasks).
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import load_summary, mlflow_runs, run_cli
from raytrain_yolo.train.worker import IPS_KEY

WINDOWS = 3


SECRET = "S3cr3tPassw0rd"  # in the tracking URI, as platforms hand it over: never written at rest, never printed


# Ray Train's state tracking with the export API on: Ray writes each Train run's settings (its train_loop_config
# included) under the session's logs/export_events, as a dashboard deployment has it.
EXPORT_ENV = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1", "RAY_enable_export_api_write": "1"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, mlflow_server):
    cwd = tmp_path_factory.mktemp("tune")
    experiment = f"tune-{cwd.name}"  # the session's server is shared: this sweep's own experiment
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live under it
    try:
        proc = run_cli(
            "tune", "--cpu", "--batch", "8,2", "--amp", "fp32,bf16",
            "--window-steps", 3, "--windows", WINDOWS, "--grace-windows", 1, "--max-concurrent", 1,
            "--synthetic-train", 48, "--synthetic-val", 8, "imgsz=64", "--name", "sweep",
            "--tracking-uri", mlflow_server.replace("http://", f"http://user:{SECRET}@"), "--experiment", experiment,
            # A local Ray of its own, which inherits the export switches; MLflow's client credentials as platforms
            # set them (the session's server asks for none and ignores them).
            env={**EXPORT_ENV, "RAY_TMPDIR": ray_tmp, "MLFLOW_TRACKING_USERNAME": "user",
                 "MLFLOW_TRACKING_PASSWORD": SECRET},
            timeout=1200, cwd=cwd, ray="own",
        )
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        exported = [p for p in Path(ray_tmp).rglob("export_events/*") if p.is_file()]
        yield proc, cwd / "runs" / "raytrain", (mlflow_server, experiment), exported
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_no_secret_in_the_sweeps_files_or_console(sweep):
    """Issue 39, 4: the tracking URI's password reaches MLflow (the runs are there) but none of Tune's files
    (params.json, params.pkl, result.json, experiment state), our own files, or the console."""
    proc, storage, _, exported = sweep
    assert SECRET not in proc.stdout + proc.stderr
    files = [p for p in storage.rglob("*") if p.is_file()]
    assert any(p.name == "params.json" for p in files) and any(p.name == "result.json" for p in files)
    leaked = [str(p) for p in files if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked
    # Ray's exports: the warm groups' Ray Train runs (their train_loop_config names the pool and the group; each
    # trial's own configuration reaches the ranks through the pool, its MLflow target by reference) and the tasks
    # and actors of the sweep hold neither the URI's password nor the MLflow credentials.
    train_runs = [p for p in exported if b"train_loop_config" in p.read_bytes()]
    assert train_runs and b"group" in train_runs[0].read_bytes(), [str(p) for p in exported]
    leaked = [str(p) for p in exported if SECRET.encode() in p.read_bytes()]
    assert not leaked, leaked


def test_the_default_sweep_fits_the_machine_and_keeps_one_store(sweep):
    _, storage, (uri, experiment), _ = sweep
    best = yaml.safe_load((storage / "sweep" / "best.yaml").read_text())
    assert best["scaling"]["num_workers"] == 2, best["scaling"]  # the fit default, with CPUs shared out
    summaries = [load_summary(storage / "sweep" / "trials", t.name) for t in (storage / "sweep" / "trials").iterdir()
                 if (t / "summary.json").is_file()]
    # The trials that ran to the end wrote one (those ASHA stopped did not): two workers each.
    assert summaries and all(s["world_size"] == 2 for s in summaries)
    # One store for the sweep, with each trial nested under the sweep's run; summaries name it masked.
    assert all(s["tracking_uri"] == uri.replace("http://", "http://user:***@") for s in summaries)
    _, runs = mlflow_runs(uri, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = {r.info.run_id for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert {s["mlflow_run_id"] for s in summaries} <= children
    assert not list(storage.glob("sweep/trials/*/mlflow.db"))


def test_results_table_one_row_per_trial(sweep):
    proc, storage, _, _ = sweep
    rows = pq.read_table(storage / "sweep" / "results.parquet").to_pylist()
    assert len(rows) == 4  # 2 batch x 2 amp
    assert {(r["batch"], r["amp"]) for r in rows} == {(b, a) for b in (8, 2) for a in ("fp32", "bf16")}
    assert "images/s" in proc.stdout and "status" in proc.stdout
    assert (storage / "sweep" / "throughput.png").stat().st_size > 1000


def test_infeasible_points_are_recorded_and_the_sweep_goes_on(sweep):
    _, storage, _, _ = sweep
    rows = pq.read_table(storage / "sweep" / "results.parquet").to_pylist()
    bf16 = [r for r in rows if r["amp"] == "bf16"]
    assert all(r["status"] == "infeasible" and "needs a GPU" in r["reason"] for r in bf16)
    assert any(r["status"] == "ok" for r in rows if r["amp"] == "fp32")


def test_best_is_the_fastest_measured_and_fit_accepts_best_yaml(sweep, tmp_path):
    _, storage, _, _ = sweep
    rows = pq.read_table(storage / "sweep" / "results.parquet").to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    assert all(r["windows"] == WINDOWS and r["images_per_second"] > 0 for r in ok)
    best = yaml.safe_load((storage / "sweep" / "best.yaml").read_text())
    fastest = max(ok, key=lambda r: r["images_per_second"])
    assert (best["train"]["batch"], best["loader"]) == (fastest["batch"], "ultralytics")  # the loader not swept
    assert best["train"]["optimizer"] == "SGD" and best["scaling"]["num_workers"] == 2
    # `fit --config best.yaml epochs=1`, through fit's own parser and the preflight its launch runs (once a training
    # run of its own: that a resolved configuration trains is every fit's test, from a best.yaml test_hpo's).
    from raytrain_yolo.core.cli import spec_from_args
    from raytrain_yolo.plan.request import check_run
    from raytrain_yolo.fit import build_parser

    ns = build_parser().parse_args(["--config", str(storage / "sweep" / "best.yaml"), "epochs=1", "--storage-path",
                                    str(tmp_path), "--name", "from-best", "--no-tracking"])
    spec, train_args, task = check_run(spec_from_args(ns, ns.overrides))
    assert (train_args["batch"], train_args["epochs"], spec.loader, task) == (fastest["batch"], 1, "ultralytics",
                                                                               "detect")
    assert spec.scaling.num_workers == 2 and spec.scaling.use_gpu is False


def test_early_stopping_stops_the_slow_configuration(sweep):
    _, storage, _, _ = sweep
    rows = pq.read_table(storage / "sweep" / "results.parquet").to_pylist()
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["windows"] < WINDOWS for r in stopped)
    slow = [r for r in rows if r["batch"] == 2 and r["amp"] == "fp32"]
    assert all(r["status"] == "stopped early" for r in slow), "batch 2 is the clearly slower configuration on CPU"
    # (ASHA may also stop one of two equal batch-8 trials at a rung: it keeps the better half, noise decides.)


def test_parent_mlflow_run_with_nested_trials(sweep):
    _, storage, (uri, experiment), _ = sweep
    _, runs = mlflow_runs(uri, experiment)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    assert len(children) == 2  # the feasible trials; infeasible ones never start training
    # Issue 39: a trial ASHA stopped is ended (FINISHED, tagged), not left RUNNING.
    assert all(r.info.status == "FINISHED" for r in children), [(r.info.run_name, r.info.status) for r in children]
    stopped = [r for r in children if r.data.tags.get("raytrain_yolo.status") == "stopped early"]
    rows = pq.read_table(storage / "sweep" / "results.parquet").to_pylist()
    assert len(stopped) == sum(r["status"] == "stopped early" for r in rows)


@pytest.mark.quick
def test_a_trial_that_never_reported_is_a_failed_row(tmp_path):
    """Issue 44, 6: a throughput trial whose actor never started (a node lost, a runtime-env failure) has no config
    in its Ray Tune Result: it is a failed row naming the cause, not an AttributeError that ends the sweep without
    results.parquet or best.yaml."""
    from ray.tune import Result

    from raytrain_yolo.sweep.throughput import SweepBudget, summarize_trial

    lost = Result(metrics={}, checkpoint=None, error=RuntimeError("The actor died unexpectedly: node lost"),
                  path=str(tmp_path / "trial_00001"))
    row = summarize_trial(lost, ["batch", "workers"], SweepBudget())
    assert row["status"] == "failed" and "node lost" in row["reason"] and row["trial"] == "trial_00001", row
    assert row["batch"] is None and row["images_per_second"] is None


def rank_pids(log: Path) -> set[int]:
    """The worker processes that wrote a run's log (the header each rank writes: `rank r of n, host pid p`)."""
    return {int(m) for m in re.findall(r"===== rank \d+ of \d+, \S+ pid (\d+) =====", log.read_text())}


def test_the_trials_took_turns_on_one_warm_group(sweep):
    """Issue 42: both feasible trials ran on the same two worker processes (one Ray Train group kept for the
    sweep), while everything above (rows, ASHA's stop, best.yaml, MLflow runs, no secret at rest) is as a sweep of
    one Ray Train run per trial has it."""
    _, storage, _, _ = sweep
    logs = sorted((storage / "sweep" / "trials").glob("*/run.log"))
    assert len(logs) == 2, logs
    first, second = (rank_pids(p) for p in logs)
    assert len(first) == 2 and first == second, (first, second)


def test_a_failed_warm_trial_costs_its_group_a_restart_and_the_next_trial_runs(ray_local, tmp_path):
    """Issue 42: a trial whose job fails on a rank (its dataset gone after the sweep checked it) fails with the
    rank's error; Ray Train restarts that group, and the next trial runs on the new processes to its full budget."""
    from raytrain_yolo.core.config import RunSpec, SyntheticSpec, TrackingSpec
    from raytrain_yolo.data.synthetic import ensure_synthetic
    from raytrain_yolo.plan import prepare
    from raytrain_yolo.sweep.throughput import SweepBudget, trial_spec
    from raytrain_yolo.sweep.warm import TrialFailed, WarmTrial, warm_pool
    from raytrain_yolo.train.launch import launch

    tiny = SyntheticSpec(train=16, val=4, imgsz=64)
    shutil.copytree(ensure_synthetic(tiny).parent, tmp_path / "data")
    base = RunSpec(train={"model": "yolo26n.yaml", "imgsz": 64, "batch": 4, "workers": 0}, synthetic=tiny,
                   tracking=TrackingSpec(enabled=False), storage_path=str(tmp_path / "runs"), name="warm")
    base.scaling.num_workers, base.scaling.use_gpu, base.scaling.cpus_per_worker = 2, False, 0.9
    budget = SweepBudget(window_steps=2, windows=2, max_concurrent=1)
    gone = trial_spec(base, {}, "gone", budget)
    gone.train["data"] = str(tmp_path / "data" / "data.yaml")
    gone_plan = prepare(gone, placed=True)  # checked while the dataset is there
    shutil.rmtree(tmp_path / "data")
    reports: list[dict] = []
    report = lambda metrics, staged: reports.append(metrics)  # noqa: E731 - throughput jobs stage no checkpoint
    with warm_pool(base, budget.max_concurrent) as pool:
        with pytest.raises(TrialFailed, match="FileNotFoundError: data=.* exists on the driver but not on node"):
            launch(gone_plan, group=WarmTrial(pool, report))
        assert not reports
        after = launch(prepare(trial_spec(base, {}, "after", budget), placed=True),
                       group=WarmTrial(pool, report)).summary
    assert after["error"] is None and after["world_size"] == 2
    assert [r["window"] for r in reports] == [1, 2] and all(r[IPS_KEY] > 0 for r in reports)
    failed_on, ran_on = rank_pids(tmp_path / "runs" / "warm" / "trials" / "gone" / "run.log"), \
        {w["pid"] for w in after["workers"]}
    assert failed_on and len(ran_on) == 2 and not failed_on & ran_on, (failed_on, ran_on)


def test_a_warm_job_sees_its_trial_gone_at_a_step_not_at_its_next_report(ray_local):
    """Issue 42: when Tune stops a warm trial (ASHA, PBT's pause), its queue dies with it. The job's ranks learn that
    at the steps after it (TrialChannel.on_step raises RunAbandoned, which the group's loop takes as the job's end)
    rather than at their next report, up to an epoch later. Rank 0 of one rank, on a real Ray queue; the sweep-level
    case is test_hpo's ASHA sweep."""
    import time

    from ray.util.queue import Queue

    from raytrain_yolo.sweep.warm import TrialChannel
    from raytrain_yolo.train.worker import RunAbandoned

    queue = Queue()
    channel = TrialChannel(queue, rank=0, world_size=1)
    for _ in range(5):  # the trial is there: the steps go on
        channel.on_step()
        time.sleep(0.05)
    assert channel.left == ""
    ray_local.kill(queue.actor)
    deadline = time.monotonic() + 30
    with pytest.raises(RunAbandoned, match="the trial is gone"):
        while time.monotonic() < deadline:
            channel.on_step()
            time.sleep(0.05)
    assert channel.left.startswith("at step ") and int(channel.left.split()[2]) > 5, channel.left
