"""`prepare(spec) -> RunPlan`: every check of a training run, once, in order, on the driver, before Ray starts."""

from __future__ import annotations

import copy
import dataclasses

from raytrain_yolo.core import storage
from raytrain_yolo.core.cluster import connect_ray, worker_env
from raytrain_yolo.core.config import RunSpec, check_batch
from raytrain_yolo.core.tracking import resolve_uri
from raytrain_yolo.plan import rerun
from raytrain_yolo.plan.nodes import check_nodes
from raytrain_yolo.plan.request import check_inputs, check_request
from raytrain_yolo.plan.resources import resolve_scaling
from raytrain_yolo.plan.run_plan import RunPlan


def prepare(spec: RunSpec, argv: list[str] | None = None, inputs_checked: bool = False,
            placed: bool = False) -> RunPlan:
    """Resolve and check a run in this order: the request (flags, Ultralytics' arguments, the model: cheap), the
    rerun (the same --name's recorded plan; a finished run returns here, before anything is scanned or started),
    the inputs (the dataset's labels, storage, tracking server), then the cluster (join Ray, fit the workers to
    it, check that every node sees the paths).

    `spec` is not changed: the plan holds a resolved copy. `argv`: this command's arguments, for the command a
    refusal suggests. `inputs_checked`: the caller (a sweep's driver, for each trial) already checked the dataset,
    storage and tracking server of this exact request, so they are not read again. `placed`: the run's workers
    are already up (a warm group of the throughput sweep, whose driver fitted them to the cluster and checked the
    nodes once): only the batch is checked against their number.
    Raises UserError (one line, naming the fix) for anything the run would fail on later."""
    spec, train_args, task = check_request(copy.deepcopy(spec))
    plan = RunPlan(spec, train_args, task)
    finished, taken = rerun.decide(spec.run_dir, spec.name, plan.record()["asked"], argv)
    if finished is not None:
        return dataclasses.replace(plan, finished=finished, taken=taken)
    if not inputs_checked:
        check_inputs(spec, train_args, task)
    if placed:
        check_batch(train_args["batch"], spec.scaling.num_workers, spec.scaling.min_workers)
    else:
        join_cluster(spec, train_args)
    return RunPlan(spec, train_args, task, taken=taken)


def join_cluster(spec: RunSpec, train_args: dict) -> None:
    """Join Ray, fit the workers to its free resources (spec.scaling set), and check the nodes."""
    connect_ray(spec.verbose)
    resolve_scaling(spec)
    check_batch(train_args["batch"], spec.scaling.num_workers, spec.scaling.min_workers)
    check_node_paths(spec, train_args)


def check_node_paths(spec: RunSpec, train_args: dict) -> None:
    """What every node must see of the run: its local data= path and the tracking store (plan/nodes.check_nodes)."""
    data = None if spec.is_synthetic or storage.is_uri(str(train_args["data"])) else train_args["data"]
    check_nodes(spec, data, resolve_uri(spec) if spec.tracking.enabled else None, worker_env())
