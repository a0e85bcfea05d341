"""Joining Ray (a cluster's RAY_ADDRESS, else a local Ray) and the environment every job's Ray workers get."""

from __future__ import annotations

import contextlib
import logging
import os
import socket

from raytrain_yolo.core.errors import UserError

# Environment every worker gets (the user's value when set): no network calls from Ultralytics.
WORKER_ENV_DEFAULTS = {"YOLO_OFFLINE": "1"}
# The driver's values that every worker gets. Not GLOO_SOCKET_IFNAME/NCCL_SOCKET_IFNAME: an interface name is
# a property of one machine (eth0 here, ens5 there), so each node's own environment (`ray start`'s) applies.
WORKER_ENV_PASSTHROUGH = ("RAYTRAIN_YOLO_CACHE", "YOLO_CONFIG_DIR", "RAYTRAIN_YOLO_PREEMPTION_CHECK_S")
API_SERVER_ENV = "RAY_API_SERVER_ADDRESS"  # where Ray's State API clients look first (ray.dashboard.utils)


def connect_ray(verbose: bool = False) -> None:
    """Join RAY_ADDRESS when set (a cluster, or the cluster a `ray job` runs on), else start a local Ray.

    Worker output reaches this console only with `verbose` (Ray's `log_to_driver`); it is in run.log anyway.
    """
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    quiet = {"log_to_driver": verbose, "logging_level": logging.INFO if verbose else logging.WARNING}
    if address:
        _check_answers(address)
    else:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # offline: a local Ray reports nothing home
    try:
        if address:
            ray.init(address=address, **quiet)
        else:
            with _own_state_api() as dashboard_port:
                ray.init(dashboard_port=dashboard_port, **quiet)
    except ConnectionError as e:
        raise UserError(
            f"cannot reach the Ray cluster at RAY_ADDRESS={address} ({str(e).splitlines()[0]}): "
            "start it (`ray start --head`) or unset RAY_ADDRESS to run locally"
        ) from None


@contextlib.contextmanager
def _own_state_api():
    """A dashboard port for the local Ray about to start, named to its processes as RAY_API_SERVER_ADDRESS.

    Ray's State API clients inside a cluster find "the" cluster by themselves when nothing names it: from the
    newest `ray start` on the machine, else the only GCS process running. Ray Train's PlacementGroupCleaner is
    one: when a run's controller dies without stopping (Ray Tune ends a trial early: ASHA stops it, PBT pauses
    it), it asks the State API whether the controller is alive and then removes the run's placement group. With
    another Ray on the machine its lookup fails (ConnectionError "Found multiple active Ray instances", which it
    does not catch) or asks the other Ray, and the group's CPUs stay held until the sweep ends: the next trials
    wait for them and fail. The processes of a local Ray inherit this process's environment when `ray.init`
    starts them, so the variable is set for the start only and this process's own environment is left as it was.
    """
    port = free_local_port()  # (taken in the moment before Ray binds it, Ray starts without a dashboard)
    before = os.environ.get(API_SERVER_ENV)
    os.environ[API_SERVER_ENV] = f"http://127.0.0.1:{port}"
    try:
        yield port
    finally:
        if before is None:
            os.environ.pop(API_SERVER_ENV, None)
        else:
            os.environ[API_SERVER_ENV] = before


def free_local_port() -> int:
    """A TCP port of 127.0.0.1 that is free now (the OS picks it; another process may take it before it is used)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _check_answers(address: str, timeout: float = 5.0) -> None:
    """A TCP probe first: ray.init keeps retrying an address that does not answer for a long time."""
    target = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = target.rpartition(":")
    if address in ("auto", "local") or not sep or not port.isdigit():
        return
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except OSError as e:
        raise UserError(
            f"the Ray cluster at RAY_ADDRESS={address} does not answer ({e.strerror or e}): start it "
            "(`ray start --head`), fix RAY_ADDRESS, or unset it to run locally"
        ) from None


def on_this_node() -> dict:
    """Ray actor options for a small helper of this process (a console queue, a trial's relay, predict's ledger):
    no CPU, and on this process's own node. Ray's default places an actor on any node, and a helper on a worker
    node dies with that node: seen on `cluster/local-multinode.sh`, the console queue of a fit landed on each of
    the three nodes in turn, and after a node loss the driver printed no epoch line again."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id=node, soft=False)}


def worker_env() -> dict[str, str]:
    """Environment every worker gets: our defaults (the user's value when set) and a few of the driver's."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV_DEFAULTS.items()}
    env.update({k: os.environ[k] for k in WORKER_ENV_PASSTHROUGH if k in os.environ})
    return env
