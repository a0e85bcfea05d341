"""The workers fitted to the cluster's free CPUs and GPUs, node by node: refused in one line, or waited for only
as long as --wait-for-resources allows (Ray would wait for them without end)."""

from __future__ import annotations

import time

from raytrain_yolo.core.config import RunSpec
from raytrain_yolo.core.errors import UserError

LOCAL_CPU_WORKERS = 2
EPS = 1e-6  # Ray reports fractional CPUs as floats (1.9000000000000001)



def resolve_scaling(spec: RunSpec, extra_cpus: float = 0.0) -> RunSpec:
    """Fill in GPU/CPU and worker count from the cluster; refuse what its free resources cannot hold now.

    Ray would otherwise wait for the workers without end. `extra_cpus`: CPUs the job needs besides its
    workers (a tune trial's driver). A cluster that is busy or still scaling up is waited for only when asked
    (`--wait-for-resources SECONDS`). Inside a Ray Tune trial, the free resources already exclude what the
    trial itself holds. Each worker's CPUs (and GPU) must be on one node, so the fit is counted node by node.
    """
    import ray

    s = spec.scaling
    if s.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker {s.cpus_per_worker} must be above 0")
    deadline = time.monotonic() + spec.resource_wait_s
    while True:
        try:
            nodes, nodes_free = node_resources()
            return _fit_scaling(spec, ray.cluster_resources(), ray.available_resources(), extra_cpus,
                                nodes=nodes, nodes_free=nodes_free)
        except UserError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                if spec.resource_wait_s:
                    raise UserError(f"waited {spec.resource_wait_s:g} s for resources that did not come: {e}") from None
                raise
            time.sleep(min(0.25, left))  # a finished job's placement group is usually gone within a second


def node_resources() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]] | None]:
    """Each live node's total and free resources (resource name -> amount), by node address.

    Totals come from `ray.nodes()`. Ray 2.60 has no public call for what each node has free
    (`ray.util.state.list_nodes` reports totals only), so the free side is Ray's DeveloperAPI
    `ray._private.state.available_resources_per_node()`; None when that call is missing or fails (then only
    the cluster-wide free resources are checked)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    addresses = [n["NodeManagerAddress"] for n in alive]
    names = {n["NodeID"]: n["NodeManagerAddress"] if addresses.count(n["NodeManagerAddress"]) == 1
             else f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in alive}
    totals = {names[n["NodeID"]]: dict(n.get("Resources") or {}) for n in alive}
    try:
        from ray._private import state

        per_node = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - a Ray without the call: fall back to the cluster-wide check
        return totals, None
    return totals, {names[i]: dict(r) for i, r in per_node.items() if i in names}


def worker_bundle(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What Ray reserves for one worker, all on one node: its CPUs, and one GPU for a GPU worker."""
    return {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def workers_per_node(bundle: dict[str, float], nodes: dict[str, dict[str, float]]) -> dict[str, int]:
    """How many whole worker bundles each node holds (Ray places one worker's resources on one node)."""
    return {name: min(int(res.get(k, 0.0) / v + EPS) for k, v in bundle.items()) for name, res in nodes.items()}


def _describe(res: dict[str, float], use_gpu: bool) -> str:
    cpus, gpus = f"{res.get('CPU', 0.0):g} CPUs", int(res.get("GPU", 0.0) + EPS)
    return f"{cpus} and {gpus} GPU{'' if gpus == 1 else 's'}" if use_gpu else cpus


def _largest_node(nodes: dict[str, dict[str, float]], use_gpu: bool) -> tuple[str, dict[str, float]]:
    """The node with the most CPUs (among those with a GPU, for GPU workers)."""
    pool = {k: v for k, v in nodes.items() if not use_gpu or v.get("GPU", 0.0) >= 1 - EPS} or nodes
    name = max(pool, key=lambda k: pool[k].get("CPU", 0.0))
    return name, pool[name]


def _check_nodes_hold(least: int, bundle: dict[str, float], use_gpu: bool, nodes: dict[str, dict[str, float]]) -> None:
    """Refuse a worker larger than every node, or more workers than the nodes hold whole, however many CPUs and
    GPUs the cluster has in all."""
    per_node = workers_per_node(bundle, nodes)
    name, res = _largest_node(nodes, use_gpu)
    if not any(per_node.values()):
        raise UserError(f"one worker needs {_describe(bundle, use_gpu)} on one node but the largest node, {name}, "
                        f"has {_describe(res, use_gpu)}: use --cpus-per-worker {int(res.get('CPU', 0.0) + EPS)} "
                        "or less, or add a larger node")
    if least > sum(per_node.values()):
        raise UserError(f"{least} workers need {_describe(bundle, use_gpu)} each on one node, and the cluster's nodes "
                        f"hold only {sum(per_node.values())} workers of {bundle['CPU']:g} CPUs (largest node {name}: "
                        f"{_describe(res, use_gpu)}): lower --num-workers or --cpus-per-worker")


def _fit_scaling(spec: RunSpec, total: dict[str, float], free: dict[str, float], extra_cpus: float = 0.0,
                 nodes: dict[str, dict[str, float]] | None = None,
                 nodes_free: dict[str, dict[str, float]] | None = None) -> RunSpec:
    """Fit the request to the cluster: `total`/`free` are its resources in all (resource -> amount), `nodes` and
    `nodes_free` the same per node (node name -> resources); without them only the cluster-wide sums are checked.
    Raises UserError naming the fix; sets `use_gpu` and `num_workers` on the spec and returns it."""
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 0))
    free_gpus, free_cpus = int(free.get("GPU", 0) + EPS), float(free.get("CPU", 0))
    s = spec.scaling
    use_gpu = gpus > 0 if s.use_gpu is None else s.use_gpu
    if use_gpu and gpus == 0:
        raise UserError("--gpu was given but the Ray cluster has no GPUs: drop --gpu (or use --cpu) or add GPU nodes")
    bundle = worker_bundle(s.cpus_per_worker, use_gpu)
    n = s.num_workers
    if n is None:  # what fits now: one worker per free GPU, else up to 2 CPU workers
        fits = int((free_cpus - extra_cpus) / s.cpus_per_worker + EPS)
        if nodes_free is not None:
            fits = min(fits, sum(workers_per_node(bundle, nodes_free).values()))
        n = (free_gpus or gpus) if use_gpu else max(1, min(LOCAL_CPU_WORKERS, fits))
    if n < 1 or (s.min_workers is not None and not 1 <= s.min_workers <= n):
        raise UserError(f"--num-workers {s.min_workers or ''}{'-' if s.min_workers else ''}{n} must be "
                        "at least 1 (and MIN <= MAX for MIN-MAX)")
    least = s.min_workers or n
    if use_gpu and least > gpus:
        raise UserError(f"{least} GPU workers need {least} GPUs but the cluster has {gpus}: "
                        f"use --num-workers {gpus} or add GPU nodes")
    need = least * s.cpus_per_worker + extra_cpus
    what = f"{least} workers x {s.cpus_per_worker:g} CPUs" + (f" + {extra_cpus:g} for the trial" if extra_cpus else "")
    if nodes:  # short in all: say first when one worker is larger than any node, then the sum below
        _check_nodes_hold(least if need <= cpus + EPS else 1, bundle, use_gpu, nodes)
    if need > cpus + EPS:
        raise UserError(f"{what} need {need:g} CPUs but the cluster has {cpus:g}: "
                        "lower --num-workers or --cpus-per-worker")
    later = "wait for them with --wait-for-resources SECONDS, or stop the jobs that hold them"
    if use_gpu and least > free_gpus:
        raise UserError(f"{least} GPU workers need {least} GPUs but only {free_gpus} of the cluster's {gpus} are "
                        f"free now: use --num-workers {max(free_gpus, 1)}, {later}")
    if need > free_cpus + EPS:
        raise UserError(f"{what} need {need:g} CPUs but only {free_cpus:g} of the cluster's {cpus:g} are free now: "
                        f"lower --num-workers or --cpus-per-worker, {later}")
    if nodes_free is not None and least > (fit_now := sum(workers_per_node(bundle, nodes_free).values())):
        raise UserError(f"{what}: only {fit_now} fit on what the nodes have free now (each worker's "
                        f"{'CPUs and GPU' if use_gpu else 'CPUs'} on one node): lower --num-workers or "
                        f"--cpus-per-worker, {later}")
    s.use_gpu, s.num_workers = use_gpu, n
    return spec
