"""A checkpoint at the current step when Ray says a node of the run is being preempted, and the resume at that step.

Ray 2.60 turns a node's drain notice (a spot reclaim under Ray's autoscaler or KubeRay; `ray drain-node --reason
DRAIN_NODE_REASON_PREEMPTION --deadline-remaining-seconds N` by hand) into `ray.train.get_preemption_info()` on every
rank, a collective: each rank asks at the same steps. Here every rank asks at the first optimizer step after about
`RAYTRAIN_YOLO_PREEMPTION_CHECK_S` seconds of steps (default 2; Ray looks at the drains every 5 s; one ask costs
about 3 ms on CPU workers), the number of batches taken from rank 0's step time in the last epoch and shared.

On a notice, rank 0 saves a checkpoint of the epoch in progress: Ultralytics' own `save_model()` (model, EMA,
optimizer, scaler, early stopping) at that step, with the step, the order of the epoch's batches and the running loss
in its state (the node may go before its deadline). Training goes on (an epoch that ends meanwhile checkpoints as
always), and at the last ask before the deadline (when the next ask, counting an epoch's end on the way, and a
checkpoint, counted twice, could come after it: rank 0 decides for all) a second step checkpoint is taken, after
which every rank waits for the group's end: work after it would be lost with the node. Ray Train restarts the
group at the deadline (or when the node is gone) and resumes from the latest checkpoint: Ultralytics' resume starts
at the interrupted epoch (not after it), the sampler gives the rest of that epoch's batches in the same order, the
epoch's training loss combines both parts, and Ultralytics' learning rate schedule, EMA and optimizer state go on
from where they were. Only fit runs of a fixed size with `--max-failures` and more than one worker on Ultralytics'
loader, from their second epoch on and past the warmup; elsewhere a preemption costs what any node loss costs.

What differs from a run never preempted, as with Ultralytics' own resume at an epoch's start: the first optimizer step
after the resume applies the batches since the resume only (with `accumulate` > 1), augmentation draws differ, and
the resumed epoch's time and images/s count its remaining batches only.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from typing import Any

import torch.distributed as dist

CHECK_EVERY_S = float(os.environ.get("RAYTRAIN_YOLO_PREEMPTION_CHECK_S", "2"))
NO_DEADLINE_WAIT_S = 120.0  # Ray Train's own wait for a notice without a deadline
AFTER_DEADLINE_S = 60.0  # a group not ended this long after the deadline goes on training (a cancelled notice)


class StepSampler:
    """In Ultralytics' train loader, around its DistributedSampler: the same per-rank order, and which epoch's order
    each pass was drawn with (with loader workers Ultralytics draws epoch E+1's pass before its `set_epoch(E+1)`, so
    that pass has epoch E's order). `resume=(order epoch, batches to skip)` draws an interrupted pass again without
    its first batches."""

    def __init__(self, inner, batch_size: int, files: list[str], resume: tuple[int, int] | None = None):
        self.inner, self.batch_size, self.files, self.resume = inner, batch_size, files, resume
        self.drawn: list[tuple[int, str]] = []  # (order epoch, first file) per pass drawn, oldest first
        self.current: int | None = None  # the order epoch of the epoch in progress's pass
        self.awaiting_first = False  # the epoch in progress has not shown its first batch yet

    def __len__(self) -> int:
        return len(self.inner)

    def __iter__(self):
        epoch, skip = self.resume or (self.inner.epoch, 0)
        self.resume = None
        kept = self.inner.epoch
        self.inner.set_epoch(epoch)
        try:
            indices = list(iter(self.inner))[skip * self.batch_size:]
        finally:
            self.inner.set_epoch(kept)
        self.drawn.append((epoch, self.files[indices[0]] if indices else ""))
        return iter(indices)

    def first_batch(self, first_file: str) -> None:
        """The epoch in progress trains on the pass whose first file this is (passes left behind are dropped)."""
        while self.drawn and self.drawn[0][1] != first_file:
            self.drawn.pop(0)
        self.current = self.drawn.pop(0)[0] if self.drawn else None
        self.awaiting_first = False


def install(loader, files: list[str], resume: dict[str, Any] | None) -> StepSampler | None:
    """Put a StepSampler into Ultralytics' train `loader` (an InfiniteDataLoader: a repeating batch sampler around a
    BatchSampler around the DistributedSampler); None where the order is not the DistributedSampler's (one worker,
    `rect=True`). With `resume` (a step checkpoint's state), the loader's next epoch also yields that many fewer
    batches, so that epoch ends where it would have."""
    from torch.utils.data.distributed import DistributedSampler

    batches = getattr(getattr(loader, "batch_sampler", None), "sampler", None)
    inner = getattr(batches, "sampler", None)
    if type(inner) is not DistributedSampler or not inner.shuffle:
        return None
    skip = int(resume["step"]) if resume else 0
    batches.sampler = sampler = StepSampler(inner, batches.batch_size, files,
                                            (int(resume["order_epoch"]), skip) if resume else None)
    if skip:
        loader.__class__ = _resumed(type(loader))
        loader.skip_batches = skip
    return sampler


_RESUMED: dict[type, type] = {}


def _resumed(cls: type) -> type:
    """`cls` (Ultralytics' loader class) whose next epoch stops `skip_batches` early."""
    if cls not in _RESUMED:
        def __iter__(self):  # a generator, as Ultralytics' own: its loop makes an iterator that rank 0 never iterates
            skip, self.skip_batches = self.skip_batches, 0
            yield from itertools.islice(cls.__iter__(self), len(self) - skip)

        _RESUMED[cls] = type(f"Resumed{cls.__name__}", (cls,), {"__iter__": __iter__, "skip_batches": 0})
    return _RESUMED[cls]


class PreemptionSaver:
    """The trainer's callbacks for one rank (see the module's text). `report_step(trainer, step)`: the Reporter's
    step checkpoint (a collective of all ranks); `mark(phase)`: this rank's progress mark for the hang watchdog."""

    def __init__(self, trainer, world_size: int, report_step, mark, resume: dict[str, Any] | None):
        self.world_size, self.report_step, self.mark = world_size, report_step, mark
        self.resume = resume  # {"epoch", "step", "order_epoch", "tloss"}: the step checkpoint this run resumed from
        self.every = 1  # batches between asks, the same on every rank
        self.since = 0  # batches since the last ask
        self.batches = 0  # of the epoch in progress, skipped ones included
        self.trained = 0  # of the epoch in progress, by this attempt
        self.stepped = 0  # the trainer's optimizer steps at the last batch's end
        self.step_s = 0.0  # rank 0's mean training step in the last epoch
        self.epoch_started = 0.0
        self.deadline: float | None = None  # when the noticed node goes (time.time(), rank 0's view)
        self.save_s = 0.0  # the longest step checkpoint so far, seconds
        self.epoch_end_s, self.epoch_ended = 0.0, 0.0  # the last epoch's validation and checkpoint (s); its start
        self.saved = False  # the last checkpoint before the deadline is taken: no more asks
        for event in ("on_train_epoch_start", "on_train_batch_end", "on_train_epoch_end"):
            trainer.add_callback(event, getattr(self, event))

    def on_train_epoch_start(self, trainer) -> None:
        if trainer.step_sampler is None:  # not Ultralytics' distributed order (the same on every rank)
            return
        every = [max(1, math.floor(CHECK_EVERY_S / self.step_s)) if self.step_s else 1]
        if self.world_size > 1:
            dist.broadcast_object_list(every, src=0)
        if self.epoch_ended:
            self.epoch_end_s = time.monotonic() - self.epoch_ended
        resumed = self.resume is not None and trainer.epoch == int(self.resume["epoch"])
        self.every, self.batches, self.trained, self.since = every[0], int(self.resume["step"]) if resumed else 0, 0, 0
        self.epoch_started, self.stepped = time.monotonic(), trainer.optimizer_steps
        trainer.step_sampler.awaiting_first = True

    def eligible(self, trainer) -> bool:
        """The same answer on every rank: at the first optimizer step once `every` batches have passed since the last
        ask, from the second epoch on, once the whole epoch is past the warmup (a resume restarts Ultralytics' step
        count at the epoch's start), and before the epoch's last batch."""
        stepped, self.stepped = trainer.optimizer_steps > self.stepped, trainer.optimizer_steps
        self.since += 1
        if not trainer.step_checkpoints or trainer.step_sampler is None or self.saved or not stepped or \
                self.since < self.every:
            return False
        self.since = 0
        nb = len(trainer.train_loader)  # at an epoch's last batch its own checkpoint comes next
        return trainer.epoch >= 1 and trainer.epoch * nb > trainer.warmup_iterations and self.batches < nb

    def on_train_batch_end(self, trainer) -> None:
        import ray.train

        self.batches, self.trained = self.batches + 1, self.trained + 1
        if not self.eligible(trainer):
            return
        info = ray.train.get_preemption_info()  # rank 0's, on every rank
        if info is None:
            return
        if self.deadline is None:  # the notice: a checkpoint now (the node may go before its deadline), train on
            self.deadline = info.deadline_ms / 1000 if info.deadline_ms else time.time() + NO_DEADLINE_WAIT_S
            self._save(trainer)
        elif self._last_chance(trainer):  # the last ask before the deadline: a checkpoint, then wait for the loss
            self._save(trainer)
            self.saved = True
            self._wait()

    def _last_chance(self, trainer) -> bool:
        """Rank 0's answer, on every rank: whether the next ask (after `every` batches and up to `accumulate` more to
        the next optimizer step, and the epoch's validation and checkpoint when the epoch ends before it) and a
        checkpoint after it, the checkpoint counted twice, could come after the deadline."""
        ahead = self.every + trainer.accumulate
        gap = ahead * self.step_s + (self.epoch_end_s if len(trainer.train_loader) - self.batches <= ahead else 0.0)
        last = [time.time() + gap + 2 * self.save_s >= self.deadline]
        if self.world_size > 1:
            dist.broadcast_object_list(last, src=0)
        return bool(last[0])

    def _save(self, trainer) -> None:
        started, order = time.monotonic(), trainer.step_sampler.current
        self.report_step(trainer, None if order is None else {
            "step": self.batches, "order_epoch": order,
            "tloss": {k: float(v) for k, v in (trainer.tloss or {}).items()}})
        self.save_s = max(self.save_s, time.monotonic() - started)

    def _wait(self) -> None:
        """Until Ray Train ends this group (at the notice's deadline or the node's loss); a group still here a minute
        after the deadline goes on training (the notice was withdrawn and Ray kept the group)."""
        self.mark("preempted")
        while time.time() < self.deadline + AFTER_DEADLINE_S:
            time.sleep(1.0)
        self.mark("step")

    def on_train_epoch_end(self, trainer) -> None:
        """The step time for the next epoch's asks; the resumed epoch's training loss over all its batches (the part
        before the checkpoint and the rest)."""
        self.epoch_ended = time.monotonic()
        self.step_s = (self.epoch_ended - self.epoch_started) / max(self.trained, 1)
        if self.resume is None or trainer.epoch != int(self.resume["epoch"]) or not trainer.tloss or \
                trainer.step_sampler is None:  # no sampler: the epoch was trained again from its start
            return
        nb, done, before = len(trainer.train_loader), int(self.resume["step"]), self.resume["tloss"]
        trainer.tloss = {k: (before[k] * done + v * (nb - done)) / nb if k in before else v
                         for k, v in trainer.tloss.items()}
        self.resume = None
