"""Warm trials: a sweep's trials (both objectives) run on Ray Train worker groups that stay up for the whole sweep.

A Ray Train run of its own per trial costs 12-20 s on 2 cores (controller, placement group, worker processes,
the process group) and 6-10 s of imports before the trial's first step, for a few seconds of measured steps
(throughput) or one short epoch (accuracy).

- `GroupPool`, a Ray actor beside the sweep's driver, keeps at most one worker group per trial Tune runs at once
  and hands each trial a group of its world size. A group is one long Ray Train run (`serve_group`: a
  TorchTrainer whose ranks run `group_loop`): Ray Train places its workers, makes the process group (gloo or
  nccl), pins each rank's device, and restarts the group when a rank fails. Its ranks take a job, run it with
  `worker.run_worker` (what a run of its own runs), and wait for the next. A group of another world size that is
  idle is ended to make room.
- A trial stays Tune's function trainable: Tune searches, schedules, stops and records it as before. Its
  `launch(plan, group=WarmTrial(...))` writes the same summary, MLflow run and folder as a trial on its own run;
  the job's reports come back through a queue the trial owns, and the trial hands them to `tune.report`.
- A trial Tune stops (ASHA, PBT's pause) dies with its queue: within a training step or two rank 0 sees that
  (a probe of the queue that never waits, looked at after every step), every rank learns it (rank 0's word, broadcast) and leaves the job at
  the same step (RunAbandoned), and the group takes the next job; a report that cannot reach the trial ends the
  job the same way.
- A trial that fails on a rank (an exception: out of memory) sends its error to the trial, which fails with it,
  and the rank raises: Ray Train restarts that group, and the next trial runs on new processes. A rank whose
  process dies (killed) sends nothing: the pool sees the restarted group come back and tells the trial. Either way
  one trial's fault is that trial's result, never another's.
- Checkpoints (the accuracy sweep's trials): a warm job has no Ray Train run of its own, so its checkpoints are
  its Tune trial's. Rank 0 uploads each epoch's checkpoint to `<run>/staged/` on the sweep's storage (the trial
  may be on another node) and hands the trial its place; the trial reports it with `tune.report(checkpoint=)`,
  which persists it into the trial's folder under Tune's CheckpointConfig, and removes the staged copy. Tune then
  does what each trial's own Ray Train run did: `--max-failures` restarts a failed trial from its last checkpoint
  (Tune's FailureConfig), `Tuner.restore` resumes an unfinished trial from it after the driver was lost, and PBT
  clones it. The job starts from that checkpoint through `spec.resume_from` (worker.restore).
"""

from __future__ import annotations

import gc
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import ray

from raytrain_yolo.core.config import RunSpec

POLL_S = 5.0  # an idle rank asks the pool for a job this often (a blocking call that returns at once on a job)
QUIET_S = 1.0  # a trial with no message from its ranks this long asks the pool whether its job was lost
CLOSE_S = 60.0  # a sweep waits at most this long for its warm groups to end after its last trial


class TrialFailed(RuntimeError):
    """A warm trial's job failed on its group: the rank's error (`Type: message`), or the group's loss."""


@dataclass
class Persisted:
    """A checkpoint folder (path or URI) that Tune persisted for a warm trial, as `launch` reads a Ray Checkpoint."""

    path: str


@dataclass
class GroupResult:
    """What `launch` reads of a finished job, as of a Ray Train `Result`: rank 0's return, the run's folder, the
    trial's last persisted checkpoint (None for throughput trials)."""

    return_value: dict[str, Any] | None
    path: str
    checkpoint: Persisted | None = None
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
        run_job(job, rank, world_size, gid)
        if rank == 0:
            ray.get(pool.ended.remote(gid, last))


def run_job(job: dict[str, Any], rank: int, world_size: int, gid: int) -> None:
    """One job on this rank (`worker.run_worker`), its reports through the trial's channel; rank 0 sends the outcome.
    A job whose trial is gone ends on every rank at the same step, and the group stays whole. A job that raises
    sends its error (rank 0's, or the first rank's to reach the queue) and re-raises: Ray Train restarts the group,
    so that no rank stays in a collective the others left."""
    from raytrain_yolo.train.worker import RunAbandoned, run_worker

    channel = TrialChannel(job["queue"], rank, world_size, job.get("staging"))
    try:
        outcome = run_worker(job["config"], channel)
    except RunAbandoned:
        outcome = None
        gc.collect()  # the abandoned trainer now: its loader's worker processes, its model
    except BaseException as e:
        channel.put("error", f"{type(e).__name__}: {e}")
        raise
    if channel.left and rank == 0:  # in the trial's log
        print(f"warm group {gid}: the trial is gone (Tune stopped it); its job ended {channel.left}", flush=True)
    if rank == 0:
        channel.put("done", outcome)


class TrialChannel:
    """A warm rank's `ray.train.report`: rank 0 puts the metrics on the trial's queue, and a checkpoint's files under
    `staging` (a folder on the sweep's storage; None: the job reports none); every rank then learns, from rank 0 (a
    broadcast, so a collective of all ranks, as Ray's report is), whether the trial is still there to take them:
    False ends the job's training at this report."""

    def __init__(self, queue, rank: int, world_size: int, staging: str | None = None):
        self.queue, self.rank, self.world_size, self.staging = queue, rank, world_size, staging
        self.steps, self.probe = 0, None
        self.left = ""  # where the job ended because the trial was gone: "at step N", "at its report"

    def put(self, kind: str, value: Any) -> bool:
        try:
            self.queue.put((kind, value))
            return True
        except Exception:  # noqa: BLE001 - the trial (and its queue) is gone: Tune stopped it
            return False

    def __call__(self, metrics: dict[str, Any], checkpoint=None) -> bool:
        there = self._from_rank_0(self._send(metrics, checkpoint) if self.rank == 0 else True)
        self.left = self.left or ("" if there else "at its report")
        return there

    def on_step(self) -> None:
        """Every rank, after each training step (batch): rank 0 looks whether the trial is gone (Tune stopped it: its
        queue died with it) and tells the others, and then every rank raises RunAbandoned at this same step. Its cost
        is a broadcast of one number (none with one rank) and a look at a probe that never waits, against a step of
        tens of milliseconds or more; without it a stopped trial's job trained on to its next report, up to an
        epoch."""
        from raytrain_yolo.train.worker import RunAbandoned

        self.steps += 1
        if not self._from_rank_0(not self._trial_gone() if self.rank == 0 else True):
            self.left = f"at step {self.steps} of the job"
            raise RunAbandoned(f"the trial is gone (stopped by Tune) at step {self.steps}")

    def _trial_gone(self) -> bool:
        """Rank 0, without waiting: whether the trial's queue answered its last probe with its death."""
        if self.probe is None:
            self.probe = self.queue.actor.qsize.remote()
            return False
        ready, _ = ray.wait([self.probe], timeout=0)
        if not ready:
            return False
        probe, self.probe = self.probe, None
        try:
            ray.get(probe)
            return False
        except ray.exceptions.RayActorError:
            return True

    def _from_rank_0(self, flag: bool) -> bool:
        """Rank 0's `flag` on every rank (a broadcast: a collective of all ranks, as Ray's report is)."""
        import torch
        import torch.distributed as dist

        if self.world_size == 1:
            return flag
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        t = torch.tensor([int(flag)], device=device)
        dist.broadcast(t, 0)
        return bool(t.item())

    def _send(self, metrics: dict[str, Any], checkpoint) -> bool:
        """Rank 0: the report, with its checkpoint's staged copy; a copy the trial will never take is removed."""
        from raytrain_yolo.core import storage

        if checkpoint is None:
            return self.put("report", (metrics, None))
        if self.staging is None:
            raise ValueError("this warm job reports no checkpoints (a throughput trial's)")
        staged = f"{self.staging}/{uuid.uuid4().hex}"
        storage.upload_dir(checkpoint.path, staged)
        if self.put("report", (metrics, staged)):
            return True
        storage.delete_dir(staged)
        return False


class WarmTrial:
    """A trial's side of a warm group (launch's `group`): `run` hands the job to the pool and waits for it,
    passing each report to `report(metrics, staged)`: `staged` is the folder of the report's checkpoint (None
    without one), and `report` returns where it persisted it (tune.report's checkpoint), or None. `staging`: where
    rank 0 puts checkpoints for the trial (None: the job reports none)."""

    def __init__(self, pool, report: Callable[[dict[str, Any], str | None], str | None], staging: str | None = None):
        self.pool, self.report, self.staging = pool, report, staging

    def run(self, spec: RunSpec, config: dict[str, Any]) -> GroupResult:
        """Run `config` (launch.worker_config) on a warm group of `spec`'s worker count; rank 0's outcome and the
        last persisted checkpoint. Raises TrialFailed with the rank's error, or when the group was lost under the
        job."""
        from ray.util.queue import Empty, Queue

        from raytrain_yolo.core.cluster import on_this_node
        from raytrain_yolo.train.launch import start_timeout_s

        queue = Queue(actor_options=on_this_node())  # the trial's own: gone with it, which tells the ranks
        persisted = None
        try:
            job = {"config": config, "queue": queue, "staging": self.staging}
            _, job_id = ray.get(self.pool.run.remote(spec.scaling.num_workers, job, start_timeout_s(spec)))
            while True:
                try:
                    kind, value = queue.get(timeout=QUIET_S)
                except Empty:
                    if why := ray.get(self.pool.lost.remote(job_id)):
                        raise TrialFailed(why) from None
                    continue
                if kind == "report":
                    persisted = self.report(*value) or persisted
                elif kind == "done":
                    return GroupResult(value, spec.run_dir, Persisted(persisted) if persisted else None)
                else:
                    raise TrialFailed(value)
        finally:
            ray.kill(queue.actor)


@contextmanager
def warm_pool(base: RunSpec, max_groups: int, enabled: bool = True):
    """The sweep's GroupPool, at most `max_groups` groups (one per trial that runs at once), beside this driver;
    None when not `enabled` (--fresh-trials). Its groups end with the block, each after its job (a trial Tune
    stopped leaves it at its next step), before the sweep ends its trials' MLflow runs. The groups get `base` without
    its tracking URI: each job brings its own MLflow target."""
    if not enabled:
        yield None
        return
    from raytrain_yolo.core.cluster import on_this_node, worker_env

    groups = base.to_dict()
    groups["tracking"] = {**groups["tracking"], "enabled": False, "uri": None}  # groups log nothing: no credential
    pool = GroupPool.options(**on_this_node()).remote(groups, max_groups, worker_env())
    try:
        yield pool
    finally:
        try:
            ray.get(pool.close.remote(CLOSE_S), timeout=CLOSE_S + 10)
        finally:
            ray.kill(pool)  # and with it any group still up (its Ray Train run is the pool's task)
