"""Issue 22: fault paths that need no training run. A retry's parameters, save=False, the driver's network
interface names, and credentials inside URIs. Real MLflow stores and files; no Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.core.errors import UserError

pytestmark = pytest.mark.quick


def sqlite_run(tmp_path):
    """A real MLflow run in a fresh SQLite store; returns (client, run_id)."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("faults", artifact_location=(tmp_path / "mlartifacts").as_uri())
    return client, client.create_run(exp).info.run_id


def test_a_retry_logs_the_ultralytics_arguments_again_without_failing(tmp_path):
    """With --storage-path s3://..., rank 0's Ultralytics `project` is a folder of its node's temp folder: a retry
    on another node (another temp folder) logs another value. A worker lost after the first attempt logged its
    arguments, but before the first checkpoint, retried that way: MLflow refuses to change a logged value (until
    2026-12-01 every attempt had a new temporary folder), and each retry failed until --max-failures was spent."""
    from ultralytics.cfg import get_cfg

    from raytrain_yolo.core.tracking import log_params

    client, run_id = sqlite_run(tmp_path)
    attempts = [str(tmp_path / node / "raytrain-yolo-0123456789ab" / "rank0") for node in ("node-a", "node-b")]
    for project in attempts:
        args = get_cfg(overrides={"model": "yolo26n.yaml", "epochs": 2, "project": project, "name": "train"})
        args.save_dir = f"{project}/train"  # as Ultralytics' trainer sets it
        log_params(client, run_id, {**vars(args), "data/train_images": 16})
    params = client.get_run(run_id).data.params
    assert params["project"] == attempts[0] and params["epochs"] == "2" and params["data/train_images"] == "16"


def test_a_runs_scratch_folder_is_emptied_at_each_start_and_removed_at_the_end(tmp_path, monkeypatch):
    """A worker's temporary files of a run (the checkpoint being staged, a restart's unpacked checkpoint, and with
    --storage-path s3://... Ultralytics' own folder of weights and results.csv) live in one folder per run on each
    node. Until 2026-12-01 every attempt made new ones and nothing removed Ultralytics' folder or what a killed
    worker left (a long-tier cell found four after one restart on s3://, 21 MB each on rank 0; this machine had
    225). Now each rank's entry is emptied when it is made, its entries go when its attempt ends, and the run's
    whole folder once every rank is done; a local storage path keeps Ultralytics' folder: it is the run's own."""
    import tempfile

    from raytrain_yolo.train.worker import Scratch, save_project

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "node-tmp"))  # this node's temp folder
    (tmp_path / "node-tmp").mkdir()
    spec = RunSpec(storage_path="s3://bucket/runs", name="r")
    rank0, rank1 = Scratch.of(spec, 0), Scratch.of(spec, 1)
    project = save_project(spec, rank0)
    (project / "train" / "weights").mkdir(parents=True)
    (project / "train" / "weights" / "last.pt").write_bytes(b"a killed attempt's weights")
    rank0.fresh("checkpoint")
    assert save_project(spec, rank0) == project and not any(project.iterdir()), "the next attempt starts empty"
    assert save_project(spec, rank1) != project and rank1.root == rank0.root
    other = Scratch.of(RunSpec(storage_path="s3://bucket/runs", name="other"), 0)
    assert other.root != rank0.root and rank0.root.parent == tmp_path / "node-tmp"
    other.fresh("checkpoint")
    rank1.drop_rank()
    assert sorted(p.name for p in rank0.root.iterdir()) == ["rank0-checkpoint", "rank0-ultralytics"]
    rank0.drop_run()
    assert not rank0.root.exists() and other.root.exists()
    local = RunSpec(storage_path=str(tmp_path / "runs"), name="r")
    assert save_project(local, Scratch.of(local, 0)) == Path(local.run_dir)


def test_save_false_is_refused_before_ray_starts(tmp_path):
    """Ray Train restarts from the last.pt in each checkpoint, and the run ends with best.pt/last.pt: without
    save, a restart failed with "Resume checkpoint not found"."""
    from raytrain_yolo.plan.request import check_run

    def spec(**kw) -> RunSpec:
        return RunSpec(train={"save": False, "epochs": 1}, scaling=ScalingSpec(num_workers=1, use_gpu=False),
                       synthetic=SyntheticSpec(train=8, val=4), tracking=TrackingSpec(enabled=False),
                       storage_path=str(tmp_path), name="nosave", **kw)

    with pytest.raises(UserError) as e:
        check_run(spec())
    msg = str(e.value)
    assert msg.startswith("save=False") and "drop save=False" in msg and "\n" not in msg, msg
    check_run(spec(window_steps=2, max_windows=1))  # a throughput trial never checkpoints: save=False is its own


def test_the_driver_network_interface_names_stay_on_the_driver(monkeypatch):
    """Each node's own GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME apply: the driver's interface name (eth0) may not
    exist on another node (ens5), and gloo/NCCL then fail there."""
    from raytrain_yolo.core.cluster import worker_env

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "driver-eth0")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "driver-eth0")
    monkeypatch.setenv("YOLO_CONFIG_DIR", "/tmp/yolo-config")
    env = worker_env()
    assert "GLOO_SOCKET_IFNAME" not in env and "NCCL_SOCKET_IFNAME" not in env
    assert env["YOLO_CONFIG_DIR"] == "/tmp/yolo-config" and env["YOLO_OFFLINE"] == "1"


@pytest.mark.parametrize("raw, shown", [
    ("http://user:token@mlflow:5000/", "http://user:***@mlflow:5000/"),
    ("https://ghp_abc123@mlflow.example.com", "https://***@mlflow.example.com"),
    ("s3://AKIAX:se%2Fcret+1@bucket/runs/x", "s3://AKIAX:***@bucket/runs/x"),
    ("gs://bucket/runs", "gs://bucket/runs"),
    ("sqlite:////tmp/a@b/mlflow.db", "sqlite:////tmp/a@b/mlflow.db"),
    ("/data/x@y/data.yaml", "/data/x@y/data.yaml"),
    ("error: cannot write to --storage-path s3://k:s@b/r (denied): choose", "error: cannot write to "
     "--storage-path s3://k:***@b/r (denied): choose"),
])
def test_redact_hides_the_secret_of_any_uri(raw, shown):
    from raytrain_yolo.core.storage import redact

    assert redact(raw) == shown


def test_credentials_reach_no_param_tag_summary_or_console(tmp_path, capsys):
    """A real run start: the storage path and data= carry s3 credentials, the tracking server a token."""
    from raytrain_yolo.core.cli import run_main
    from raytrain_yolo.core.tracking import RunTracker, check_reachable
    from raytrain_yolo.train.launch import format_summary, run_params, write_summary

    secret = "s3cr3t"
    data = f"s3://AKIAX:{secret}@bucket/d/data.yaml"
    spec = RunSpec(train={"data": data}, storage_path=f"s3://AKIAX:{secret}@bucket/runs", name="creds",
                   tracking=TrackingSpec(uri=f"sqlite:///{tmp_path / 'mlflow.db'}"))
    tracker = RunTracker(spec)
    run_id = tracker.start(run_params(spec, {"data": data}, "detect"))
    run = tracker.client.get_run(run_id)
    assert run.data.params["ray/storage_path"] == "s3://AKIAX:***@bucket/runs"
    assert run.data.params["dataset"] == "s3://AKIAX:***@bucket/d/data.yaml"
    assert secret not in json.dumps([run.data.params, run.data.tags])
    assert tracker.start({}) == run_id, "a driver restart finds the same run by its (redacted) key"

    summary = {"name": "creds", "task": "detect", "world_size": 1, "device": "cpu", "device_name": "cpu",
               "epochs_completed": 1, "epochs_requested": 1, "best_checkpoint": None, "last_checkpoint": None,
               "ray_result_path": f"{spec.run_dir}", "tracking_uri": f"http://me:{secret}@mlflow:5000",
               "train_args": {"data": data}}
    write_summary(str(tmp_path / "summary.json"), summary)
    assert secret not in (tmp_path / "summary.json").read_text()
    assert "http://me:***@mlflow:5000" in format_summary(summary, f"{spec.run_dir}/summary.json")
    assert secret not in format_summary(summary, f"{spec.run_dir}/summary.json")
    tracker.finish("FINISHED", summary)
    artifact = tracker.client.download_artifacts(run_id, "summary.json", str(tmp_path / "dl"))
    assert secret not in open(artifact).read()

    def unreachable_server() -> int:
        check_reachable(f"http://me:{secret}@127.0.0.1:9")  # the discard port: nothing answers
        return 0

    assert run_main(unreachable_server, debug=False) == 2
    err = capsys.readouterr().err
    assert "http://me:***@127.0.0.1:9" in err and secret not in err


def test_trial_relay_keeps_the_object_storage_scheme(tmp_path):
    """Ray reports a checkpoint on object storage by its path inside the pyarrow filesystem (`bucket/runs/...`);
    an accuracy trial hands that path to PBT (its exploits) and to the copy of the best trial's best.pt, which read
    it as a local folder and failed. The relay hands on the s3:// URI; a local checkpoint stays a local path."""
    import queue

    import pyarrow.fs as pafs
    from ray.train import Checkpoint

    from raytrain_yolo.sweep.accuracy import TrialRelay, late_epochs

    s3 = pafs.S3FileSystem(endpoint_override="127.0.0.1:1", region="us-east-1", scheme="http")  # never contacted
    q = queue.Queue()
    TrialRelay(q, "s3://bucket/runs/sweep/trials").after_report(
        None, [{"epoch": 2}], Checkpoint("bucket/runs/sweep/trials/t1/checkpoint_x", filesystem=s3))
    assert q.get_nowait() == ({"epoch": 2}, "s3://bucket/runs/sweep/trials/t1/checkpoint_x")
    TrialRelay(q, str(tmp_path)).after_report(None, [{"epoch": 1}], Checkpoint(str(tmp_path / "checkpoint_y")))
    assert q.get_nowait() == ({"epoch": 1}, str(tmp_path / "checkpoint_y"))
    TrialRelay(q, str(tmp_path)).after_report(None, [{"epoch": 1}], None)
    assert q.get_nowait() == ({"epoch": 1}, None)
    # The epochs a finished run trained after Tune paused its trial, reported late with the run's last checkpoint
    # (seen in the PBT test on s3://: the folder had lost its scheme and the trial failed).
    history = [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}]
    for last in ("s3://bucket/runs/sweep/trials/t1/checkpoint_x/last.pt", str(tmp_path / "checkpoint_x" / "last.pt")):
        assert late_epochs({"last_checkpoint": last, "history": history}, 1) == [
            ({"epoch": 2}, None), ({"epoch": 3}, last[:-len("/last.pt")])]
    assert late_epochs({"last_checkpoint": None, "history": history}, 2) == [({"epoch": 3}, None)]


def test_a_restart_puts_best_pt_back_beside_the_weights(tmp_path):
    """On object storage every attempt trains in a new temporary folder; Ultralytics rewrites best.pt only when
    fitness improves, so a restart that did not put it back had no best.pt (summary, --register-model, PBT) until
    the run improved again. Rank 0 puts back best.pt and results.csv; other ranks write nothing."""
    from ray.train import Checkpoint

    import tempfile

    from raytrain_yolo.train.worker import STATE_FILE, forget_restored, unpack

    ckpt = tmp_path / "checkpoint_000001"
    ckpt.mkdir()
    (ckpt / STATE_FILE).write_text(json.dumps({"epoch": 1, "history": [{"epoch": 1}]}))
    for name, data in (("last.pt", b"last"), ("best.pt", b"best"), ("results.csv", b"epoch\n1\n")):
        (ckpt / name).write_bytes(data)
    fresh = tmp_path / "attempt-2"  # this attempt's save_dir: empty, as on object storage
    state = unpack(Checkpoint(str(ckpt)), fresh, 0, Path(tempfile.mkdtemp()))
    assert (fresh / "weights" / "best.pt").read_bytes() == b"best"
    assert (fresh / "results.csv").read_bytes() == b"epoch\n1\n"
    assert state["epoch"] == 1 and open(state["last_pt"], "rb").read() == b"last"
    forget_restored(state)
    other = unpack(Checkpoint(str(ckpt)), tmp_path / "rank-1", 1, Path(tempfile.mkdtemp()))
    assert not (tmp_path / "rank-1").exists()
    forget_restored(other)
    assert not any(p.exists() for p in (Path(state["restored_dir"]), Path(other["restored_dir"])))


def test_restart_wait_bounds_each_restart_not_the_run(monkeypatch):
    """--restart-wait is per restart: a fixed-size run with --max-failures gets Ray's unlimited count of timed-out
    worker-group starts and a RestartClock, fed here the controller's states as Ray Train's controller changes them
    (the multi-node test runs three slow replacements for real). Three restarts that each wait 50 s of a 60-s limit
    (150 s, and 15 timed-out 10-s starts, more than one limit's worth) go on; a fourth that waits 60 s ends the run
    in one line; starts that fail at once are bounded too. Without --max-failures, or with --restart-wait 0, no
    start may time out (the check before training waited as the user allowed); an elastic run keeps Ray's unlimited
    starts."""
    from raytrain_yolo.train import launch
    from raytrain_yolo.train.launch import restart_clock, start_attempts
    from raytrain_yolo.train.restarts import RestartClock, RestartWaitExceeded

    monkeypatch.setattr(launch, "_USER_START_TIMEOUT", None)  # Ray Train's start timeout: 60 s, as by default
    assert start_attempts(RunSpec(max_failures=1)) == -1 and restart_clock(RunSpec(max_failures=1)).wait_s == 600
    assert restart_clock(RunSpec(max_failures=1, restart_wait_s=90)).max_tries == 2  # 60-s tries
    for spec in (RunSpec(max_failures=0), RunSpec(max_failures=1, restart_wait_s=0)):
        assert start_attempts(spec) == 0 and restart_clock(spec) is None
    elastic = RunSpec(max_failures=1, scaling=ScalingSpec(num_workers=2, min_workers=1))
    assert start_attempts(elastic) == -1 and restart_clock(elastic) is None

    from ray.train.v2._internal.execution.controller import state as ray_states

    from raytrain_yolo.train import restarts

    now = [0.0]
    monkeypatch.setattr(restarts.time, "monotonic", lambda: now[0])

    def to(clock: RestartClock, name: str, seconds: float = 0.0) -> None:  # the controller changes its state
        now[0] += seconds
        cls = getattr(ray_states, f"{name.title()}State")
        clock.after_controller_state_update(None, cls(*[None] * (cls.__init__.__code__.co_argcount - 1)))

    clock = RestartClock(wait_s=60, start_timeout_s=10)

    def wait(timeouts: int) -> None:  # a group lost while running, then `timeouts` start tries time out
        to(clock, "RESTARTING")
        for _ in range(timeouts):
            to(clock, "SCHEDULING")
            to(clock, "RESCHEDULING", 10)
        to(clock, "SCHEDULING")

    for name in ("INITIALIZING", "SCHEDULING", "RUNNING"):
        to(clock, name)
    for _ in range(3):
        wait(5)
        to(clock, "RUNNING")
    assert clock.restarts == 3
    with pytest.raises(RestartWaitExceeded, match=r"^the workers of restart 4 were not placed within --restart-wait "
                                                  r"60 s \(60 s, 6 worker-group start tries of 10 s failed\).*"
                                                  r"raise --restart-wait"):
        wait(6)
    quick = RestartClock(wait_s=60, start_timeout_s=10)
    to(quick, "SCHEDULING")
    with pytest.raises(RestartWaitExceeded, match="the first start .* 6 worker-group start tries"):
        for _ in range(6):  # starts that fail at once (their workers cannot start): as many as fit in the wait
            to(quick, "RESCHEDULING", 0.1)
    with pytest.raises(UserError, match=r"--restart-wait -1 must be 0 or more seconds"):
        from raytrain_yolo.plan.request import check_run

        check_run(RunSpec(max_failures=1, restart_wait_s=-1, tracking=TrackingSpec(enabled=False)))


def test_the_storage_filesystem_keeps_its_retries_once_pickled(monkeypatch):
    """Ray Train pickles RunConfig's storage filesystem to its controller and workers. pyarrow's S3FileSystem
    loses its retry strategy on the way (apache/arrow#47348: 3 attempts again); ours keeps its attempts. Counted
    as connections to an endpoint that accepts and closes each one (a server going down). test_job_sources runs
    a whole fit through a 30 s refusal; a negative --storage-wait is refused before Ray."""
    import os
    import socket
    import threading

    import pyarrow.fs as pafs
    from ray import cloudpickle

    from raytrain_yolo.plan.request import check_run
    from raytrain_yolo.core.storage import RetryingS3FileSystem, ray_storage, s3_attempts

    server = socket.create_server(("127.0.0.1", 0))
    seen: list[int] = []

    def accept():
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            seen.append(1)
            conn.close()

    threading.Thread(target=accept, daemon=True).start()
    for k, v in {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{server.getsockname()[1]}", "AWS_ACCESS_KEY_ID": "k",
                 "AWS_SECRET_ACCESS_KEY": "s", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"
                 }.items():
        monkeypatch.setenv(k, v)

    def connections(fs) -> int:
        seen.clear()
        with pytest.raises(OSError):
            cloudpickle.loads(cloudpickle.dumps(fs)).get_file_info("bucket/x")
        return len(seen)

    try:
        plain = pafs.S3FileSystem(endpoint_override=os.environ["AWS_ENDPOINT_URL"],
                                  retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=4))
        assert connections(plain) == 3, "pyarrow now keeps retry_strategy when pickled: RetryingS3FileSystem can go"
        assert connections(RetryingS3FileSystem("s3://bucket/x", 4)) == 4
    finally:
        server.close()
    path, fs = ray_storage("s3://bucket/runs", 120)
    assert path == "bucket/runs" and isinstance(fs, RetryingS3FileSystem) and fs.attempts == s3_attempts(120)
    assert ray_storage("/data/runs", 120) == ("/data/runs", None)
    assert s3_attempts(0) == 3 and s3_attempts(30) < s3_attempts(120) < s3_attempts(600)
    with pytest.raises(UserError, match=r"^--storage-wait -1 must be 0 or more seconds$"):
        check_run(RunSpec(storage_wait_s=-1, tracking=TrackingSpec(enabled=False)))


def test_a_node_local_model_cache_keeps_the_models_used_last_and_those_in_use(tmp_path):
    """val's and predict's node-local caches (weights per job, registry downloads) kept every model they were ever
    given (2.4 GB on this project's machine by 2026-12-01). `keep_recent` marks the entry a job uses and removes,
    beyond the 4 used last, those unused for 10 minutes; those used since are a job's that may still be starting."""
    import os
    import time

    from raytrain_yolo.plan.job import keep_recent

    cache, now = tmp_path / "raytrain-yolo-weights", time.time()
    ages = {"a": 60, "b": 120, "c": 3600, "d": 7200, "e": 9000, "f": 10000}  # seconds since last used
    for name, age in ages.items():
        (cache / name).mkdir(parents=True)
        (cache / name / "best.pt").write_bytes(b"w")
        os.utime(cache / name, (now - age, now - age))
    (cache / "new").mkdir()
    os.utime(cache / "new", (now - 99999, now - 99999))  # the entry in use now, whatever its age
    keep_recent(cache / "new")
    # used last: new (now), a, b, c; d, e and f are older and unused for 10 minutes
    assert sorted(p.name for p in cache.iterdir()) == ["a", "b", "c", "new"]
    for name, age in {"g": 30, "h": 40, "i": 50}.items():  # more models in use than the cache keeps
        (cache / name).mkdir()
        os.utime(cache / name, (now - age, now - age))
    keep_recent(cache / "new")
    # beyond new, g, h and i: a and b are in use (1-2 minutes), c is not (an hour)
    assert sorted(p.name for p in cache.iterdir()) == ["a", "b", "g", "h", "i", "new"]


@pytest.mark.quick
def test_a_trial_that_failed_before_it_reported_is_a_failed_row(tmp_path):
    """A trial whose actor never started (here: its worker could not read the sweep's storage) reported nothing, and
    Ray's `Result.config` is then None. The accuracy sweep records the trial as failed with its cause; it used to end
    the command with "AttributeError: 'NoneType' object has no attribute 'get'" instead (found on 2026-12-02 by
    test_hpo's restore of a sweep in `s3://` when the rerun's Ray workers lacked the endpoint)."""
    from ray.tune import Result

    from raytrain_yolo.sweep.accuracy import summarize_trial
    from test_hpo import plan, write_space

    _, hpo = plan(tmp_path, "--space", write_space(tmp_path))
    trial = tmp_path / "trial_0001"
    trial.mkdir()
    error = OSError("When resolving region for bucket 'datasets': could not resolve host")
    row = summarize_trial(Result(metrics=None, checkpoint=None, error=error, path=str(trial)), hpo)
    assert row["trial"] == "trial_0001" and row["status"] == "failed" and row["epochs"] == 0, row
    assert "resolving region for bucket 'datasets'" in row["reason"], row["reason"]
    assert all(row[k] is None for k in hpo.searched), row


@pytest.mark.quick
def test_a_rank_ending_after_another_removed_the_runs_scratch_folder_ends_cleanly(tmp_path):
    """Two ranks of a run on one node share its scratch folder: the rank that ends first removes the whole folder
    (`drop_run`, once past the run's last collective) while the other may be dropping its own entries (`drop_rank`).
    When the folder went between pathlib's check and its listing, that raised FileNotFoundError and failed a run
    whose training had completed (found on 2026-12-02 by test_train_args' 2-rank run under the full suite's load).
    Here one thread makes and removes the folder as fast as it can while this one drops rank 0's entries 20000
    times: the code before raised about once in 400 (7 in 3000 on this project's 2-core machine)."""
    import shutil
    import threading

    from raytrain_yolo.train.worker import Scratch

    root, stop = tmp_path / "raytrain-yolo-run", threading.Event()
    kept = Scratch(root, 1).fresh("checkpoint")
    Scratch(root, 0).fresh("restored")
    Scratch(root, 0).drop_rank()
    assert kept.is_dir() and not (root / "rank0-restored").exists(), "a rank drops only its own entries"

    def other_rank_ends():
        while not stop.is_set():
            (root / "rank1-checkpoint").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(root, ignore_errors=True)

    churn = threading.Thread(target=other_rank_ends)
    churn.start()
    try:
        for _ in range(20000):
            Scratch(root, 0).drop_rank()
    finally:
        stop.set()
        churn.join()


@pytest.mark.parametrize("module, argv, flag", [
    ("fit", ["--storage-path", "s3://AKIAX:s3cr3t@bucket/runs", "--synthetic-train", 8], "--storage-path"),
    ("fit", ["--no-tracking", "data=s3://AKIAX:s3cr3t@bucket/d/data.yaml"], "data="),
    ("val", ["model=missing.pt", "data=s3://AKIAX:s3cr3t@bucket/d/data.yaml"], "data="),
    ("predict", ["model=missing.pt", "source=gs://tok:s3cr3t@bucket/images/"], "source="),
    ("predict", ["model=missing.pt", "source=/nowhere", "--output", "s3://AKIAX:s3cr3t@bucket/out"], "--output"),
])
def test_credentials_inside_an_object_storage_uri_are_refused_first(module, argv, flag, tmp_path, capfd, monkeypatch):
    """Issue 39, 4: credentials written into an s3:// (or gs://) URI were carried into every path derived from it
    (checkpoint paths, Tune's state) and not every later reader takes them from a URI: refused before anything is
    read, naming the variables that carry them instead, without printing the secret."""
    from conftest import refused_in_process

    monkeypatch.chdir(tmp_path)
    line = refused_in_process(module, argv, capfd, monkeypatch)
    assert f"{flag} " in line and "holds credentials" in line and "AWS_ACCESS_KEY_ID" in line, line
    assert "s3cr3t" not in line, line


@pytest.mark.parametrize("workers", [0, 2])
def test_a_step_checkpoint_resumes_the_epoch_with_the_rest_of_its_batches_in_order(workers):
    """train/preemption.py's sampler in Ultralytics' own train loader (InfiniteDataLoader, DistributedSampler for
    rank 1 of 2), driven the way Ultralytics' loop drives it (`set_epoch(e)`, then one epoch of `len(loader)`
    batches). With loader workers Ultralytics draws each epoch's pass before it calls that epoch's `set_epoch`, so
    the StepSampler records which epoch's order each pass has. A loader resumed from a step checkpoint taken after 3
    batches of epoch 2 yields exactly the 7 batches the uninterrupted run trained after them, in the same order, and
    then the same epoch 3; its first epoch is that many batches shorter."""
    import torch
    from torch.utils.data.distributed import DistributedSampler
    from ultralytics.data.build import InfiniteDataLoader

    from raytrain_yolo.train.preemption import install

    class Files(torch.utils.data.Dataset):
        im_files = [f"{i}.jpg" for i in range(80)]

        def __len__(self):
            return len(self.im_files)

        def __getitem__(self, i):
            return {"im_file": self.im_files[i]}

    def loader(resume=None):
        sampler = DistributedSampler(Files(), num_replicas=2, rank=1, shuffle=True, seed=0)
        dl = InfiniteDataLoader(Files(), batch_size=4, sampler=sampler, num_workers=workers,
                                collate_fn=lambda b: {"im_file": [x["im_file"] for x in b]})
        return dl, install(dl, Files.im_files, resume)

    def epoch(dl, step, e):  # Ultralytics' loop: set_epoch, then the epoch's batches; the first names the pass
        dl.sampler.set_epoch(e)
        enumerate(dl)  # Ultralytics' loop makes one iterator on every rank and iterates another one on rank 0
        batches = []
        for b in dl:
            if not batches:
                step.first_batch(b["im_file"][0])
            batches.append(b["im_file"])
        return batches

    dl, step = loader()
    assert len(dl) == 10
    straight = {e: epoch(dl, step, e) for e in (1, 2)}
    order = step.current  # the epoch whose order epoch 2's pass was drawn with
    straight[3] = epoch(dl, step, 3)
    assert order == (2 if workers == 0 else 1)
    assert straight[2] != straight[3] and all(len(b) == 10 for b in straight.values())

    resumed, step = loader({"step": 3, "order_epoch": order})
    assert len(resumed) == 10  # Ultralytics' batch count (warmup, schedule) is the full epoch's
    assert epoch(resumed, step, 2) == straight[2][3:]
    assert epoch(resumed, step, 3) == straight[3]


def test_a_finished_run_resumed_sends_mlflow_the_epochs_it_lacks(tmp_path):
    """A run stopped after its last checkpoint was registered and before its end (Ctrl-C of a sweep, a lost driver)
    had never logged its last epoch: rank 0 holds each epoch's metrics until Ray registered its checkpoint, and the
    last one until the end. The resume finds the run finished and trains nothing; it now sends MLflow (a real sqlite
    store) the epochs the checkpoint's history has and the run lacks, each once. test_hpo's Ctrl-C test met this."""
    from mlflow.tracking import MlflowClient

    from raytrain_yolo.core.tracking import EpochLogger
    from raytrain_yolo.train.worker import _log_missed_epochs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("finished")).info.run_id
    history = [{"epoch": 1, "lr/pg0": 0.1, "fitness": 0.2}, {"epoch": 2, "lr/pg0": 0.05, "fitness": 0.3}]
    EpochLogger(uri, run).log_epoch(history[0])  # what the attempt logged before it was stopped
    _log_missed_epochs({"tracking": {"uri": uri, "run_id": run, "client_settings": None}}, {"history": history}, None)
    for key in ("lr/pg0", "fitness"):
        assert sorted(m.step for m in client.get_metric_history(run, key)) == [1, 2], key
