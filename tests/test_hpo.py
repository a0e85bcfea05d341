"""Issue 16: accuracy tuning. Ray Tune searches Ultralytics hyperparameters for the best mAP; every trial is a
real DDP training run (CPU workers here), tracked in MLflow, resumable, with ASHA or PBT scheduling."""

from __future__ import annotations

import ast
import inspect
import json
import os
import signal
import textwrap

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import load_summary, mlflow_runs, run_cli, shared_head, start_cli, wait_for
from raycluster import http_status
from test_datasync import s3  # noqa: F401  (a fixture: moto's S3 server)

EPOCHS = 3
DATA = ("--synthetic-train", 32, "--synthetic-val", 16, "imgsz=64")
# lr0=0.5 wrecks a pretrained model within an epoch, 0.002 fine-tunes it: ASHA has something to stop.
SPACE = {"lr0": {"choices": [0.002, 0.5]}, "fliplr": [0.0, 1.0], "warmup_epochs": 0}


def checkpoint_copies() -> set[str]:
    """The temporary copies of Tune checkpoints in this machine's temp folder (Ray's own, which
    `Checkpoint.to_directory()` without a path makes and never removes, and ours): a trial that exploits a donor or
    resumes after a restore must leave none (the trials run on this machine)."""
    import glob
    import tempfile

    tmp = tempfile.gettempdir()
    return set(glob.glob(f"{tmp}/checkpoint_tmp_*") + glob.glob(f"{tmp}/raytrain-yolo-tune-checkpoint-*"))


def write_space(tmp_path, space=SPACE):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(space))
    return p


@pytest.fixture(scope="module")
def asha(tmp_path_factory, seed_model):
    """The ASHA sweep, submitted as a `ray job submit` entrypoint to the session's shared head (once a test of its own,
    a sweep more; the Jobs API with a token is test_cluster's, on a head of that module's): `tune --objective map`
    joins the cluster it runs on and leaves it up, and --metric picks what the sweep follows. `model=` is relative
    to the sweep's working directory: every trial runs in a folder of its own."""
    from test_cluster import submit_and_wait

    head = shared_head()
    head.wait_idle()
    storage = tmp_path_factory.mktemp("hpo")
    uri = f"sqlite:///{storage / 'mlflow.db'}"
    logs = submit_and_wait(head, [
        "python", "-m", "raytrain_yolo.tune", "--objective", "map", "--cpu", "--num-workers", 1, "--trials", 3,
        "--max-concurrent", 1, "--metric", "mAP50", "--space", write_space(storage), *DATA, f"epochs={EPOCHS}",
        f"model={seed_model.name}", "--storage-path", storage, "--name", "asha", "--tracking-uri", uri,
    ], "asha", cwd=seed_model.parent, timeout=900)
    assert http_status(f"{head.url}/api/jobs/", head.auth_headers) == 200, "the cluster must still be up"
    return logs, storage, uri, pq.read_table(storage / "asha" / "results.parquet").to_pylist()


@pytest.mark.quick
def test_default_space_is_ultralytics_own():
    """The default ranges are read from the installed Ultralytics tuner, not remembered."""
    from ultralytics.engine.tuner import Tuner

    from raytrain_yolo.sweep.accuracy import ULTRALYTICS_SPACE

    tree = ast.parse(textwrap.dedent(inspect.getsource(Tuner.__init__)))
    space = next(n.value.values[-1] for n in ast.walk(tree)
                 if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "self.space")
    theirs = {k: list(v[:2]) for k, v in ast.literal_eval(space).items()}
    assert ULTRALYTICS_SPACE == theirs


def plan(tmp_path, *args):
    """The sweep's whole preflight, in-process: what the command line checks before Ray starts."""
    from raytrain_yolo.sweep.accuracy import plan_from_args
    from raytrain_yolo.tune import build_parser

    return plan_from_args(build_parser().parse_args(["--objective", "map", "--storage-path", str(tmp_path),
                                                     "--no-tracking", *map(str, args)]))


@pytest.mark.parametrize("space, words", [
    ({"lr0": [0.1, 0.01]}, ("lr0", "min < max")),
    ({"lr00": [0.0, 0.1]}, ("lr00", "did you mean 'lr0'")),
    ({"fliplr": [0.0, 2.0]}, ("fliplr", "between 0.0 and 1.0")),
    ({"epochs": [1, 5]}, ("epochs", "epochs=N")),
])
@pytest.mark.quick
def test_bad_space_is_one_line(tmp_path, space, words):
    from raytrain_yolo.core.errors import UserError

    with pytest.raises(UserError) as e:
        plan(tmp_path, "--space", write_space(tmp_path, space))
    assert "\n" not in str(e.value) and all(w in str(e.value) for w in words), e.value


@pytest.mark.quick
def test_bad_metric_is_one_line(tmp_path):
    from raytrain_yolo.core.errors import UserError

    with pytest.raises(UserError, match=r"--metric mAP75 is not a detect validation metric: use one of fitness, "):
        plan(tmp_path, "--space", write_space(tmp_path), "--metric", "mAP75")
    assert plan(tmp_path, "--space", write_space(tmp_path), "--metric", "mAP50")[1].metric == "metrics/mAP50(B)"


@pytest.mark.quick
def test_scheduler_options_that_cannot_work_name_a_fix_that_does(tmp_path):
    """Issue 42, 4: one-epoch trials have no epoch boundary for ASHA or PBT; the refusal names `--scheduler none`
    (it said "lower it or raise epochs=", and no grace period is below 1), and a grace period too long names one
    that fits."""
    from raytrain_yolo.core.errors import UserError

    space = write_space(tmp_path)
    for scheduler in ("asha", "pbt"):
        with pytest.raises(UserError, match=f"--scheduler {scheduler} acts between a trial's epochs and epochs=1 has "
                                            "none: use --scheduler none"):
            plan(tmp_path, "--space", space, "--scheduler", scheduler, "--trials", 2, "epochs=1")
    with pytest.raises(UserError, match="--grace-epochs 5 must be at least 1 and below epochs=3: use --grace-epochs 2"):
        plan(tmp_path, "--space", space, "--grace-epochs", 5, "epochs=3")
    assert plan(tmp_path, "--space", space, "--scheduler", "none", "epochs=1")[1].scheduler == "none"
    # Warm trials by default, a Ray Train run per trial with --fresh-trials: what the sweep's definition records.
    assert plan(tmp_path, "--space", space, "epochs=3")[1].definition["warm"] is True
    assert plan(tmp_path, "--space", space, "--fresh-trials", "epochs=3")[1].definition["warm"] is False


@pytest.mark.quick
def test_a_user_error_ends_the_command_before_ray_starts(tmp_path):
    """The command line's shape of every error above: exit 2, one line on stderr, no Ray."""
    proc = run_cli("tune", "--objective", "map", "--space", write_space(tmp_path, {"lr00": [0.0, 0.1]}),
                   "--storage-path", tmp_path, "--no-tracking", timeout=120, ray="none")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: lr00"), proc.stderr
    assert "Ray" not in proc.stdout + proc.stderr


def test_same_name_with_another_space_is_refused(asha, seed_model, tmp_path):
    """Tune restores a sweep as it was started: a rerun of --name asha that asks for something else must say
    so in its preflight, before any training, instead of silently continuing the old sweep."""
    from raytrain_yolo.core.errors import UserError

    storage = asha[1]
    same = ("--cpu", "--num-workers", 1, "--trials", 3, "--max-concurrent", 1, "--metric", "mAP50", *DATA,
            f"epochs={EPOCHS}", f"model={seed_model}", "--name", "asha")
    assert plan(storage, "--space", write_space(tmp_path), *same)[1].trials == 3  # the same sweep: it continues
    with pytest.raises(UserError, match=r"sweep 'asha' in .* was started with other --space: pass the same ones to "
                                        r"continue it, or use a new --name"):
        plan(storage, "--space", write_space(tmp_path, {**SPACE, "fliplr": [0.0, 0.5]}), *same)
    with pytest.raises(UserError, match=r"other key=value arguments"):
        plan(storage, "--space", write_space(tmp_path), *same[:-4], f"epochs={EPOCHS + 1}", *same[-3:])


def test_asha_stops_a_lagging_trial_early(asha):
    logs, storage, _, rows = asha
    assert len(rows) == 3 and {r["metric"] for r in rows} == {"metrics/mAP50(B)"}
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(r["epochs"] < EPOCHS and "ASHA" in r["reason"] for r in stopped)
    # Warm trials (issue 42): the group saw each stopped trial go and left its job, at a step or at its report. On a
    # fast machine the job may have trained its last epochs before Tune's stop reached the trial: then Ultralytics'
    # own end line is there instead (test_tune checks the step-level check on every machine).
    for r in stopped:
        text = (storage / "asha" / "trials" / r["trial"] / "run.log").read_text(errors="replace")
        assert "the trial is gone (Tune stopped it); its job ended at" in text or f"{EPOCHS} epochs completed in" \
            in text, text[-2000:]
    assert sum(r["epochs_trained"] for r in rows) < 3 * EPOCHS
    finished = [r for r in rows if r["status"] == "finished"]
    assert finished and all(r["epochs"] == EPOCHS for r in finished)
    assert all(r["lr0"] in (0.002, 0.5) and 0.0 <= r["fliplr"] <= 1.0 for r in rows)
    best = max(finished, key=lambda r: r["best"])
    assert best["lr0"] == 0.002 and best["best"] > 0 and rows[0]["trial"] == best["trial"]
    assert (storage / "asha" / "map.png").stat().st_size > 1000
    assert "stopped early" in logs
    # --metric: the best row's best and final are that metric's, as the trial's own run recorded it each epoch.
    history = load_summary(storage / "asha" / "trials", best["trial"])["history"]
    assert len(history) == EPOCHS and best["final"] == pytest.approx(history[-1]["metrics/mAP50(B)"], abs=1e-9)
    assert best["best"] == pytest.approx(max(h["metrics/mAP50(B)"] for h in history), abs=1e-9)


def test_best_yaml_reproduces_the_best_trial(asha, tmp_path):
    _, storage, _, rows = asha
    best = rows[0]
    cfg = yaml.safe_load((storage / "asha" / "best.yaml").read_text())
    assert cfg["train"]["lr0"] == best["lr0"] and cfg["train"]["warmup_epochs"] == 0
    assert (storage / "asha" / "best.pt").stat().st_size > 100_000
    proc = run_cli("fit", "--config", storage / "asha" / "best.yaml", "--storage-path", tmp_path, "--name", "again",
                   "--no-tracking")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load_summary(tmp_path, "again")
    assert round(s["metrics"]["metrics/mAP50-95(B)"], 3) == round(best["map50_95_final"], 3)


def test_mlflow_parent_and_one_finished_nested_run_per_trial(asha):
    _, _, uri, rows = asha
    _, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.params["hpo/scheduler"] == "asha"
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == {r["trial"] for r in rows}
    assert all(c.info.status == "FINISHED" for c in children.values())
    for r in rows:
        if r["status"] == "stopped early":
            assert children[r["trial"]].data.tags["raytrain_yolo.status"] == "stopped early"


class Bucket:
    """A sweep's files in moto's bucket `datasets`, read past Ray: keys, objects, JSON."""

    def __init__(self, client, prefix: str):
        self.client, self.prefix = client, prefix

    def keys(self, under: str = "") -> list[str]:
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket="datasets",
                                                                      Prefix=f"{self.prefix}/{under}")
        return [o["Key"][len(self.prefix) + 1:] for page in pages for o in page.get("Contents", [])]

    def json(self, key: str) -> dict:
        try:
            return json.loads(self.client.get_object(Bucket="datasets", Key=f"{self.prefix}/{key}")["Body"].read())
        except Exception:  # noqa: BLE001 - not there (yet), or being rewritten
            return {}

    def etag(self, key: str) -> str:
        return self.client.head_object(Bucket="datasets", Key=f"{self.prefix}/{key}")["ETag"]

    def trials(self) -> set[str]:
        return {k.split("/")[1] for k in self.keys("trials/") if k.count("/") >= 2}

    def checkpointed(self, trial: str) -> list[str]:
        """The checkpoint folders Tune persisted for a warm trial (in Tune's trial folder, beside `trials/`)."""
        return sorted({k.split("/")[1] for k in self.keys(f"{trial}/checkpoint_")})


def tune_statuses(bucket: Bucket) -> dict[str, str]:
    """Trial name -> status, as Tune's last experiment snapshot in the bucket records it."""
    out = {}
    for key in bucket.keys("experiment_state-"):
        for t in bucket.json(key).get("trial_data", []):
            trial = json.loads(t[0])
            out[f"trial_{trial['trial_id']}"] = trial["status"]
    return out


def test_driver_killed_mid_sweep_then_same_command_finishes_without_rerunning(tmp_path, request):
    """Two warm trials, one after the other, with --max-failures 1, the sweep in `s3://` (moto). First fault (issue
    22's sweep cell, a worker lost mid-trial on object storage; the long tier's ASHA cell until 2026-12-02): once a
    trial has a Tune checkpoint in the bucket, its warm group's Train worker is SIGKILLed; Ray Train restarts the
    group, the trial fails, and Tune restarts it from that checkpoint (issue 42: a warm trial's checkpoints are its
    Tune trial's). Second: the driver (and the local Ray it started) dies while the second trial trains. The same
    command restores the Tune experiment from the bucket: the first trial is not run again, the second resumes from
    its last Tune checkpoint, and MLflow has each epoch once. On a fast machine (0.6 s epochs) the second trial's run
    has often ended before the kill, and Tune had not yet recorded it: the restored trial then trains nothing and
    reports the run's last epoch (it used to end the sweep: Tune refused a final result without `fitness`). One
    worker per trial (once 2): what is restored here is Tune's experiment and the trial's Ray Train run; a DDP run
    resumed on 2 ranks is test_faults'."""
    from conftest import train_worker_pids

    client = request.getfixturevalue("s3")  # before the sweep: its local Ray's workers inherit the endpoint and keys
    epochs, uri = EPOCHS, f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = ("tune", "--objective", "map", "--cpu", "--num-workers", 1, "--trials", 2, "--max-concurrent", 1,
           "--scheduler", "none", "--space", write_space(tmp_path), *DATA, f"epochs={epochs}", "--max-failures", 1,
           "--storage-path", "s3://datasets/sweeps", "--name", "again", "--tracking-uri", uri)
    bucket = Bucket(client, "sweeps/again")
    copies = checkpoint_copies()

    def a_trial_checkpointed():
        return [t for t in bucket.trials() if bucket.checkpointed(t)]

    def one_done_one_checkpointed():
        status = tune_statuses(bucket)
        done = [t for t, s in status.items() if s == "TERMINATED"]
        busy = [t for t, s in status.items() if s != "TERMINATED" and bucket.checkpointed(t)]
        return (done[0], busy[0]) if done and busy else None

    log = tmp_path / "first.log"
    proc = start_cli(*cmd, log_path=log)
    try:
        # The first fault: a worker lost mid-trial, once the first trial has a checkpoint (--max-failures 1).
        first = wait_for(lambda: a_trial_checkpointed() or proc.poll() is not None, 600, interval=0.2,
                         what="a trial's checkpoint")
        killed = wait_for(lambda: train_worker_pids(proc.pid) or proc.poll() is not None, 60, what="a Train worker")
        assert proc.poll() is None, "no trial left to lose a worker in:\n" + log.read_text()[-3000:]
        os.kill(killed[0], signal.SIGKILL)
        done, busy = wait_for(one_done_one_checkpointed, 600, what="one finished trial and one checkpoint")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    before = bucket.etag(f"trials/{done}/summary.json")
    assert not bucket.keys("results.parquet")

    again = run_cli(*cmd, ray="own")  # a local Ray again: its workers inherit the endpoint and keys
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert bucket.etag(f"trials/{done}/summary.json") == before, "a finished trial must not run again"
    run_dir = mirror(client, "datasets", "sweeps/again", tmp_path / "again")
    rows = {r["trial"]: r for r in pq.read_table(run_dir / "results.parquet").to_pylist()}
    assert set(rows) == {done, busy} and all(r["status"] == "finished" and r["epochs"] == epochs for r in rows.values())
    assert bucket.keys("groups/") and not [k for k in bucket.keys("trials/") if "/staged/" in k], \
        "the trials ran on warm groups, and no staged checkpoint copy was left"
    resumed = load_summary(run_dir / "trials", busy)
    assert resumed["resumed_from_epoch"] >= 1 and resumed["world_size"] == 1
    if first == [done]:  # the worker was lost in the trial that then finished (else in the one the rerun resumed)
        restarted = load_summary(run_dir / "trials", done)
        assert restarted["resumed_from_epoch"] >= 1 and [h["epoch"] for h in restarted["history"]] == \
            list(range(1, epochs + 1)), restarted["history"]
    assert (run_dir / "best.pt").stat().st_size > 100_000, "the best trial's best.pt beside the sweep, in the bucket"
    tracking, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.info.status == "FINISHED" for r in runs)
    for child in children:
        steps = [m.step for m in tracking.get_metric_history(child.info.run_id, "lr/pg0")]
        assert sorted(steps) == list(range(1, epochs + 1)), (child.info.run_name, steps)
    assert checkpoint_copies() <= copies, "the restored trial's checkpoint copy was left in the temp folder"


def test_ctrl_c_then_the_same_command_keeps_one_mlflow_run_per_trial(tmp_path):
    """Issue 39, 3: Tune catches Ctrl-C itself, saves the experiment and returns the trials as if they had ended.
    The sweep ranked them as such (best.yaml from a half-trained trial, exit 0), ended its MLflow runs FINISHED,
    and the same command then resumed the sweep into a second parent run and new trial runs. Now: exit 130, the
    sweep's run KILLED, nothing ranked; the same command resumes into the same runs, each epoch logged once."""
    epochs, uri, storage = 2, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "runs"
    # One trial (two cost 50 s more): the interrupted trial is what the resume must continue into its own run.
    cmd = ("tune", "--objective", "map", "--cpu", "--num-workers", 1, "--trials", 1,
           "--scheduler", "none", "--space", write_space(tmp_path), *DATA, f"epochs={epochs}",
           "--storage-path", storage, "--name", "ctrlc", "--tracking-uri", uri)
    log = tmp_path / "first.log"
    proc = start_cli(*cmd, log_path=log)
    try:
        wait_for(lambda: list(storage.glob("ctrlc/trial_*/checkpoint_*")) or proc.poll() is not None, 600,
                 interval=0.2, what="a trial's first (Tune) checkpoint")
        assert proc.poll() is None, log.read_text()[-3000:]
        os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: the whole foreground process group
        rc = proc.wait(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=60)
    text = log.read_text()
    assert rc == 130 and "interrupted: Tune saved the sweep" in text, text[-3000:]
    assert not (storage / "ctrlc" / "best.yaml").exists() and not (storage / "ctrlc" / "results.parquet").exists()
    _, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "KILLED", [(r.info.run_name, r.info.status) for r in runs]

    again = run_cli(*cmd, ray="own")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    rows = pq.read_table(storage / "ctrlc" / "results.parquet").to_pylist()
    assert len(rows) == 1 and all(r["status"] == "finished" and r["epochs"] == epochs for r in rows), rows
    tracking, runs = mlflow_runs(uri)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 1, [(r.info.run_name, r.info.status) for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs), [(r.info.run_name, r.info.status) for r in runs]
    assert {r.data.tags["mlflow.parentRunId"] for r in children} == {parents[0].info.run_id}
    for child in children:
        steps = [m.step for m in tracking.get_metric_history(child.info.run_id, "lr/pg0")]
        assert sorted(steps) == list(range(1, epochs + 1)), (child.info.run_name, steps)


def mirror(client, bucket: str, prefix: str, dest):
    """The objects under s3://bucket/prefix/ but the checkpoints' (weights), downloaded to the same relative paths
    under `dest`."""
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/"):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/") or "/checkpoint_" in obj["Key"]:  # a folder's marker object, weights
                continue
            target = dest / obj["Key"][len(prefix) + 1:]
            target.parent.mkdir(parents=True, exist_ok=True)
            client.download_file(bucket, obj["Key"], str(target))
    return dest


def test_pbt_continues_a_lagging_trial_from_the_donors_checkpoint(tmp_path, seed_model, request):
    """Two trials side by side (1 worker each); every epoch PBT compares them, and the lagging one continues
    from the other's latest checkpoint with mutated hyperparameters: a new Ray Train run seeded from it.

    Issue 22's PBT-on-object-storage cell: the sweep writes to `s3://` (moto), so each exploit reads the donor's
    checkpoint from the bucket. The sweep starts a local Ray of its own while the session's shared head runs, as
    on a machine with another Ray: a trial PBT stops ends its Ray Train controller without a stop, and only Ray
    Train's placement-group cleaner gives that run's CPUs back; with two Rays on the machine it could not find its
    own (core/cluster.py) and the exploiting trial waited for CPUs that never came ("no trial finished")."""
    # 4 epochs: with 3, PBT (which compares trials only once both have reported) exploited no trial in one run.
    # seed=2: BasicVariantGenerator(random_state=2) draws lr0 0.002 for one trial and 0.5 (wrecking) for the other
    # (the space file's keys in YAML's sorted order), so one lags at every epoch. With the same lr0 (seed 0 draws
    # 0.002 twice), Ray's asynchronous PBT, which compares a trial's epoch k with the other's last report (epoch
    # k-1), often finds the reporting trial ahead: no exploit (seen in CI, 2026-12-07).
    epochs, uri = EPOCHS + 1, f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = {**SPACE, "hsv_h": [0.0, 0.1]}
    copies = checkpoint_copies()
    client = request.getfixturevalue("s3")  # before the sweep: its local Ray's workers inherit the endpoint and keys
    shared_head()  # another Ray on the machine
    proc = run_cli("tune", "--objective", "map", "--cpu", "--num-workers", 1, "--cpus-per-worker", 0.9,
                   "--trials", 2, "--scheduler", "pbt", "--perturbation-epochs", 1, "--space",
                   write_space(tmp_path, space), *DATA, f"epochs={epochs}", f"model={seed_model}", "seed=2",
                   "--storage-path", "s3://datasets/sweeps", "--name", "pbt", "--tracking-uri", uri, timeout=900,
                   ray="own")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run_dir = mirror(client, "datasets", "sweeps/pbt", tmp_path / "pbt")
    rows = pq.read_table(run_dir / "results.parquet").to_pylist()
    assert len(rows) == 2 and all(r["status"] == "finished" and r["epochs"] == epochs for r in rows)
    drawn = {json.loads((run_dir / "trials" / r["trial"] / "plan.json").read_text())["asked"]["train_args"]["lr0"]
             for r in rows}  # each trial's first Train run, as planned (a run PBT stopped has no summary)
    assert drawn == {0.002, 0.5}, f"the premise: one trial lags ({drawn})"
    exploited = [r for r in rows if r["exploits"]]
    assert exploited, "PBT exploited no trial"
    policy = [json.loads(line) for line in (run_dir / "pbt_global.txt").read_text().splitlines()]
    for r in exploited:
        donor, epoch = r["exploits"].split(", ")[-1].split("@")  # the last exploit ran to the end
        runs = sorted((run_dir / "trials").glob(f"{r['trial']}-e{epoch}-from-{donor}"))
        assert runs, list((run_dir / "trials").iterdir())
        s = load_summary(run_dir / "trials", runs[0].name)
        # The epoch count continues from the donor's checkpoint, to the end of the schedule.
        assert s["resumed_from_epoch"] == int(epoch) and s["epochs_completed"] == epochs
        assert [h["epoch"] for h in s["history"]] == list(range(1, epochs + 1))
        # Its hyperparameters are PBT's mutation of the donor's, not the donor's.
        searched = ("lr0", "fliplr", "hsv_h")
        trained = {k: s["train_args"][k] for k in searched}
        match = [p for p in policy if all(abs(p[5][k] - trained[k]) < 1e-9 for k in searched)]
        assert match and any(match[0][4][k] != trained[k] for k in searched), (trained, policy)
    tracking, runs = mlflow_runs(uri)
    assert len(runs) == 3 and all(r.info.status == "FINISHED" for r in runs)  # the sweep and its 2 trials
    # Issue 39, 5: the trial's MLflow run says which run it was cloned from, at which epoch, and the donor's epochs
    # (its history up to the seed, which the seeded run carries) are not logged as the trial's own.
    by_name = {r.info.run_name: r for r in runs}
    for r in exploited:
        run = by_name[r["trial"]]
        cloned = run.data.tags.get("raytrain_yolo.cloned_from", "").split(", ")
        for exploit in r["exploits"].split(", "):
            donor, epoch = exploit.split("@")
            assert any(c.split("@")[0].split("-")[0] == donor and c.endswith(f"@{epoch}") for c in cloned), \
                (cloned, exploit)
            seed = json.loads(next((run_dir / "trials").glob(f"{r['trial']}-e{epoch}-from-{donor}-seed/"
                                                                "raytrain_state.json")).read_text())
            donors = {h["epoch"]: h["fitness"] for h in seed["history"] if h["epoch"] <= int(epoch)}
            logged = {m.step: m.value for m in tracking.get_metric_history(run.info.run_id, "fitness")}
            assert not [e for e, v in donors.items() if logged.get(e) == pytest.approx(v, abs=1e-12)], (donors, logged)
    assert checkpoint_copies() <= copies, "a donor's checkpoint, copied for the exploit, was left in the temp folder"


@pytest.mark.quick
def test_a_trial_its_trainer_stopped_early_is_a_finished_trial(tmp_path):
    """Issue 39: patience=1 ended a trial at epoch 2 of 6 with fitness 0.80. The trainer ended it, not the
    scheduler: the row is finished (the sweep ranks it and writes best.yaml), and says why it stopped."""
    import pandas as pd
    from ray.tune import Result

    from raytrain_yolo.core.config import SearchDim
    from raytrain_yolo.sweep.accuracy import HpoPlan, summarize_trial

    epochs = pd.DataFrame([{"epoch": 1, "fitness": 0.7, "lr0": 0.01},
                           {"epoch": 2, "fitness": 0.8, "lr0": 0.01,
                            "stopped_early": "patience=1: no better fitness since epoch 1"}])
    result = Result(metrics={"config": {"lr0": 0.01}}, checkpoint=None, error=None, path=str(tmp_path / "trial_1"),
                    metrics_dataframe=epochs)
    row = summarize_trial(result, HpoPlan(space={"lr0": SearchDim("range", (0.001, 0.1))}, epochs=6))
    assert row["status"] == "finished" and row["best"] == 0.8 and row["epochs"] == 2, row
    assert "stopped early at epoch 2 of 6" in row["reason"] and "patience=1" in row["reason"]
