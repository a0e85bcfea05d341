"""MLflow, and nothing else touches mlflow.

One training is one MLflow run. The driver owns its life cycle: it creates the run (or finds the run of an
earlier attempt with the same storage path and name), logs the scaling parameters and versions, and ends it
FINISHED or FAILED. Rank 0 of the workers logs the Ultralytics arguments, the per-epoch metrics and the
checkpoint artifacts into that run by id, so restarted workers keep writing to the same run.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from importlib import metadata
from pathlib import Path
from typing import Any

from raytrain_yolo.core.config import RunSpec
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.storage import is_uri as storage_is_uri
from raytrain_yolo.core.storage import redact

WEIGHTS_DIGEST_TAG = "raytrain_yolo.best_sha256"  # run and model version tag: SHA-256 of weights/best.pt
RUN_KEY_TAG = "raytrain_yolo.run"  # <storage>/<name>: identifies one training across driver restarts
SENTINEL_METRIC = "lr/pg0"  # logged every epoch: its steps tell which epochs MLflow has
PROBE_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
PATIENT_PROBE_S = 5.0  # after the run, how often a server that does not answer is asked again


def mlflow_retry_budget_s() -> float:
    """Seconds MLflow's own HTTP retries would wait in all (MLFLOW_HTTP_REQUEST_MAX_RETRIES retries, urllib3's
    backoff `MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR * 2**(k-1)` capped at 120 s each; jitter left out): about 4
    minutes at MLflow's defaults (7, 2), 0 with MLFLOW_HTTP_REQUEST_MAX_RETRIES=0."""
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR, MLFLOW_HTTP_REQUEST_MAX_RETRIES

    retries, factor = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get(), MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR.get()
    return float(sum(min(120.0, factor * 2 ** (k - 1)) for k in range(1, retries + 1)))


def resolve_uri(spec: RunSpec) -> str:
    """--tracking-uri, else $MLFLOW_TRACKING_URI, else an SQLite store `mlflow.db` in the working directory.

    Local stores come back absolute, in every form MLflow documents (a folder, `file:./mlruns`, `file:/abs`,
    `file:///abs`, `sqlite:///relative.db`): a tune trial runs in a folder of its own and must find the same
    store. `databricks` and every URI with a scheme of its own are left as given."""
    from mlflow.utils.file_utils import local_file_uri_to_path
    from mlflow.utils.uri import get_uri_scheme

    uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        return f"sqlite:///{Path.cwd() / 'mlflow.db'}"
    scheme = get_uri_scheme(uri)
    if uri == "databricks" or (scheme not in ("", "file", "sqlite") and len(scheme) > 1):
        return uri
    if scheme in ("", "file") or len(scheme) == 1:  # a folder (a Windows drive letter too): MLflow's file store
        return Path(local_file_uri_to_path(uri) if scheme == "file" else uri).expanduser().resolve().as_uri()
    if not uri[len("sqlite:///"):].startswith("/"):  # sqlite:///relative.db: relative to this folder
        return f"sqlite:///{Path(uri[len('sqlite:///'):]).resolve()}"
    return uri


def _artifact_location(uri: str) -> str | None:
    """Beside a local SQLite store, not in whichever working directory created the experiment first
    (under `ray job submit --working-dir` that is a temporary copy of the code)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


def metric_key(key: str) -> str:
    """MLflow refuses parentheses: `metrics/mAP50(B)` is logged as `metrics/mAP50B` (as Ultralytics does)."""
    return key.replace("(", "").replace(")", "")


def _client(uri: str):
    """A client of `uri`. When the URI carries credentials (`http://user:password@host`), MLflow's own "View run at"
    links, which print the URI as given, are off in this process (MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT)."""
    from mlflow import MlflowClient

    if redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    return MlflowClient(tracking_uri=uri)


def client_settings() -> dict[str, str]:
    """This process's MLflow client settings: every `MLFLOW_*` environment variable (credentials, TLS, retries and
    timeouts, the S3 endpoint for artifacts). Ray does not hand a driver's environment to processes on other nodes,
    so the processes that talk to MLflow for a run (rank 0, a sweep's trials) take them from here, through Ray's
    object store (not the runtime environment, which Ray's dashboard shows): rank 0 then reaches the server the
    driver checked, with its credentials and its retry budget."""
    return {k: v for k, v in os.environ.items() if k.startswith("MLFLOW_")}


def use_client_settings(settings: dict[str, str] | None) -> None:
    """Apply `client_settings()` taken on the driver in this process (rank 0, a trial), over its own."""
    os.environ.update(settings or {})


@contextmanager
def _probing(short_timeout: bool = True):
    """MLflow's HTTP client without its own retries and, with `short_timeout`, with a 5-s timeout (PROBE_ENV), for
    this block only: a question whose answer may be "the server is down" must not wait minutes for MLflow's backoff.
    (The end of a run keeps MLflow's timeout: its calls upload the weights.)"""
    env = PROBE_ENV if short_timeout else {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextmanager
def failed_on_error(tracker: "RunTracker | None"):
    """A sweep's body: when it raises, its MLflow run ends FAILED (KILLED for Ctrl-C) and the error goes on."""
    try:
        yield
    except BaseException as e:
        if tracker:
            tracker.failed(e)
        raise


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return redact(text.splitlines()[0][:200] if text else type(e).__name__)


def check_reachable(uri: str, experiment: str | None = None) -> None:
    """Say before training, not after an hour, that the tracking server does not answer, or that `experiment` was
    deleted (MLflow keeps a deleted experiment's name, refuses new runs in it and refuses to create it again).

    Raises UserError naming the URI (credentials redacted) or the experiment, and the fix."""
    try:
        with _probing():
            client = _client(uri)
            client.search_experiments(max_results=1)
            exp = client.get_experiment_by_name(experiment) if experiment else None
    except Exception as e:  # noqa: BLE001 - any failure here means: cannot track
        raise UserError(
            f"MLflow tracking URI {redact(uri)} does not answer ({_first_line(e)}): start the server, fix "
            "--tracking-uri, or pass --no-tracking"
        ) from None
    if exp is not None and exp.lifecycle_stage == "deleted":
        raise UserError(
            f"MLflow experiment '{experiment}' in {redact(uri)} is deleted: restore it with `mlflow experiments restore "
            f"--experiment-id {exp.experiment_id}` (MLFLOW_TRACKING_URI={redact(uri)}), or log to another with "
            "--experiment NAME")
    handed = handed_run_id()
    if handed:
        try:
            with _probing():
                _client(uri).get_run(handed)
        except Exception as e:  # noqa: BLE001
            raise UserError(f"MLFLOW_RUN_ID={handed} is not a run in {redact(uri)} ({_first_line(e)}): unset it, or "
                            "set MLFLOW_TRACKING_URI to the store that holds it") from None


def handed_run_id() -> str | None:
    """A run a platform made and handed over in MLFLOW_RUN_ID: logged into as Ultralytics' integration does
    (`mlflow.start_run()` takes that run), instead of a new one."""
    return os.environ.get("MLFLOW_RUN_ID") or None


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("ray", "ultralytics", "torch", "mlflow", "raytrain_yolo"):
        try:
            out[f"version/{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def _job_submission_id() -> str | None:
    """Set when running as a `ray job submit` entrypoint (the job config travels in this variable)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except (ValueError, AttributeError):
        return None


class RunTracker:
    """Driver side: create or resume the run, log what only the driver knows, end it with a status."""

    def __init__(self, spec: RunSpec):
        self.spec = spec
        self.uri = resolve_uri(spec)
        self.client = None
        self.run_id: str | None = None
        self.resumed = False

    def start(self, extra_params: dict[str, Any]) -> str:
        check_reachable(self.uri, self.spec.tracking.experiment)
        self.client = _client(self.uri)
        key = redact(self.spec.tracking.run_key or self.spec.run_dir)  # a tag: never a credential
        handed = None if self.spec.tracking.parent_run_id else handed_run_id()
        if handed:  # the platform's run: ours to log into, in its own experiment
            self.run_id, self.resumed = handed, True
            self.client.update_run(handed, status="RUNNING")
            self.client.set_tag(handed, RUN_KEY_TAG, key)
            log_params(self.client, handed, {**extra_params, **versions()})
            return handed
        exp = self.client.get_experiment_by_name(self.spec.tracking.experiment)
        exp_id = exp.experiment_id if exp else self.client.create_experiment(
            self.spec.tracking.experiment, artifact_location=_artifact_location(self.uri)
        )
        found = self.client.search_runs(
            [exp_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'", max_results=1, order_by=["start_time DESC"]
        )
        if found and found[0].info.status != "FINISHED":
            self.run_id, self.resumed = found[0].info.run_id, True
            self.client.update_run(self.run_id, status="RUNNING")
            log_params(self.client, self.run_id, {**extra_params, **versions()})  # what the lost attempt did not
        else:
            tags = {RUN_KEY_TAG: key, "ray.result_path": key, "ray.world_size": str(self.spec.scaling.num_workers)}
            if commit := _git_commit():
                tags["mlflow.source.git.commit"] = commit
            if job := _job_submission_id():
                tags["ray.job_submission_id"] = job
            if self.spec.tracking.parent_run_id:
                tags["mlflow.parentRunId"] = self.spec.tracking.parent_run_id
            run = self.client.create_run(exp_id, run_name=self.spec.name, tags=tags)
            self.run_id = run.info.run_id
            log_params(self.client, self.run_id, {**extra_params, **versions()})
        return self.run_id

    def finish(self, status: str, summary: dict[str, Any] | None = None) -> list[str]:
        """Log the summary, register the model (--register-model), end the run with `status`. A tracking server
        that does not answer ends nothing: one line says so, and the return value names what did not reach it."""
        if not self.run_id:
            return []
        unsent: list[str] = []
        steps = []
        if summary is not None:
            steps.append(("summary.json", lambda: self._log_summary(summary)))
            if self.spec.tracking.register_model and summary.get("best_checkpoint"):
                steps.append((f"model version of {self.spec.tracking.register_model}",
                              lambda: self._register(self.spec.tracking.register_model)))
            elif self.spec.tracking.register_model:
                print(f"warning: --register-model {self.spec.tracking.register_model}: not registered, the run "
                      "has no best.pt (it trained no epoch, or was saved with save=False)", file=sys.stderr,
                      flush=True)
        steps.append((f"run status {status}", lambda: self.client.set_terminated(self.run_id, status=status)))
        for what, call in steps:
            try:
                with _probing() if unsent else nullcontext():
                    call()
            except Exception as e:  # noqa: BLE001 - the training is done; tracking never undoes it
                if not unsent:
                    print(f"mlflow: tracking server {redact(self.uri)} does not answer ({_first_line(e)}): run "
                          f"{self.run_id} did not get {what}", file=sys.stderr, flush=True)
                unsent.append(what)
        return unsent

    def _log_summary(self, summary: dict[str, Any]) -> None:
        """summary.json as an artifact, and each rank's mean step time and data wait as metrics `ranks/<r>/step_s`,
        `ranks/<r>/data_wait_s` (seconds; the last attempt's workers): a straggler is one line in MLflow's UI."""
        from mlflow.entities import Metric

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "summary.json"
            path.write_text(redact(json.dumps(summary, indent=2, default=str)))
            self.client.log_artifact(self.run_id, str(path))
        now = int(time.time() * 1000)
        figures = [Metric(f"ranks/{w['rank']}/{k}", float(w[k]), now, 0) for w in summary.get("workers") or []
                   for k in ("step_s", "data_wait_s") if w.get(k) is not None]
        if figures:
            self.client.log_batch(self.run_id, metrics=figures)

    def failed(self, e: BaseException) -> None:
        """End the run after an exception: KILLED for Ctrl-C, else FAILED."""
        self.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")

    def finished(self, artifacts) -> None:
        """Log a sweep's output files and end its run FINISHED."""
        for path in artifacts:
            self.log_artifact(path)
        self.finish("FINISHED")

    def log_artifact(self, path: str) -> None:
        if self.run_id and not storage_is_uri(path):
            self.client.log_artifact(self.run_id, path)

    def _register(self, name: str) -> None:
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name)
        except MlflowException:
            pass  # already registered: add a version
        held = [f.path for f in self.client.list_artifacts(self.run_id, "weights")]
        if "weights/best.pt" not in held:  # rank 0 could not upload it (the server was down at the end)
            raise RuntimeError(f"run {self.run_id} holds no weights/best.pt, so no version was registered; "
                               "log it, then register it with MLflow")
        run = self.client.get_run(self.run_id)
        digest = run.data.tags.get(WEIGHTS_DIGEST_TAG)
        self.client.create_model_version(name, source=f"{run.info.artifact_uri}/weights", run_id=self.run_id,
                                         tags={WEIGHTS_DIGEST_TAG: digest} if digest else None)


def log_params(client, run_id: str, params: dict[str, Any]) -> dict[str, str]:
    """Log the parameters the run does not hold yet, credentials in URIs redacted; return those it already held
    with another value (key -> the value not logged).

    MLflow refuses to change a logged value. A retry whose first attempt logged its arguments before any
    checkpoint logs them again, and some differ by attempt (with an object-store --storage-path, Ultralytics'
    `project`/`save_dir` is a new temporary folder each time): the first attempt's values stay."""
    from mlflow.entities import Param

    held = client.get_run(run_id).data.params
    values = {k: redact(str(v))[:6000] for k, v in params.items()}
    items = [Param(k, v) for k, v in values.items() if k not in held]
    for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client.log_batch(run_id, params=items[i : i + 100])
    return {k: v for k, v in values.items() if k in held and held[k] != v}


class EpochLogger:
    """Rank 0 side: Ultralytics arguments once, metrics every epoch (step=epoch), artifacts at the end.

    A tracking server that stops answering mid-run (restarted, redeployed, a network cut longer than MLflow's own
    retries) never stops training: what could not be sent is kept, in order, said once on the console, and sent
    when the server answers again (tried at each epoch) or at the end. Every call goes without MLflow's own
    retries: with them, rank 0 waited out an outage shorter than their backoff (about 4 minutes) inside the training
    loop, and every DDP rank with it (measured: a 60 s cut cost 60 s of training, experiments/faults.md); during
    training also with a 5-s timeout (PROBE_ENV), at the end with MLflow's (the weights are uploaded then). At the
    end of the run (`log_outputs`) a call that fails is tried again every PATIENT_PROBE_S seconds for as long as
    MLflow's own retries would have waited (`mlflow_retry_budget_s`: about 4 minutes by default), once: a server
    back within that sends everything at once (MLflow's doubling backoff slept up to 2 minutes more after the
    server was back); after it, the rest is listed.
    `unsent()` names what never reached it, for the summary. `notify` also takes those two lines (the server is
    down, it answers again): the worker hands them to the driver's console, which shows nothing else of rank 0's
    output."""

    def __init__(self, uri: str, run_id: str, log_args: bool = True, notify=None):
        self.uri = uri
        self.notify = notify or (lambda line: None)
        self.client = _client(uri)
        self.run_id = run_id
        self.log_args = log_args
        self.pending: list[tuple[str, Any]] = []  # (what, call) in the order they happened, not yet sent
        self.down = False
        self.training = True  # until log_outputs: no call may hold the training loop
        self.gave_up = False  # after the run, one call waited out the retry budget and failed: no more waiting
        # Steps already in MLflow: a step is logged once. The worker hands an epoch over only once its checkpoint
        # is registered (AfterRegistration), so a logged epoch is the run's, and a restart that trains an epoch
        # again never finds a lost attempt's values of it here. Asked first; with the server down the question
        # waits at the head of the queue, and each step's send, when its turn comes, skips a step the answer holds
        # (a restart's replayed history, sent as the server came back, had logged epoch 1 twice, 2026-12-01).
        # `queued`: steps this process has queued or sent.
        self.logged: set[int] = set()
        self.queued: set[int] = set()
        self._send("the run's logged epochs", lambda: self.logged.update(
            m.step for m in self.client.get_metric_history(run_id, metric_key(SENTINEL_METRIC))))

    def _send(self, what: str, call) -> None:
        """Send what waits, then `call`; on the first failure keep the rest for the next try."""
        self.pending.append((what, call))
        patient = not self.training and not self.gave_up
        deadline = time.monotonic() + (mlflow_retry_budget_s() if patient else 0.0)
        with _probing(short_timeout=not patient):
            while self.pending:
                try:
                    self.pending[0][1]()
                except Exception as e:  # noqa: BLE001 - tracking never ends training
                    if not self.down:
                        self._say(f"mlflow: tracking server {redact(self.uri)} does not answer ({_first_line(e)}); "
                                  "training goes on, and what it misses is sent when it answers again")
                    self.down = True
                    if time.monotonic() < deadline:
                        time.sleep(min(PATIENT_PROBE_S, max(0.0, deadline - time.monotonic())))
                        continue
                    self.gave_up = self.gave_up or patient
                    return
                self.pending.pop(0)
        if self.down:
            self._say(f"mlflow: tracking server {redact(self.uri)} answers again; sent what it had missed")
            self.down = False

    def _say(self, line: str) -> None:
        _rank0_line(line)
        try:
            self.notify(line)
        except Exception:  # noqa: BLE001 - a lost console line never stops training
            pass

    def unsent(self) -> list[str]:
        """What never reached MLflow (empty when everything did)."""
        return [what for what, _ in self.pending]

    def add_to_tag(self, key: str, value: str) -> None:
        """Add `value` to the run's tag `key` (comma-separated, each value once)."""
        def send() -> None:
            held = self.client.get_run(self.run_id).data.tags.get(key, "")
            parts = [p for p in held.split(", ") if p]
            if value not in parts:
                self.client.set_tag(self.run_id, key, ", ".join([*parts, value]))

        self._send(f"the tag {key}", send)

    def sync_history(self, history: list[dict[str, Any]]) -> None:
        """On restart: log the epochs the checkpoint has but MLflow missed."""
        for metrics in history:
            self.log_epoch(metrics)

    def on_pretrain_routine_end(self, trainer) -> None:
        if not self.log_args:
            return
        params = dict(vars(trainer.args))
        params["data/train_images"] = len(trainer.train_loader.dataset)
        params["data/val_images"] = len(trainer.test_loader.dataset)
        params["data/nc"] = trainer.data.get("nc")
        params["device_name"] = _device_name(trainer)

        def send() -> None:
            kept = log_params(self.client, self.run_id, params)
            if kept:  # a retry: MLflow keeps what the first attempt logged
                _rank0_line(f"mlflow: kept the first attempt's value of {', '.join(sorted(kept))}")

        self._send("the Ultralytics arguments", send)

    def log_epoch(self, metrics: dict[str, Any], trainer=None) -> None:
        from mlflow.entities import Metric

        step, now = int(metrics.get("window") or metrics["epoch"]), int(time.time() * 1000)
        if step in self.logged or step in self.queued:
            return
        self.queued.add(step)
        items = [
            Metric(metric_key(k), float(v), now, step)
            for k, v in metrics.items()
            if k not in ("epoch", "window") and isinstance(v, (int, float))
        ]

        def send() -> None:
            if step not in self.logged:  # the server's answer, asked before this, may hold it
                self.client.log_batch(self.run_id, metrics=items)
                self.logged.add(step)

        self._send(f"{'window' if metrics.get('window') else 'epoch'} {step}'s metrics", send)

    def log_outputs(self, trainer) -> None:
        """The weights and Ultralytics' result files, after the last epoch (and whatever still waits)."""
        self.training = False
        files = [(trainer.wdir / name, "weights") for name in ("last.pt", "best.pt") if (trainer.wdir / name).is_file()]
        files += [(f, None) for f in sorted(trainer.save_dir.iterdir())
                  if f.is_file() and f.suffix in {".csv", ".yaml", ".png", ".jpg"}]
        for path, folder in files:
            self._send(f"artifact {folder + '/' if folder else ''}{path.name}",
                       lambda path=path, folder=folder: self.client.log_artifact(self.run_id, str(path), folder))
        best = trainer.wdir / "best.pt"
        if best.is_file():  # what a registered version of this run is checked against before it is loaded
            digest = file_sha256(best)
            self._send("best.pt's digest", lambda: self.client.set_tag(self.run_id, WEIGHTS_DIGEST_TAG, digest))


def file_sha256(path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class AfterRegistration:
    """Hands each epoch's metrics to `send` (EpochLogger.log_epoch) one report later, when Ray has registered that
    epoch's checkpoint, and the last epoch's at the end (`flush`). A worker group lost between a report and Ray
    registering its checkpoint retrains that epoch; logged at once, MLflow kept the lost attempt's values of it and
    skipped the retrained ones as already logged. Ray Train's controller registers a report's checkpoint within a
    poll of its workers (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), long before the next epoch ends. Throughput windows
    have no checkpoint: they go at once. MLflow shows an epoch one epoch later than the console does."""

    def __init__(self, send):
        self.send, self.held = send, None

    def __call__(self, metrics: dict[str, Any], trainer=None) -> None:
        if metrics.get("window") is not None:
            self.send(metrics, trainer)
            return
        if self.held is not None:
            self.send(*self.held)
        self.held = (metrics, trainer)

    def flush(self) -> None:
        """After the last epoch: its metrics too."""
        if self.held is not None:
            self.send(*self.held)
            self.held = None


def _rank0_line(line: str) -> None:
    """A line from rank 0 to its log, once. Inside a Ray Train worker the built-in `print` is Ray Train's
    (RAY_TRAIN_ENABLE_PRINT_PATCH): it sends the line to Train's logger and, with sys.stdout wrapped as Ray wraps
    it, to the stream too, so the run's log got each line twice. Writing to the process's own stdout is one line,
    and leaves Ray's patch in place for the user's code."""
    print(line, file=sys.__stdout__, flush=True)


def _device_name(trainer) -> str:
    import torch

    return torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu"


def end_open_run(uri: str, experiment: str, key: str, status: str, tags: dict[str, str],
                 ended: tuple[str, ...] = ("RUNNING",)) -> None:
    """End the run with this key if it is still RUNNING (or in one of the `ended` states): a tune trial that
    its scheduler stopped, or that failed, was ended by Ray before its own driver code could end it."""
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return
    for run in client.search_runs([exp.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{redact(key)}'"):
        if run.info.status in ended:
            for k, v in tags.items():
                client.set_tag(run.info.run_id, k, redact(str(v))[:5000])
            client.set_terminated(run.info.run_id, status=status)
