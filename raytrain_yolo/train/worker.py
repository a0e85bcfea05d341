"""The per-worker training function and the callbacks it hangs on Ultralytics' loop.

Runs in every Ray Train worker process. Ultralytics is imported here, inside the function, after Ray has set
the distributed environment (see adapter.py).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import ray.util
import torch
import torch.distributed as dist

from raytrain_yolo.core.config import RunSpec
from raytrain_yolo.core.console import capture_process_output, publish_log
from raytrain_yolo.data.synthetic import ensure_synthetic

IPS_KEY = "throughput/images_per_second"
CHECKPOINT_FILES = ("last.pt", "best.pt")
CLONED_FROM_TAG = "raytrain_yolo.cloned_from"  # MLflow tag of a PBT trial: the runs it was cloned from, `run@epoch`
STATE_FILE = "raytrain_state.json"  # epochs done and the metrics history, for restarts
WARMUP_FRACTION = 0.2  # of each epoch's steps (or window), skipped before timing: loader start-up, cudnn tuning


@dataclass
class ThroughputMeter:
    """Steady-state global images/s from per-step timestamps.

    DDP keeps ranks in lockstep (every step all-reduces), so one rank's step times times the global batch is the
    global rate. In each epoch the first WARMUP_FRACTION of steps is not steady: that keeps dataloader start-up,
    caching and the previous epoch's validation and checkpointing out of every figure.
    """

    window_steps: int = 0  # >0: close a window of this many steady steps at a time (tune trials)
    global_batch_sizes: list[int] = field(default_factory=list)  # images per step this epoch, all ranks together
    last_stamp: float = 0.0
    step_in_epoch: int = 0
    skip: int = 1
    steps: int = 0  # steps seen in this run
    epoch_images: float = 0.0
    epoch_seconds: float = 0.0
    total_images: float = 0.0
    total_seconds: float = 0.0
    win_images: float = 0.0
    win_seconds: float = 0.0
    win_steps: int = 0
    windows: int = 0
    epoch_ips: float | None = None
    built_from: float = 0.0  # perf_counter() when the worker began building Ultralytics' trainer
    first_step_s: float | None = None  # from then to the end of the first step: Ultralytics' own set-up

    def startup(self) -> dict[str, float]:
        """Where a throughput trial's time went on this rank (seconds): `startup/trainer_s`, building Ultralytics'
        trainer (model, dataset, loader) and its first step; `startup/since_trainer_s`, from the start of that
        build to now. A trial's first report minus the latter is what came before Ultralytics: Tune, Ray Train,
        the worker processes (experiments/warm-trials.sh)."""
        return {"startup/trainer_s": self.first_step_s or 0.0,
                "startup/since_trainer_s": time.perf_counter() - self.built_from}

    def on_train_epoch_start(self, trainer) -> None:
        loader, world = trainer.train_loader, max(trainer.world_size, 1)
        per_rank = len(loader.sampler) if loader.sampler is not None else len(loader.dataset)
        bs, n = loader.batch_size, len(loader)
        sizes = [bs] * (n - 1) + [per_rank - bs * (n - 1)] if n else []
        self.global_batch_sizes = [s * world for s in sizes]
        self.skip = max(1, int(n * WARMUP_FRACTION))
        self.step_in_epoch, self.epoch_images, self.epoch_seconds = 0, 0.0, 0.0
        self.last_stamp = time.perf_counter()

    def on_train_batch_end(self, trainer) -> bool:
        """Record one step; True when it closed a window."""
        now = time.perf_counter()
        seconds, self.last_stamp = now - self.last_stamp, now
        if self.first_step_s is None:
            self.first_step_s = now - self.built_from
        i, self.step_in_epoch = self.step_in_epoch, self.step_in_epoch + 1
        self.steps += 1
        if i < self.skip or i >= len(self.global_batch_sizes):
            return False
        images = self.global_batch_sizes[i]
        self.epoch_images += images
        self.epoch_seconds += seconds
        self.total_images += images
        self.total_seconds += seconds
        if not self.window_steps:
            return False
        self.win_images += images
        self.win_seconds += seconds
        self.win_steps += 1
        return self.win_steps >= self.window_steps

    def take_window(self) -> float:
        ips = self.win_images / self.win_seconds
        self.win_images, self.win_seconds, self.win_steps = 0.0, 0.0, 0
        self.windows += 1
        return ips

    def close_epoch(self) -> float | None:
        self.epoch_ips = self.epoch_images / self.epoch_seconds if self.epoch_seconds > 0 else None
        return self.epoch_ips

    @property
    def images_per_second(self) -> float | None:
        return self.total_images / self.total_seconds if self.total_seconds > 0 else None


class RunAbandoned(Exception):
    """Raised on every rank at the same step when the run's reports have no one left to take them (a warm trial
    that Tune stopped mid-epoch: sweep/warm.TrialChannel.on_step); its group then takes the next job."""


class Reporter:
    """`ray.train.report` on every rank the same number of times (it is a barrier).

    Training runs report once per epoch; rank 0 attaches the metrics and a checkpoint. Throughput trials
    (`window_steps` > 0) report once per window of steady steps instead, so a Tune scheduler can stop a slow
    trial early, and stop after `max_windows`. `send` is `ray.train.report`, or on a warm group's ranks
    (sweep/warm.py) the trial's channel, which returns False on every rank once the trial is gone: training
    then stops at that report; between reports the channel's `on_step`, called on every rank after each step,
    raises RunAbandoned on all of them once the trial is gone.
    """

    def __init__(self, spec: RunSpec, meter: ThroughputMeter, scratch: Scratch, history: list | None = None,
                 plan: dict | None = None, epochs: int = 0, seeded_from: dict | None = None, send=None):
        self.spec, self.meter, self.scratch, self.rank = spec, meter, scratch, scratch.rank
        self.send = send or ray.train.report
        self.on_step = getattr(send, "on_step", None)  # a warm trial's channel: is the trial still there?
        self.seeded_from = seeded_from  # {"run", "epoch"}: the other run's checkpoint this run started from (PBT)
        self.plan = plan  # the run's plan record, kept in each checkpoint's state
        self.epochs = epochs  # as asked: Ultralytics' own count may change (time=)
        self.stopped_early: dict[str, Any] | None = None  # rank 0: the trainer ended the run before `epochs`
        self.on_metrics: list = []  # rank-0 consumers of each report's metrics (tracking)
        self.history: list[dict[str, Any]] = list(history or [])  # carried over restarts in the checkpoint
        self.samples: list[dict[str, Any]] = []
        self.trial = spec.window_steps > 0

    def on_train_batch_end(self, trainer) -> None:
        if self.on_step is not None:
            self.on_step()
        if self.meter.on_train_batch_end(trainer):
            metrics = {"window": self.meter.windows + 1, IPS_KEY: self.meter.take_window(), "step": self.meter.steps,
                       **self.meter.startup()}
            if self.rank == 0 and trainer.device.type == "cuda":
                metrics["system/gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 1e9
            if self._report(metrics, trainer, checkpoint=False) is False:
                trainer.stop = True  # the warm trial is gone (Tune stopped it): every rank got False here
            self.meter.last_stamp = time.perf_counter()  # the report's own time is not the next step's
        if self.spec.max_windows and self.meter.windows >= self.spec.max_windows:
            trainer.stop = True  # every rank closes the same window at the same step, so all stop together

    def on_train_epoch_end(self, trainer) -> None:
        self.meter.close_epoch()
        if trainer.traced_files is not None:  # the images this rank really trained on (--trace-samples)
            dataset = trainer.train_loader.dataset  # positions in the whole set (a device loader's shard has a `source`)
            index = {f: i for i, f in enumerate(getattr(dataset, "source", dataset).im_files)}
            self.samples.append({"epoch": trainer.epoch, "indices": [index[f] for f in trainer.traced_files]})
            trainer.traced_files.clear()

    def epoch_metrics(self, trainer) -> dict[str, Any]:
        m: dict[str, Any] = {"epoch": trainer.epoch + 1}
        if self.rank != 0:
            return m
        m.update(trainer.label_loss_items(trainer.tloss, prefix="train") if trainer.tloss else {})
        m.update({k: float(v) for k, v in (trainer.metrics or {}).items()})
        m.update({k: float(v) for k, v in getattr(trainer, "lr", {}).items()})
        if trainer.fitness is not None:
            m["fitness"] = float(trainer.fitness)
        if self.meter.epoch_ips is not None:
            m[IPS_KEY] = self.meter.epoch_ips
        if trainer.epoch_time is not None:
            m["throughput/epoch_seconds"] = float(trainer.epoch_time)
        # elastic runs: which epochs trained at which size (Ultralytics' own world_size is 0 for one CPU worker)
        m["system/world_size"] = ray.train.get_context().get_world_size()
        if trainer.device.type == "cuda":
            m["system/gpu_mem_gb"] = torch.cuda.max_memory_allocated(trainer.device) / 1e9
        return m

    def on_fit_epoch_end(self, trainer) -> None:
        if not self.trial and self._report(self.epoch_metrics(trainer), trainer, checkpoint=True) is False:
            trainer.stop = True

    def _report(self, metrics: dict[str, Any], trainer, checkpoint: bool) -> bool | None:
        if self.rank != 0:
            return self.send({k: v for k, v in metrics.items() if k in ("epoch", "window")})
        self.history.append(metrics)
        if not checkpoint:
            went = self.send(metrics)
        else:
            staged = self.scratch.fresh("checkpoint")
            last = bool(trainer.stop)  # the trainer's final epoch (all of them, patience=, time=): rank 0 knows now
            if last and metrics["epoch"] < self.epochs:
                self.stopped_early = stopped_early(trainer, metrics["epoch"], self.epochs)
                metrics["stopped_early"] = self.stopped_early["reason"]  # a sweep ranks the trial as finished
            try:
                for src in [trainer.wdir / name for name in CHECKPOINT_FILES] + [trainer.csv, trainer.save_dir / "args.yaml"]:
                    if src.is_file() and last and src.suffix == ".pt":
                        strip_final(src, staged / src.name)
                    elif src.is_file():
                        shutil.copy2(src, staged / src.name)
                (staged / STATE_FILE).write_text(json.dumps(self._state(metrics["epoch"]), default=float))
                went = self.send(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(staged)))
            finally:
                shutil.rmtree(staged, ignore_errors=True)
        # After the checkpoint is persisted: a crash in between loses a log line, never duplicates one. Not what
        # a warm trial that is gone never saw (went False): its MLflow run ends where Tune stopped it.
        for consumer in self.on_metrics if went is not False else ():
            consumer(metrics, trainer)
        return went

    def _state(self, epoch: int, step: dict[str, Any] | None = None) -> dict[str, Any]:
        """A checkpoint's state (STATE_FILE): epochs done, the history, ...; `step` in a step checkpoint."""
        return {"epoch": epoch, "history": self.history, "run": self.spec.name, "plan": self.plan,
                "stopped_early": self.stopped_early, "seeded_from": self.seeded_from, "step": step}

    def report_step(self, trainer, step: dict[str, Any] | None) -> None:
        """A checkpoint in the middle of epoch `trainer.epoch + 1` (train/preemption.py), on every rank (a collective):
        `last.pt` as it is now and `step` (batches of the epoch trained, their order, the running loss) in its state.
        Not an epoch: no history row, no console line, no MLflow epoch. Its fitness is -inf, so that Ray ranks it
        below every epoch's and drops it at the next. `step` None (rank 0 could not tell the epoch's order): a
        report without a checkpoint."""
        metrics = {"epoch": trainer.epoch, "step": step["step"] if step else 0}
        if self.rank != 0 or step is None:
            self.send(metrics)
            return
        staged = self.scratch.fresh("checkpoint")
        try:
            trainer.save_step_checkpoint(staged / "last.pt")
            for src in (trainer.wdir / "best.pt", trainer.csv, trainer.save_dir / "args.yaml"):
                if src.is_file():
                    shutil.copy2(src, staged / src.name)
            (staged / STATE_FILE).write_text(json.dumps(self._state(trainer.epoch, step), default=float))
            self.send({**metrics, "fitness": float("-inf")},
                             checkpoint=ray.train.Checkpoint.from_directory(str(staged)))
        finally:
            shutil.rmtree(staged, ignore_errors=True)
        print(f"preemption notice: checkpoint at step {step['step']} of epoch {trainer.epoch + 1}", flush=True,
              file=sys.__stdout__)  # once: Ray Train's print patch would write it twice to the log


def stopped_early(trainer, epoch: int, epochs: int) -> dict[str, Any]:
    """What ended the run at `epoch` of `epochs`: Ultralytics' early stopping (`patience=`) or its time limit."""
    stopper = trainer.stopper
    if stopper.patience and epoch - stopper.best_epoch >= stopper.patience:
        reason = f"patience={stopper.patience}: no better fitness since epoch {stopper.best_epoch}"
    elif trainer.args.time:
        reason = f"time={trainer.args.time} hours"
    else:
        reason = "the trainer stopped"
    return {"epoch": epoch, "epochs": epochs, "reason": reason}


def strip_final(src: Path, dest: Path) -> None:
    """The run's final weights as Ultralytics leaves them: `strip_optimizer` (no optimizer state, EMA as the model,
    half precision), written to `dest`. Nothing resumes from the final checkpoint: the run is finished."""
    from ultralytics.utils.torch_utils import strip_optimizer

    strip_optimizer(src, str(dest))


def params_digest(model: torch.nn.Module) -> str:
    """SHA-256 of every trainable parameter, in order: equal on all ranks iff DDP kept them in sync.

    Buffers (BatchNorm running stats) are left out: like Ultralytics, we do not sync them every forward.
    """
    h = hashlib.sha256()
    for _, p in model.named_parameters():
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class Scratch:
    """This node's temporary folder of one run, `<temp>/raytrain-yolo-<run key>` (the key: a digest of the run's
    storage path and name, the same for every attempt), with each rank's entries in it: `rank<r>-checkpoint` (the
    checkpoint being staged for upload), `rank<r>-restored` (a restart's unpacked checkpoint) and, with object
    storage, `rank<r>-ultralytics` (Ultralytics' own run folder). An entry is emptied when it is made (a killed
    attempt never removed its own), the rank's entries go when its attempt ends, and once every rank is past the
    run's last collective the whole folder goes, with whatever killed attempts of other ranks left on this node."""

    root: Path
    rank: int

    @classmethod
    def of(cls, spec: RunSpec, rank: int) -> Scratch:
        key = hashlib.sha256(spec.run_dir.encode()).hexdigest()[:12]
        return cls(Path(tempfile.gettempdir()) / f"raytrain-yolo-{key}", rank)

    def fresh(self, what: str) -> Path:
        """This rank's entry `what`, empty."""
        folder = self.root / f"rank{self.rank}-{what}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        return folder

    def drop_rank(self) -> None:
        try:
            folders = list(self.root.glob(f"rank{self.rank}-*"))
        except FileNotFoundError:  # another rank on this node ended first and removed the run's folder (drop_run)
            return
        for folder in folders:
            shutil.rmtree(folder, ignore_errors=True)

    def drop_run(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


def save_project(spec: RunSpec, scratch: Scratch) -> Path:
    """Where this rank keeps Ultralytics' own run folder (`train/`: weights, results.csv, args.yaml): the run's
    folder when the storage is a local path, else a scratch entry (everything of it that lasts is in the
    checkpoints)."""
    return Path(spec.run_dir) if "://" not in spec.storage_path else scratch.fresh("ultralytics")


def kept_save_dir(spec: RunSpec, save_dir: Path) -> str | None:
    """Ultralytics' folder as the summary names it (`ultralytics_dir`): None with object storage, where it was a
    temporary folder of a worker's node (its files are in each checkpoint)."""
    return None if "://" in spec.storage_path else str(save_dir)


def restore(spec: RunSpec, save_dir: Path, scratch: Scratch) -> dict[str, Any] | None:
    """After a restart (worker failure, or the same --name run again): the latest Ray checkpoint, unpacked.

    Returns its state (`epoch` = epochs done, `history`) with `last_pt` set to a local copy of Ultralytics'
    `last.pt`, which holds model, EMA, optimizer, scaler, epoch, best fitness and the early-stopping state, in
    the scratch entry `restored_dir`: `forget_restored(state)` removes it once Ultralytics has loaded it.
    Rank 0 also puts back what Ultralytics keeps beside its weights (see `unpack`).
    """
    ckpt = ray.train.get_checkpoint()
    if ckpt is None and spec.resume_from:  # a new run seeded from another run's checkpoint (PBT exploit)
        ckpt = ray.train.Checkpoint(spec.resume_from)
    if ckpt is None:
        return None
    return unpack(ckpt, save_dir, scratch.rank, scratch.fresh("restored"))


def unpack(ckpt: "ray.train.Checkpoint", save_dir: Path, rank: int, local: Path) -> dict[str, Any]:
    """The checkpoint's state, its files in the empty folder `local` (`restored_dir`, `last_pt` in it). Rank 0 puts
    back into `save_dir` what Ultralytics only rewrites when it changes: `results.csv` (one row per epoch) and
    `weights/best.pt` (rewritten only when fitness improves). With --storage-path on object storage `save_dir` is
    emptied on every attempt: without this a restarted run had no best.pt until it improved again."""
    try:
        ckpt.to_directory(str(local))
        state = json.loads((local / STATE_FILE).read_text())
        if rank == 0:
            for src, dest in ((local / "results.csv", save_dir / "results.csv"),
                              (local / "best.pt", save_dir / "weights" / "best.pt")):
                if src.is_file():
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(src, dest)
    except BaseException:
        shutil.rmtree(local, ignore_errors=True)
        raise
    state.update(last_pt=str(local / "last.pt"), restored_dir=str(local))
    return state


def forget_restored(state: dict[str, Any] | None) -> None:
    """Remove the local copy of the restored checkpoint (a no-op without one, or when it is already gone)."""
    if state and state.get("restored_dir"):
        shutil.rmtree(state["restored_dir"], ignore_errors=True)


def _to_console(queue):
    """Rank 0's epoch metrics to the driver's console line; a lost line never stops training."""

    def put(metrics: dict[str, Any], trainer) -> None:
        try:
            queue.put_nowait({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        except Exception:  # noqa: BLE001
            pass

    return put


def _note_to_console(queue):
    """A line of rank 0's for the driver's console (console.EpochPrinter prints a `note` as it is); None without a
    console queue."""
    if queue is None:
        return None

    def put(line: str) -> None:
        queue.put_nowait({"note": line})

    return put


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any] | None:
    """Train on this worker; rank 0 returns every rank's facts (device, host, parameter digest) to the driver."""
    return run_worker(config, ray.train.report)


def run_worker(config: dict[str, Any], send) -> dict[str, Any] | None:
    """One run's training on this worker of a Ray Train group, its reports through `send` (`ray.train.report`, or
    a warm trial's channel: sweep/warm.py). Rank 0 returns the run's outcome (`_train`), the others None."""
    spec = RunSpec.from_dict(config["spec"])
    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    if config.get("log_file"):  # everything this worker prints, Ultralytics and Ray alike
        capture_process_output(config["log_file"], spec.verbose,
                               f"rank {rank} of {world_size}, {socket.gethostname()} pid {os.getpid()}")
    device = ray.train.torch.get_device()
    args = dict(config["train_args"])
    data_yaml, args["data"] = _local_data(spec, args.get("data"), config["task"])
    scratch = Scratch.of(spec, rank)
    save_dir = save_project(spec, scratch) / "train"
    state = restore(spec, save_dir, scratch)
    try:
        result = _train(config, spec, args, data_yaml, save_dir, state, rank, world_size, device, scratch, send)
    except RunAbandoned:
        scratch.drop_run()  # every rank left at the same step: no rank of the run uses this node's folder
        raise
    finally:
        scratch.drop_rank()  # with the restored checkpoint's copy, when Ultralytics never got to load it
    scratch.drop_run()  # every rank is past _train's last collective: no rank of the run uses this node's folder
    if "://" in spec.storage_path and config.get("log_file") and ctx.get_local_rank() == 0 \
            and ray.get_runtime_context().get_node_id() != config.get("driver_node"):
        # this node's share of the run's log, beside the run (the driver's node's is the driver's to copy)
        publish_log(config["log_file"], f"{spec.run_dir}/logs/{ray.util.get_node_ip_address()}.log")
    return result


def _local_data(spec: RunSpec, data: str | None, task: str) -> tuple[str, str]:
    """(the data.yaml the summary names, the one this worker's Ultralytics reads): the embedded set generated here,
    an object-storage set copied to this node once, or the driver's path, with the root the driver resolved pinned
    into a local copy when the data.yaml's `path:` was relative."""
    if spec.is_synthetic:
        data = str(ensure_synthetic(spec.synthetic, task))
    elif "://" in data:  # object storage: this node's local copy, made once per node
        from raytrain_yolo.data.sync import localize

        data = localize(data)
    elif not Path(data).is_file():
        raise FileNotFoundError(
            f"data={data} exists on the driver but not on node {socket.gethostname()}: put the dataset "
            "on storage every node mounts at the same path"
        )
    if spec.data_root:
        from raytrain_yolo.data.sync import pin_root

        return data, pin_root(data, spec.data_root)
    return data, data


def _train(config: dict[str, Any], spec: RunSpec, args: dict[str, Any], data_yaml: str, save_dir: Path,
           state: dict[str, Any] | None, rank: int, world_size: int, device: torch.device,
           scratch: Scratch, send=None) -> dict[str, Any] | None:
    """Ultralytics' training on this worker, from the restored `state` when there is one. Ends with a collective
    of every rank (the caller then removes the run's scratch folder). Rank 0 returns the run's outcome."""
    if state and (state["epoch"] >= args["epochs"] or state.get("stopped_early")):  # finished, no summary yet
        if rank == 0 and config.get("tracking"):
            _log_missed_epochs(config, state, seeded_from(spec, state))
        return _finished_already(spec, state, save_dir, data_yaml, rank, world_size)
    built_from = time.perf_counter()
    trainer = _ultralytics_trainer(config, spec, args, save_dir, state, world_size, device)
    meter = ThroughputMeter(window_steps=spec.window_steps, built_from=built_from)
    reporter = Reporter(spec, meter, scratch, history=state["history"] if state else None, plan=config.get("plan"),
                        epochs=int(args["epochs"]), seeded_from=seeded_from(spec, state), send=send)
    logger, to_mlflow = _epoch_logger(config, state, trainer, reporter, reporter.seeded_from) \
        if rank == 0 and config.get("tracking") else (None, None)
    if rank == 0 and config.get("progress") is not None:
        reporter.on_metrics.append(_to_console(config["progress"]))
    progress = _hook(trainer, config.get("progress_board"), rank, scratch, meter, reporter)
    if trainer.step_checkpoints or trainer.step_resume:
        from raytrain_yolo.train.preemption import PreemptionSaver

        PreemptionSaver(trainer, world_size, reporter.report_step, progress.mark if progress else lambda _: None,
                        trainer.step_resume)
    try:
        trainer.train()
    finally:
        if progress:
            progress.close()
    if logger:
        to_mlflow.flush()
        logger.log_outputs(trainer)
        if logger.unsent():
            print(f"mlflow: never reached the tracking server: {', '.join(logger.unsent())}", flush=True)
    gathered = _gather_facts(trainer, reporter, rank, world_size, progress.figures() if progress else {})
    if rank != 0:
        return None
    return {
        "workers": gathered,
        "history": reporter.history,
        "images_per_second": meter.images_per_second,
        "resumed_from": state["epoch"] if state else None,
        "resumed_from_step": (state.get("step") or {}).get("step") if state else None,
        "tracking_unsent": logger.unsent() if logger else [],
        "stopped_early": reporter.stopped_early,
        "save_dir": kept_save_dir(spec, trainer.save_dir),
        "data": data_yaml,
        "device_name": torch.cuda.get_device_name(trainer.device) if trainer.device.type == "cuda" else "cpu",
    }


def _hook(trainer, board, rank: int, scratch: Scratch, meter: ThroughputMeter, reporter: Reporter):
    """Hang the run's callbacks on the trainer: this rank's progress marks first (watchdog: its `on_fit_epoch_end`
    mark comes before the checkpoint's upload), then the throughput meter and the reporter. Returns the progress
    (None without a board: --hang-timeout 0)."""
    from raytrain_yolo.train.watchdog import RankProgress

    progress = RankProgress(board, rank, scratch.fresh("progress") / "stacks.txt") if board is not None else None
    for event, fn in (progress.callbacks().items() if progress else ()):
        trainer.add_callback(event, fn)
    trainer.add_callback("on_train_epoch_start", meter.on_train_epoch_start)
    trainer.add_callback("on_train_batch_end", reporter.on_train_batch_end)
    trainer.add_callback("on_train_epoch_end", reporter.on_train_epoch_end)
    trainer.add_callback("on_fit_epoch_end", reporter.on_fit_epoch_end)
    return progress


def _finished_already(spec: RunSpec, state: dict[str, Any], save_dir: Path, data_yaml: str, rank: int,
                      world_size: int) -> dict[str, Any] | None:
    """The restored checkpoint is the run's last (the driver was lost before it wrote the summary): nothing to
    train. No worker of this group trained, so no worker facts: the summary's world size is the last epoch's."""
    if world_size > 1:
        dist.barrier()  # every rank has unpacked its checkpoint
    if rank != 0:
        return None
    return {"workers": [], "history": state["history"], "images_per_second": None, "resumed_from": state["epoch"],
            "save_dir": kept_save_dir(spec, save_dir), "device_name": None, "data": data_yaml,
            "stopped_early": state.get("stopped_early")}


def _ultralytics_trainer(config: dict[str, Any], spec: RunSpec, args: dict[str, Any], save_dir: Path,
                         state: dict[str, Any] | None, world_size: int, device: torch.device):
    """The task's Ray-aware Ultralytics trainer (adapter.trainer_class), resuming `state`'s last.pt with
    Ultralytics' own resume when there is one (it restores everything in it and starts at the next epoch)."""
    from raytrain_yolo.train.adapter import keep_offline, trainer_class  # first Ultralytics import here

    keep_offline()
    Trainer = trainer_class(config["task"], spec.loader, spec.prefetch)
    overrides = {**args, "project": str(save_dir.parent), "name": save_dir.name, "exist_ok": True}
    if state:
        overrides.update(resume=state["last_pt"], save_dir=str(save_dir))
    trainer = Trainer(overrides=overrides, device=device, world_size=world_size)
    # A checkpoint at the step on a preemption notice (train/preemption.py; launch.step_checkpoints says where);
    # `step_resume`, the step checkpoint this run resumes.
    trainer.step_checkpoints = bool(config.get("step_checkpoints"))
    trainer.step_resume = {"epoch": state["epoch"], **state["step"]} if state and state.get("step") else None
    # The pre-train routine has read last.pt (model, optimizer, EMA, ...): its local copy is no longer needed.
    trainer.add_callback("on_pretrain_routine_end", lambda _: forget_restored(state))
    if spec.trace_samples:
        trainer.traced_files = []
    return trainer


def seeded_from(spec: RunSpec, state: dict[str, Any] | None) -> dict[str, Any] | None:
    """The other run whose checkpoint this run started from, and its epoch (a PBT exploit: `spec.resume_from`), kept
    in every checkpoint of this run; None for a run that started from nothing or resumes its own checkpoint."""
    if not state:
        return None
    if state.get("run", spec.name) == spec.name:
        return state.get("seeded_from")
    return {"run": state["run"], "epoch": int(state["epoch"])}


def _log_missed_epochs(config: dict[str, Any], state: dict[str, Any], seed: dict[str, Any] | None) -> None:
    """A run whose last checkpoint was registered before its summary (the driver or the sweep was stopped after
    it): MLflow gets the epochs it lacks from that checkpoint's history. The attempt that trained the last epoch
    holds its metrics until the end of the run (AfterRegistration), so it may never have logged them."""
    _rank0_logger(config).sync_history(_own_epochs(state["history"], seed))


def _rank0_logger(config: dict[str, Any]):
    """Rank 0's MLflow EpochLogger for the run `config["tracking"]` names (launch._by_reference: a reference, so
    that the values stay out of Ray Train's exported config)."""
    from raytrain_yolo.core.tracking import EpochLogger, use_client_settings

    t = config["tracking"]
    if isinstance(t, ray.ObjectRef):
        t = ray.get(t)
    use_client_settings(t.get("client_settings"))
    return EpochLogger(t["uri"], t["run_id"], notify=_note_to_console(config.get("progress")))


def _own_epochs(history: list[dict[str, Any]], seed: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The run's own epochs in a checkpoint's history: not those up to the PBT donor's `seed`."""
    return [h for h in history if not seed or h["epoch"] > seed["epoch"]]


def _epoch_logger(config: dict[str, Any], state: dict[str, Any] | None, trainer, reporter: Reporter,
                  seed: dict[str, Any] | None = None):
    """Rank 0's MLflow logger, hung on the trainer and the reporter (each epoch handed over once Ray registered its
    checkpoint: AfterRegistration); returns both. Every attempt logs the arguments (MLflow keeps the first value
    of each): a run resumed after its driver was lost before rank 0 logged them has them. A run `seed`ed from
    another run's checkpoint (a PBT exploit) says so on its MLflow run (`raytrain_yolo.cloned_from`: `run@epoch`,
    one per exploit) and logs only the epochs it trained: the epochs up to the seed are the donor's, not its own."""
    from raytrain_yolo.core.tracking import AfterRegistration

    logger = _rank0_logger(config)
    if seed:
        logger.add_to_tag(CLONED_FROM_TAG, f"{seed['run']}@{seed['epoch']}")
    if state:
        logger.sync_history(_own_epochs(state["history"], seed))
    trainer.add_callback("on_pretrain_routine_end", logger.on_pretrain_routine_end)
    to_mlflow = AfterRegistration(logger.log_epoch)
    reporter.on_metrics.append(to_mlflow)
    return logger, to_mlflow


def _gather_facts(trainer, reporter: Reporter, rank: int, world_size: int,
                  figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's device, host, parameter digest and step/data-wait `figures` (watchdog.RankProgress), gathered
    on every rank (a collective of all)."""
    from raytrain_yolo.train.adapter import unwrap

    facts = {
        "rank": rank,
        "host": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
        "device": str(trainer.device),
        "loss_scale": trainer.world_size,
        "params_sha256": params_digest(unwrap(trainer.model)),
        "samples": reporter.samples,
        **figures,
    }
    gathered = [facts]
    if world_size > 1:
        gathered = [None] * world_size
        dist.all_gather_object(gathered, facts)
    return gathered
