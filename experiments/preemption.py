"""What a spot preemption costs a fixed-size `fit`, measured on the namespace cluster (issue 41, item 4).

    python experiments/preemption.py [--images 5000] [--deadline 20] [--replace 15]   # root; ~8 min on 2 cores

The cluster of `cluster/local-multinode.sh` (tests/multinode.py): a 0-CPU head and two 1-CPU worker nodes, a
shared folder. One `fit --cpu`, 2 gloo workers (one per node), 3 epochs, `warmup_epochs=0` (a notice in the warmup
gets no step checkpoint), `--max-failures 2`, data and checkpoints on the shared folder, no MLflow. Once the first
epoch's checkpoint is registered and a quarter of the time to it has passed again, node 2 gets Ray's preemption
notice (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds DEADLINE`: what Ray's
autoscaler and KubeRay send for a spot reclaim), is taken down (every process in it) at the deadline and comes back
REPLACE seconds later (a replacement node). Ray Train's preemption watcher is on (Ray's default; the suite turns it
off).

Printed and written to results/preemption-cpu-<date>.md: the exit status; the epoch and step the restart resumed
from; the steps trained twice, that is rank 0's steps of the interrupted epoch that the lost group trained past the
checkpoint the run resumed from (read from Ultralytics' progress bar in run.log); the time from the last checkpoint
registered before the node's loss to the loss, also as a fraction of the run's median epoch; and the time from the
notice to the end. Epochs must be longer than the deadline for the notice to fall inside one (the default 5000
images of 64 px take about 52 s per epoch on this project's 2-core machine; 1600 images, 17 s, finished first).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import wait_for  # noqa: E402
from multinode import start_cluster, stop_cluster, why_not_supported  # noqa: E402
from test_multinode import latest_epoch, node_id, preemption_notice, snapshot  # noqa: E402

from raytrain_yolo.core.config import SyntheticSpec  # noqa: E402
from raytrain_yolo.data.synthetic import ensure_synthetic  # noqa: E402

def data_on(cluster, images: int) -> Path:
    src = ensure_synthetic(SyntheticSpec(train=images, val=16, imgsz=64)).parent
    dest = cluster.shared / "datasets" / src.name
    shutil.copytree(src, dest)
    (dest / "data.yaml").write_text((src / "data.yaml").read_text().replace(f"path: {src}", f"path: {dest}"))
    return dest / "data.yaml"


def measure(cluster, images: int, deadline: int, replace: float) -> dict:
    storage, name = str(cluster.shared / "runs"), "preempted"
    log = cluster.dir / f"{name}.log"
    cmd = (sys.executable, "-m", "raytrain_yolo.fit", "--cpu", f"data={data_on(cluster, images)}", "batch=16",
           "imgsz=64", "epochs=3", "warmup_epochs=0", "--num-workers", 2, "--max-failures", 2,
           "--storage-path", storage, "--name", name, "--no-tracking", "--no-validate-untrained")
    fit = cluster.start_on_head(*cmd, log_path=log)
    checkpoints: list[tuple[float, tuple]] = []  # (when Ray registered it, as seen here; its (epoch, step))

    def latest() -> tuple:
        m = (snapshot(cluster, name, storage).get("latest_checkpoint_result") or {}).get("metrics") or {}
        return m.get("epoch", 0), m.get("step") or 0

    def watch(seconds: float) -> None:  # poll the registered checkpoints for `seconds`
        end = time.monotonic() + seconds
        while time.monotonic() < end and fit.poll() is None:
            if not checkpoints or latest() != checkpoints[-1][1]:
                checkpoints.append((time.monotonic(), latest()))
            time.sleep(0.2)

    try:
        started = time.monotonic()
        wait_for(lambda: latest_epoch(cluster, name, storage) >= 1 or fit.poll() is not None, 900,
                 what="the first checkpoint")
        first_epoch_s = time.monotonic() - started
        checkpoints.append((time.monotonic(), latest()))
        watch(max(5.0, first_epoch_s / 4))  # into the next epoch
        preemption_notice(cluster, node_id(cluster, 2), deadline)
        noticed = time.monotonic()
        watch(deadline - (time.monotonic() - noticed))
        down = cluster.script("node-down", "2")
        assert down.returncode == 0, down.stderr
        lost = time.monotonic()
        before = [c for c in checkpoints if c[0] <= lost][-1]
        watch(replace)
        up = cluster.script("node-up", "2")
        assert up.returncode == 0, up.stderr[-2000:]
        rc = fit.wait(timeout=1200)
        ended = time.monotonic()
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
    text = log.read_text()
    summary = json.loads((Path(storage) / name / "summary.json").read_text()) if rc == 0 else {}
    twice, per_epoch = steps_trained_twice((Path(storage) / name / "run.log").read_text(errors="replace"), summary)
    epoch_s = statistics.median(h["throughput/epoch_seconds"] for h in summary.get("history", [])
                                if h.get("throughput/epoch_seconds")) if summary else None
    return {"rc": rc, "last_line": text.strip().splitlines()[-1] if text.strip() else "",
            "resumed_from_epoch": summary.get("resumed_from_epoch"),
            "resumed_from_step": summary.get("resumed_from_step"), "epoch_s": epoch_s,
            "checkpoint_before_loss": before[1], "lost_s": lost - before[0],
            "lost_epochs": (lost - before[0]) / epoch_s if epoch_s else None,
            "notice_to_end_s": ended - noticed, "wall_s": summary.get("wall_seconds"), "twice": twice,
            "per_epoch": per_epoch}


def steps_trained_twice(run_log: str, summary: dict) -> tuple[int | None, int | None]:
    """Rank 0's steps of the interrupted epoch that the lost group trained past the checkpoint the run resumed from
    (read from Ultralytics' progress bar in run.log, before the resume), and the steps per epoch."""
    if not summary.get("resumed_from_epoch"):
        return None, None
    epoch, epochs = summary["resumed_from_epoch"] + 1, len(summary["history"])
    before = run_log[:run_log.rfind("Resuming training")]
    bars = re.findall(rf"\s{epoch}/{epochs}\s+[\d.]+G\s[^\r\n\x1b]*?\s(\d+)/(\d+)\s", before)
    if not bars:
        return 0, None
    # The bar is drawn before each step: its last count may be one short of the steps done.
    return max(0, max(int(k) for k, _ in bars) - int(summary.get("resumed_from_step") or 0)), int(bars[-1][1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=5000)
    p.add_argument("--deadline", type=int, default=20, help="seconds from the notice to the node's loss")
    p.add_argument("--replace", type=float, default=15, help="seconds the node stays down")
    a = p.parse_args()
    if why_not_supported():
        print(f"cannot build the namespace cluster here: {why_not_supported()}", file=sys.stderr)
        return 2
    cluster = start_cluster()
    try:
        r = measure(cluster, a.images, a.deadline, a.replace)
    finally:
        stop_cluster(cluster)
    table = (f"| images | deadline | down | exit | resumed after epoch, at step | median epoch | lost | "
             f"notice to end |\n| --- | --- | --- | --- | --- | --- | --- | --- |\n"
             f"| {a.images} | {a.deadline} s | {a.replace:g} s | {r['rc']} | {r['resumed_from_epoch']}, "
             f"{r['resumed_from_step'] or '-'} | "
             f"{r['epoch_s'] or 0:.1f} s | {r['twice']} of {r['per_epoch']} steps trained twice; {r['lost_s']:.1f} s "
             f"from the last checkpoint to the loss ({r['lost_epochs'] or 0:.0%} of an epoch) | "
             f"{r['notice_to_end_s']:.0f} s |\n")
    print(table + f"\nlast line: {r['last_line']}")  # the summary's rule when it passed, else the error
    out = ROOT / "experiments" / "results" / f"preemption-cpu-{time.strftime('%Y-%m-%d')}.md"
    failed = "" if r["rc"] == 0 else f"\n{r['last_line']}\n"
    title = f"# A spot preemption (experiments/preemption.py, {time.strftime('%Y-%m-%d %H:%M')})"
    out.write_text(f"{title}\n\n{table}{failed}")
    return 0 if r["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
