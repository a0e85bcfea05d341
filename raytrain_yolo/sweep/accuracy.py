"""Accuracy tuning (`python -m raytrain_yolo.tune --objective map`): Ray Tune searches Ultralytics
hyperparameters for the best validation metric; every trial is a real DDP training run through `launch()`.

- Search: Optuna's TPE (`OptunaSearch`) over the space, `--trials` trials; PBT samples at random and then
  exploits and explores on its own.
- Scheduling: ASHA stops trials whose per-epoch metric lags at its rungs; PBT restarts a lagging trial from a
  better trial's checkpoint with mutated hyperparameters (a new Ray Train run seeded from that checkpoint);
  `none` runs every trial to the end.
- Trials run warm (sweep/warm.py): trials take turns on DDP worker groups kept up for the sweep, and each
  epoch's checkpoint is the Tune trial's own (`tune.report(checkpoint=)`), so Tune keeps them, restarts a failed
  trial from its last one (--max-failures) and PBT clones them. With --fresh-trials each trial is a Ray Train run
  of its own: a Ray Train callback hands each epoch's metrics and checkpoint path from the Train controller to the
  trial function, which reports them to Tune (with the checkpoint under PBT, which needs one to clone).
- Resuming: the Tune experiment lives in `<storage>/<name>/`; the same command restores it with
  `Tuner.restore`. Finished trials are kept; an unfinished one restarts its function, which resumes from the
  trial's last Tune checkpoint (warm) or whose Ray Train run of the same name resumes from its own (fresh).
- Outputs: results.parquet (one row per trial), best.yaml (a `fit --config` file), best.pt, map.png, and one
  MLflow parent run with a nested run per trial.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.train.v2.api.callback import UserCallback

from raytrain_yolo.core import storage
from raytrain_yolo.core.cluster import on_this_node
from raytrain_yolo.core.config import RunSpec, SearchDim, default_name
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.tracking import client_settings, use_client_settings
from raytrain_yolo.sweep.trials import close_trial_runs, fit_tuner, trial_name
from raytrain_yolo.sweep.warm import warm_pool

# Ultralytics 8.4.190's own search space (ultralytics/engine/tuner.py, Tuner.__init__; the same ranges as
# run_ray_tune's default_space), without its mutation gains. tests/test_hpo.py checks it against the source.
ULTRALYTICS_SPACE: dict[str, list[float]] = {
    "lr0": [1e-5, 1e-2],
    "lrf": [0.01, 1.0],
    "momentum": [0.7, 0.98],
    "weight_decay": [0.0, 0.001],
    "warmup_epochs": [0.0, 5.0],
    "warmup_momentum": [0.0, 0.95],
    "box": [1.0, 20.0],
    "cls": [0.1, 4.0],
    "cls_pw": [0.0, 1.0],
    "dfl": [0.4, 12.0],
    "hsv_h": [0.0, 0.1],
    "hsv_s": [0.0, 0.9],
    "hsv_v": [0.0, 0.9],
    "degrees": [0.0, 45.0],
    "translate": [0.0, 0.9],
    "scale": [0.0, 0.95],
    "shear": [0.0, 10.0],
    "perspective": [0.0, 0.001],
    "flipud": [0.0, 1.0],
    "fliplr": [0.0, 1.0],
    "bgr": [0.0, 1.0],
    "mosaic": [0.0, 1.0],
    "mixup": [0.0, 1.0],
    "cutmix": [0.0, 1.0],
    "copy_paste": [0.0, 1.0],
    "close_mosaic": [0, 10],
}
SCHEDULERS = ("asha", "pbt", "none")
ASHA_REDUCTION = 3  # as Ultralytics' run_ray_tune
MAP_KEY = "metrics/mAP50-95(B)"
THROUGHPUT_ONLY = ("batch", "workers", "amp", "cache", "compile", "channels_last", "deterministic",
                   "window_steps", "windows", "grace_windows")


@dataclass
class HpoPlan:
    """A validated accuracy sweep: what to search, how long, and how to schedule it."""

    space: dict[str, SearchDim]
    epochs: int
    trials: int = 10
    scheduler: str = "asha"
    metric: str = "fitness"
    grace_epochs: int = 1
    perturbation_epochs: int = 1
    max_concurrent: int | None = None
    seed: int = 0
    space_source: str = "Ultralytics' default space"
    fixed: dict[str, Any] = field(default_factory=dict)
    definition: dict[str, Any] = field(default_factory=dict)  # what a rerun with the same --name must repeat
    warm: bool = True  # trials on worker groups kept for the sweep (sweep/warm.py); False: a Ray Train run each
    data: str | None = None  # the data.yaml every trial reads, as checked (None: the embedded set)

    @property
    def searched(self) -> list[str]:
        return [k for k, d in self.space.items() if d.kind != "fixed"]


# ---------------------------------------------------------------------------------------------------------
# Preflight: the one pass before Ray starts


def plan_from_args(ns) -> tuple[RunSpec, HpoPlan]:
    """Build and check the whole sweep from the command line; every problem is one line naming the fix."""
    from raytrain_yolo.plan.request import check_run
    from raytrain_yolo.plan.space import check_metric, check_space

    _refuse_throughput_knobs(ns)
    spec = _base_spec(ns)
    if ns.space:
        raw, source = _read_space(ns.space), ns.space
    else:
        raw, source = dict(ULTRALYTICS_SPACE), "Ultralytics' default space"
    space = check_space(raw, source, spec.scaling.num_workers)
    fixed = {k: d.values[0] for k, d in space.items() if d.kind == "fixed"}
    spec.train.update(fixed)
    if str(spec.train.get("optimizer", "auto")).lower() == "auto" and "optimizer" not in space:
        spec.train["optimizer"] = "SGD"  # `auto` ignores lr0 and momentum, and picks by run length
    # arguments, model, data (the label scan, once for the whole sweep: trials skip it), storage, tracking
    spec, train_args, task = check_run(spec)
    epochs = int(train_args["epochs"])
    plan = HpoPlan(space=space, epochs=epochs, space_source=source, fixed=fixed,
                   metric=check_metric(ns.metric or "fitness", task), seed=int(train_args.get("seed", 0) or 0),
                   warm=not getattr(ns, "fresh_trials", False),
                   data=None if spec.is_synthetic else str(train_args["data"]))
    _schedule(plan, ns, source)
    plan.definition = sweep_definition(spec, plan)
    check_same_sweep(spec, plan)
    return spec, plan


def _refuse_throughput_knobs(ns) -> None:
    """The throughput sweep's flags, and lists where the accuracy sweep takes one value."""
    for flag in THROUGHPUT_ONLY:
        if getattr(ns, flag, None) not in (None, False):
            opt = "--" + flag.replace("_", "-")
            raise UserError(f"{opt} is a throughput-sweep knob: with --objective map put {flag} in --space "
                            f"({flag}: {{choices: [...]}}) or pass {flag}=VALUE")
    if ns.no_early_stop:
        raise UserError("--no-early-stop is for the throughput sweep: with --objective map use --scheduler none")
    if ns.num_workers and len(ns.num_workers) != 1:
        raise UserError(f"--num-workers {','.join(map(str, ns.num_workers))}: with --objective map give one count "
                        "(workers per trial), e.g. --num-workers 2")
    if ns.loader and len(ns.loader) != 1:
        raise UserError("--loader takes one value with --objective map: ultralytics or device")
    if ns.prefetch and len(ns.prefetch) != 1:
        raise UserError("--prefetch takes one value with --objective map: true or false")


def _base_spec(ns) -> RunSpec:
    """The RunSpec every trial starts from: the flags and key=value arguments, one worker count and loader."""
    from raytrain_yolo.core.cli import bool_list, spec_from_args

    spec = spec_from_args(ns, ns.overrides)
    if ns.num_workers:
        spec.scaling.num_workers = ns.num_workers[0]
    if ns.loader:
        spec.loader = ns.loader[0]
    if ns.prefetch:
        spec.prefetch = bool_list(ns.prefetch)[0]
    spec.name = spec.name or default_name("hpo")
    return spec


def _schedule(plan: HpoPlan, ns, source: str) -> None:
    """Trials, scheduler and its epochs, concurrency; the impossible combinations refused with a fix that applies."""
    epochs = plan.epochs
    if ns.trials is not None:
        plan.trials = ns.trials
    if plan.trials < 1:
        raise UserError(f"--trials {plan.trials} must be at least 1")
    plan.scheduler = ns.scheduler or "asha"
    if plan.scheduler == "pbt" and plan.trials < 2:
        raise UserError("--scheduler pbt needs a population: use --trials 2 or more")
    if not plan.searched:
        raise UserError(f"{source} fixes every value: give at least one range or list of choices to search")
    plan.grace_epochs = ns.grace_epochs if ns.grace_epochs is not None else max(1, min(10, epochs // 3))
    plan.perturbation_epochs = ns.perturbation_epochs if ns.perturbation_epochs is not None else max(1, epochs // 4)
    checks = {"asha": ("--grace-epochs", plan.grace_epochs), "pbt": ("--perturbation-epochs", plan.perturbation_epochs)}
    for scheduler, (opt, v) in checks.items():
        if plan.scheduler != scheduler or 1 <= v < epochs:
            continue
        if epochs == 1:  # no epoch boundary inside a trial: nothing to stop at or perturb
            raise UserError(f"--scheduler {scheduler} acts between a trial's epochs and epochs=1 has none: use "
                            "--scheduler none (every trial runs its epoch), or raise epochs=")
        raise UserError(f"{opt} {v} must be at least 1 and below epochs={epochs}: use {opt} {min(max(v, 1), epochs - 1)}, "
                        "or raise epochs=")
    plan.max_concurrent = ns.max_concurrent
    if plan.max_concurrent is not None and plan.max_concurrent < 1:
        raise UserError(f"--max-concurrent {plan.max_concurrent} must be at least 1")


DEFINITION_FILE = "sweep_definition.json"


def sweep_definition(spec: RunSpec, plan: HpoPlan) -> dict[str, Any]:
    """What makes a sweep this sweep: Tune restores its experiment as it was started, so a rerun with the same
    --name must ask for the same."""
    space = {k: {"kind": d.kind, "values": list(d.values), "log": d.log} for k, d in plan.space.items()}
    out = {"space": space, "train": spec.train, "synthetic": dataclasses.asdict(spec.synthetic) if spec.is_synthetic else None,
           "num_workers": spec.scaling.num_workers, "loader": spec.loader, "trials": plan.trials,
           "scheduler": plan.scheduler, "metric": plan.metric, "warm": plan.warm}
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def check_same_sweep(spec: RunSpec, plan: HpoPlan) -> None:
    """Refuse to continue a sweep of the same --name that was started with another space or other arguments
    (Tune would silently run the old one)."""
    text = storage.read_text(f"{spec.run_dir}/{DEFINITION_FILE}")
    if not text:
        return
    old = {"warm": False, **json.loads(text)}  # recorded before warm trials: every trial ran a Ray Train run
    changed = [k for k in sorted(set(old) | set(plan.definition)) if old.get(k) != plan.definition.get(k)]
    if changed:
        names = {"space": "--space", "train": "key=value arguments", "warm": "trials (warm, or --fresh-trials)"}
        what = ", ".join(names.get(k, k) for k in changed)
        raise UserError(f"sweep '{spec.name}' in {spec.run_dir} was started with other {what}: pass the same ones "
                        f"to continue it, or use a new --name for a new sweep")


def _read_space(path: str) -> Any:
    try:
        with open(path) as f:
            return yaml.safe_load(f)
    except OSError:
        raise UserError(f"--space file '{path}' not found: pass an existing YAML file") from None
    except yaml.YAMLError:
        raise UserError(f"--space file '{path}' is not valid YAML: fix its syntax") from None


# ---------------------------------------------------------------------------------------------------------
# One trial


def trial_config(base: RunSpec, hyp: dict[str, Any]) -> dict[str, Any]:
    """What best.yaml holds for a trial: the base configuration with the trial's hyperparameters."""
    out = {"train": {**base.train, **hyp}, "scaling": dataclasses.asdict(base.scaling), "loader": base.loader}
    if base.is_synthetic:
        out["synthetic"] = dataclasses.asdict(base.synthetic)
    return out


def _plain(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v


class TrialRelay(UserCallback):
    """Ray Train callback (runs in the Train controller): hand rank 0's metrics and the checkpoint's path to
    the trial function through a queue. Like Tune's own TuneReportCallback, which cannot carry a checkpoint."""

    def __init__(self, queue, storage_path: str):
        self.queue = queue
        self.storage_path = storage_path  # Ray's checkpoint path has no scheme on object storage: put it back

    def after_report(self, run_context, metrics, checkpoint):
        path = storage.as_uri(checkpoint.path, self.storage_path) if checkpoint else None
        self.queue.put((dict(metrics[0]), path))


def late_epochs(summary: dict, reported: int) -> list[tuple[dict, str | None]]:
    """The epochs of a trial's finished run after epoch `reported` (Tune never saw them), each with the checkpoint
    folder to report beside it: the run's last checkpoint beside its last epoch, None beside the others. The folder
    keeps an `s3://` scheme (a `Path` folds `s3://b` into `s3:/b`, which Tune's Checkpoint refused: "Missing bucket
    name in S3 URI", the trial failed)."""
    last = summary.get("last_checkpoint")
    folder = last.rsplit("/", 1)[0] if last else None
    late = [h for h in summary.get("history", []) if h["epoch"] > reported]
    return [(h, folder if i == len(late) - 1 else None) for i, h in enumerate(late)]


def run_trial(config: dict[str, Any], base: dict | None = None, sweep: dict | None = None, pool=None) -> None:
    """Tune's function trainable: one DDP training run with this trial's hyperparameters, on a warm group of the
    sweep (`pool`: sweep/warm.py) or, without one (--fresh-trials), on a Ray Train run of its own."""
    from ray import tune

    use_client_settings((sweep or {}).get("client_settings"))
    hyp = {k: _plain(v) for k, v in config.items()}
    name = tune.get_context().get_trial_name()
    spec, exploited, reported = _trial_spec(RunSpec.from_dict(base), hyp, name, sweep, warm=pool is not None)

    def report(metrics: dict, path: str | None, checkpoint: str | None) -> None:
        """To Tune: the epoch's metrics, `path` the Train run's checkpoint they name, `checkpoint` one to persist."""
        out = {k: _plain(v) for k, v in metrics.items() if isinstance(_plain(v), (int, float, str))}
        out.update(checkpoint_path=path or "", train_run=spec.name, exploited=exploited)
        tune.report(out, checkpoint=tune.Checkpoint(checkpoint) if checkpoint else None)

    if pool is None:
        _fresh_trial(spec, sweep, reported, report)
    else:
        _warm_trial(spec, pool, report)


def _warm_trial(spec: RunSpec, pool, report) -> None:
    """The trial on a warm group: each epoch's checkpoint, staged by rank 0, persisted by Tune as the trial's own
    (sweep/warm.py). A job with nothing left to train (its checkpoint was its last epoch: a PBT donor's, or the trial
    had finished when the driver was lost) reports its last epoch, so that Tune sees the trial reach its end."""
    from ray import tune

    from raytrain_yolo.plan import prepare
    from raytrain_yolo.sweep.warm import WarmTrial
    from raytrain_yolo.train.launch import launch

    reported = []

    def persist(metrics: dict, staged: str | None) -> str | None:
        reported.append(metrics["epoch"])
        try:
            report(metrics, None, staged)
        finally:
            if staged:
                storage.delete_dir(staged)
        return storage.as_uri(tune.get_checkpoint().path, spec.storage_path) if staged else None

    staging = f"{spec.run_dir}/staged"
    try:
        summary = launch(prepare(spec, inputs_checked=True, placed=True),
                         group=WarmTrial(pool, persist, staging)).summary
    finally:
        with contextlib.suppress(OSError):
            storage.delete_dir(staging)  # what a job cut short left there
    if not reported and summary.get("history"):
        report(summary["history"][-1], None, None)
    if summary.get("error"):
        raise RuntimeError(summary["error"])


def _fresh_trial(spec: RunSpec, sweep: dict, reported: int | None, report) -> None:
    """The trial on a Ray Train run of its own (--fresh-trials): its checkpoints are the run's; Tune gets one only
    under PBT, which clones it. `reported`: when the trial resumes its own run, the last epoch Tune has seen."""
    from ray.util.queue import Empty, Queue

    from raytrain_yolo.plan import prepare
    from raytrain_yolo.train.launch import launch

    queue = Queue(maxsize=1, actor_options=on_this_node())  # beside this trial: lost only with it
    outcome: dict[str, Any] = {}
    pbt = sweep["scheduler"] == "pbt"

    def train():
        try:
            # the sweep's driver checked the dataset, storage and tracking server once (check_run): not again per trial
            plan = prepare(spec, inputs_checked=True)
            outcome["summary"] = launch(plan, callbacks=[TrialRelay(queue, spec.storage_path)]).summary
        except BaseException as e:  # noqa: BLE001 - handed to the trial's thread below
            outcome["error"] = e

    thread = threading.Thread(target=train, name="hpo-trial-train", daemon=True)
    thread.start()
    trained = False
    while thread.is_alive() or not queue.empty():
        try:
            metrics, path = queue.get(timeout=1.0)
        except Empty:
            continue
        if reported is not None and path:  # epochs trained after Tune paused the trial: Tune never saw them
            state = json.loads(storage.read_text(f"{path}/raytrain_state.json") or "{}")
            for h in state.get("history", []):
                if reported < h["epoch"] < metrics["epoch"]:
                    report(h, None, None)
        reported, trained = None, True
        report(metrics, path, path if path and pbt else None)
    summary = outcome.get("summary") or {}
    if not trained and summary.get("history"):
        # Nothing was left to train: the donor's checkpoint was its last epoch (after a PBT exploit), or the trial's
        # own run had finished when the sweep's driver was lost, before Tune recorded the trial as ended (a restore
        # without a Tune checkpoint does not say which epochs Tune saw). Report at least the last epoch, so that
        # Tune (which refuses a trial's final result without its metric) and results.parquet see the trial reach
        # its end; results count an epoch of one Train run once (summarize_trial).
        last = summary["history"][-1]["epoch"]
        reported = last - 1 if reported is None else min(reported, last - 1)
    if reported is not None:  # the run had finished before Tune paused the trial: report what Tune missed
        for h, path in late_epochs(summary, reported):
            report(h, path, path if path and pbt else None)
    if "error" in outcome:
        raise outcome["error"]
    if summary.get("error"):
        raise RuntimeError(summary["error"])


def _trial_spec(base: RunSpec, hyp: dict[str, Any], name: str, sweep: dict,
                warm: bool = False) -> tuple[RunSpec, str, int | None]:
    """The trial's RunSpec (exactly what best.yaml would run); after a PBT exploit, `donor@epoch`; when it
    resumes its own run from a Tune checkpoint, the last epoch Tune has seen.

    A trial's training runs are `<trial>` and, after each exploit, `<trial>-e<epoch>-from-<donor>`, seeded
    from the donor's checkpoint. A Tune checkpoint of the trial's own run means: resume that run (a fresh trial's
    Ray Train run resumes from its own last checkpoint; a warm trial's job, `warm`, from this one: its checkpoints
    are Tune's).
    """
    from ray import tune

    from raytrain_yolo.sweep.throughput import as_trial
    from raytrain_yolo.train.worker import STATE_FILE

    spec = as_trial(RunSpec.from_dict({**base.to_dict(), **trial_config(base, hyp)}), base, name)
    trials_dir = spec.storage_path
    spec.tracking.run_key = f"{trials_dir}/{name}"  # one MLflow run per trial, across its Train runs
    ckpt = tune.get_checkpoint()
    if warm:
        ckpt = newest_own_checkpoint(ckpt, f"{base.run_dir}/{name}")
    if ckpt is None:
        return spec, "", None
    # Its state is read where it is: resuming its own run, the worker downloads the checkpoint itself (warm), or the
    # trial's Ray Train run resumes from its own (fresh); only a donor's is copied here, to be reseeded.
    where = storage.as_uri(ckpt.path, spec.storage_path)
    text = storage.read_text(f"{where}/{STATE_FILE}")
    if text is None:
        raise FileNotFoundError(f"Tune's checkpoint {storage.redact(where)} has no {STATE_FILE}")
    state = json.loads(text)
    run = state.get("run", name)
    if run == name or run.startswith(name + "-"):
        spec.name = run
        if warm:
            spec.resume_from = where
        return spec, "", int(state["epoch"])
    donor, epoch = run.split("-", 1)[0], int(state["epoch"])
    spec.name = f"{name}-e{epoch}-from-{donor}"
    spec.resume_from = f"{trials_dir}/{spec.name}-seed"
    # A copy of our own, removed here: Checkpoint.to_directory() without a path leaves /tmp/checkpoint_tmp_* behind.
    with tempfile.TemporaryDirectory(prefix="raytrain-yolo-tune-checkpoint-") as tmp:
        reseed_checkpoint(Path(ckpt.to_directory(tmp)), dict(hyp), spec.resume_from)
    return spec, f"{donor}@{epoch}", None


def newest_own_checkpoint(ckpt, folder: str):
    """A warm trial's checkpoint to resume: Tune's (`ckpt`, as the restored experiment state recorded it), or a newer
    one that Tune persisted in the trial's own `folder` after that state was last stored (the driver was lost in
    between: Tune stores its experiment state on object storage only every so often, and the suite's lost-driver
    sweep restored a trial with no checkpoint while its folder held one). A donor's checkpoint (PBT's exploit,
    outside `folder`) stands. Only a folder with both the state and last.pt counts."""
    from ray import tune

    from raytrain_yolo.train.worker import STATE_FILE

    own = [n for n in sorted(storage.list_dirs(folder, prefix="checkpoint_"))
           if storage.is_file(f"{folder}/{n}/{STATE_FILE}") and storage.is_file(f"{folder}/{n}/last.pt")]
    if not own:
        return ckpt
    held = storage.as_uri(ckpt.path, folder).rstrip("/") if ckpt is not None else None
    if held is not None and (not held.startswith(f"{folder}/") or held.rsplit("/", 1)[-1] >= own[-1]):
        return ckpt
    return tune.Checkpoint(f"{folder}/{own[-1]}")


def reseed_checkpoint(local: Path, hyp: dict[str, Any], dest: str) -> None:
    """Turn a donor's checkpoint into the start of a new run with other hyperparameters.

    Ultralytics' resume restores the arguments saved in last.pt (`train_args`) and the optimizer state (which
    holds lr, momentum, weight decay); so the new values go into `train_args` and the optimizer starts fresh
    from them. Weights, EMA, epoch and best fitness are the donor's.
    """
    import torch

    path = local / "last.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    ckpt["train_args"] = {**ckpt.get("train_args", {}), **hyp}
    ckpt["optimizer"] = None
    torch.save(ckpt, path)
    storage.upload_dir(str(local), dest)


# ---------------------------------------------------------------------------------------------------------
# The sweep


@dataclass
class HpoResult:
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    paths: dict[str, str]


def tune_domains(plan: HpoPlan) -> dict[str, Any]:
    from ray import tune

    out = {}
    for k, d in plan.space.items():
        if d.kind == "choice":
            out[k] = tune.choice(list(d.values))
        elif d.kind == "range":
            lo, hi = d.values
            out[k] = (tune.randint(int(lo), int(hi) + 1) if d.integer
                      else tune.loguniform(lo, hi) if d.log else tune.uniform(lo, hi))
    return out


def _clip(config: dict[str, Any], bounds: dict[str, tuple]) -> dict[str, Any]:
    """PBT multiplies by 0.8 or 1.2 without looking at the range: keep each value inside it."""
    for k, (lo, hi) in bounds.items():
        if k in config:
            config[k] = type(config[k])(min(max(config[k], lo), hi))
    return config


def build_tuner(spec: RunSpec, plan: HpoPlan, concurrent: int, pool=None):
    """Ray Tune's Tuner for the sweep (or the one restored from `<storage>/<name>`); `pool`: the sweep's warm groups
    (sweep/warm.py), None for a Ray Train run per trial."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    from raytrain_yolo.sweep.throughput import TRIAL_DRIVER_CPU

    domains = tune_domains(plan)
    sweep = {"scheduler": plan.scheduler, "client_settings": client_settings()}
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=spec.to_dict(), sweep=sweep, pool=pool),
                                    {"CPU": TRIAL_DRIVER_CPU})
    storage_path, storage_filesystem = storage.ray_storage(spec.storage_path, spec.storage_wait_s)
    if tune.Tuner.can_restore(spec.run_dir):
        print(f"resuming the sweep in {storage.redact(spec.run_dir)}", file=sys.stderr, flush=True)
        return tune.Tuner.restore(f"{storage_path.rstrip('/')}/{spec.name}", trainable=trainable,
                                  resume_unfinished=True, resume_errored=True, storage_filesystem=storage_filesystem)
    if plan.scheduler == "pbt":
        from ray.tune.search import BasicVariantGenerator

        bounds = {k: d.values for k, d in plan.space.items() if d.kind == "range"}
        mutations = {k: (list(d.values) if d.kind == "choice" else domains[k]) for k, d in plan.space.items()
                     if d.kind != "fixed"}
        scheduler = PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=plan.perturbation_epochs, hyperparam_mutations=mutations,
            custom_explore_fn=functools.partial(_clip, bounds=bounds), quantile_fraction=0.5 if plan.trials < 4 else 0.25)
        search = BasicVariantGenerator(random_state=plan.seed)
    else:
        from optuna.samplers import TPESampler
        from ray.tune.search.optuna import OptunaSearch

        search = OptunaSearch(sampler=TPESampler(seed=plan.seed))
        # max_t one past the last epoch: a trial that keeps up ends on its own (summary, FINISHED MLflow run).
        scheduler = (ASHAScheduler(time_attr="epoch", max_t=plan.epochs + 1, grace_period=plan.grace_epochs,
                                   reduction_factor=ASHA_REDUCTION)
                     if plan.scheduler == "asha" else FIFOScheduler())
    return tune.Tuner(
        trainable,
        param_space=domains,
        tune_config=tune.TuneConfig(metric=plan.metric, mode="max", search_alg=search, scheduler=scheduler,
                                    num_samples=plan.trials, max_concurrent_trials=concurrent,
                                    trial_name_creator=trial_name, trial_dirname_creator=trial_name),
        run_config=tune.RunConfig(name=spec.name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                  verbose=1, **_trial_checkpoints(spec, plan)),
    )


def _trial_checkpoints(spec: RunSpec, plan: HpoPlan) -> dict[str, Any]:
    """Tune's checkpoint and failure settings. PBT may clone any trial's checkpoint it saw at a perturbation: all
    are kept. A warm trial's checkpoints are Tune's (sweep/warm.py): the latest --keep-checkpoints of them (each
    holds Ultralytics' best.pt so far), and --max-failures restarts of a failed trial from the last one, as its own
    Ray Train run did for a fresh trial."""
    from ray import tune

    if not plan.warm:
        return {"checkpoint_config": tune.CheckpointConfig(num_to_keep=None)}
    keep = None if plan.scheduler == "pbt" else max(1, spec.keep_checkpoints)
    return {"checkpoint_config": tune.CheckpointConfig(num_to_keep=keep),
            "failure_config": tune.FailureConfig(max_failures=spec.max_failures)}


def fit_resources(spec: RunSpec, plan: HpoPlan) -> int:
    """Workers per trial from the cluster, and how many trials its free resources hold side by side (each also
    runs a 0.1-CPU trial driver: on a small CPU machine the workers get what is left, see sweep/throughput.py)."""
    import ray

    from raytrain_yolo.plan.resources import resolve_scaling
    from raytrain_yolo.sweep.throughput import trials_side_by_side, worker_cpus_beside_trial

    cpus = float(ray.cluster_resources().get("CPU", 0))
    s = spec.scaling
    resolve_scaling(spec)
    if not s.use_gpu:
        s.cpus_per_worker = worker_cpus_beside_trial(cpus, s.num_workers, s.cpus_per_worker)
    fit = trials_side_by_side(s.use_gpu, s.num_workers, s.cpus_per_worker)
    return max(1, min(plan.max_concurrent or fit, plan.trials))


def run_search(spec: RunSpec, plan: HpoPlan) -> HpoResult:
    """Run (or resume) the sweep; write results.parquet, best.yaml, best.pt and map.png under `<storage>/<name>/`."""
    from raytrain_yolo.core.cluster import connect_ray
    from raytrain_yolo.core.tracking import RunTracker, failed_on_error

    connect_ray()
    concurrent = fit_resources(spec, plan)
    if plan.warm:  # trials on warm groups do not join the cluster: every node's view of the inputs, checked once
        from raytrain_yolo.plan.prepare import check_node_paths

        check_node_paths(spec, {"data": plan.data})
    if not storage.read_text(f"{spec.run_dir}/{DEFINITION_FILE}"):
        storage.write_text(f"{spec.run_dir}/{DEFINITION_FILE}", json.dumps(plan.definition, indent=2))
    tracker = RunTracker(spec) if spec.tracking.enabled else None
    if tracker:
        tracker.start({"hpo/trials": plan.trials, "hpo/scheduler": plan.scheduler, "hpo/metric": plan.metric,
                       "hpo/space": json.dumps({k: list(d.values) for k, d in plan.space.items()}),
                       "hpo/space_source": plan.space_source, "hpo/epochs": plan.epochs,
                       "ray/num_workers": spec.scaling.num_workers, "ray/use_gpu": spec.scaling.use_gpu,
                       "hpo/max_concurrent": concurrent})
        spec.tracking.parent_run_id = tracker.run_id
    with failed_on_error(tracker):
        with warm_pool(spec, concurrent, plan.warm) as pool:
            results = fit_tuner(build_tuner(spec, plan, concurrent, pool), f"Tune saved the sweep in "
                                f"{storage.redact(spec.run_dir)}: the same command resumes it")
        rows = [summarize_trial(r, plan, spec.storage_path) for r in results]
        rows.sort(key=lambda r: (r["status"] != "finished", -_num(r["best"]), -_num(r["final"])))
        best = next((r for r in rows if r["status"] == "finished"), None)
        if tracker:
            close_trial_runs(spec, rows, done="finished")
        paths = write_outputs(spec, plan, rows, best)
    if tracker:
        tracker.finished(paths.values())
    return HpoResult(rows, best, paths)


def _num(v) -> float:
    return float(v) if v is not None and not (isinstance(v, float) and math.isnan(v)) else -math.inf


def summarize_trial(result, plan: HpoPlan, storage_path: str = "") -> dict[str, Any]:
    """One row: hyperparameters (the last ones, under PBT), epochs reached, the metric's best and final, and the
    trial's last checkpoint (its Train run's, or for a warm trial Tune's: `storage_path` puts back its scheme)."""
    from raytrain_yolo.core.cli import root_cause

    row: dict[str, Any] = {"trial": Path(result.path).name if result.path else None}
    config = result.config or {}  # None for a trial that failed before it reported (its actor did not start)
    row.update({k: _plain(config.get(k)) for k in plan.searched})
    records, seen = [], set()
    for r in _progress(result):  # an epoch of one Train run once, also if a restore reported it again
        key = (r.get("epoch"), r.get("train_run"))
        if not _missing(r.get("epoch")) and key not in seen:
            seen.add(key)
            records.append(r)
    values = [float(r[plan.metric]) for r in records if not _missing(r.get(plan.metric))]
    row["epochs"] = int(max((r["epoch"] for r in records), default=0))
    row["epochs_trained"] = len(records)
    row["metric"] = plan.metric
    row["best"] = max(values) if values else None
    row["final"] = values[-1] if values else None
    row["map50_95_final"] = float(records[-1][MAP_KEY]) if records and not _missing(records[-1].get(MAP_KEY)) else None
    row["history"] = [[int(r["epoch"]), float(r[plan.metric])] for r in records if not _missing(r.get(plan.metric))]
    exploits = []
    for r in records:
        tag = r.get("exploited")
        if isinstance(tag, str) and tag and tag not in exploits:
            exploits.append(tag)
    row["exploits"] = ", ".join(exploits)
    row["checkpoint"] = next((r["checkpoint_path"] for r in reversed(records) if r.get("checkpoint_path")), None)
    if row["checkpoint"] is None and result.checkpoint is not None:
        row["checkpoint"] = storage.as_uri(result.checkpoint.path, storage_path)
    stopped = next((r["stopped_early"] for r in reversed(records) if isinstance(r.get("stopped_early"), str)
                    and r["stopped_early"]), None)  # the trainer ended the run itself (patience=, time=)
    if result.error:
        row["status"], row["reason"] = "failed", root_cause(result.error)[:300]
    elif row["epochs"] >= plan.epochs:
        row["status"], row["reason"] = "finished", None
    elif stopped:
        row["status"], row["reason"] = "finished", f"stopped early at epoch {row['epochs']} of {plan.epochs} ({stopped})"
    else:
        row["status"] = "stopped early"
        row["reason"] = f"{plan.scheduler.upper()} stopped it after epoch {row['epochs']} of {plan.epochs}"
    return row


def _progress(result) -> list[dict[str, Any]]:
    """Every result the trial reported, in order, from its progress.csv. (After PBT restored a trial from
    a checkpoint, Tune's `metrics_dataframe` holds only the results since.)"""
    import csv
    import io

    text = storage.read_text(f"{result.path}/progress.csv") if result.path else None
    if not text:
        df = result.metrics_dataframe
        return [] if df is None else df.to_dict("records")
    rows = []
    for raw in csv.DictReader(io.StringIO(text)):
        row: dict[str, Any] = {}
        for k, v in raw.items():
            try:
                row[k] = float(v) if v != "" else None
            except (TypeError, ValueError):
                row[k] = v
        rows.append(row)
    return rows


def _missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def write_outputs(spec: RunSpec, plan: HpoPlan, rows: list[dict], best: dict | None) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    run_dir = spec.run_dir
    cols = ["trial", *plan.searched, "epochs", "epochs_trained", "metric", "best", "final", "map50_95_final",
            "status", "reason", "exploits", "checkpoint"]
    table = pa.table({c: [r.get(c) for r in rows] for c in cols})
    paths = {"results": f"{run_dir}/results.parquet", "plot": f"{run_dir}/map.png", "json": f"{run_dir}/sweep.json"}
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    storage.write_bytes(paths["results"], buf.getvalue().to_pybytes())
    if best:
        cfg = trial_config(spec, {k: best[k] for k in plan.searched})
        note = ("# PBT changed hyperparameters during training: these are the trial's last values, so a run from\n"
                "# scratch with them is a good start, not a replay of the trial.\n") if plan.scheduler == "pbt" else ""
        header = (f"# Best of {len(rows)} trials of `python -m raytrain_yolo.tune --objective map` ({spec.name}, "
                  f"{time.strftime('%Y-%m-%d')}): {best['trial']}, {plan.metric} best {best['best']:.4f}, "
                  f"final {best['final']:.4f}.\n{note}# Use it as is: python -m raytrain_yolo.fit --config best.yaml\n")
        paths["best"] = f"{run_dir}/best.yaml"
        storage.write_text(paths["best"], header + yaml.safe_dump(cfg, sort_keys=False))
        if best.get("checkpoint"):
            try:
                storage.copy_file(f"{best['checkpoint']}/best.pt", f"{run_dir}/best.pt")
                paths["weights"] = f"{run_dir}/best.pt"
            except OSError as e:  # the sweep's results stand without it; say why it is missing
                print(f"warning: no best.pt beside best.yaml: {storage.redact(str(e).splitlines()[0])}",
                      file=sys.stderr, flush=True)
    plot_trials(rows, plan, paths["plot"])
    storage.write_text(paths["json"], json.dumps({"rows": rows, "best": best}, indent=2, default=str))
    return paths


def plot_trials(rows: list[dict], plan: HpoPlan, path: str) -> None:
    """The metric per trial over epochs; x where a scheduler stopped a trial, o where PBT restarted one."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for r in rows:
        pts = r.get("history") or []
        if not pts:
            continue
        (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=r["trial"], alpha=0.85)
        if r["status"] == "stopped early":
            ax.plot(pts[-1][0], pts[-1][1], marker="x", markersize=10, color=line.get_color())
        for i in range(1, len(pts)):
            if pts[i][0] <= pts[i - 1][0] or pts[i][0] > pts[i - 1][0] + 1:  # the epoch counter jumped: exploit
                ax.plot(pts[i][0], pts[i][1], marker="o", markersize=9, fillstyle="none", color=line.get_color())
    ax.set_xlabel("epoch")
    ax.set_ylabel(plan.metric)
    ax.set_title(f"{plan.metric} per trial ({plan.scheduler}; x: stopped early, o: PBT exploit)")
    ax.grid(alpha=0.3)
    if len(rows) <= 12:
        ax.legend(fontsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def format_table(rows: list[dict], plan: HpoPlan) -> str:
    keys = plan.searched[:6]
    head = ["trial", *keys, "epochs", "best", "final", "status"]
    fmt_v = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    body = [[str(r["trial"]), *(fmt_v(r.get(k)) for k in keys), str(r["epochs"]),
             f"{r['best']:.4f}" if r["best"] is not None else "-", f"{r['final']:.4f}" if r["final"] is not None else "-",
             r["status"] + (f" ({r['exploits']})" if r.get("exploits") else "")] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *(fmt(b) for b in body)])


def main(ns) -> int:
    """The body of `tune --objective map` (called by tune.main inside run_main)."""
    from raytrain_yolo.core.cli import print_sweep, stop_ray

    spec, plan = plan_from_args(ns)
    result = run_search(spec, plan)
    stop_ray()
    return print_sweep(format_table(result.rows, plan), result.paths, result.best, "no trial finished its epochs")
