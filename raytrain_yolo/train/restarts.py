"""`--restart-wait` for each restart: how long a restarted run waits for its workers to be placed again.

A lost node that an autoscaler or a spot pool replaces takes minutes. Ray Train retries a worker-group start that
times out (each try waits `RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S`), but Ray 2.60's failure policy counts those
timeouts over the whole run (`FailureConfig.controller_failure_limit`) and nothing resets the count: a budget that
outlasts one slow replacement ran out at the third. So a fixed-size run with `--max-failures` gets an unlimited
count from Ray, and `RestartClock`, a Ray Train controller callback, bounds each wait on its own: the clock starts
when the controller leaves RUNNING to place a worker group (a restart, or the first start) and stops when the group
runs. A wait that reaches `--restart-wait` seconds, or as many timed-out starts as fit in it, ends the run with one
line (`RestartWaitExceeded`). The clock is read at each of the controller's state changes, so a wait ends at the
first start try that ends past the limit: at most one start timeout late.
"""

from __future__ import annotations

import math
import time

from ray.train.v2._internal.execution.callback import ControllerCallback

# The controller's states (TrainControllerStateType names) in which it is placing a worker group.
PLACING = frozenset({"SCHEDULING", "RESCHEDULING", "RESTARTING"})


class RestartWaitExceeded(RuntimeError):
    """A restart (or the first start) whose workers were not placed within `--restart-wait`."""


class RestartClock(ControllerCallback):
    """Runs in Ray Train's controller (RunConfig.callbacks). `wait_s`: --restart-wait (seconds, > 0);
    `start_timeout_s`: one worker-group start try's timeout (seconds). Raising from a state-change hook makes the
    controller end the run with that error (a ControllerError that its failure policy does not retry).
    """

    def __init__(self, wait_s: float, start_timeout_s: float):
        self.wait_s, self.start_timeout_s = wait_s, start_timeout_s
        self.max_tries = max(1, math.ceil(wait_s / start_timeout_s))
        self.restarts = 0  # group starts after the first
        self._since: float | None = None  # when this wait began (time.monotonic, on the controller)
        self._failed_tries = 0
        self._ran = False

    def after_controller_state_update(self, previous_state, current_state) -> None:
        self.update(type(current_state).__name__.removesuffix("State").upper())  # ReschedulingState: RESCHEDULING

    def update(self, state: str, now: float | None = None) -> None:
        """Advance the clock to controller state `state` (a TrainControllerStateType name) at `now`."""
        now = time.monotonic() if now is None else now
        if state == "RUNNING":
            self._since, self._failed_tries, self._ran = None, 0, True
            return
        if state not in PLACING:
            return
        if self._since is None:
            self._since = now
            self.restarts += self._ran
            self._ran = False
        if state == "RESCHEDULING":  # a start try failed (timed out, or its workers could not start)
            self._failed_tries += 1
        waited = now - self._since
        if waited >= self.wait_s or self._failed_tries >= self.max_tries:
            what = f"restart {self.restarts}" if self.restarts else "the first start"
            raise RestartWaitExceeded(
                f"the workers of {what} were not placed within --restart-wait {self.wait_s:g} s ({waited:.0f} s, "
                f"{self._failed_tries} worker-group start tries of {self.start_timeout_s:g} s failed): the nodes "
                "they need did not come back; raise --restart-wait for nodes that take longer to replace, or let the "
                "run go on with fewer workers (--num-workers MIN-MAX)")
