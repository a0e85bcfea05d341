"""Shared fixtures: real Ray, real Ultralytics, tiny synthetic data generated once per test session.

One Ray head serves each pytest process of the session (tests/raycluster.py; pytest-xdist runs two): the jobs that
`run_cli` starts and the in-process `ray_local` tests join it, as a user's command joins their cluster. It starts on
first use, so `python -m pytest -m quick` (no training run, no cluster) never starts it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from raycluster import start_head

ROOT = Path(__file__).resolve().parents[1]

# Ray 2.60 turns token authentication on for a new local Ray once ~/.ray/auth_token exists, and a process keeps the
# mode of its first ray.init() for good: this process joins the shared head (no authentication) and starts local
# Rays of its own, so every one of them, and every command it runs, has authentication off. The clients of
# test_cluster's token head name their mode and token explicitly.
os.environ["RAY_AUTH_MODE"] = "disabled"

# pytest runs the suite in two processes (pyproject: `-n 2 --dist loadfile`, pytest-xdist; the suite's own CPU use
# leaves about a quarter of two cores idle in one process: fault waits, process starts, one-worker runs). Each
# worker gets a temporary folder of its own, for itself and all it starts (its Ray head, local Rays, job drivers
# and Train workers inherit TMPDIR): the tests that assert "no temporary folder of ours left" see only their own.
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # "gw0", "gw1" under pytest-xdist; None in one process
if XDIST_WORKER:
    import atexit
    import shutil
    import tempfile

    tempfile.tempdir = tempfile.mkdtemp(prefix=f"rt{XDIST_WORKER[2:]}-", dir="/tmp")  # short: Ray's socket paths
    os.environ["TMPDIR"] = tempfile.tempdir
    atexit.register(shutil.rmtree, tempfile.tempdir, True)

# What each launch pays for and no test checks (issue 20, measured on 2 cores: ~3 s and 3-6 s of a ~50 s launch):
# - Ray Train's preemption watcher, one more actor process per run (cloud preemption notices; no test has them);
# - Ultralytics' own MLflow and Ray Tune integrations, which its trainer imports on rank 0 when the settings file
#   enables them (the default) and which our trainer then drops (adapter._DUPLICATE_CALLBACK_MODULES). The tests
#   get a settings file of their own with those two off (the root user's stays untouched), and
#   test_tracking.test_ultralytics_own_tracking_callbacks_are_dropped turns them on to check the drop itself.
# The multi-node clusters (tests/multinode.py) keep Ray's defaults (they pass no RAY_* variable through), and
# test_console's new-user run keeps Ray's and Ultralytics' defaults.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# Ray Train's controller looks at its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default): a run's
# end, a failure and each start are noticed up to one interval late, in every launch and every trial. Ray Train
# passes the variable from the driver to its controller and workers. (A/B on this 2-core machine, 4 runs each of
# one 3-epoch 2-worker fit: median 35.3 s at 0.5 s against 37.9 s at 2 s, runs varying 27-43 s.)
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
if "YOLO_CONFIG_DIR" not in os.environ:
    import atexit
    import shutil
    import tempfile

    import raytrain_yolo  # noqa: F401  (sets YOLO_OFFLINE before Ultralytics is imported)

    os.environ["YOLO_CONFIG_DIR"] = tempfile.mkdtemp(prefix="raytrain-yolo-tests-ultralytics-")
    atexit.register(shutil.rmtree, os.environ["YOLO_CONFIG_DIR"], True)
    from ultralytics.utils import SETTINGS  # after YOLO_CONFIG_DIR: writes its defaults there

    SETTINGS.update(mlflow=False, raytune=False)


def session_folder(tmp_path_factory) -> Path:
    """The session's base temporary folder, which every pytest-xdist worker of the session sees (a worker's own
    base is a folder in it): where what the workers share is made once."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if XDIST_WORKER else base


@contextmanager
def made_once(path: Path):
    """Held by one process of the session at a time (an exclusive lock on `path`): the first worker to need a
    shared thing makes it inside, the others wait and find it made."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory):
    """One dataset cache for the whole session (both pytest-xdist workers: a dataset is written to a temporary
    folder and renamed), shared by in-process runs and CLI subprocesses."""
    cache = os.environ.get("RAYTRAIN_YOLO_CACHE") or str(session_folder(tmp_path_factory) / "synthetic-cache")
    os.environ["RAYTRAIN_YOLO_CACHE"] = cache
    Path(cache).mkdir(parents=True, exist_ok=True)
    return Path(cache)


SEED_SCRIPT = """
import os, shutil, sys
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic
from ultralytics import YOLO
data = ensure_synthetic(SyntheticSpec(train=128, val=16, imgsz=64))
YOLO("yolo26n.yaml").train(data=str(data), imgsz=64, epochs=14, batch=16, nbs=16, optimizer="SGD", lr0=0.02,
    warmup_epochs=0, workers=0, device="cpu", plots=False, project=sys.argv[2], name="seed", exist_ok=True,
    seed=0, amp=False, verbose=False)
shutil.copy(sys.argv[2] + "/seed/weights/last.pt", sys.argv[1] + ".part")
os.replace(sys.argv[1] + ".part", sys.argv[1])
"""


@pytest.fixture(scope="session")
def seed_model(synthetic_cache, tmp_path_factory):
    """A YOLO26n that already finds the shapes a little (mAP50-95 about 0.08), so one epoch tells trials apart:
    from scratch, every trial scores 0 for the first epochs and ASHA or PBT cannot rank them. Plain
    Ultralytics, 14 epochs at 64 px (about 30 s on 2 cores), made once per session and cached with the synthetic
    data."""
    path = synthetic_cache / "hpo-seed-yolo26n-64px.pt"
    with made_once(path.with_suffix(".lock")):
        if not path.is_file():
            work = tmp_path_factory.mktemp("seed")
            proc = subprocess.run([sys.executable, "-c", SEED_SCRIPT, str(path), str(work)], capture_output=True,
                                  text=True, env={**os.environ, "YOLO_OFFLINE": "1"}, timeout=600)
            assert proc.returncode == 0 and path.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return path


_SHARED: dict = {}  # the session's shared head, once started: {"head": Head, "running": its context manager}


def shared_head():
    """The session's shared Ray head (2 CPUs, no authentication), started on first use. Refused to a test marked
    quick: the quick tier promises no cluster."""
    assert not _SHARED.get("quick"), "a test marked quick asked for a Ray cluster: drop the mark or the cluster"
    if "head" not in _SHARED:
        running = start_head()
        _SHARED["head"] = running.__enter__()
        _SHARED["running"] = running
    return _SHARED["head"]


def shared_head_pids() -> set[int]:
    """The processes of the shared head (what its `ray start` started), if it runs; job drivers aside."""
    import psutil

    if "head" not in _SHARED:
        return set()
    try:
        return {p.pid for p in psutil.Process(_SHARED["head"].proc.pid).children(recursive=True)}
    except psutil.Error:
        return set()


# Seconds each module took in one process (the full run of 2026-12-01 23:25 on this project's 2-core machine, the
# shared fixtures counted where they were first made; test_multinode, test_tune, test_hpo and test_job_sources
# estimated from their runs of 2026-12-02, with issue 22's fault cells they took over from the long tier). Modules
# are collected longest first: pytest-xdist hands whole modules to its two workers in collection order, so the last
# ones are short and neither worker ends long after the other. A module not listed goes last; the order inside a
# module stays.
MODULE_SECONDS = {"test_multinode": 620, "test_hpo": 360, "test_job_sources": 200, "test_cluster": 177,
                  "test_core": 110, "test_predict_images": 96, "test_faults": 80, "test_predict": 80, "test_tune": 128,
                  "test_console": 57, "test_augment": 52, "test_tasks": 41, "test_val": 35, "test_train_args": 32,
                  "test_tracking": 31, "test_errors": 13, "test_resources": 12, "test_fault_paths": 9}


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: -MODULE_SECONDS.get(item.path.stem, 0))  # stable: each module's order stays


def pytest_runtest_setup(item):
    _SHARED["quick"] = item.get_closest_marker("quick") is not None


@pytest.fixture(scope="session", autouse=True)
def _stop_shared_head():
    yield
    if "running" in _SHARED:
        _SHARED.pop("head")
        _SHARED.pop("running").__exit__(None, None, None)


@pytest.fixture(scope="module")
def ray_local():
    """This process joined to the shared head (2 CPUs, as CI has), for in-process launches in one test module."""
    import ray

    head = shared_head()
    head.wait_idle()
    saved = {k: os.environ.get(k) for k in head.driver_env}
    os.environ.update(head.driver_env)
    try:
        ray.init(address=head.address, log_to_driver=False)
        yield ray
    finally:
        ray.shutdown()  # also after a failed init: a half-joined process would fail every later ray.init
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


NO_RAY = "127.0.0.1:1"  # a RAY_ADDRESS where nothing listens: a command that should end before Ray ends otherwise


def run_cli(module: str, *args: str, timeout: float = 900, env: dict | None = None, cwd=None, ray: str = "shared"):
    """Run `python -m raytrain_yolo.<module> args...` as users do; return the CompletedProcess.

    `ray`: "shared" joins the session's shared head (RAY_ADDRESS), once the last job's resources are free there;
    "own" starts a local Ray of its own, as a command without RAY_ADDRESS does: for tests about a local Ray, or
    whose workers must inherit this process's environment (a local Ray's workers do; the shared head's have the
    head's); "none" is for commands that must end before Ray starts: RAY_ADDRESS names a port nothing listens on,
    so one that got as far as Ray would end in another error. A RAY_ADDRESS in `env` wins; a None in `env` removes
    that variable.
    """
    assert ray == "none" or not _SHARED.get("quick"), "a test marked quick started a Ray job: drop the mark or the job"
    full_env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    if env is None or "RAY_ADDRESS" not in env:
        full_env.pop("RAY_ADDRESS", None)
        if ray == "shared":
            head = shared_head()
            head.wait_idle()
            full_env.update(head.driver_env)
        elif ray == "none":
            full_env["RAY_ADDRESS"] = NO_RAY
        else:
            assert ray == "own", ray
    return subprocess.run(
        [sys.executable, "-m", f"raytrain_yolo.{module}", *map(str, args)],
        capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd or ROOT,
    )


def refused_in_process(module: str, argv: list, capfd, monkeypatch) -> str:
    """Run `raytrain_yolo.<module>.main(argv)` in this process, as `python -m` would, for a command that must be
    refused before Ray starts (RAY_ADDRESS names a port nothing listens on: one that got as far as Ray would end in
    another error): assert exit 2, a last line `error: ...` and no traceback; return that line. (A subprocess per
    case paid seconds of imports each.)"""
    import importlib

    monkeypatch.setenv("RAY_ADDRESS", NO_RAY)
    capfd.readouterr()
    try:
        rc = importlib.import_module(f"raytrain_yolo.{module}").main([str(a) for a in argv])
    except SystemExit as e:  # argparse's own exit
        rc = e.code
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert rc == 2 and last.startswith("error: ") and "Traceback" not in err, (argv, rc, err[-1500:])
    return last


def load_summary(storage: Path, name: str) -> dict:
    return json.loads((storage / name / "summary.json").read_text())


def total_train_loss(metrics: dict) -> float:
    return sum(v for k, v in metrics.items() if k.startswith("train/") and k.endswith("_loss"))


def start_cli(module: str, *args: str, env: dict | None = None, log_path: Path | None = None):
    """Start `python -m raytrain_yolo.<module>` in the background (for fault injection); output to log_path."""
    full_env = {k: v for k, v in {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}.items() if v is not None}
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", f"raytrain_yolo.{module}", *map(str, args)],
        stdout=out, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT, start_new_session=True,
    )


def train_worker_pids(parent_pid: int) -> list[int]:
    """PIDs of the Ray Train worker processes under one `fit` process (its local Ray's raylet spawns them)."""
    import psutil

    try:
        kids = psutil.Process(parent_pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return train_workers(p.pid for p in kids)


def train_workers(pids) -> list[int]:
    """Those of `pids` that are Ray Train worker processes (still running)."""
    import psutil

    found = []
    for pid in pids:
        try:
            cmdline = psutil.Process(pid).cmdline()
        except psutil.Error:
            continue
        if cmdline and cmdline[0].startswith("ray::RayTrainWorker"):
            found.append(pid)
    return found


class KillFirst:
    """A fault for in-process jobs on the session's shared head: a thread that SIGKILLs the first of the head's
    processes whose title (Ray's process title: `ray::<task>` while it runs that task, `ray::<actor class>.<method>`
    while an actor runs that method) matches the regular expression `title` from its start. Processes whose title
    matches `watch` (default: `title`) are found among the head's processes every 0.2 s and then looked at every
    5 ms, so that a call of a few tenths of a second is caught; no process outside the head is ever touched. Use as
    a context manager; `killed` is the pid, None if none was killed (a test asserts it, so that a job that ended
    before the fault cannot pass as having survived it)."""

    def __init__(self, title: str, watch: str | None = None, timeout: float = 300.0):
        import threading

        self.title, self.watch, self.timeout = title, watch or title, timeout
        self.killed: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import time

        import psutil

        deadline, next_scan, watched = time.monotonic() + self.timeout, 0.0, {}
        while not self._stop.is_set() and time.monotonic() < deadline:
            if time.monotonic() >= next_scan:
                for pid in shared_head_pids() - watched.keys():
                    try:
                        p = psutil.Process(pid)
                        cmd = p.cmdline()
                    except psutil.Error:
                        continue
                    if cmd and re.match(self.watch, cmd[0]):
                        watched[pid] = p
                next_scan = time.monotonic() + 0.2
            for pid, p in list(watched.items()):
                try:
                    cmd = p.cmdline()
                except psutil.Error:
                    watched.pop(pid)
                    continue
                if cmd and re.match(self.title, cmd[0]):
                    p.kill()
                    self.killed = pid
                    return
            time.sleep(0.005)

    def __enter__(self) -> "KillFirst":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints, beside them


def registered_in(snapshot: dict) -> list[str]:
    """The checkpoint folders a run's SNAPSHOT (its controller rewrites it after each checkpoint, across restarts)
    lists as registered and kept: the best `--keep-checkpoints` (2) and the latest; not folders still uploading."""
    return [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results") or []]


def latest_epoch_in(snapshot: dict) -> int:
    """The epoch of the latest checkpoint a run's SNAPSHOT names; 0 before the first."""
    return int(((snapshot.get("latest_checkpoint_result") or {}).get("metrics") or {}).get("epoch", 0))


def wait_for(predicate, timeout: float, interval: float = 0.5, what: str = "condition"):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def mlflow_runs(uri: str, experiment: str = "raytrain_yolo"):
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return client, (client.search_runs([exp.experiment_id]) if exp else [])


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (the package's own helper)."""
    from raytrain_yolo.core.cluster import free_local_port

    return free_local_port()


TASK_MODELS = {"detect": "yolo26n.yaml", "pose": "yolo26n-pose.yaml", "segment": "yolo26n-seg.yaml", "obb": "yolo26n-obb.yaml"}
# Tiny runs that still learn in 2 epochs on 2 gloo workers (measured: every task's total train loss falls).
TINY_TRAIN = {"train": 64, "val": 16, "imgsz": 64}
TINY_ARGS = ("epochs=2", "imgsz=64", "batch=8", "optimizer=AdamW", "lr0=0.002")


@pytest.fixture(scope="session")
def task_run(tmp_path_factory):
    """`task_run(task)`: that task trained once per session with `fit` on the embedded data (2 epochs, 2 gloo
    workers, 64 images of 64 px); returns (CompletedProcess, summary). Shared by the task, val and predict tests,
    also across pytest-xdist workers (the first to ask trains it; its output is kept beside the run)."""
    storage = session_folder(tmp_path_factory) / "task-runs"

    def get(task: str):
        kept = storage / f"{task}.process.json"
        with made_once(storage / f"{task}.lock"):
            if not kept.is_file():
                proc = run_cli(
                    "fit", "--cpu", "--num-workers", 2, "--storage-path", storage, "--name", task, "--no-tracking",
                    "--no-validate-untrained", "--synthetic-train", TINY_TRAIN["train"], "--synthetic-val",
                    TINY_TRAIN["val"], "--synthetic-size", TINY_TRAIN["imgsz"], f"model={TASK_MODELS[task]}",
                    *TINY_ARGS,
                )
                assert proc.returncode == 0, proc.stderr[-3000:]
                kept.write_text(json.dumps({"args": proc.args, "returncode": proc.returncode,
                                            "stdout": proc.stdout, "stderr": proc.stderr}))
        return subprocess.CompletedProcess(**json.loads(kept.read_text())), load_summary(storage, task)

    return get


def start_mlflow_server(folder: Path) -> tuple[subprocess.Popen, str]:
    """A real MLflow server on a free loopback port, its store and artifacts in `folder`, started in a session of
    its own (stop it with os.killpg(proc.pid, ...)); returns (process, URL) once /health answers."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination",
         str(folder / "artifacts"), "--workers", "1"],
        # Tracking only: MLflow's server-side job runner (six huey consumers, ~15 s of CPU to start) stays off.
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return urllib.request.urlopen(f"{url}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 90, what="mlflow server")
    except BaseException:
        os.killpg(server.pid, signal.SIGTERM)
        raise
    return server, url


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow server for the session, over HTTP (test_faults' fault run logs to its default experiment;
    other tests use experiments of their own in it)."""
    server, url = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    try:
        yield url
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
