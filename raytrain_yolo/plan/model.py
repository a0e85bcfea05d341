"""The model check: a model YAML or a local Ultralytics checkpoint, its task, and the training arguments a
checkpoint keeps (as `YOLO(model).train()` takes them); the distillation teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from raytrain_yolo.core.errors import UserError


def check_weights(model: str) -> str:
    """val and predict need trained weights: a local .pt (or a models:/ URI, resolved to one before this)."""
    if not str(model).endswith(".pt"):
        raise UserError(f"model={model} has no trained weights: pass a .pt checkpoint (e.g. the best_checkpoint "
                        "of a fit summary) or models:/NAME/VERSION")
    return check_model(model, None)


def check_model(model: str, task: str | None) -> str:
    """The model is a known YAML or a loadable local checkpoint; return its task."""
    from ultralytics.nn.tasks import guess_model_task, yaml_model_load

    name = str(model)
    if name.endswith((".yaml", ".yml")):
        try:
            cfg = yaml_model_load(name)
        except (FileNotFoundError, OSError):
            raise UserError(
                f"model={name} is neither a local file nor an Ultralytics model YAML: e.g. model=yolo26n.yaml"
            ) from None
        except yaml.YAMLError:
            raise UserError(f"model={name} is not valid YAML: fix its syntax") from None
        found = guess_model_task(cfg)
    elif name.endswith(".pt"):
        found = _checkpoint_task(name)
    else:
        raise UserError(f"model={name} must be a .yaml model config or a .pt checkpoint")
    if task and task != found:
        raise UserError(f"model={name} is a {found} model but task={task}: drop task= or use a {task} model")
    from raytrain_yolo.train.adapter import TASK_TRAINERS

    if found not in TASK_TRAINERS:  # Ultralytics' classify, semantic and depth tasks: no trainer, validator or rows here
        raise UserError(f"model={name} is a {found} model: these jobs take {', '.join(TASK_TRAINERS)} models; use "
                        f"one of those, or Ultralytics itself for {found}")
    return found


def check_teacher(teacher: str) -> str:
    """Ultralytics' knowledge distillation (`distill_model=`): every rank loads the teacher's weights as Ultralytics'
    `DistillationModel` does (`load_checkpoint`, which would download a name it does not find). Nothing is
    downloaded here, so it must be a local, loadable Ultralytics `.pt`; any task, as Ultralytics allows. Returns its
    absolute path (the workers run elsewhere). Raises UserError naming `distill_model=`."""
    name = str(teacher)
    if not name.endswith(".pt"):
        raise UserError(f"distill_model={name} must be the teacher's trained weights, a .pt checkpoint (a model YAML "
                        "has none): e.g. distill_model=runs/teacher/weights/best.pt")
    _checkpoint_task(name, key="distill_model")
    return str(Path(name).expanduser().resolve())


def _checkpoint_task(path: str, key: str = "model") -> str:
    """The task of a local Ultralytics checkpoint; UserError naming `key=` if it is missing or not one."""
    from ultralytics.nn.tasks import guess_model_task

    return guess_model_task(load_checkpoint_model(path, key))


_LOADED: dict[tuple[str, float], Any] = {}  # (path, mtime) -> the checkpoint's model: a run's checks load it once


def load_checkpoint_model(path: str, key: str = "model"):
    """The model inside a local Ultralytics checkpoint (its EMA when it has one), loaded once per file version.
    A `.pt` is a pickle: loading runs code from it, so it must be a file you trust (README, "What is trusted")."""
    import torch

    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path} not found: pass the path of a local .pt file (nothing is downloaded)")
    cache_key = (str(p.resolve()), p.stat().st_mtime)
    if cache_key in _LOADED:
        return _LOADED[cache_key]
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any failure here means: not a usable checkpoint
        first = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}={path} cannot be loaded ({first}): the file is corrupt or not a PyTorch checkpoint") from None
    model = (ckpt.get("ema") or ckpt.get("model")) if isinstance(ckpt, dict) else None
    if not isinstance(model, torch.nn.Module):
        raise UserError(f"{key}={path} is not an Ultralytics checkpoint (no model inside): pass a YOLO .pt file")
    _LOADED.clear()  # one model at a time: a sweep's driver checks one model
    _LOADED[cache_key] = model
    return model


def checkpoint_args(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments a checkpoint keeps for training, as `YOLO(model).train()` takes them: Ultralytics'
    `Model._reset_ckpt_args` of the checkpoint's model args (`imgsz`, `single_cls`; `task` is the model's own), less
    what the user gave and less `data` (Ultralytics' train() sets data itself). A model trained at 64 px fine-tunes
    at 64 px unless `imgsz=` says otherwise, as in Ultralytics."""
    from ultralytics.engine.model import Model

    args = getattr(load_checkpoint_model(model), "args", None) or {}
    kept = Model._reset_ckpt_args(dict(args) if not isinstance(args, dict) else args)
    return {k: v for k, v in kept.items() if k not in ("data", "task") and k not in given}
