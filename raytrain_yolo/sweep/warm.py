"""Warm trials: a throughput sweep's trials run on Ray Train worker groups that stay up for the whole sweep.

A Ray Train run of its own per trial costs 12-20 s on 2 cores (controller, placement group, worker processes,
the process group) and 6-10 s of imports before the trial's first step, for a few seconds of measured steps.

- `GroupPool`, a Ray actor beside the sweep's driver, keeps at most one worker group per trial Tune runs at once
  and hands each trial a group of its world size. A group is one long Ray Train run (`serve_group`: a
  TorchTrainer whose ranks run `group_loop`): Ray Train places its workers, makes the process group (gloo or
  nccl), pins each rank's device, and restarts the group when a rank fails. Its ranks take a job, run it with
  `worker.run_worker` (what a run of its own runs), and wait for the next. A group of another world size that is
  idle is ended to make room.
- A trial stays Tune's function trainable: Tune searches, schedules, stops and records it as before. Its
  `launch(plan, group=WarmTrial(...))` writes the same summary, MLflow run and folder as a trial on its own run;
  the job's reports come back through a queue the trial owns, and the trial hands them to `tune.report`.
- A trial Tune stops (ASHA) dies with its queue: rank 0's next report cannot reach it, every rank learns that at
  that report (rank 0's word, broadcast), training stops there, and the group takes the next job.
- A trial that fails on a rank (an exception: out of memory) sends its error to the trial, which fails with it,
  and the rank raises: Ray Train restarts that group, and the next trial runs on new processes. A rank whose
  process dies (killed) sends nothing: the pool sees the restarted group come back and tells the trial. Either way
  one trial's fault is that trial's result, never another's.
- Not warm: the accuracy sweep (`--objective map`). Its trials' checkpoints, restarts (--max-failures) and
  resume after the sweep's driver is lost are their own Ray Train runs' (checkpoint manager, run folder); a shared
  group would have to redo those.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

import ray

from raytrain_yolo.core.config import RunSpec

POLL_S = 5.0  # an idle rank asks the pool for a job this often (a blocking call that returns at once on a job)
QUIET_S = 1.0  # a trial with no message from its ranks this long asks the pool whether its job was lost


class TrialFailed(RuntimeError):
    """A warm trial's job failed on its group: the rank's error (`Type: message`), or the group's loss."""


@dataclass
class GroupResult:
    """What `launch` reads of a finished job, as of a Ray Train `Result`: rank 0's return, the run's folder."""

    return_value: dict[str, Any] | None
    path: str
    checkpoint: None = None
    error: BaseException | None = None


@ray.remote(num_cpus=0, max_concurrency=256)
class GroupPool:
    """The sweep's worker groups and the job each is running (see the module's docstring). Threaded: trials and
    ranks wait in its methods on one condition."""

    def __init__(self, base: dict[str, Any], max_groups: int, env: dict[str, str]):
        self.base, self.max_groups, self.env = base, max_groups, env
        self.cond = threading.Condition()
        self.groups: dict[int, dict[str, Any]] = {}  # gid -> size, job, running, retire, ref (its serve_group)
        self.lost_jobs: dict[int, str] = {}  # job id -> why it has no outcome
        self.next_gid = self.next_job_id = 0
        self.me = ray.get_runtime_context().current_actor

    # --- trials ---
    def run(self, world_size: int, job: dict[str, Any], wait_s: float) -> tuple[int, int]:
        """Give `job` to an idle group of `world_size` ranks, starting or ending groups as needed; (group, job id).
        Raises TimeoutError when no group is free within `wait_s` s."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            while (gid := self._free_group(world_size)) is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no warm group of {world_size} workers was free within {wait_s:g} s")
                self.cond.wait(min(left, POLL_S))
            self.next_job_id += 1
            self.groups[gid].update(job={**job, "id": self.next_job_id}, running=False)
            self.cond.notify_all()
            return gid, self.next_job_id

    def lost(self, job_id: int) -> str | None:
        """Why job `job_id` will never send an outcome (its group restarted or ended), or None."""
        with self.cond:
            return self.lost_jobs.get(job_id)

    def _free_group(self, size: int) -> int | None:
        idle = [g for g, s in self.groups.items() if s["job"] is None and not s["retire"]]
        for gid in idle:
            if self.groups[gid]["size"] == size:
                return gid
        if len(self.groups) < self.max_groups:
            return self._start(size)
        if idle:  # another size: end it, and start this one once it is gone
            self.groups[idle[0]]["retire"] = True
            self.cond.notify_all()
        return None

    def _start(self, size: int) -> int:
        from raytrain_yolo.core.cluster import on_this_node

        gid, self.next_gid = self.next_gid, self.next_gid + 1
        self.groups[gid] = {"size": size, "job": None, "running": False, "retire": False}
        self.groups[gid]["ref"] = serve_group.options(**on_this_node()).remote(self.me, gid, size, self.base, self.env)
        return gid

    # --- ranks ---
    def ready(self, gid: int) -> None:
        """Rank 0 of group `gid` is up: first start, or Ray Train's restart after a rank failed. A job that was
        running there lost its ranks."""
        with self.cond:
            g = self.groups[gid]
            if g["job"] is not None and g["running"]:
                self._lose(g, "a worker of the trial's group failed and Ray Train restarted the group (a process "
                              "killed: out of memory?); see the trial's log")

    def next_job(self, gid: int, last: int, wait_s: float) -> dict[str, Any] | None:
        """Group `gid`'s job after job `last`, {"retire": True} when the group is to end, or None after `wait_s`."""
        with self.cond:
            deadline = time.monotonic() + wait_s
            while True:
                g = self.groups[gid]
                if g["job"] is not None and g["job"]["id"] > last:
                    g["running"] = True
                    return g["job"]
                if g["retire"] and g["job"] is None:
                    return {"retire": True}
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)

    def ended(self, gid: int, job_id: int) -> None:
        """Rank 0: job `job_id` is over (finished, or stopped because its trial is gone); the group is free."""
        with self.cond:
            g = self.groups[gid]
            if g["job"] is not None and g["job"]["id"] == job_id:
                g["job"], g["running"] = None, False
            self.cond.notify_all()

    def group_ended(self, gid: int, error: str | None) -> None:
        """`serve_group`: group `gid`'s Ray Train run is over (retired, or failed: `error`)."""
        with self.cond:
            g = self.groups.pop(gid)
            if g["job"] is not None:
                self._lose(g, f"its warm worker group ended: {error or 'retired'}")
            self.cond.notify_all()

    def _lose(self, g: dict[str, Any], why: str) -> None:
        self.lost_jobs[g["job"]["id"]] = why
        g["job"], g["running"] = None, False
        self.cond.notify_all()

    # --- the sweep ---
    def close(self, wait_s: float) -> int:
        """End every group (each after its job) and wait up to `wait_s` s for their Ray Train runs to end; returns
        how many are still up."""
        deadline = time.monotonic() + wait_s
        with self.cond:
            for g in self.groups.values():
                g["retire"] = True
            self.cond.notify_all()
            while self.groups and time.monotonic() < deadline:
                self.cond.wait(min(POLL_S, max(0.0, deadline - time.monotonic())))
            return len(self.groups)


@ray.remote(num_cpus=0)
def serve_group(pool, gid: int, world_size: int, base: dict[str, Any], env: dict[str, str]) -> None:
    """Group `gid`: a Ray Train run of `world_size` ranks that runs jobs until the pool retires it. Ray Train
    restarts it after every failed job (each is one trial's), for as long as the sweep lasts; a group that cannot be
    placed within the start timeout ends, and its job with it."""
    from ray.train import FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from raytrain_yolo.core import storage
    from raytrain_yolo.core.cli import root_cause
    from raytrain_yolo.train.launch import group_configs

    spec = RunSpec.from_dict(base)
    error = None
    try:
        torch_config, scaling_config = group_configs(spec, world_size)
        storage_path, storage_filesystem = storage.ray_storage(f"{spec.run_dir}/groups", spec.storage_wait_s)
        TorchTrainer(
            group_loop, train_loop_config={"pool": pool, "group": gid},
            torch_config=torch_config, scaling_config=scaling_config,
            run_config=RunConfig(name=f"group_{gid}", storage_path=storage_path, storage_filesystem=storage_filesystem,
                                 failure_config=FailureConfig(max_failures=-1, controller_failure_limit=0),
                                 worker_runtime_env={"env_vars": env}),
        ).fit()
    except Exception as e:  # noqa: BLE001 - the pool tells the trial that waited on this group
        error = root_cause(e)
    finally:
        ray.get(pool.group_ended.remote(gid, error))


def group_loop(config: dict[str, Any]) -> None:
    """Every rank of a warm group: take the pool's next job, run it (`worker.run_worker`), repeat until retired."""
    import torch.distributed as dist

    from raytrain_yolo.train.worker import run_worker

    pool, gid = config["pool"], config["group"]
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if rank == 0:
        ray.get(pool.ready.remote(gid))
    if world_size > 1:
        dist.barrier()  # no rank takes a job before the pool has heard of this start (a lost job is not redone)
    last = 0
    while True:
        job = ray.get(pool.next_job.remote(gid, last, POLL_S))
        if job is None:
            continue
        if job.get("retire"):
            return
        last = job["id"]
        channel = TrialChannel(job["queue"], rank, world_size)
        try:
            outcome = run_worker(job["config"], channel)
        except BaseException as e:
            channel.put("error", f"{type(e).__name__}: {e}")
            raise  # Ray Train restarts the group: no rank stays in a collective the others left
        if rank == 0:
            channel.put("done", outcome)
            ray.get(pool.ended.remote(gid, last))


class TrialChannel:
    """A warm rank's `ray.train.report`: rank 0 puts the metrics on the trial's queue; every rank then learns,
    from rank 0 (a broadcast, so a collective of all ranks, as Ray's report is), whether the trial is still there
    to take them: False ends the job's training at this report."""

    def __init__(self, queue, rank: int, world_size: int):
        self.queue, self.rank, self.world_size = queue, rank, world_size

    def put(self, kind: str, value: Any) -> bool:
        try:
            self.queue.put((kind, value))
            return True
        except Exception:  # noqa: BLE001 - the trial (and its queue) is gone: Tune stopped it
            return False

    def __call__(self, metrics: dict[str, Any], checkpoint=None) -> bool:
        import torch
        import torch.distributed as dist

        if checkpoint is not None:
            raise ValueError("a warm trial reports no checkpoints (throughput trials only)")
        there = self.put("report", metrics) if self.rank == 0 else True
        if self.world_size > 1:
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
            flag = torch.tensor([int(there)], device=device)
            dist.broadcast(flag, 0)
            there = bool(flag.item())
        return there


class WarmTrial:
    """A trial's side of a warm group (launch's `group`): `run` hands the job to the pool and waits for it,
    passing each report to `report` (tune.report)."""

    def __init__(self, pool, report):
        self.pool, self.report = pool, report

    def run(self, spec: RunSpec, config: dict[str, Any]) -> GroupResult:
        """Run `config` (launch.worker_config) on a warm group of `spec`'s worker count; rank 0's outcome. Raises
        TrialFailed with the rank's error, or when the group was lost under the job."""
        from ray.util.queue import Empty, Queue

        from raytrain_yolo.core.cluster import on_this_node
        from raytrain_yolo.train.launch import start_timeout_s

        queue = Queue(actor_options=on_this_node())  # the trial's own: gone with it, which tells the ranks
        try:
            _, job_id = ray.get(self.pool.run.remote(spec.scaling.num_workers, {"config": config, "queue": queue},
                                                     start_timeout_s(spec)))
            while True:
                try:
                    kind, value = queue.get(timeout=QUIET_S)
                except Empty:
                    if why := ray.get(self.pool.lost.remote(job_id)):
                        raise TrialFailed(why) from None
                    continue
                if kind == "report":
                    self.report(value)
                elif kind == "done":
                    return GroupResult(value, spec.run_dir)
                else:
                    raise TrialFailed(value)
        finally:
            ray.kill(queue.actor)
