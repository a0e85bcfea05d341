"""The one preflight pass every job calls, so that a bad request fails in one clear line before any work starts,
instead of deep inside a worker an hour later. Nothing here downloads anything.

- `check_request(spec)`: the flags, Ultralytics' arguments as Ultralytics resolves them, the model (no dataset read);
- `check_inputs(...)`: the dataset and its labels, storage, the tracking server;
- `resolve_scaling(spec)`: the workers fitted to the cluster's free CPUs/GPUs (Ray would wait for them forever);
- `check_nodes(...)`: on more than one node, what every node must see (storage, data, tracking), from the nodes.
`raytrain_yolo.plan.prepare` runs them in order for a training run; val/predict (core/jobs.py) and the sweeps'
drivers call the parts (`check_run` = request + inputs).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytrain_yolo.core import storage

from raytrain_yolo.core.config import (RunSpec, SearchDim, check_batch, check_loader, check_name, default_name,
                                       resolve_train_args, validate_train_args)
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.tracking import check_reachable, resolve_uri

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
LOCAL_CPU_WORKERS = 2
EPS = 1e-6  # Ray reports fractional CPUs as floats (1.9000000000000001)
MAX_LABEL_FILES = 50_000  # label scan bound: enough for the datasets people start with, seconds of I/O


@dataclass
class SplitCheck:
    """What Ultralytics' label scan (YOLODataset.cache_labels) counts in one split."""

    images: int  # the images Ultralytics trains or validates on (corrupt pairs dropped)
    label_files: int  # label files found for them
    instances: int  # the objects in those labels
    backgrounds: int  # images whose label file is missing or empty
    skipped: list[str] = field(default_factory=list)  # one line per corrupt image/label pair Ultralytics drops


@dataclass
class DataCheck:
    """A data.yaml as Ultralytics' check_det_dataset resolved it, and each checked split's counts."""

    data: dict[str, Any]  # check_det_dataset's dictionary
    root: str  # the dataset root, absolute
    cwd_relative: bool  # `path:` is relative: Ultralytics resolved it from this working directory
    splits: dict[str, SplitCheck] = field(default_factory=dict)


def check_data(data: str, task: str, allow_bad_labels: bool = False, splits=("train", "val"), training: bool = True,
               single_cls: bool = False) -> DataCheck:
    """The data.yaml and its `splits` as Ultralytics sees them: `check_det_dataset` resolves the file (path:,
    names/nc, the split folders), then `verify_image_label` checks every image/label pair (up to MAX_LABEL_FILES
    per split) with the arguments YOLODataset passes. `training`: the train split is the one Ultralytics builds
    with augmentation, where it requires labels."""
    p = Path(data).expanduser()
    raw = _read_yaml(p, data)
    cfg = _ultralytics_dataset(p, data, raw, splits[-1])
    if task == "pose":
        _check_kpt_shape(cfg, data)
    found = DataCheck(cfg, str(Path(cfg["path"]).resolve()), _cwd_relative(raw))
    for key in splits:
        found.splits[key] = _check_split(key, raw, found, task, data, allow_bad_labels,
                                         training and key == "train", single_cls)
    return found


def _read_yaml(p: Path, data: str) -> dict[str, Any]:
    """What Ultralytics has no one-line answer for: a data= that is no local .yaml file, or YAML that does not parse
    (nothing is downloaded, so Ultralytics' dataset names and URLs are not looked up)."""
    if p.suffix not in (".yaml", ".yml"):
        raise UserError(f"data={data} is not a .yaml file: pass the path of a YOLO data.yaml")
    if not p.is_file():
        raise UserError(f"data={data} not found: pass the path of an existing YOLO data.yaml")
    try:
        raw = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"data={data} is not valid YAML{where}: fix its syntax") from None
    if not isinstance(raw, dict):
        raise UserError(f"data={data} must be a mapping with train:, val: and names:")
    return raw


def _ultralytics_dataset(p: Path, data: str, raw: dict, split: str) -> dict[str, Any]:
    """Ultralytics' check_det_dataset, without downloads; its refusals as one line."""
    from ultralytics.data.utils import check_det_dataset

    from raytrain_yolo.train.adapter import offline_dataset_check

    if split not in ("train", "val") and not raw.get(split):  # Ultralytics' words would be "images not found"
        raise UserError(f"data={data} has no '{split}:' entry: add the {split} image folder, or pick another split=")
    try:
        with offline_dataset_check():
            return check_det_dataset(str(p), autodownload=False, split=split)
    except FileNotFoundError as e:
        missing = re.search(r"missing path '([^']+)'", str(e))
        if missing:
            raise UserError(_missing_split(split, raw, Path(missing[1]), None, data)) from None
        raise UserError(f"data={data}: {_ultralytics_says(e, p)}: fix the data.yaml") from None
    except Exception as e:  # noqa: BLE001 - Ultralytics refuses with TypeError, SyntaxError, KeyError, ...
        raise UserError(f"data={data}: {_ultralytics_says(e, p)}{_names_hint(raw)}: fix the data.yaml") from None


def _ultralytics_says(e: BaseException, p: Path | None = None) -> str:
    """An Ultralytics message as one plain line: no colours, emoji, download notes or help links."""
    from ultralytics.utils import remove_colorstr

    text = remove_colorstr(str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)).replace("\u274c", "")
    lines = [x.strip() for x in text.splitlines() if x.strip() and not x.strip().startswith(("Note ", "See https"))]
    line = " ".join(" ".join(lines).split()).rstrip(".")
    if p is not None and line.startswith(str(p)):
        line = line[len(str(p)):].strip()
    return f"Ultralytics says {line}" if line else f"Ultralytics refuses it ({type(e).__name__})"


def _names_hint(raw: dict) -> str:
    names = raw.get("names")
    if isinstance(names, str) and re.search(r"\d:\S", names):
        return " (names: reads as one string; write a space after each colon, e.g. `0: square`)"
    return ""


def _check_kpt_shape(cfg: dict, data: str) -> None:
    """YOLODataset refuses a pose dataset without a usable kpt_shape before it reads any label."""
    kpt_shape = cfg.get("kpt_shape")
    if not (isinstance(kpt_shape, list) and len(kpt_shape) == 2 and kpt_shape[1] in (2, 3)
            and isinstance(kpt_shape[0], int) and kpt_shape[0] > 0):
        raise UserError(f"a pose model needs 'kpt_shape: [keypoints, 2 or 3]' in data={data} (found {kpt_shape}): "
                        "add it, e.g. kpt_shape: [17, 3], or train a detect model")


def _cwd_relative(raw: dict) -> bool:
    """A relative `path:` is resolved by Ultralytics from the working directory (then its datasets folder), so
    workers elsewhere would find another folder: they get the root the driver resolved instead."""
    root = raw.get("path")
    return isinstance(root, str) and bool(root) and not Path(root).is_absolute()


def _missing_split(key: str, raw: dict, missing: Path, root: Path | None, data: str) -> str:
    """`key:` names a folder that does not exist; with a hint when the usual layouts exist beside it."""
    entry = raw.get(key)
    if root is None and isinstance(entry, str) and not Path(entry).is_absolute():
        root = missing  # the folder the entry was resolved from: strip the entry's own parts
        for _ in Path(entry.removeprefix("../")).parts:
            root = root.parent
    alt = [c for c in (root / "images" / key, root / key / "images", root / "images" / Path(str(entry)).parent.name)
           if c.is_dir()] if root else []
    hint = f"; did you mean {key}: {alt[0].relative_to(root)}?" if alt else ""
    return f"{key}: {entry} in data={data} does not exist (looked for {missing}){hint}"


def _image_files(paths: list[str]) -> list[str]:
    """The images Ultralytics' BaseDataset.get_img_files lists: folders searched recursively, .txt files read as
    one image path per line (`./` relative to the list), any suffix in Ultralytics' IMG_FORMATS; sorted."""
    import glob
    import os

    from ultralytics.data.utils import IMG_FORMATS

    files: list[str] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += glob.glob(str(Path(glob.escape(p)) / "**" / "*.*"), recursive=True)
        elif p.is_file():
            parent = str(p.parent) + os.sep
            lines = p.read_text(encoding="utf-8-sig").strip().splitlines()
            files += [x.replace("./", parent, 1) if x.startswith("./") else x for x in lines]
    return sorted(x.replace("/", os.sep) for x in files if x.rpartition(".")[-1].lower() in IMG_FORMATS)


def _check_split(key: str, raw: dict, found: DataCheck, task: str, data: str, allow_bad_labels: bool,
                 augment: bool, single_cls: bool) -> SplitCheck:
    """One split's image/label pairs through Ultralytics' verify_image_label, refused as Ultralytics would
    refuse them (no image left, no label found for training); corrupt pairs refused unless allow_bad_labels."""
    cfg = found.data
    folders = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
    for folder in folders:
        if not Path(folder).exists():
            raise UserError(_missing_split(key, raw, Path(folder), Path(found.root), data))
    im_files = _image_files(folders)
    if not im_files:
        raise UserError(f"no images in {', '.join(folders)} ({key}: of data={data}): put .jpg/.png files there "
                        f"or fix {key}: in the data.yaml")
    im_files = im_files[:MAX_LABEL_FILES]
    results = _verify_pairs(im_files, cfg, task, single_cls)
    kept = [r for r in results if r[0] is not None]
    corrupt = [(im, _reason(r[9])) for im, r in zip(im_files, results) if r[8]]
    if not kept:
        raise UserError(f"Ultralytics finds no usable image in {key}: of data={data} ({len(corrupt)} corrupt, "
                        f"e.g. {corrupt[0][0]}: {corrupt[0][1]}): fix the images and their labels")
    label_files = sum(r[6] for r in results)
    if augment and label_files == 0:
        raise UserError(_no_labels(key, im_files, data))
    if corrupt and not allow_bad_labels:
        im, why = corrupt[0]
        raise UserError(f"{im} with labels {_label_file(im)}: Ultralytics would skip this image ({why}): fix the "
                        f"file, or pass --allow-bad-labels to skip such images as Ultralytics does "
                        f"({len(corrupt)} in {key}:)")
    _check_label_kinds(kept, task, key, data)
    out = SplitCheck(len(kept), label_files, sum(len(r[1]) for r in kept), sum(r[5] + r[7] for r in kept),
                     [f"{im}: {why}" for im, why in corrupt])
    if corrupt:
        print(f"labels     {key}: {len(corrupt)} of {len(im_files)} image/label pairs skipped, as Ultralytics "
              f"does (--allow-bad-labels), e.g. {out.skipped[0]}", flush=True)
    elif label_files == 0:
        print(f"labels     {key}: no label files for its {len(im_files)} images (Ultralytics reads them as "
              f"backgrounds, e.g. {_label_file(im_files[0])} for {Path(im_files[0]).name})", flush=True)
    return out


def _verify_pairs(im_files: list[str], cfg: dict, task: str, single_cls: bool) -> list:
    """Ultralytics' verify_image_label over the pairs, with YOLODataset.verify_args' arguments, in a thread pool
    as YOLODataset.cache_labels runs it."""
    from itertools import repeat
    from multiprocessing.pool import ThreadPool

    from ultralytics.data.utils import img2label_paths, verify_image_label
    from ultralytics.utils import NUM_THREADS

    nkpt, ndim = cfg.get("kpt_shape", (0, 0))
    args = zip(im_files, img2label_paths(im_files), repeat(""), repeat(task == "pose"),
               repeat(cfg.get("bg_class_idx") or len(cfg["names"])), repeat(nkpt), repeat(ndim), repeat(single_cls))
    with ThreadPool(min(NUM_THREADS, max(1, len(im_files) // 64 + 1))) as pool:
        return pool.map(verify_image_label, args)


def _label_file(im_file: str) -> str:
    from ultralytics.data.utils import img2label_paths

    return img2label_paths([im_file])[0]


def _reason(msg: str) -> str:
    """Ultralytics' reason for dropping a pair, from verify_image_label's message."""
    from ultralytics.utils import remove_colorstr

    why = " ".join(remove_colorstr(msg).split("ignoring corrupt image/label: ", 1)[-1].split())
    if "inhomogeneous" in why:  # numpy's words for rows of different lengths
        why += " - its rows have different numbers of columns"
    return why


def _no_labels(key: str, im_files: list[str], data: str) -> str:
    """Ultralytics stops training with 'No labels found': say where it looked and how it names label files."""
    first = Path(_label_file(im_files[0]))
    folder = first.parent
    rule = (f"Ultralytics reads the labels of {Path(im_files[0]).name} from {first.name} in {folder} (the last "
            "/images/ of an image's path becomes /labels/, the suffix .txt)")
    if not folder.is_dir():
        return f"no label folder for the {key} images of data={data}: {rule}; put the YOLO .txt labels there"
    others = sorted(folder.glob("*.txt"))
    seen = f" (it holds {others[0].name}, ...)" if others else " (it holds no .txt files)"
    return (f"no label file for any {key} image of data={data} in {folder}{seen}. {rule}: name each label file "
            "like its image")


def _check_label_kinds(kept: list, task: str, key: str, data: str) -> None:
    """YOLODataset.verify_labels: segment and OBB training need a polygon for every box."""
    from types import SimpleNamespace

    from ultralytics.data.dataset import YOLODataset

    if task not in ("segment", "obb"):
        return
    labels = [YOLODataset.result_to_label(None, r)[0] for r in kept]
    stand_in = SimpleNamespace(use_segments=task == "segment", use_obb=task == "obb",
                               format_class=YOLODataset.format_class)
    try:
        YOLODataset.verify_labels(stand_in, labels, Path(f"{key}.cache"))
    except ValueError as e:
        raise UserError(f"{key}: of data={data}: {_ultralytics_says(e)}: use a {task} dataset or a detect "
                        "model") from None


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

    return guess_model_task(_load_checkpoint_model(path, key))


_LOADED: dict[tuple[str, float], Any] = {}  # (path, mtime) -> the checkpoint's model: a run's checks load it once


def _load_checkpoint_model(path: str, key: str = "model"):
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


# Accuracy tuning (`tune --objective map`): the search space and the metric, checked before Ray starts.
NOT_SEARCHABLE = {
    "epochs": "it is every trial's length (ASHA's budget): set it as epochs=N",
    "data": "a sweep tunes one dataset: set it as data=...",
    "model": "a sweep tunes one model: set it as model=...",
}
TASK_METRICS = {"detect": "DetMetrics", "segment": "SegmentMetrics", "pose": "PoseMetrics", "obb": "OBBMetrics"}


def check_space(raw: Any, where: str, num_workers: int | None) -> dict[str, SearchDim]:
    """Ultralytics' tuner form `key: [min, max]` (an optional third number, Ultralytics' mutation gain, is
    ignored), plus `key: {min:, max:, log: true}`, `key: {choices: [...]}` and fixed values `key: value`.
    Each bound and choice must pass Ultralytics' own argument checks."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from raytrain_yolo.core.config import check_batch, validate_train_args

    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where} must map Ultralytics arguments to ranges, e.g. lr0: [1.0e-5, 1.0e-2]")
    space: dict[str, SearchDim] = {}
    for key, value in raw.items():
        if key in NOT_SEARCHABLE:
            raise UserError(f"'{key}' in {where} cannot be searched: {NOT_SEARCHABLE[key]}")
        dim = _dim(key, value, where)
        default = DEFAULT_CFG_DICT.get(key)
        for v in dim.values:
            try:
                validate_train_args({key: v})
            except UserError as e:
                raise UserError(f"{key}: {value} in {where}: {str(e).split(' (fix', 1)[0]}") from None
        if dim.kind == "range":
            if isinstance(default, bool) or not isinstance(default, (int, float)):
                raise UserError(f"{key}: {value} in {where} is a range but {key} is not a number: "
                                f"list the values instead, {key}: {{choices: [...]}}")
            dim = SearchDim("range", dim.values, dim.log, integer=isinstance(default, int))
        if key == "batch" and num_workers:
            for v in dim.values:
                check_batch(v, num_workers)
        space[key] = dim
    return space


def _dim(key: str, value: Any, where: str) -> SearchDim:
    fix = f"write {key}: [min, max], {key}: {{choices: [a, b]}} or {key}: value"
    if isinstance(value, dict):
        if set(value) == {"choices"} and isinstance(value["choices"], list) and value["choices"]:
            return SearchDim("choice", tuple(value["choices"]))
        if {"min", "max"} <= set(value) <= {"min", "max", "log"}:
            return _range(key, [value["min"], value["max"]], where, log=bool(value.get("log", False)))
        raise UserError(f"{key}: {value} in {where} is not a range or a list of choices: {fix}")
    if isinstance(value, list):
        if 2 <= len(value) <= 3 and all(_number(v) for v in value):
            return _range(key, value[:2], where)
        raise UserError(f"{key}: {value} in {where} is not [min, max]: {fix}")
    return SearchDim("fixed", (value,))


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _range(key: str, bounds: list, where: str, log: bool = False) -> SearchDim:
    lo, hi = bounds
    if not (_number(lo) and _number(hi)) or lo >= hi:
        raise UserError(f"{key}: [{lo}, {hi}] in {where} must have min < max (for one value write {key}: {lo})")
    if log and lo <= 0:
        raise UserError(f"{key}: log range in {where} must start above 0, not {lo}")
    return SearchDim("range", (lo, hi), log)


def check_metric(name: str, task: str) -> str:
    """The metric ASHA/PBT/Optuna follow: `fitness` or one of the task's validation metrics (all: higher is
    better). Short forms name the box metric: `mAP50-95` is `metrics/mAP50-95(B)`."""
    from ultralytics.utils import metrics

    names = ["fitness", *getattr(metrics, TASK_METRICS.get(task, "DetMetrics"))().keys]
    for full in names:
        if name in (full, full.removeprefix("metrics/"), full.removeprefix("metrics/").removesuffix("(B)")):
            return full
    raise UserError(f"--metric {name} is not a {task} validation metric: use one of {', '.join(names)}")


# --- a cluster of several nodes: what every node must see ------------------------------------------------

NODE_PROBE_TIMEOUT_S = 120  # a node starts a Ray worker process for the probe: seconds on a busy node


def local_path_of_tracking(uri: str | None) -> str | None:
    """The folder a file-based MLflow store lives in (sqlite:///x/mlflow.db, file:///x), else None."""
    if not uri:
        return None
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent)
    if uri.startswith("file://"):
        return uri[len("file://"):]
    return None


def probe_node(probes: dict[str, str], token: str, data: str | None, uri_dirs: list[str], backend: str,
               inputs: dict[str, str] | None = None) -> dict:
    """Runs on one node as a Ray task: which of the driver's files it sees, whether it can use the run's
    object-store paths, and the first of the job's `inputs` (what to call it -> local path) it lacks."""
    import os
    import socket

    import ray

    seen = {}
    for what, path in probes.items():
        try:
            seen[what] = Path(path).read_text() == token
        except OSError:
            seen[what] = False
    unwritable = None
    for d in uri_dirs:
        probe = f"{d}/.node-probe-{token}-{socket.gethostname()}"
        try:
            storage.write_text(probe, "ok")
            storage.delete(probe)
        except OSError as e:
            unwritable = f"{d} ({str(e).splitlines()[0][:160] if str(e) else type(e).__name__})"
    host = socket.gethostname()
    try:
        loopback = socket.gethostbyname(host).startswith("127.")
    except OSError:
        loopback = True
    return {
        "ip": ray.util.get_node_ip_address(),
        "host": host,
        "seen": seen,
        "data": data is None or Path(data).is_file(),
        "missing": next((k for k, path in (inputs or {}).items() if not Path(path).exists()), None),
        "unwritable": unwritable,
        "gloo_loopback": backend == "gloo" and loopback and not os.environ.get("GLOO_SOCKET_IFNAME"),
    }


def check_nodes(spec, data: str | None, tracking_uri: str | None, env: dict[str, str] | None = None,
                inputs: dict[str, str] | None = None, writes: str | None = None, gloo: bool = True) -> list[dict]:
    """On a cluster of more than one node, refuse before training what only one node's disk holds.

    The driver writes a probe file into --storage-path and next to a file-based tracking store; a small Ray task
    on every other node reads it back (and tries object-store paths, and looks for data= and the job's other
    local `inputs`, e.g. {"model=/x/best.pt": "/x/best.pt"}), in the environment the workers get (`env`).
    Returns what each node answered; [] on a single node. `--allow-node-local` skips it. val and predict pass
    `writes`, the folder their workers write to instead of the run's (predict's --output; '' for none: val's
    driver writes its metrics itself), and `gloo=False`: their workers do not form a process group.
    """
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = ray.get_runtime_context().get_node_id()
    others = [n for n in ray.nodes() if n["Alive"] and n["NodeID"] != here]
    if not others or spec.allow_node_local:
        return []
    token = uuid.uuid4().hex
    probes, made = {}, []
    out = spec.run_dir if writes is None else writes
    flag = f"--storage-path {spec.storage_path}" if writes is None else f"--output {writes}"
    places = {"storage": None if not out or storage.is_uri(out) else out,
              "tracking": local_path_of_tracking(tracking_uri)}
    for what, folder in places.items():
        if folder:
            path = Path(folder) / f".node-probe-{token}"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(token)
            probes[what], made = str(path), [*made, path]
    uri_dirs = [out] if out and storage.is_uri(out) else []
    task = ray.remote(num_cpus=0, max_retries=0, runtime_env={"env_vars": env or {}})(probe_node)
    refs = {n["NodeManagerAddress"]: task.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
    ).remote(probes, token, data, uri_dirs, spec.scaling.backend if gloo else "", inputs) for n in others}
    try:
        ready, _ = ray.wait(list(refs.values()), num_returns=len(refs), timeout=NODE_PROBE_TIMEOUT_S)
        late = [ip for ip, ref in refs.items() if ref not in ready]
        if late:
            raise UserError(f"Ray node {late[0]} did not answer a {NODE_PROBE_TIMEOUT_S} s probe task: check that "
                            "node (`ray status`), or pass --allow-node-local to skip the check")
        answers = ray.get(list(refs.values()))
    finally:
        for path in made:
            path.unlink(missing_ok=True)
    skip = " (--allow-node-local skips this check)"
    for a in answers:
        node = f"node {a['ip']} ({a['host']})"
        if "storage" in a["seen"] and not a["seen"]["storage"]:
            raise UserError(
                f"{flag} is not shared: {node} cannot see it. On a multi-node cluster use an object store "
                f"({flag.split()[0]} s3://bucket/prefix) or a filesystem every node mounts at "
                f"the same path{skip}")
        if "tracking" in a["seen"] and not a["seen"]["tracking"]:
            raise UserError(
                f"the MLflow store {tracking_uri} is a file that {node} cannot see, and rank 0 may run there: use a "
                f"tracking server every node reaches (--tracking-uri http://HOST:5000) or --no-tracking{skip}")
        if a["unwritable"]:
            raise UserError(f"{node} cannot write to {flag.split()[0]} {a['unwritable']}: give every node the same "
                            f"credentials and endpoint (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...){skip}")
        if not a["data"]:
            raise UserError(f"data={data} is not on {node}: put the dataset on a filesystem every node mounts at "
                            f"the same path{skip}")
        if a.get("missing"):
            raise UserError(f"{a['missing']} is not on {node}: put it on a filesystem every node mounts at the "
                            f"same path{skip}")
        if a["gloo_loopback"]:
            raise UserError(
                f"{node}: its host name {a['host']} resolves to a loopback address, so gloo would connect the "
                "ranks to 127.0.0.1: set GLOO_SOCKET_IFNAME to the network interface of the node's IP in that "
                f"node's environment (`ray start`'s), or fix the host name's address{skip}")
    return answers


# --- The workers against the cluster's free resources, and the whole pass ----------------------------------


def resolve_scaling(spec: RunSpec, extra_cpus: float = 0.0) -> RunSpec:
    """Fill in GPU/CPU and worker count from the cluster; refuse what its free resources cannot hold now.

    Ray would otherwise wait for the workers without end. `extra_cpus`: CPUs the job needs besides its
    workers (a tune trial's driver). A cluster that is busy or still scaling up is waited for only when asked
    (`--wait-for-resources SECONDS`). Inside a Ray Tune trial, the free resources already exclude what the
    trial itself holds. Each worker's CPUs (and GPU) must be on one node, so the fit is counted node by node.
    """
    import ray

    s = spec.scaling
    if s.cpus_per_worker <= 0:
        raise UserError(f"--cpus-per-worker {s.cpus_per_worker} must be above 0")
    deadline = time.monotonic() + spec.resource_wait_s
    while True:
        try:
            nodes, nodes_free = node_resources()
            return _fit_scaling(spec, ray.cluster_resources(), ray.available_resources(), extra_cpus,
                                nodes=nodes, nodes_free=nodes_free)
        except UserError as e:
            left = deadline - time.monotonic()
            if left <= 0:
                if spec.resource_wait_s:
                    raise UserError(f"waited {spec.resource_wait_s:g} s for resources that did not come: {e}") from None
                raise
            time.sleep(min(0.25, left))  # a finished job's placement group is usually gone within a second


def node_resources() -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]] | None]:
    """Each live node's total and free resources (resource name -> amount), by node address.

    Totals come from `ray.nodes()`. Ray 2.60 has no public call for what each node has free
    (`ray.util.state.list_nodes` reports totals only), so the free side is Ray's DeveloperAPI
    `ray._private.state.available_resources_per_node()`; None when that call is missing or fails (then only
    the cluster-wide free resources are checked)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    addresses = [n["NodeManagerAddress"] for n in alive]
    names = {n["NodeID"]: n["NodeManagerAddress"] if addresses.count(n["NodeManagerAddress"]) == 1
             else f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in alive}
    totals = {names[n["NodeID"]]: dict(n.get("Resources") or {}) for n in alive}
    try:
        from ray._private import state

        per_node = state.available_resources_per_node()
    except Exception:  # noqa: BLE001 - a Ray without the call: fall back to the cluster-wide check
        return totals, None
    return totals, {names[i]: dict(r) for i, r in per_node.items() if i in names}


def worker_bundle(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    """What Ray reserves for one worker, all on one node: its CPUs, and one GPU for a GPU worker."""
    return {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def workers_per_node(bundle: dict[str, float], nodes: dict[str, dict[str, float]]) -> dict[str, int]:
    """How many whole worker bundles each node holds (Ray places one worker's resources on one node)."""
    return {name: min(int(res.get(k, 0.0) / v + EPS) for k, v in bundle.items()) for name, res in nodes.items()}


def _describe(res: dict[str, float], use_gpu: bool) -> str:
    cpus, gpus = f"{res.get('CPU', 0.0):g} CPUs", int(res.get("GPU", 0.0) + EPS)
    return f"{cpus} and {gpus} GPU{'' if gpus == 1 else 's'}" if use_gpu else cpus


def _largest_node(nodes: dict[str, dict[str, float]], use_gpu: bool) -> tuple[str, dict[str, float]]:
    """The node with the most CPUs (among those with a GPU, for GPU workers)."""
    pool = {k: v for k, v in nodes.items() if not use_gpu or v.get("GPU", 0.0) >= 1 - EPS} or nodes
    name = max(pool, key=lambda k: pool[k].get("CPU", 0.0))
    return name, pool[name]


def _check_nodes_hold(least: int, bundle: dict[str, float], use_gpu: bool, nodes: dict[str, dict[str, float]]) -> None:
    """Refuse a worker larger than every node, or more workers than the nodes hold whole, however many CPUs and
    GPUs the cluster has in all."""
    per_node = workers_per_node(bundle, nodes)
    name, res = _largest_node(nodes, use_gpu)
    if not any(per_node.values()):
        raise UserError(f"one worker needs {_describe(bundle, use_gpu)} on one node but the largest node, {name}, "
                        f"has {_describe(res, use_gpu)}: use --cpus-per-worker {int(res.get('CPU', 0.0) + EPS)} "
                        "or less, or add a larger node")
    if least > sum(per_node.values()):
        raise UserError(f"{least} workers need {_describe(bundle, use_gpu)} each on one node, and the cluster's nodes "
                        f"hold only {sum(per_node.values())} workers of {bundle['CPU']:g} CPUs (largest node {name}: "
                        f"{_describe(res, use_gpu)}): lower --num-workers or --cpus-per-worker")


def _fit_scaling(spec: RunSpec, total: dict[str, float], free: dict[str, float], extra_cpus: float = 0.0,
                 nodes: dict[str, dict[str, float]] | None = None,
                 nodes_free: dict[str, dict[str, float]] | None = None) -> RunSpec:
    """Fit the request to the cluster: `total`/`free` are its resources in all (resource -> amount), `nodes` and
    `nodes_free` the same per node (node name -> resources); without them only the cluster-wide sums are checked.
    Raises UserError naming the fix; sets `use_gpu` and `num_workers` on the spec and returns it."""
    gpus, cpus = int(total.get("GPU", 0)), float(total.get("CPU", 0))
    free_gpus, free_cpus = int(free.get("GPU", 0) + EPS), float(free.get("CPU", 0))
    s = spec.scaling
    use_gpu = gpus > 0 if s.use_gpu is None else s.use_gpu
    if use_gpu and gpus == 0:
        raise UserError("--gpu was given but the Ray cluster has no GPUs: drop --gpu (or use --cpu) or add GPU nodes")
    bundle = worker_bundle(s.cpus_per_worker, use_gpu)
    n = s.num_workers
    if n is None:  # what fits now: one worker per free GPU, else up to 2 CPU workers
        fits = int((free_cpus - extra_cpus) / s.cpus_per_worker + EPS)
        if nodes_free is not None:
            fits = min(fits, sum(workers_per_node(bundle, nodes_free).values()))
        n = (free_gpus or gpus) if use_gpu else max(1, min(LOCAL_CPU_WORKERS, fits))
    if n < 1 or (s.min_workers is not None and not 1 <= s.min_workers <= n):
        raise UserError(f"--num-workers {s.min_workers or ''}{'-' if s.min_workers else ''}{n} must be "
                        "at least 1 (and MIN <= MAX for MIN-MAX)")
    least = s.min_workers or n
    if use_gpu and least > gpus:
        raise UserError(f"{least} GPU workers need {least} GPUs but the cluster has {gpus}: "
                        f"use --num-workers {gpus} or add GPU nodes")
    need = least * s.cpus_per_worker + extra_cpus
    what = f"{least} workers x {s.cpus_per_worker:g} CPUs" + (f" + {extra_cpus:g} for the trial" if extra_cpus else "")
    if nodes:  # short in all: say first when one worker is larger than any node, then the sum below
        _check_nodes_hold(least if need <= cpus + EPS else 1, bundle, use_gpu, nodes)
    if need > cpus + EPS:
        raise UserError(f"{what} need {need:g} CPUs but the cluster has {cpus:g}: "
                        "lower --num-workers or --cpus-per-worker")
    later = "wait for them with --wait-for-resources SECONDS, or stop the jobs that hold them"
    if use_gpu and least > free_gpus:
        raise UserError(f"{least} GPU workers need {least} GPUs but only {free_gpus} of the cluster's {gpus} are "
                        f"free now: use --num-workers {max(free_gpus, 1)}, {later}")
    if need > free_cpus + EPS:
        raise UserError(f"{what} need {need:g} CPUs but only {free_cpus:g} of the cluster's {cpus:g} are free now: "
                        f"lower --num-workers or --cpus-per-worker, {later}")
    if nodes_free is not None and least > (fit_now := sum(workers_per_node(bundle, nodes_free).values())):
        raise UserError(f"{what}: only {fit_now} fit on what the nodes have free now (each worker's "
                        f"{'CPUs and GPU' if use_gpu else 'CPUs'} on one node): lower --num-workers or "
                        f"--cpus-per-worker, {later}")
    s.use_gpu, s.num_workers = use_gpu, n
    return spec


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
    spec.storage_path = storage.normalise(spec.storage_path)
    if spec.keep_checkpoints < 1:
        raise UserError(f"--keep-checkpoints {spec.keep_checkpoints} must be at least 1")
    if spec.scaling.pg_timeout_s <= 0:
        raise UserError(f"--process-group-timeout {spec.scaling.pg_timeout_s:g} must be above 0 seconds")
    for flag, value in (("--resize-check", spec.scaling.resize_check_s), ("--restart-wait", spec.restart_wait_s),
                        ("--storage-wait", spec.storage_wait_s)):
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
    return spec, train_args, task


def checkpoint_args(model: str, given: dict[str, Any]) -> dict[str, Any]:
    """The arguments a checkpoint keeps for training, as `YOLO(model).train()` takes them: Ultralytics'
    `Model._reset_ckpt_args` of the checkpoint's model args (`imgsz`, `single_cls`; `task` is the model's own), less
    what the user gave and less `data` (Ultralytics' train() sets data itself). A model trained at 64 px fine-tunes
    at 64 px unless `imgsz=` says otherwise, as in Ultralytics."""
    from ultralytics.engine.model import Model

    args = getattr(_load_checkpoint_model(model), "args", None) or {}
    kept = Model._reset_ckpt_args(dict(args) if not isinstance(args, dict) else args)
    return {k: v for k, v in kept.items() if k not in ("data", "task") and k not in given}


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
                       single_cls=bool(train_args.get("single_cls")))
        else:
            train_args["data"] = str(Path(data).expanduser().resolve())
            found = check_data(train_args["data"], task, spec.allow_bad_labels, splits,
                               single_cls=bool(train_args.get("single_cls")))
            spec.data_root = found.root if found.cwd_relative else ""
    storage.check_writable(spec.run_dir)
    if spec.tracking.enabled:
        check_reachable(resolve_uri(spec), spec.tracking.experiment)
