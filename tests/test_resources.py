"""Issue 14: never wait forever. A request the cluster's *free* resources cannot hold now is refused before
training, or waited for only as long as --wait-for-resources allows (the default sweep fits the machine:
test_tune.py's sweep is that default). The busy cluster is real: a local Ray of 2 CPUs where another job's actor
holds one of them.
"""

from __future__ import annotations

import threading

import pytest

from raytrain_yolo.core.config import RunSpec, ScalingSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.plan import prepare


@pytest.fixture(scope="module")
def busy_cluster():
    """2 CPUs, one held by another job's actor for as long as the holder lives."""
    import ray

    ray.init(num_cpus=2, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class OtherJob:
        def ping(self) -> bool:
            return True

    holder = OtherJob.remote()
    ray.get(holder.ping.remote())
    yield ray, holder
    ray.shutdown()


def spec_for(tmp_path, workers: int | None, wait: float = 0) -> RunSpec:
    return RunSpec(scaling=ScalingSpec(num_workers=workers, use_gpu=False), synthetic=SyntheticSpec(train=8, val=4),
                   tracking=TrackingSpec(enabled=False), storage_path=str(tmp_path), name="busy",
                   resource_wait_s=wait)


def test_request_beyond_the_free_cpus_is_refused_at_once(busy_cluster, tmp_path):
    with pytest.raises(UserError) as e:
        prepare(spec_for(tmp_path, 2))
    msg = str(e.value)
    assert "need 2 CPUs but only 1 of the cluster's 2 are free now" in msg, msg
    assert "--wait-for-resources" in msg and "--num-workers" in msg and "\n" not in msg


def test_the_wait_is_bounded_by_wait_for_resources(busy_cluster, tmp_path):
    with pytest.raises(UserError, match=r"waited 2 s for resources that did not come: .*only 1 of"):
        prepare(spec_for(tmp_path, 2, wait=2))


def test_the_default_worker_count_fits_what_is_free(busy_cluster, tmp_path):
    spec = prepare(spec_for(tmp_path, None)).spec
    assert spec.scaling.num_workers == 1 and spec.scaling.use_gpu is False


def test_sweeps_start_as_many_trials_as_the_free_resources_hold(busy_cluster, tmp_path):
    """2 CPUs, 1 held by another job: two trials of 1 worker x 0.9 CPUs (+0.1 for each trial) fit the cluster's
    total but not what is free. Counting the total started both; the second one's workers found no CPUs, waited and
    were recorded failed. Both sweeps size their concurrency with this one count."""
    from raytrain_yolo.sweep.accuracy import HpoPlan, fit_resources

    spec = spec_for(tmp_path, 1)
    spec.scaling.cpus_per_worker = 0.9
    assert fit_resources(spec, HpoPlan(space={}, epochs=1, trials=2)) == 1


def test_a_wait_ends_when_the_other_job_leaves(busy_cluster, tmp_path):
    ray, holder = busy_cluster
    threading.Timer(2.0, lambda: ray.kill(holder)).start()
    spec = prepare(spec_for(tmp_path, 2, wait=120)).spec
    assert spec.scaling.num_workers == 2


def test_a_worker_larger_than_every_node_is_refused_in_one_line(busy_cluster, tmp_path):
    """One node of 2 CPUs, one worker of 3: Ray places each worker's CPUs on one node, so it could never start."""
    spec = spec_for(tmp_path, 1)
    spec.scaling.cpus_per_worker = 3
    with pytest.raises(UserError) as e:
        prepare(spec)
    msg = str(e.value)
    assert "one worker needs 3 CPUs on one node" in msg and "the largest node" in msg and "has 2 CPUs" in msg, msg
    assert "--cpus-per-worker 2" in msg and "\n" not in msg


def cpu_spec(workers: int | None, cpus: float) -> RunSpec:
    return RunSpec(scaling=ScalingSpec(num_workers=workers, use_gpu=False, cpus_per_worker=cpus))


@pytest.mark.quick
def test_the_fit_is_per_node_not_the_cluster_sum():
    """2 nodes x 4 CPUs: the cluster has 8, yet a 6-CPU worker fits on neither node; two 3-CPU workers fit (one
    per node), three of 2.5 CPUs do not (7.5 of the 8 CPUs, but one per node)."""
    from raytrain_yolo.plan.resources import _fit_scaling

    nodes = {"10.0.0.1": {"CPU": 4.0}, "10.0.0.2": {"CPU": 4.0}}
    total = free = {"CPU": 8.0}
    with pytest.raises(UserError, match=r"one worker needs 6 CPUs on one node but the largest node, 10\.0\.0\.\d, "
                                        r"has 4 CPUs: use --cpus-per-worker 4 or less"):
        _fit_scaling(cpu_spec(1, 6), total, free, nodes=nodes, nodes_free=nodes)
    assert _fit_scaling(cpu_spec(2, 3), total, free, nodes=nodes, nodes_free=nodes).scaling.num_workers == 2
    with pytest.raises(UserError, match=r"the cluster's nodes hold only 2 workers of 2\.5 CPUs"):
        _fit_scaling(cpu_spec(3, 2.5), total, free, nodes=nodes, nodes_free=nodes)
    # Free now: 3 CPUs on each node (6 in all) hold no 4-CPU worker; a request Ray would wait for is refused
    # as not free now, with --wait-for-resources as one way out.
    busy = {"10.0.0.1": {"CPU": 3.0}, "10.0.0.2": {"CPU": 3.0}}
    with pytest.raises(UserError, match=r"only 0 fit on what the nodes have free now.*--wait-for-resources"):
        _fit_scaling(cpu_spec(1, 4), total, {"CPU": 6.0}, nodes=nodes, nodes_free=busy)
    # The default worker count counts what each node has free: 3 + 1 free CPUs hold one 2-CPU worker, not two.
    uneven = {"10.0.0.1": {"CPU": 3.0}, "10.0.0.2": {"CPU": 1.0}}
    assert _fit_scaling(cpu_spec(None, 2), total, {"CPU": 4.0}, nodes=nodes, nodes_free=uneven).scaling.num_workers == 1


@pytest.mark.quick
def test_trial_workers_share_the_cpus_left_beside_the_trial():
    """Both sweeps size each CPU worker with one rule: the 0.1-CPU trial driver first, then equal shares in steps of
    0.05 CPU, never above --cpus-per-worker; nothing left is one line."""
    from raytrain_yolo.sweep.throughput import worker_cpus_beside_trial

    assert worker_cpus_beside_trial(2, 2, 1.0) == 0.95  # (2 - 0.1) / 2, rounded down to 0.05
    assert worker_cpus_beside_trial(2, 1, 1.0) == 1.0  # room for more: --cpus-per-worker caps it
    assert worker_cpus_beside_trial(16, 3, 4.0) == 4.0
    with pytest.raises(UserError, match=r"^4 workers per trial do not fit the cluster's 0\.2 CPUs next to the trial "
                                        r"itself: lower --num-workers$"):
        worker_cpus_beside_trial(0.2, 4, 1.0)


@pytest.mark.quick
def test_points_known_not_to_run_leave_the_grid_as_rows():
    """A knob value with which no point can run (amp=bf16 on CPU workers, 4 loader workers on 2-CPU nodes) leaves
    the grid Tune runs, and each of its points is an `infeasible` row with the reason; a value that fails only with
    some others (batch 3 over 2 workers, not over 1) stays in the grid for its trial to report; a grid with nothing
    that can run stays whole."""
    from raytrain_yolo.sweep.throughput import SweepBudget, split_known_infeasible

    base = RunSpec(name="s", storage_path="/tmp/nowhere", scaling=ScalingSpec(num_workers=2, use_gpu=False))
    grid = {"batch": [8, 3], "num_workers": [1, 2], "amp": ["fp32", "bf16"], "workers": [0, 4]}
    kept, rows = split_known_infeasible(base, grid, SweepBudget(), max_node_cpus=2)
    assert kept == {"batch": [8, 3], "num_workers": [1, 2], "amp": ["fp32"], "workers": [0]}
    assert sorted(tuple(r[k] for k in grid) for r in rows) == sorted(
        (b, n, a, w) for b in (8, 3) for n in (1, 2) for a in ("fp32", "bf16") for w in (0, 4)
        if (a, w) != ("fp32", 0))
    assert all(r["status"] == "infeasible" and r["windows"] == 0 and r["trial"] is None for r in rows)
    assert {r["reason"] for r in rows if (r["workers"], r["batch"]) == (0, 8)} == {"amp=bf16 needs a GPU (CPU workers train in fp32)"}
    assert {r["reason"] for r in rows if (r["amp"], r["batch"]) == ("fp32", 8)} == {
        "workers=4 dataloader workers exceed the 2 CPUs of the largest node"}
    assert split_known_infeasible(base, {"amp": ["bf16"]}, SweepBudget(), max_node_cpus=2) == ({"amp": ["bf16"]}, [])
