"""A cluster of several nodes: what every node must see (storage, data, a file-based tracking store, the job's
inputs), asked of the nodes themselves by a small Ray task on each."""

from __future__ import annotations

from pathlib import Path

from raytrain_yolo.core import storage
from raytrain_yolo.core.errors import UserError


NODE_PROBE_TIMEOUT_S = 120  # a node starts a Ray worker process for the probe: seconds on a busy node


def local_path_of_tracking(uri: str | None) -> str | None:
    """The folder a file-based MLflow store lives in (sqlite:///x/mlflow.db, file:///x), else None."""
    if not uri:
        return None
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None


def probe_node(probes: dict[str, str], token: str, data: str | None, uri_dirs: list[str], backend: str,
               inputs: dict[str, str] | None = None) -> dict:
    """Runs on one node as a Ray task: which of the driver's files it sees, whether it can use the run's
    object-store paths, and the first of the job's `inputs` (what to call it -> local path) it lacks."""
    import os
    import socket

    import ray

    seen = {}
    for what, path in probes.items():
        try:
            seen[what] = Path(path).read_text() == token
        except OSError:
            seen[what] = False
    unwritable = None
    for d in uri_dirs:
        probe = f"{d}/.node-probe-{token}-{socket.gethostname()}"
        try:
            storage.write_text(probe, "ok")
            storage.delete(probe)
        except OSError as e:
            unwritable = f"{d} ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    host = socket.gethostname()
    try:
        loopback = socket.gethostbyname(host).startswith("127.")
    except OSError:
        loopback = True
    return {
        "ip": ray.util.get_node_ip_address(),
        "host": host,
        "seen": seen,
        "data": data is None or Path(data).is_file(),
        "missing": next((k for k, path in (inputs or {}).items() if not Path(path).exists()), None),
        "unwritable": unwritable,
        "gloo_loopback": backend == "gloo" and loopback and not os.environ.get("GLOO_SOCKET_IFNAME"),
    }


def check_nodes(spec, data: str | None, tracking_uri: str | None, env: dict[str, str] | None = None,
                inputs: dict[str, str] | None = None, writes: str | None = None, gloo: bool = True) -> list[dict]:
    """On a cluster of more than one node, refuse before training what only one node's disk holds.

    The driver writes a probe file into --storage-path and next to a file-based tracking store; a small Ray task
    on every other node reads it back (and tries object-store paths, and looks for data= and the job's other
    local `inputs`, e.g. {"model=/x/best.pt": "/x/best.pt"}), in the environment the workers get (`env`).
    Returns what each node answered; [] on a single node. `--allow-node-local` skips it. val and predict pass
    `writes`, the folder their workers write to instead of the run's (predict's --output; '' for none: val's
    driver writes its metrics itself), and `gloo=False`: their workers do not form a process group.
    """
    import uuid

    import ray

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others or spec.allow_node_local:
        return []
    token = uuid.uuid4().hex
    out = spec.run_dir if writes is None else writes
    flag = f"--storage-path {spec.storage_path}" if writes is None else f"--output {writes}"
    probes = _write_probes(token, {"storage": None if not out or storage.is_uri(out) else out,
                                   "tracking": local_path_of_tracking(tracking_uri)})
    try:
        answers = _ask_nodes(others, probes, token, data, [out] if out and storage.is_uri(out) else [],
                             spec.scaling.backend if gloo else "", inputs, env)
    finally:
        for path in probes.values():
            Path(path).unlink(missing_ok=True)
    for answer in answers:
        _refuse_what_the_node_lacks(answer, flag, tracking_uri, data)
    return answers


def _write_probes(token: str, places: dict[str, str | None]) -> dict[str, str]:
    """A probe file holding `token` in each local folder of `places` (what -> folder or None); what -> its path."""
    probes = {}
    for what, folder in places.items():
        if folder:
            path = Path(folder) / f".node-probe-{token}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
            probes[what] = str(path)
    return probes


def _ask_nodes(others: list[dict], probes: dict[str, str], token: str, data: str | None, uri_dirs: list[str],
               backend: str, inputs: dict[str, str] | None, env: dict[str, str] | None) -> list[dict]:
    """`probe_node` on each of the `others` (Ray's node records), in the workers' environment; each one's
    answer, or UserError naming a node that did not answer within NODE_PROBE_TIMEOUT_S."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": env or {}})(probe_node)
    refs = {n["NodeManagerAddress"]: task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(probes, token, data, uri_dirs, backend, inputs) for n in others}
    ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=NODE_PROBE_TIMEOUT_S)
    late = [ip for ip, ref in refs.items() if ref not in ready]
    if late:
        raise UserError(f"Ray node {late[0]} did not answer a {NODE_PROBE_TIMEOUT_S} s probe task: check that "
                        "node (`ray status`), or pass --allow-node-local to skip the check")
    return ray.get(list(refs.values()))


def _refuse_what_the_node_lacks(a: dict, flag: str, tracking_uri: str | None, data: str | None) -> None:
    """One line for the first thing a node's answer (probe_node's) says it cannot see or use."""
    skip = " (--allow-node-local skips this check)"
    node = f"node {a['ip']} ({a['host']})"
    if "storage" in a["seen"] and not a["seen"]["storage"]:
        raise UserError(
            f"{flag} is not shared: {node} cannot see it. On a multi-node cluster use an object store "
            f"({flag.split()[0]} s3://bucket/prefix) or a filesystem every node mounts at "
            f"the same path{skip}")
    if "tracking" in a["seen"] and not a["seen"]["tracking"]:
        raise UserError(
            f"the MLflow store {tracking_uri} is a file that {node} cannot see, and rank 0 may run there: use a "
            f"tracking server every node reaches (--tracking-uri http://HOST:5000) or --no-tracking{skip}")
    if a["unwritable"]:
        raise UserError(f"{node} cannot write to {flag.split()[0]} {a['unwritable']}: give every node the same "
                        f"credentials and endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...){skip}")
    if not a["data"]:
        raise UserError(f"data={data} is not on {node}: put the dataset on a filesystem every node mounts at "
                        f"the same path{skip}")
    if a.get("missing"):
        raise UserError(f"{a['missing']} is not on {node}: put it on a filesystem every node mounts at the "
                        f"same path{skip}")
    if a["gloo_loopback"]:
        raise UserError(
            f"{node}: its host name {a['host']} resolves to a loopback address, so gloo would connect the "
            "ranks to 127.0.0.1: set GLOO_SOCKET_IFNAME to the network interface of the node's IP in that "
            f"node's environment (`ray start`'s), or fix the host name's address{skip}")
