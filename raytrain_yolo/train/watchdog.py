"""Stuck ranks: every rank says where it is; the driver finds a run in which no rank progresses, names the rank
that stopped, writes every rank's Python stack under the run's folder, and ends the worker group.

Under DDP one stopped rank (a dead mount under its dataloader, a driver call that never returns, a deadlocked loader
worker, a rank that took another branch) stops every rank: the others wait in the next all-reduce until the process
group's timeout (3 hours, Ultralytics' default), and nothing says which rank or why. Here:

- each rank marks its progress from Ultralytics' callbacks (`RankProgress`): phase (`data`: waiting for the next
  batch, `step`, `validation`, `checkpoint`, `end`), epoch, the steps done in that epoch and the time of its last
  progress; a thread of the rank hands that to the run's `ProgressBoard` (an actor beside the driver) every `BEAT_S`
  seconds (so what the board holds is up to `BEAT_S` old), so a rank whose main thread is stuck still reports how
  long it has been stuck, and a frozen process stops reporting at all. The marks also give each rank's mean step
  time and data wait (`figures()`), which the run's summary lists per worker: a straggler shows before it hangs;
- the driver's `Watchdog` declares a hang when no rank has progressed for the hang timeout (a rank slowed down but
  progressing keeps the others waiting, never ended); the rank that stopped is the one behind the others (fewest
  steps), else the one whose reports stopped, else the one idle longest;
- it then reads every rank's Python stack from outside the process (Python's `faulthandler`, registered in each rank
  on `STACK_SIGNAL`, and signalled by a task on the rank's node; a process that cannot run, e.g. stopped, gives its
  state from /proc instead), writes them to `<run>/hangs/<UTC time>/rank<r>.txt`, prints one line, and kills the
  stopped rank: Ray Train restarts the worker group from the last checkpoint under `--max-failures`, or the run ends
  with that line.

The timeout: `--hang-timeout SECONDS`, else the larger of `HANG_FLOOR_S` (10 minutes) and `GAP_MULTIPLE` times the
longest pause between two progress marks any rank has shown (the slowest step, validation batch or checkpoint
upload); `--hang-timeout 0` turns it off. A rank still setting up (building its dataset, caching images, before its
first batch) or past its last epoch (rank 0 uploading the final weights) is not judged: there the process group's
timeout stays the guard.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

BEAT_S = 2.0  # how often each rank reports
HANG_FLOOR_S = 600.0
GAP_MULTIPLE = 5
STACK_SIGNAL = signal.SIGUSR2  # faulthandler's dump of every thread's Python stack (Ray uses neither SIGUSR)
# Phases not judged: building the dataset and caching images before the first batch, and the run's end (rank 0
# uploads the final weights to MLflow, with MLflow's own patience, while the others wait in the last collective).
UNJUDGED = ("setup", "end", "preempted")  # preempted: waiting, on purpose, for Ray to end the group (train/preemption)
SILENT_BEATS = 3  # a rank that missed this many reports is not running (frozen, or its node is gone)


class RankHang(RuntimeError):
    """A run ended because a rank stopped making progress (the message is the watchdog's line)."""


class ProgressBoard:
    """Beside the driver: each rank's last report, as `rank -> state`. Ages are taken on the board's own clock (the
    receipt time, plus the idle time the rank measured on its own), so the nodes' clocks never need to agree."""

    def __init__(self):
        self.ranks: dict[int, dict[str, Any]] = {}
        self.ended: set[int] = set()  # processes of a worker group that ended: their late reports are not read

    def beat(self, rank: int, state: dict[str, Any]) -> None:
        if state["pid"] not in self.ended:
            self.ranks[rank] = {**state, "received": time.monotonic()}

    def read(self) -> dict[int, dict[str, Any]]:
        """Every rank's state with `idle_s` (since its last progress) and `silent_s` (since its last report) now."""
        now = time.monotonic()
        return {r: {**s, "silent_s": now - s["received"], "idle_s": s["idle_s"] + now - s["received"]}
                for r, s in self.ranks.items()}

    def forget(self, pids: list[int]) -> None:
        """Drop the reports of processes that are gone or ended (a worker group ended or being replaced)."""
        self.ended.update(pids)
        self.ranks = {r: s for r, s in self.ranks.items() if s["pid"] not in self.ended}


class RankProgress:
    """Rank side: progress marks from Ultralytics' callbacks, reported to the board by a thread every BEAT_S."""

    def __init__(self, board, rank: int, stack_file: Path):
        import ray

        self.board, self.rank = board, rank
        self.phase, self.epoch, self.step = "setup", 0, 0
        self.last = time.monotonic()
        self.longest_gap_s = 0.0  # the longest pause between two marks after setup (the default timeout's base)
        self.spent = {"step": [0.0, 0], "data": [0.0, 0]}  # phase -> [seconds, times]: step time, data wait
        self.stacks = open(stack_file, "w")  # noqa: SIM115 - open for the process's life: faulthandler writes to it
        faulthandler.register(STACK_SIGNAL, file=self.stacks, all_threads=True)
        self.ids = {"pid": os.getpid(), "node_id": ray.get_runtime_context().get_node_id(),
                    "node_ip": ray.util.get_node_ip_address(), "stack_file": str(stack_file)}
        self._stop = threading.Event()
        threading.Thread(target=self._report, name="raytrain-yolo-progress", daemon=True).start()

    def mark(self, phase: str, step: int | None = None, epoch: int | None = None) -> None:
        now = time.monotonic()
        if self.phase != "setup":
            self.longest_gap_s = max(self.longest_gap_s, now - self.last)
        if self.phase in self.spent and phase != self.phase:
            self.spent[self.phase][0] += now - self.last
            self.spent[self.phase][1] += 1
        self.phase, self.last = phase, now
        self.step = self.step if step is None else step
        self.epoch = self.epoch if epoch is None else epoch

    def callbacks(self) -> dict[str, Any]:
        """Ultralytics callback name -> function (the trainer's; its validator copies them)."""
        return {
            "on_train_epoch_start": lambda t: self.mark("data", step=0, epoch=t.epoch + 1),
            "on_train_batch_start": lambda t: self.mark("step"),
            "on_train_batch_end": lambda t: self.mark("data", step=self.step + 1),
            "on_val_start": lambda v: self.mark("validation"),
            "on_val_batch_end": lambda v: self.mark("validation"),
            "on_fit_epoch_end": lambda t: self.mark("checkpoint"),
            "on_train_end": lambda t: self.mark("end"),
        }

    def figures(self) -> dict[str, Any]:
        """This rank's mean step time and data wait (seconds: from a batch's start to its end, and from a batch's
        end, or the epoch's start, to the next batch's start), over the batches it trained."""
        def mean(phase: str) -> float | None:
            total, n = self.spent[phase]
            return round(total / n, 6) if n else None

        return {"step_s": mean("step"), "data_wait_s": mean("data"), "steps": self.spent["step"][1]}

    def _report(self) -> None:
        while not self._stop.wait(BEAT_S):
            try:
                self.board.beat.remote(self.rank, {**self.ids, "phase": self.phase, "epoch": self.epoch,
                                                   "step": self.step, "idle_s": time.monotonic() - self.last,
                                                   "longest_gap_s": self.longest_gap_s})
            except Exception:  # noqa: BLE001 - the board went with the driver: nothing to report to
                return

    def close(self) -> None:
        self._stop.set()
        faulthandler.unregister(STACK_SIGNAL)
        self.stacks.close()


def stopped_rank(states: dict[int, dict[str, Any]]) -> int:
    """Of ranks none of which progresses: the one that stopped the others. Under DDP the others went on to the next
    collective and wait there, so it is the one behind (fewest steps); among equals, the one whose reports stopped
    (a frozen process), else the one idle longest."""
    return min(states, key=lambda r: (states[r]["epoch"], states[r]["step"],
                                      -(states[r]["silent_s"] > SILENT_BEATS * BEAT_S), -states[r]["idle_s"]))


def hang_timeout_s(states: dict[int, dict[str, Any]], asked: float | None) -> float:
    """`--hang-timeout` when given, else the larger of HANG_FLOOR_S and GAP_MULTIPLE x the longest pause seen."""
    if asked is not None:
        return asked
    return max(HANG_FLOOR_S, GAP_MULTIPLE * max((s["longest_gap_s"] for s in states.values()), default=0.0))


def hung(states: dict[int, dict[str, Any]], asked: float | None) -> float | None:
    """The hang timeout when the ranks' `states` (ProgressBoard.read) are a hang, else None: every rank is past its
    setup and none has progressed for the timeout. One rank progressing, however slowly, holds the others in its
    collectives: no hang."""
    if not states or any(s["phase"] in UNJUDGED for s in states.values()):
        return None
    timeout = hang_timeout_s(states, asked)
    return timeout if min(s["idle_s"] for s in states.values()) > timeout else None


def inspect_process(pid: int, stack_file: str, kill: bool) -> dict[str, Any]:
    """On the rank's node: whether `pid` lives, its state (/proc), its Python stack (faulthandler, when it can run),
    and, with `kill`, its end (SIGKILL)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {"alive": False}
    state = next((line.split(":", 1)[1].strip() for line in status.splitlines() if line.startswith("State:")), "?")
    stack, path = "", Path(stack_file)
    if not state.startswith(("T", "t", "Z")):  # stopped, traced or a zombie runs no signal handler
        size = path.stat().st_size if path.exists() else 0
        os.kill(pid, STACK_SIGNAL)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            time.sleep(0.2)
            if path.exists() and path.stat().st_size > size:
                time.sleep(0.3)  # the rest of the threads
                stack = path.read_text(errors="replace")[size:]
                break
    if kill:
        os.kill(pid, signal.SIGKILL)
    return {"alive": True, "state": state, "stack": stack}


def innermost_frame(stack: str) -> str:
    """`file:line in function` of the main thread's innermost frame in a faulthandler dump ('' when there is none)."""
    lines = stack.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith("Current thread")), None)
    if start is None:
        start = next((i for i, line in enumerate(lines) if line.startswith("Thread")), None)
    if start is None or start + 1 >= len(lines):
        return ""
    frame = lines[start + 1].strip()  # File "x.py", line 12 in f
    parts = frame.replace('File "', "").replace('", line ', ":").split(" in ", 1)
    return f"{parts[0]} in {parts[1]}" if len(parts) == 2 else frame


class Watchdog:
    """Driver side, for one run: a thread that reads the board and ends a hang (see the module's text). `lines`: the
    one-line report of each hang it ended."""

    def __init__(self, board, run_dir: str, asked_timeout_s: float | None, poll_s: float = BEAT_S):
        self.board, self.run_dir, self.asked, self.poll_s = board, run_dir, asked_timeout_s, poll_s
        self.lines: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="raytrain-yolo-watchdog", daemon=True)

    def __enter__(self) -> Watchdog:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _watch(self) -> None:
        import ray

        while not self._stop.wait(self.poll_s):
            try:
                states = ray.get(self.board.read.remote(), timeout=30)
            except Exception:  # noqa: BLE001 - the board is beside the driver: only a driver in trouble gets here
                continue
            timeout = hung(states, self.asked)
            if timeout is not None:
                self._end_hang(states, timeout)

    def _end_hang(self, states: dict[int, dict[str, Any]], timeout: float) -> None:
        """Every rank's stack to the run's folder, one line, the stopped rank killed. Ranks whose process is gone
        (a group being replaced) are forgotten instead: that is no hang."""
        import ray

        from raytrain_yolo.core import storage

        culprit = stopped_rank(states)
        seen = {r: _on_node(s["node_id"], inspect_process, s["pid"], s["stack_file"], False)
                for r, s in states.items() if r != culprit}
        seen[culprit] = _on_node(states[culprit]["node_id"], inspect_process, states[culprit]["pid"],
                                 states[culprit]["stack_file"], True)
        if seen[culprit] is None:  # its node does not answer: a lost node is Ray Train's to handle
            return
        gone = [states[r]["pid"] for r, v in seen.items() if v is not None and not v["alive"]]
        if gone:
            ray.get(self.board.forget.remote(gone))
            if states[culprit]["pid"] in gone:
                return
        folder = f"{self.run_dir}/hangs/{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        for r, v in sorted(seen.items()):
            s = states[r]
            head = (f"rank {r}, node {s['node_ip']}, pid {s['pid']}: {s['phase']} of epoch {s['epoch']} after its step "
                    f"{s['step']}, no progress for {s['idle_s']:.0f} s, process state {(v or {}).get('state', '?')}")
            storage.write_text(f"{folder}/rank{r}.txt", f"{head}\n\n{(v or {}).get('stack') or '(no Python stack)'}\n")
        s, v = states[culprit], seen[culprit] or {}
        where = innermost_frame(v.get("stack", "")) or f"process state {v.get('state', 'unknown')}"
        line = (f"hang: rank {culprit} (node {s['node_ip']}, pid {s['pid']}) made no progress for {s['idle_s']:.0f} s "
                f"(--hang-timeout {timeout:g}) in {s['phase']} of epoch {s['epoch']} after its step {s['step']}, at "
                f"{where}; every rank's stack is in {storage.redact(folder)}; its worker group is ended (a restart "
                "from the last checkpoint under --max-failures)")
        self.lines.append(line)
        print(line, file=sys.stderr, flush=True)
        ray.get(self.board.forget.remote([states[r]["pid"] for r in states]))


def _on_node(node_id: str, fn, *args) -> dict[str, Any] | None:
    """`fn(*args)` in a task on node `node_id`; None when that node does not answer within 60 s."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    task = ray.remote(num_cpus=0, max_retries=0)(fn).options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False))
    try:
        return ray.get(task.remote(*args), timeout=60)
    except Exception:  # noqa: BLE001 - a node that is gone: Ray Train handles its loss
        return None


def start_board():
    """The run's ProgressBoard actor, beside the driver (it dies with the driver, never with a worker node)."""
    import ray

    from raytrain_yolo.core.cluster import on_this_node

    return ray.remote(ProgressBoard).options(**on_this_node()).remote()
