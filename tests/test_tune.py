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

import shutil
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import load_summary, mlflow_runs, run_cli

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
    # Ray Train's exported run settings: each trial's train_loop_config is there, without the URI's password or
    # the MLflow credentials (they reach rank 0 through the object store).
    train_runs = [p for p in exported if b"train_loop_config" in p.read_bytes()]
    assert train_runs, [str(p) for p in exported]
    assert b"window_steps" in train_runs[0].read_bytes(), "the config itself is exported, masked"
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
