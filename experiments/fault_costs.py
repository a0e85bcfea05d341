"""What each fault costs a `fit`, measured: the run's wall time with the fault against the same run without it.

    python experiments/fault_costs.py [worker|driver|mlflow-60s ...]   # all: about 7 minutes on 2 CPU cores

Every run: `fit --cpu`, 2 gloo workers, 64 images of 96 px, 4 epochs, its own local Ray (the command without
RAY_ADDRESS), logging to one real MLflow server over HTTP through a TCP path the script can cut (tests'
CuttableLink), each run in an MLflow experiment of its own. The faults, each injected once the first checkpoint
is registered:
- clean: none (the reference);
- worker: one worker SIGKILLed, `--max-failures 1` (Ray Train restarts the group from the checkpoint);
- driver: the driver and its local Ray SIGKILLed, then the same command run again (wall: both parts);
- mlflow-60s: the path to the MLflow server cut for 60 s, MLflow's own retries as they are by default.
The cost is the command's wall time (to its exit; for mlflow-60s, to the exit or the end of the cut, whichever
came first) minus the clean run's; one run each on this machine, so differences of a few seconds are noise.
Prints a Markdown table (and writes it beside this file, in results/).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from conftest import start_cli, start_mlflow_server, train_worker_pids, wait_for  # noqa: E402
from test_faults import registered_checkpoints  # noqa: E402
from test_tracking import CuttableLink  # noqa: E402

KINDS = ("worker", "driver", "mlflow-60s")  # after "clean", the reference; or those named on the command line
ARGS = ("--cpu", "--no-validate-untrained", "--num-workers", 2, "--synthetic-train", 64, "--synthetic-val", 16,
        "epochs=4", "imgsz=96")


def run(kind: str, work: Path, link: CuttableLink) -> dict:
    name = f"cost-{kind}"
    cmd = (*ARGS, "--storage-path", work, "--name", name, "--tracking-uri", link.uri, "--experiment", name,
           *(("--max-failures", 1) if kind == "worker" else ()))
    log = work / f"{name}.log"
    start = time.monotonic()
    fit = start_cli("fit", *cmd, log_path=log)
    note, ended = "", None
    try:
        if kind != "clean":
            wait_for(lambda: registered_checkpoints(work / name) >= 1 or fit.poll() is not None, 600,
                     what="the first checkpoint")
        if kind == "worker":
            os.kill(wait_for(lambda: train_worker_pids(fit.pid), 30, what="worker pids")[-1], signal.SIGKILL)
            killed = time.monotonic()
            wait_for(lambda: registered_checkpoints(work / name) >= 2 or fit.poll() is not None, 600,
                     what="a checkpoint after the restart")
            note = f"kill to the next checkpoint {time.monotonic() - killed:.0f} s"
        elif kind == "driver":
            os.killpg(fit.pid, signal.SIGKILL)
            fit.wait(timeout=60)
            rerun = time.monotonic()
            fit = start_cli("fit", *cmd, log_path=work / f"{name}-rerun.log")
            fit.wait(timeout=900)
            note = f"rerun alone {time.monotonic() - rerun:.0f} s"
        elif kind == "mlflow-60s":
            link.cut()
            cut = time.monotonic()
            wait_for(lambda: fit.poll() is not None or time.monotonic() - cut > 60, 120, what="the cut's end")
            ended = time.monotonic() if fit.poll() is not None else None  # the run ended while the server was cut
            link.up()
        rc = fit.wait(timeout=900)
        wall = (ended if kind == "mlflow-60s" and ended else time.monotonic()) - start
        summary = json.loads((work / name / "summary.json").read_text()) if rc == 0 else {}
        if kind == "mlflow-60s" and summary:
            epochs = [h.get("throughput/epoch_seconds", 0) for h in summary["history"]]
            note = (f"slowest epoch {max(epochs):.1f} s; {'ended during the cut; ' if ended else ''}"
                    f"never reached MLflow: {len(summary['tracking_unsent'])} items")
    finally:
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
        if link.listener is None or link.listener.fileno() == -1:
            link.up()
    return {"kind": kind, "rc": rc, "wall_s": wall, "note": note}


def main() -> None:
    work = Path(tempfile.mkdtemp(prefix="raytrain-yolo-fault-costs-"))
    server, url = start_mlflow_server(work)
    link = CuttableLink(url)
    link.up()
    rows = []
    try:
        for kind in ("clean", *(sys.argv[1:] or KINDS)):
            rows.append(run(kind, work, link))
            print(rows[-1], flush=True)
    finally:
        link.cut()
        os.killpg(server.pid, signal.SIGTERM)
    clean = rows[0]["wall_s"]
    lines = ["| fault | exit | wall (s) | cost (s) | note |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['rc']} | {r['wall_s']:.0f} | {r['wall_s'] - clean:+.0f} | {r['note']} |")
    table = "\n".join(lines)
    print(table)
    out = ROOT / "experiments" / "results" / f"fault-costs-{time.strftime('%Y-%m-%d')}.md"
    out.write_text(f"# fault_costs.py, {time.strftime('%Y-%m-%d %H:%M')}, {os.cpu_count()} CPUs\n\n{table}\n")


if __name__ == "__main__":
    main()
