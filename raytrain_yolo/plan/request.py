"""The request itself: the run's flags, Ultralytics' arguments as Ultralytics resolves them, the model; then what it
reads and writes (dataset, storage, tracking server). `prepare` runs the two steps with the rerun check between."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from raytrain_yolo.core import storage
from raytrain_yolo.core.config import (LOADERS, RunSpec, check_batch, check_name, default_name, resolve_train_args,
                                       validate_train_args)
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.tracking import check_reachable, resolve_uri
from raytrain_yolo.plan.dataset import check_data
from raytrain_yolo.plan.model import check_model, check_teacher, checkpoint_args


def check_saving(spec: RunSpec, train_args: dict[str, Any]) -> None:
    """A training run needs Ultralytics' weights: every Ray checkpoint carries its `last.pt` (what a restart
    resumes from) and the run ends with `best.pt`/`last.pt`. Only a throughput trial (`window_steps`), which
    never checkpoints, may leave them out."""
    if train_args.get("save") is False and not spec.window_steps:
        raise UserError("save=False would leave the Ray checkpoints without last.pt, so a restart "
                        "(--max-failures, a rerun with the same --name) could not resume and the run would end "
                        "without best.pt: drop save=False")


def check_run(spec: RunSpec) -> tuple[RunSpec, dict[str, Any], str]:
    """Everything that can be checked without Ray: the request (flags, arguments, model), then its inputs
    (dataset and labels, storage, tracking server). `plan.prepare` runs the two steps with the rerun check between."""
    spec, train_args, task = check_request(spec)
    check_inputs(spec, train_args, task)
    return spec, train_args, task


def check_flags(spec: RunSpec) -> None:
    """The run's own flags: name, storage, retries and waits (one line each, naming the flag)."""
    spec.name = check_name(spec.name or default_name())
    storage.refuse_credentials(spec.storage_path, "--storage-path")
    for key, value in spec.train.items():  # data=, model=, pretrained=, ... as object-storage URIs
        storage.refuse_credentials(value, f"{key}=")
    spec.storage_path = storage.normalise(spec.storage_path)
    if spec.keep_checkpoints < 1:
        raise UserError(f"--keep-checkpoints {spec.keep_checkpoints} must be at least 1")
    if spec.scaling.pg_timeout_s <= 0:
        raise UserError(f"--process-group-timeout {spec.scaling.pg_timeout_s:g} must be above 0 seconds")
    for flag, value in (("--resize-check", spec.scaling.resize_check_s), ("--restart-wait", spec.restart_wait_s),
                        ("--storage-wait", spec.storage_wait_s), ("--hang-timeout", spec.hang_timeout_s or 0)):
        if value < 0:
            raise UserError(f"{flag} {value:g} must be 0 or more seconds")
    if spec.max_failures < -1:
        raise UserError(f"--max-failures {spec.max_failures} must be 0 or more (-1: retry forever)")


def check_request(spec: RunSpec) -> tuple[RunSpec, dict[str, Any], str]:
    """The flags, and the Ultralytics arguments as `YOLO(model).train(**args)` resolves them (a checkpoint's own
    `imgsz`/`single_cls` under the user's, `checkpoint_args`), checked with Ultralytics' rules; the model's task.
    Reads the model, not the dataset."""
    check_flags(spec)
    train_args = resolve_train_args(spec)
    if str(train_args["model"]).endswith(".pt") and not spec.train.get("cfg"):
        train_args = validate_train_args({**train_args, **checkpoint_args(train_args["model"], spec.train)})
    check_saving(spec, train_args)
    if spec.scaling.num_workers is not None:  # known now: no need to start Ray to refuse it
        check_batch(train_args["batch"], spec.scaling.num_workers, spec.scaling.min_workers)
    else:  # its form at least (AutoBatch's -1, a fraction): the split over the workers is checked once Ray says how many
        check_batch(train_args["batch"], 1)
    task = check_model(train_args["model"], train_args.get("task"))
    check_loader(spec.loader, task, train_args)
    if spec.prefetch and not spec.loader.startswith("device"):
        raise UserError(f"--prefetch builds batches of --loader device, not of --loader {spec.loader}: "
                        "add --loader device, or drop --prefetch")
    if str(train_args["model"]).endswith(".pt"):
        train_args["model"] = str(Path(train_args["model"]).resolve())
    if train_args.get("distill_model"):
        train_args["distill_model"] = check_teacher(train_args["distill_model"])
    if isinstance(train_args.get("pretrained"), str):  # pretrained=PATH: weights to start from
        train_args["pretrained"] = check_pretrained(train_args["pretrained"])
    check_optimizer(train_args.get("optimizer", "auto"))
    return spec, train_args, task


def check_optimizer(name: Any) -> None:
    """`optimizer=` as Ultralytics' trainer builds it (`BaseTrainer.build_optimizer`, which refuses an unknown name
    only once training starts), tried here on a one-layer module; its refusal as one line."""
    import torch
    from ultralytics.engine.trainer import BaseTrainer

    from raytrain_yolo.core.console import ultralytics_quiet
    from raytrain_yolo.core.errors import ultralytics_says

    if str(name).lower() == "auto":
        return
    try:
        with ultralytics_quiet():
            BaseTrainer.build_optimizer(None, torch.nn.Linear(1, 1), name=str(name))
    except NotImplementedError as e:
        raise UserError(f"optimizer={name}: {ultralytics_says(e).split(' Request support')[0].rstrip('. ')}: pick one of "
                        "those") from None
    except Exception:  # noqa: BLE001 - a known name that needs a real model (MuSGD): Ultralytics builds it later
        pass


def check_pretrained(path: str) -> str:
    """`pretrained=PATH` names weights Ultralytics loads into the model at the start (nothing is downloaded here):
    a local .pt, made absolute (the workers run elsewhere). Raises UserError naming the key."""
    from raytrain_yolo.plan.model import load_checkpoint_model

    load_checkpoint_model(path, key="pretrained")
    return str(Path(path).expanduser().resolve())


def check_inputs(spec: RunSpec, train_args: dict[str, Any], task: str) -> None:
    """What the run reads and writes, checked from this machine: the dataset's splits (Ultralytics' label scan),
    the storage (writable), the tracking server (reachable)."""
    # Ultralytics' trainer validates on data[split] (split=, default val): that split, not always val, is checked.
    splits = tuple(dict.fromkeys(("train", str(train_args.get("split") or "val"))))
    if spec.is_synthetic and splits[-1] not in ("train", "val"):
        raise UserError(f"split={splits[-1]}: the embedded dataset has train and val images only: use split=val, or "
                        f"data= a data.yaml with a '{splits[-1]}:' entry")
    if not spec.is_synthetic:
        data = str(train_args["data"])
        if storage.is_uri(data):  # object storage: every node (this one too) checks its own local copy
            from raytrain_yolo.data import sync

            check_data(sync.localize(data), task, spec.allow_bad_labels, splits,
                       single_cls=bool(train_args.get("single_cls")), fraction=train_args.get("fraction", 1.0))
        else:
            train_args["data"] = str(Path(data).expanduser().resolve())
            found = check_data(train_args["data"], task, spec.allow_bad_labels, splits,
                               single_cls=bool(train_args.get("single_cls")), fraction=train_args.get("fraction", 1.0))
            spec.data_root = found.root if found.cwd_relative else ""
    storage.check_writable(spec.run_dir)
    if spec.tracking.enabled:
        check_reachable(resolve_uri(spec), spec.tracking.experiment)


def check_loader(loader: str, task: str, train_args: dict[str, Any]) -> None:
    """`--loader device` implements the detect task's default augmentations; refuse what it would silently drop."""
    if loader not in LOADERS:
        raise UserError(f"--loader {loader} is not one of {', '.join(LOADERS)}")
    if loader.startswith("device"):
        if task != "detect":
            raise UserError(f"--loader device augments detection boxes only, not task={task}: use --loader ultralytics")
        from raytrain_yolo.train.augment import unsupported

        bad = unsupported(train_args)
        if bad:
            raise UserError(f"--loader device does not implement {bad[0]}: drop it, or use --loader ultralytics")
