"""Issue: run on a cluster. A real local Ray head with token authentication, jobs submitted through the Jobs API
(`fit` with `ray job submit --working-dir`, `val` and `predict` with the Python SDK and no working_dir: the package
is installed on the cluster's Python), and the cluster/ files checked against what reads them.

The head (tests/raycluster.py, 2 CPUs) is the token head, this module's alone: started as `ray start --head --block`
in its own session and process group and stopped when the module ends, also when a test fails. Its token lives in
a temporary HOME; its own --temp-dir keeps `ray.init()` in other tests from finding it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, free_port, load_summary, mlflow_runs, wait_for
from raycluster import BIN, RAY, Head, clean_env, http_status, start_head

CLUSTER = ROOT / "cluster"
JOB_TIMEOUT = 480  # one 2-epoch job takes about 45 s on 2 idle cores; other tests may share them
EPOCHS = 2


@pytest.fixture(scope="module")
def head():
    """A head with token authentication on (tests/raycluster.py), for this module's Jobs API tests; stopped with the
    module (left idle for the rest of the session, a head cost ~8% of a core: its dashboard, agent and log monitor)."""
    with start_head(auth=True) as running:
        yield running


def fit_command(storage: Path, name: str, db: Path) -> list[str]:
    return ["python", "-m", "raytrain_yolo.fit", "--cpu", "--num-workers", "2", "--synthetic-train", "64",
            "--synthetic-val", "16", f"epochs={EPOCHS}", "imgsz=96", "--storage-path", str(storage), "--name", name,
            "--tracking-uri", f"sqlite:///{db}"]


def job_env_vars() -> dict:
    """Reuse the session's synthetic dataset and Ultralytics settings file (conftest.py: not the real HOME's)."""
    return {"RAYTRAIN_YOLO_CACHE": os.environ["RAYTRAIN_YOLO_CACHE"], "YOLO_CONFIG_DIR": os.environ["YOLO_CONFIG_DIR"],
            "PYTHONUNBUFFERED": "1"}


def submit_and_wait(head: Head, argv: list, what: str, cwd: Path | None = None, timeout: float = JOB_TIMEOUT) -> str:
    """Submit `argv` through the Jobs API SDK (no working_dir: the package is installed on the cluster's Python),
    run from `cwd` when given, wait for it to end, and return its logs; it must have SUCCEEDED."""
    from ray.job_submission import JobStatus, JobSubmissionClient

    client = JobSubmissionClient(head.url, headers=head.auth_headers)
    entrypoint = shlex.join(map(str, argv))
    if cwd is not None:
        entrypoint = f"cd {shlex.quote(str(cwd))} && {entrypoint}"
    sid = client.submit_job(entrypoint=entrypoint, runtime_env={"env_vars": job_env_vars()},
                            submission_id=f"raytrain-yolo-{what}-{uuid.uuid4().hex[:8]}")
    done = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    status = wait_for(lambda: (st := client.get_job_status(sid)) in done and st, timeout=timeout, interval=0.5,
                      what=f"job {sid}")
    logs = client.get_job_logs(sid)
    assert status == JobStatus.SUCCEEDED, logs[-4000:]
    return logs


def check_finished_run(logs: str, storage: Path, name: str, db: Path) -> dict:
    """summary.json says 2 workers and 2 epochs, MLflow has the run FINISHED, and the job's log names both."""
    summary = load_summary(storage, name)
    assert summary["world_size"] == 2 and summary["epochs_completed"] == EPOCHS, summary
    assert summary["device"] == "cpu" and not summary["error"]
    assert len(summary["workers"]) == 2

    uri = f"sqlite:///{db}"
    client, runs = mlflow_runs(uri)
    by_id = {r.info.run_id: r for r in runs}
    run = by_id[summary["mlflow_run_id"]]
    assert run.info.status == "FINISHED" and run.info.run_name == name
    assert run.data.params["ray/num_workers"] == "2"

    # What cluster/README.md tells users to look for in `ray job logs <id>`.
    path = re.search(r"^summary\s+(\S+)\s*$", logs, re.M)
    run_id = re.search(r"^mlflow run id\s+(\S+)\s*$", logs, re.M)
    assert path and run_id, logs[-3000:]
    assert path.group(1) == str(storage / name / "summary.json")
    assert run_id.group(1) == run.info.run_id
    return summary


# --- the cluster/ files, checked against what reads them (no cluster needed) -------------------------------


@pytest.mark.quick
def test_cluster_yaml_is_valid_for_the_ray_cluster_launcher():
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((CLUSTER / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)

    types = config["available_node_types"]
    head_type = types[config["head_node_type"]]
    assert "GPU" not in head_type.get("resources", {}) or head_type["resources"]["GPU"] == 0
    workers = {k: v for k, v in types.items() if k != config["head_node_type"]}
    gpu_workers = [v for v in workers.values() if v.get("resources", {}).get("GPU", 0) > 0]
    assert gpu_workers, "a GPU worker node type"
    for w in gpu_workers:
        assert 0 < w["min_workers"] <= w["max_workers"] <= config["max_workers"]
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and "raytrain_yolo" in setup
    head_start = " ".join(config["head_start_ray_commands"])
    assert "RAY_AUTH_MODE=token" in head_start and "ray start --head" in head_start
    assert "RAY_AUTH_MODE=token" in " ".join(config["worker_start_ray_commands"])
    assert any(remote.endswith(".ray/auth_token") for remote in config["file_mounts"]), "the token reaches every node"


@pytest.mark.quick
def test_rayjob_manifest_structure():
    docs = [d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d]
    jobs = [d for d in docs if d.get("kind") == "RayJob"]
    assert len(jobs) == 1
    job = jobs[0]
    assert job["apiVersion"] == "ray.io/v1" and job["metadata"]["name"]
    spec = job["spec"]
    entry = spec["entrypoint"]
    assert "python -m raytrain_yolo.fit" in entry and "--storage-path" in entry
    storage = shlex.split(entry)[shlex.split(entry).index("--storage-path") + 1]

    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    head_pod = cluster["headGroupSpec"]["template"]["spec"]
    groups = cluster["workerGroupSpecs"]
    gpu_groups = [g for g in groups
                  if any("nvidia.com/gpu" in c.get("resources", {}).get("limits", {})
                         for c in g["template"]["spec"]["containers"])]
    assert gpu_groups, "a worker group with nvidia.com/gpu limits"
    for g in gpu_groups:
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]

    pods = [head_pod] + [g["template"]["spec"] for g in groups]
    for pod in pods:
        for c in pod["containers"]:
            env = {e["name"]: e for e in c.get("env", [])}
            assert "MLFLOW_TRACKING_URI" in env, c["name"]
        # --storage-path is shared: the same volume at the same path in every pod (or a cloud URI).
        if "://" not in storage:
            mounts = [m["mountPath"] for c in pod["containers"] for m in c.get("volumeMounts", [])]
            assert any(storage.startswith(m.rstrip("/") + "/") for m in mounts), (storage, mounts)
    if "://" not in storage:
        claims = {v["persistentVolumeClaim"]["claimName"] for pod in pods for v in pod.get("volumes", [])
                  if "persistentVolumeClaim" in v}
        assert len(claims) == 1, claims
        pvcs = [d for d in docs if d.get("kind") == "PersistentVolumeClaim"]
        assert [p["metadata"]["name"] for p in pvcs] == list(claims)
        assert pvcs[0]["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.quick
def test_runtime_env_yaml_is_a_valid_runtime_env():
    from ray.runtime_env import RuntimeEnv

    rt = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**rt)  # Ray's own validation of the fields
    for pattern in ("runs/", "mlruns/", "mlflow.db", ".venv/", "datasets/", "*.pt", ".git"):
        assert pattern in rt["excludes"], pattern
    assert rt["env_vars"]["YOLO_OFFLINE"] == "1"
    assert all(isinstance(v, str) for v in rt["env_vars"].values())


@pytest.mark.quick
def test_rayjob_entrypoint_is_a_valid_fit_command():
    """The RayJob's entrypoint, read by the real `fit` parser and checked as `fit` checks it (no cluster needed)."""
    from raytrain_yolo import fit
    from raytrain_yolo.core.cli import spec_from_args
    from raytrain_yolo.core.config import check_batch, resolve_train_args

    job = next(d for d in yaml.safe_load_all((CLUSTER / "rayjob.yaml").read_text()) if d and d.get("kind") == "RayJob")
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "raytrain_yolo.fit"], argv
    ns = fit.build_parser().parse_args(argv[3:])
    spec = spec_from_args(ns, [o for o in ns.overrides if not o.startswith("data=")])
    args = resolve_train_args(spec)
    check_batch(args["batch"], spec.scaling.num_workers, spec.scaling.min_workers)
    import ray

    assert job["spec"]["rayClusterSpec"]["rayVersion"].split(".")[:2] == ray.__version__.split(".")[:2]


def test_local_up_starts_a_token_cluster_that_local_down_stops(tmp_path):
    """cluster/local-up.sh as the README runs it, on free ports and with its token in a temporary HOME:
    `ray job submit` reaches the head with the token (and not without), then local-down.sh stops it all."""
    import psutil

    home, temp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="rtyu-", dir="/tmp"))
    home.mkdir()
    ports = set()
    while len(ports) < 7:
        ports.add(free_port())
    gcs, dash, agent, agent_grpc, runtime_env, metrics, client = ports
    env = {**clean_env(), "HOME": str(home), "RAY": RAY, "RAY_PORT": str(gcs), "RAY_DASHBOARD_PORT": str(dash),
           "RAY_TEMP_DIR": str(temp), "RAY_NUM_CPUS": "1",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    extra = ["--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
             "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
             "--ray-client-server-port", str(client)]
    pid_file = temp / "local-up.pid"
    try:
        up = subprocess.run([str(CLUSTER / "local-up.sh"), *extra], env=env, capture_output=True, text=True,
                            timeout=240)
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        assert "token authentication ON" in up.stdout
        head_pid = int(pid_file.read_text())
        url = f"http://127.0.0.1:{dash}"
        job = [RAY, "job", "submit", "--address", url, "--", "python", "-c",
               "import ray; ray.init(); print('cpus', ray.cluster_resources()['CPU'])"]
        anonymous = subprocess.run(job, env=env, capture_output=True, text=True, timeout=120)
        assert anonymous.returncode != 0 and "Authentication required" in anonymous.stdout + anonymous.stderr, \
            anonymous.stdout[-2000:] + anonymous.stderr[-2000:]
        with_token = subprocess.run(job, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                                    timeout=180)
        assert with_token.returncode == 0, with_token.stdout[-2000:] + with_token.stderr[-2000:]
        assert "cpus 1.0" in with_token.stdout and "succeeded" in with_token.stdout + with_token.stderr
    finally:
        down = subprocess.run([str(CLUSTER / "local-down.sh")], env=env, capture_output=True, text=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not pid_file.exists()
    left = [p for p in psutil.process_iter() if _in_group(p, head_pid)]
    assert not left, f"processes of the local cluster survived local-down.sh: {left}"
    with pytest.raises(OSError):
        http_status(f"{url}/api/jobs/")


@pytest.mark.quick
def test_the_local_cluster_scripts_trust_only_their_own_state(tmp_path):
    """Issue 44, 4: local-up.sh keeps its pid file, log and sockets in a folder of this user's alone: a folder at that
    path that is a link, another user's, or writable by others is refused before anything starts (its planter could
    plant the pid file local-down.sh signals, or a link a root-owned file is truncated through); and local-down.sh
    signals only the head its pid file names, never a process the file names by mistake."""
    env = {**clean_env(), "RAY": "/bin/false", "HOME": str(tmp_path)}  # nothing may get as far as Ray

    def up(state) -> subprocess.CompletedProcess:
        return subprocess.run([str(CLUSTER / "local-up.sh")], env={**env, "RAY_TEMP_DIR": str(state)},
                              capture_output=True, text=True, timeout=60)

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)
    cases = {"link": "is a symbolic link", "open": "may be written by others"}
    if os.geteuid() == 0:  # a folder of another user's needs root to make
        (tmp_path / "theirs").mkdir()
        os.chown(tmp_path / "theirs", 65534, 65534)
        cases["theirs"] = "is not a folder of yours"
    for name, words in cases.items():
        proc = up(tmp_path / name)
        assert proc.returncode == 2 and words in proc.stderr, (name, proc.returncode, proc.stderr)
        assert not list((tmp_path / "elsewhere").iterdir()), "nothing written through the link"
    state = Path(tempfile.mkdtemp(prefix="rtyd-", dir=tmp_path))
    bystander = subprocess.Popen(["sleep", "120"])
    try:
        (state / "local-up.pid").write_text(str(bystander.pid))  # stale: that pid is now another program's
        down = subprocess.run([str(CLUSTER / "local-down.sh")], env={**env, "RAY_TEMP_DIR": str(state)},
                              capture_output=True, text=True, timeout=60)
        assert down.returncode == 0 and "stale pid file" in down.stdout, down.stdout + down.stderr
        assert bystander.poll() is None, "local-down.sh signalled a process that is not its cluster's head"
        assert not (state / "local-up.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()


def _in_group(p, pgid: int) -> bool:
    import psutil

    try:
        return os.getpgid(p.pid) == pgid and p.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


# --- a real cluster ----------------------------------------------------------------------------------------


def test_token_authentication_is_on(head):
    assert http_status(f"{head.url}/api/jobs/") == 401
    assert http_status(f"{head.url}/api/jobs/", {"Authorization": "Bearer not-the-token"}) == 403
    assert http_status(f"{head.url}/api/jobs/", head.auth_headers) == 200
    # The CLI without RAY_AUTH_MODE=token sends no token, even where a token file exists.
    proc = subprocess.run([RAY, "job", "list", "--address", head.url], env=clean_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Authentication required" in proc.stdout + proc.stderr
    proc = subprocess.run([RAY, "job", "list", "--address", head.url], env=head.client_env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_ray_job_submit_cli_with_working_dir_and_runtime_env(head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    # cluster/runtime_env.yaml as users pass it, plus this session's env vars.
    rt = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    rt["env_vars"] = {**rt.get("env_vars", {}), **job_env_vars()}
    rt_path = tmp_path / "runtime_env.yaml"
    rt_path.write_text(yaml.safe_dump(rt))
    storage, db, name = tmp_path / "runs", tmp_path / "mlflow.db", "cli"
    sid = f"raytrain-yolo-cli-{uuid.uuid4().hex[:8]}"

    # Blocking submit, as the README shows: streams the job's log and exits 0 only when the job SUCCEEDED.
    proc = subprocess.run(
        [RAY, "job", "submit", "--address", head.url, "--submission-id", sid, "--working-dir", ".",
         "--runtime-env", str(rt_path), "--", *fit_command(storage, name, db)],
        cwd=ROOT, env=head.client_env, capture_output=True, text=True, timeout=JOB_TIMEOUT,
    )
    assert proc.returncode == 0, (proc.stdout[-4000:], proc.stderr[-2000:])
    assert f"Job '{sid}' succeeded" in proc.stdout + proc.stderr

    logs = subprocess.run([RAY, "job", "logs", "--address", head.url, sid], env=head.client_env,
                          capture_output=True, text=True, timeout=120)
    assert logs.returncode == 0, logs.stderr[-2000:]
    check_finished_run(logs.stdout, storage, name, db)

    client = JobSubmissionClient(head.url, headers=head.auth_headers)
    info = client.get_job_info(sid)
    assert info.status == JobStatus.SUCCEEDED
    # The job ran the uploaded copy of the repository, without what runtime_env.yaml excludes.
    pkg = info.runtime_env["working_dir"]
    assert pkg.startswith("gcs://_ray_pkg_"), pkg
    copy = head.base / "ray" / "session_latest" / "runtime_resources" / "working_dir_files" / pkg[len("gcs://"):-4]
    assert copy.is_dir(), copy
    uploaded = {p.name for p in copy.iterdir()}
    assert {"raytrain_yolo", "pyproject.toml", "cluster"} <= uploaded, uploaded
    assert not uploaded & {".git", ".venv", "runs", "mlflow.db"}, uploaded


def test_val_and_predict_as_jobs(head, task_run, tmp_path):
    """`val` and `predict` submitted through the Jobs API's Python SDK, without a working_dir (the package is
    installed on the cluster's Python, so the entrypoint needs no upload), join the job's cluster (RAY_ADDRESS):
    val's metrics and predict's Parquet rows are those Ultralytics gives for the same checkpoint and images. (A
    `fit` job through the SDK was a test of its own: the SDK's submission path is this one, and `fit` as a job is
    test_ray_job_submit_cli_with_working_dir_and_runtime_env's.)"""
    import pyarrow.parquet as pq

    from raytrain_yolo.core.config import SyntheticSpec
    from raytrain_yolo.data.synthetic import ensure_synthetic
    from test_predict import CONF, assert_same_objects, by_image, ultralytics_objects
    from test_val import assert_same_metrics, ultralytics_val

    _, s = task_run("detect")
    metrics = tmp_path / "val.json"
    submit_and_wait(head, ["python", "-m", "raytrain_yolo.val", "--cpu", "--num-workers", "1", "--storage-path",
                           str(tmp_path), "--output", str(metrics), f"model={s['last_checkpoint']}", f"data={s['data']}",
                           "batch=4"], "val")
    got = json.loads(metrics.read_text())
    assert got["images"] == 16 and got["workers"] == 1
    assert_same_metrics(got["metrics"], ultralytics_val(s, batch=4)[0])
    images = ensure_synthetic(SyntheticSpec(train=8, val=16, imgsz=64)).parent / "images" / "val"
    out = tmp_path / "preds"
    logs = submit_and_wait(head, ["python", "-m", "raytrain_yolo.predict", "--cpu", "--num-workers", "1",
                                  "--storage-path", str(tmp_path), "--output", str(out),
                                  f"model={s['last_checkpoint']}", f"source={images}", f"conf={CONF}", "batch=4"],
                           "predict")
    assert re.search(rf"^parquet\s+\d+ rows in {re.escape(str(out))}\s*$", logs, re.M), logs[-3000:]
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["images"] == 16 and summary["workers"] == 1
    ours = by_image(pq.read_table(out).to_pylist())
    assert assert_same_objects(ours, ultralytics_objects(s["last_checkpoint"], str(images))) > 0
