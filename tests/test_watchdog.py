"""Issue 41, stuck ranks: the watchdog's decisions (train/watchdog.py) on the ranks' reports, and its reading of a
real process's Python stack and state from outside. The whole path on a real run (a rank frozen after the first
checkpoint, named, its worker group restarted) is test_faults' first fault."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest

from raytrain_yolo.train.watchdog import (BEAT_S, HANG_FLOOR_S, STACK_SIGNAL, hang_timeout_s, hung, innermost_frame,
                                          inspect_process, stopped_rank)

pytestmark = pytest.mark.quick


def rank(phase="data", epoch=2, step=10, idle=0.0, silent=1.0, gap=1.0, pid=100):
    return {"phase": phase, "epoch": epoch, "step": step, "idle_s": idle, "silent_s": silent, "longest_gap_s": gap,
            "pid": pid}


def test_a_slow_rank_that_progresses_holds_no_hang_and_a_stopped_one_is_named():
    # Rank 1 is slow (its last mark 20 s ago, the timeout 30 s); rank 0 has waited for it in a collective for 100 s.
    slow = {0: rank(idle=100.0, step=11), 1: rank(phase="step", idle=20.0, step=10)}
    assert hung(slow, 30.0) is None
    # Now rank 1 stops: nobody progressed for 30 s; it is behind rank 0 (10 steps against 11): named.
    stopped = {0: rank(idle=140.0, step=11), 1: rank(phase="step", idle=60.0, step=10)}
    assert hung(stopped, 30.0) == 30.0 and stopped_rank(stopped) == 1
    # At the same step, the one whose reports stopped (a frozen process) is named, else the one idle longest.
    frozen = {0: rank(idle=50.0), 1: rank(idle=45.0, silent=10 * BEAT_S), 2: rank(idle=70.0)}
    assert stopped_rank(frozen) == 1
    assert stopped_rank({0: rank(idle=50.0), 2: rank(idle=70.0)}) == 2
    # A rank still setting up (dataset, caching), or past its last epoch (rank 0 uploading the final weights), is
    # never judged.
    assert hung({0: rank(idle=1e4), 1: rank(phase="setup", idle=1e4)}, 30.0) is None
    assert hung({0: rank(phase="end", idle=1e4), 1: rank(idle=1e4)}, 30.0) is None


def test_the_default_timeout_follows_the_slowest_pause_seen():
    assert hang_timeout_s({0: rank(gap=3.0)}, None) == HANG_FLOOR_S
    assert hang_timeout_s({0: rank(gap=3.0), 1: rank(gap=400.0)}, None) == 2000.0  # 5 x a 400-s validation batch
    assert hang_timeout_s({0: rank(gap=400.0)}, 45.0) == 45.0  # --hang-timeout wins
    assert hung({0: rank(idle=700.0, gap=200.0)}, None) is None  # 5 x 200 s = 1000 s: not yet


def test_a_stuck_process_gives_its_stack_and_a_stopped_one_its_state(tmp_path):
    stacks = tmp_path / "stacks.txt"
    child = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import faulthandler, signal, time
        faulthandler.register({int(STACK_SIGNAL)}, file=open({str(stacks)!r}, "w"), all_threads=True)
        def read_from_a_dead_mount():
            while True:
                time.sleep(0.05)
        print("ready", flush=True)
        read_from_a_dead_mount()
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        time.sleep(0.5)  # into the loop
        seen = inspect_process(child.pid, str(stacks), kill=False)
        assert seen["alive"] and seen["state"][0] in "SR", seen
        assert "read_from_a_dead_mount" in innermost_frame(seen["stack"]), seen["stack"]
        child.send_signal(signal.SIGSTOP)
        time.sleep(0.2)
        seen = inspect_process(child.pid, str(stacks), kill=True)  # stopped: its state, no stack; then ended
        assert seen["state"].startswith("T") and seen["stack"] == "", seen
        assert child.wait(timeout=10) == -signal.SIGKILL
        assert inspect_process(child.pid, str(stacks), kill=False) == {"alive": False}
    finally:
        child.kill()
