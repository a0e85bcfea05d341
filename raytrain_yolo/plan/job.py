"""What the val and predict jobs share: the model they run (a .pt or models:/NAME/VERSION), their workers fitted to
the cluster with fit's rules, and the environment their Ray workers get.

The weights travel through Ray's object store: the driver puts the file's bytes there once and each node writes
its own copy, so `model=` (a registry download included) needs to exist only where the job is started.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from raytrain_yolo.core.config import RunSpec, ScalingSpec, check_name, default_name
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.plan.model import check_weights
from raytrain_yolo.plan.nodes import check_nodes
from raytrain_yolo.plan.resources import resolve_scaling


@dataclass(frozen=True)
class Weights:
    """The job's weights as a worker on any node gets them: from Ray's object store, written once per node.

    `ref` sits in a list so that Ray hands the reference itself to a task or actor, which fetches it only here.
    """

    name: str
    digest: str
    ref: list = field(hash=False)

    @classmethod
    def put(cls, path: str) -> "Weights":
        import ray

        data = Path(path).read_bytes()
        return cls(Path(path).name, hashlib.sha256(data).hexdigest()[:16], [ray.put(data)])

    def local(self) -> str:
        """This node's copy (the driver's own file is not assumed to be here)."""
        import ray

        dest = Path(tempfile.gettempdir()) / "raytrain-yolo-weights" / self.digest / self.name
        if not dest.is_file():
            dest.parent.mkdir(parents=True, exist_ok=True)
            part = dest.with_suffix(f".{os.getpid()}.part")
            part.write_bytes(ray.get(self.ref[0]))
            os.replace(part, dest)  # atomic: actors on one node may write at once
        keep_recent(dest.parent)
        return str(dest)


CACHE_KEEP = 4  # models each node-local cache keeps beyond those in use
CACHE_IN_USE_S = 600  # an entry used this recently is in use (a job may still be starting on it)


def keep_recent(entry: Path, keep: int = CACHE_KEEP, in_use_s: float = CACHE_IN_USE_S) -> None:
    """Mark `entry` (a folder of a node-local cache: `<temp>/raytrain-yolo-weights/`, `-registry/`) used now and
    remove what the cache no longer needs: beyond the `keep` most recently used entries, each one not used for
    `in_use_s` seconds. Before 2026-12-02 both caches kept every model they were ever given (2.4 GB of this project's
    test machine). Another process pruning the same cache at once is harmless: what is gone is skipped."""
    now = time.time()
    os.utime(entry)
    entries = []
    for p in entry.parent.iterdir():
        try:
            entries.append((p.stat().st_mtime, p))
        except OSError:
            continue
    for used, p in sorted(entries, reverse=True)[keep:]:
        if now - used > in_use_s:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


@dataclass
class JobPlan:
    """A checked val/predict job: the driver's local weights (`model`, shipped to the workers as `weights`),
    their task, and the workers to run on."""

    model: str
    task: str
    num_workers: int
    use_gpu: bool
    cpus_per_worker: float
    out_dir: str
    weights: Weights

    def remote_options(self) -> dict:
        """Ray options for one worker (task or actor)."""
        from raytrain_yolo.core.cluster import worker_env

        return {"num_cpus": self.cpus_per_worker, "num_gpus": 1 if self.use_gpu else 0,
                "runtime_env": {"env_vars": worker_env()}}

    @property
    def device(self) -> str:
        """Ultralytics' device inside a worker: Ray gave a GPU worker exactly one visible GPU."""
        return "0" if self.use_gpu else "cpu"


def resolve_model(model: str, tracking_uri: str | None = None) -> str:
    """A local .pt path; `models:/NAME/VERSION` (a model `fit --register-model` registered) is downloaded first."""
    if not str(model).startswith("models:/"):
        return str(Path(model).expanduser().resolve()) if str(model).endswith(".pt") else str(model)
    from raytrain_yolo.core.tracking import WEIGHTS_DIGEST_TAG, check_reachable, file_sha256, resolve_uri

    uri = resolve_uri(RunSpec.from_dict({"tracking": {"uri": tracking_uri}}))
    check_reachable(uri)
    import mlflow
    from mlflow.exceptions import MlflowException

    # A client with the URI, not mlflow.set_tracking_uri: that would export MLFLOW_TRACKING_URI to this process,
    # and a later job here (or its children) would log to the registry's store.
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    name, _, version = model[len("models:/"):].partition("/")
    try:
        if not version and "@" in name:  # models:/NAME@ALIAS
            name, alias = name.split("@", 1)
            version = client.get_model_version_by_alias(name, alias).version
        local = _registry_download(client, uri, name, str(version))
        recorded = client.get_model_version(name, str(version)).tags.get(WEIGHTS_DIGEST_TAG)
    except MlflowException as e:
        first = str(e).strip().splitlines()[0][:200]
        raise UserError(f"model={model} not found in the MLflow registry at {uri} ({first}): check the name and "
                        "version, or --tracking-uri") from None
    found = sorted(local.rglob("best.pt")) or sorted(local.rglob("*.pt"))
    if not found:
        raise UserError(f"model={model} in the MLflow registry holds no .pt file: register a run's weights "
                        "(fit --register-model NAME)")
    if recorded and file_sha256(found[0]) != recorded:  # a .pt is a pickle: never load one that changed
        raise UserError(f"model={model}: {found[0].name} is not the file that was registered (its SHA-256 differs "
                        f"from the version's {WEIGHTS_DIGEST_TAG} tag, {recorded[:12]}...): register the weights you "
                        "trust again, or pass model= a local file you trust")
    return str(found[0])


def _registry_download(client, uri: str, name: str, version: str) -> Path:
    """A registered model version's files, downloaded once per machine into `<temp>/raytrain-yolo-registry/<key>/`
    and read from there by every later job (before 2026-12-01 each job downloaded a new temporary copy and none was
    removed). The key digests the registry's URI, the name, the version and the version's run id and creation
    time: a version's files never change, and a registry made again at the same URI has other run ids."""
    import mlflow

    mv = client.get_model_version(name, version)
    key = hashlib.sha256(f"{uri}\n{name}\n{mv.version}\n{mv.run_id}\n{mv.creation_timestamp}".encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / "raytrain-yolo-registry" / key
    if not dest.is_dir():
        dest.parent.mkdir(parents=True, exist_ok=True)
        part = Path(tempfile.mkdtemp(prefix=f"{key}.part-", dir=dest.parent))
        try:
            source = client.get_model_version_download_uri(name, version)
            mlflow.artifacts.download_artifacts(artifact_uri=source, tracking_uri=uri, dst_path=str(part))
            part.rename(dest)  # whole or not at all; a concurrent job's rename first leaves its copy
        except OSError:
            if not dest.is_dir():
                raise
        finally:
            shutil.rmtree(part, ignore_errors=True)
    keep_recent(dest)
    return dest


def plan(model: str, scaling: ScalingSpec, storage_path: str, name: str | None, prefix: str,
         tracking_uri: str | None = None, wait_s: float = 0,
         check: Callable[[str | None, str], tuple[dict[str, str], str]] | None = None,
         allow_node_local: bool = False, check_first: bool = False) -> JobPlan:
    """The one preflight pass of val and predict, in fit's order: the model; then `check(task, out_dir)`, the
    job's own checks on the driver, which returns what its workers read (argument -> path) and the folder they
    write to ('' for none); then join Ray, fit the workers to the cluster (fit's rules and messages), and make
    sure every node sees those paths and that folder (check_nodes, as for fit). The model is not
    among them: it reaches the workers through the object store (`Weights`). `check_first`: the job's checks need
    no task (predict's source and output), so they run before the model is loaded (seconds on a loaded machine)."""
    from raytrain_yolo.core import storage
    from raytrain_yolo.core.cluster import connect_ray, worker_env

    if model is None:
        raise UserError("no model= given: pass model=PATH.pt or model=models:/NAME/VERSION")
    storage.refuse_credentials(model, "model=")
    storage.refuse_credentials(storage_path, "--storage-path")
    spec = RunSpec(scaling=scaling, storage_path=storage.normalise(storage_path),
                   name=check_name(name or default_name(prefix)), resource_wait_s=wait_s,
                   allow_node_local=allow_node_local)
    if check_first and check:
        reads, writes = check(None, spec.run_dir)
    weights = resolve_model(model, tracking_uri)
    task = check_weights(weights)
    if check and not check_first:
        reads, writes = check(task, spec.run_dir)
    elif not check:
        reads, writes = {}, ""
    connect_ray()
    resolve_scaling(spec)
    local = {f"{k}={v}": v for k, v in reads.items() if v and not storage.is_uri(v)}
    check_nodes(spec, None, None, worker_env(), inputs=local, writes=writes, gloo=False)
    s = spec.scaling
    return JobPlan(weights, task, s.num_workers, bool(s.use_gpu), s.cpus_per_worker, spec.run_dir, Weights.put(weights))
