"""Typed run configuration: what the user asked for, validated before anything starts.

One `RunSpec` carries a whole job from the CLI (or a tune trial, or the benchmark) to every Ray Train worker.
It is plain data (dataclasses of builtins) so it crosses process boundaries as a dict.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytrain_yolo.core.errors import UserError

SYNTHETIC = "synthetic"  # the `data=` value that selects the embedded synthetic dataset

# The embedded default: small enough to learn visibly in a few minutes on two CPU cores, same code path as a
# real run. Applied only when the user names no dataset; a real dataset gets Ultralytics' own defaults.
EMBEDDED_TRAIN_DEFAULTS: dict[str, Any] = {
    "imgsz": 160,
    "epochs": 20,
    "batch": 16,
    "optimizer": "SGD",  # `auto` picks by run length; name one so short and long runs train alike
    "lr0": 0.01,
    "nbs": 16,  # nominal batch = batch: an optimizer step per batch (Ultralytics accumulates up to nbs=64)
    "warmup_epochs": 1,
    "plots": False,
    "seed": 0,
}
DEFAULT_MODEL = "yolo26n.yaml"  # built from scratch: no weights download

# Ultralytics keys that Ray decides, with the flag that replaces each.
RAY_OWNED_KEYS = {
    "device": "Ray places one worker per device: use --gpu/--cpu and --num-workers",
    "project": "outputs go under --storage-path/--name",
    "name": "use --name",
    "save_dir": "outputs go under --storage-path/--name",
    "resume": "rerun the same command with the same --name to resume",
}
AMP_MODES = ("fp16", "bf16", "fp32")
# device: augment batches on the training device, the images held decoded there when they fit, else compressed
# (train/loader.py); device-decoded, device-jpeg, device-stream name the store instead of letting it be chosen.
LOADERS = ("ultralytics", "device", "device-decoded", "device-jpeg", "device-stream")
CACHE_MODES = ("ram", "disk")


@dataclass
class SyntheticSpec:
    """Size of the generated dataset used when `data=synthetic` (the default)."""

    train: int = 256
    val: int = 64
    imgsz: int = 160
    seed: int = 0


@dataclass
class ScalingSpec:
    """How many Ray Train workers, on what. `None` means: decide from the cluster."""

    num_workers: int | None = None  # one per GPU when the cluster has GPUs, else 2 CPU workers
    min_workers: int | None = None  # elastic: keep training on as few as this many workers (Ray Train V2)
    use_gpu: bool | None = None
    cpus_per_worker: float = 1.0
    # Ultralytics' own 3 h, not torch's 30 min: ranks wait in a barrier while rank 0 builds the label cache
    # (or cache=ram) of a large dataset, which takes longer than 30 minutes on big datasets.
    pg_timeout_s: float = 10800
    resize_check_s: float = 60  # elastic: how often Ray Train looks for room to grow the worker group back

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"


@dataclass
class TrackingSpec:
    """MLflow tracking: on by default, to ./mlruns unless a URI is given."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "raytrain_yolo"
    register_model: str | None = None
    parent_run_id: str | None = None  # set for tune trials: each is a nested run under the sweep's run
    run_key: str | None = None  # what identifies the run across restarts (default: <storage>/<name>); an hpo
    # trial keeps one key over the Train runs PBT starts for it, so it stays one MLflow run


@dataclass
class RunSpec:
    """Everything one training job needs; validated once, on the driver."""

    train: dict[str, Any] = field(default_factory=dict)  # Ultralytics training arguments
    scaling: ScalingSpec = field(default_factory=ScalingSpec)
    synthetic: SyntheticSpec = field(default_factory=SyntheticSpec)
    tracking: TrackingSpec = field(default_factory=TrackingSpec)
    storage_path: str = "runs/raytrain"
    name: str = ""
    loader: str = "ultralytics"  # one of LOADERS; "device" runs augmentation on the training device
    prefetch: bool = False  # device loaders: build the next batch while this one trains (train/loader.py)
    max_failures: int = 0
    keep_checkpoints: int = 2  # the best N by fitness, plus always the latest
    resource_wait_s: float = 0  # >0: wait this long for an autoscaling cluster to have the resources
    # After a failure (with --max-failures), how long a fixed-size run waits for its worker group to be placed
    # again: a lost node replaced by an autoscaler or a spot pool takes minutes, not Ray Train's 60 s start timeout.
    restart_wait_s: float = 600
    # No rank progressing for this long is a hang (train/watchdog.py): named, every rank's stack written, the worker
    # group ended. None: the larger of 10 minutes and 5x the longest pause seen; 0: off.
    hang_timeout_s: float | None = None
    # How long a request to object storage (s3://) keeps retrying while the endpoint does not answer (a restart, a
    # redeploy, a network cut) before the upload fails and the run with it: pyarrow's own default gives up in ~2 s.
    storage_wait_s: float = 120
    allow_bad_labels: bool = False  # let Ultralytics skip images whose labels are malformed
    allow_node_local: bool = False  # skip the check that every node sees --storage-path, the tracking store, data=
    validate_untrained: bool | None = None  # None: only for the synthetic dataset
    trace_samples: bool = False  # record each rank's sample indices per epoch (debugging, tests)
    window_steps: int = 0  # >0: a throughput trial: report images/s every N steady steps instead of per epoch
    max_windows: int = 0  # >0: a throughput trial stops after this many windows
    resume_from: str = ""  # a Ray Train checkpoint to start from when the run has none of its own (PBT exploit)
    verbose: bool = False  # full Ultralytics and Ray worker logs on the console too (they always go to run.log)
    data_root: str = ""  # set by the plan (dataset check) when data.yaml's path: is relative: the root Ultralytics resolved on the
    # driver (from its working directory), which the workers train on wherever they run (data.sync.pin_root)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunSpec:
        d = dict(d)
        nested = {"scaling": ScalingSpec, "synthetic": SyntheticSpec, "tracking": TrackingSpec}
        for key, typ in nested.items():
            if isinstance(d.get(key), dict):
                d[key] = _build(typ, d[key], key)
        return _build(cls, d, "config")

    @property
    def is_synthetic(self) -> bool:
        return str(self.train.get("data", SYNTHETIC)) == SYNTHETIC

    @property
    def run_dir(self) -> str:
        return f"{self.storage_path.rstrip('/')}/{self.name}"


@dataclass(frozen=True)
class SearchDim:
    """One hyperparameter of an accuracy sweep: a range (uniform, or log-uniform), a list of choices, or fixed."""

    kind: str  # "range", "choice" or "fixed"
    values: tuple  # (min, max) | the choices | (value,)
    log: bool = False
    integer: bool = False  # the Ultralytics argument is a whole number (close_mosaic): sample integers


def _build(typ, values: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(typ)}
    unknown = [k for k in values if k not in names]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], names, n=1)
        raise UserError(
            f"unknown key '{unknown[0]}' in {where}"
            + (f"; did you mean '{hint[0]}'?" if hint else f"; allowed: {', '.join(sorted(names))}")
        )
    hints = typing.get_type_hints(typ)
    for key, value in values.items():
        _check_type(value, hints[key], f"{where}.{key}" if where != "config" else key)
    return typ(**values)


# What each type must look like in YAML, and how to write it.
_TYPE_WORDS = {
    int: ("a whole number", "e.g. {key}: 4, without quotes"),
    float: ("a number", "e.g. {key}: 0.5, without quotes"),
    bool: ("true or false", "write {key}: true or {key}: false, without quotes"),
    str: ("a string", "e.g. {key}: \"text\""),
    dict: ("a mapping", "indented key: value lines under {key}:"),
}
_TYPE_NAMES = {str: "a string", int: "a whole number", float: "a number", bool: "a boolean", list: "a list",
               dict: "a mapping", type(None): "empty"}


def _check_type(value: Any, hint: Any, where: str) -> None:
    """One line naming the key, what it holds and what it must hold: `num_workers: "4"` is refused when the
    config is read, not as a TypeError deep inside a run."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        allowed = [typing.get_origin(a) or a for a in typing.get_args(hint)]
    else:
        allowed = [typing.get_origin(hint) or hint]
    for a in allowed:
        if a is Any or (a is type(None) and value is None) or (dataclasses.is_dataclass(a) and isinstance(value, a)):
            return
        if isinstance(value, bool):
            if a is bool:
                return
        elif (a is float and isinstance(value, (int, float))) or (a in (int, str, dict, list) and isinstance(value, a)):
            return
    key = where.rsplit(".", 1)[-1]
    main = next(a for a in allowed if a is not type(None))
    must, how = _TYPE_WORDS.get(main, ("a section of key: value lines", "indented key: value lines under {key}:"))
    if type(None) in allowed:
        must += " (or null)"
    held = _TYPE_NAMES.get(type(value), type(value).__name__)
    raise UserError(f"{where}: {value!r} is {held}, it must be {must}: {how.format(key=key)}")


PATH_KEYS = ("data", "model", "cfg", "source", "distill_model")  # Ultralytics arguments that name a file or folder


def absolute_paths(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with every PATH_KEYS value that names an existing local path made absolute, once, on the driver: the
    workers (and Ray Tune's trials, each in a folder of its own; a job's entrypoint under `ray job submit`) run in
    other working directories. Names Ultralytics resolves itself (`yolo26n.yaml`), URIs and `synthetic` stay."""
    out = dict(args)
    for key in PATH_KEYS:
        value = out.get(key)
        if isinstance(value, str) and value and "://" not in value and Path(value).expanduser().exists():
            out[key] = str(Path(value).expanduser().resolve())
    return out


def parse_key_values(pairs: list[str]) -> dict[str, Any]:
    """Ultralytics' own `key=value` form, typed the way the `yolo` CLI types it; local paths made absolute
    (absolute_paths)."""
    from ultralytics.cfg import smart_value

    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise UserError(f"argument '{pair}' is not key=value: write Ultralytics arguments as e.g. batch=64")
        if not value:
            raise UserError(f"'{key}=' has no value: give one, e.g. {key}=...")
        out[key] = value if key in PATH_KEYS else smart_value(value)
    return absolute_paths(out)


def read_yaml_mapping(path: str, what: str, fix: str) -> dict[str, Any]:
    """A YAML file that must hold a mapping; `what` names it in the one-line errors ("config file 'x.yaml'"),
    `fix` says what to pass when it is missing."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"{what} not found: {fix}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{what} is not valid YAML ({_first_line(e)}): fix its syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"{what} must hold a mapping of keys to values, not {type(data).__name__}")
    return data


def load_config_file(path: str) -> dict[str, Any]:
    """A YAML file of RunSpec sections (`train:`, `scaling:`, ...) and/or flat Ultralytics keys."""
    data = read_yaml_mapping(path, f"config file '{path}'", "pass an existing YAML file to --config")
    sections = {f.name for f in dataclasses.fields(RunSpec)}
    flat = {k: data.pop(k) for k in list(data) if k not in sections}
    data.setdefault("train", {})
    if not isinstance(data["train"], dict):
        raise UserError(f"'train' in '{path}' must be a mapping of Ultralytics arguments")
    data["train"] = {**flat, **data["train"]}
    return data


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def default_name(prefix: str = "fit") -> str:
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def validate_train_args(train: dict[str, Any]) -> dict[str, Any]:
    """Check Ultralytics arguments with Ultralytics' own rules; one line per problem, naming the fix."""
    from ultralytics.cfg import DEFAULT_CFG_DICT, check_cfg

    if train.get("resume"):  # Ultralytics' resume=True / resume=last.pt
        raise UserError(_resume_refused(train["resume"], train.get("model")))
    for key, why in RAY_OWNED_KEYS.items():
        if key in train and not (key == "resume" and not train[key]):
            raise UserError(f"'{key}=' is not accepted here: {why}")
    unknown = [k for k in train if k not in DEFAULT_CFG_DICT]
    if unknown:
        hint = difflib.get_close_matches(unknown[0], list(DEFAULT_CFG_DICT), n=1)
        raise UserError(
            f"'{unknown[0]}' is not an Ultralytics training argument"
            + (f"; did you mean '{hint[0]}'?" if hint else "; see `yolo cfg` for the list")
        )
    args = dict(train)
    amp = args.get("amp")
    if isinstance(amp, str) and amp not in AMP_MODES:
        raise UserError(f"amp={amp} is not one of {', '.join(AMP_MODES)} (or True/False)")
    cache = args.get("cache")
    if isinstance(cache, str) and cache not in CACHE_MODES:
        raise UserError(f"cache={cache} is not one of ram, disk (or True/False)")
    try:
        check_cfg(args, hard=True)
    except (TypeError, ValueError) as e:
        raise UserError(_first_line(e).replace("'", "") + " (fix the value on the command line or in --config)") from None
    epochs = args.get("epochs")
    if epochs is not None and (not isinstance(epochs, int) or epochs < 1):
        raise UserError(f"epochs={epochs} must be a whole number of at least 1")
    return args


def _resume_refused(resume: Any, model: Any) -> str:
    """Ultralytics' `resume=` continues a run from its last.pt. A run here resumes by its --name (the same command
    again); a plain Ultralytics last.pt (trained outside Ray) has no Ray run to resume: it is continued by
    Ultralytics itself, or trained further here from its weights as a new run."""
    last = resume if isinstance(resume, str) else model if str(model or "").endswith(".pt") else "PATH/last.pt"
    return (f"resume={resume} is Ultralytics' resume, which Ray runs here do by --name: to continue a run of this "
            f"tool, rerun its command with the same --name; to continue a plain Ultralytics checkpoint, resume it "
            f"with Ultralytics (yolo train resume model={last}); to train on from its weights as a new run here, "
            f"drop resume= and pass model={last}")


def load_cfg_file(path: str) -> dict[str, Any]:
    """Ultralytics' `cfg=FILE`: a YAML of training arguments under the ones given with it, as `YOLO.train(cfg=...)`
    reads it (a copy of Ultralytics' default.yaml, edited, is the usual form). Keys at Ultralytics' default value
    change nothing and are dropped, so a full copy's `device: null` or `name: null` is no Ray-owned key.
    Relative paths are the working directory's, read once on the driver; the workers get the values."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    data = read_yaml_mapping(path, f"cfg={path}", "pass the path of a YAML of Ultralytics training arguments")
    return {k: v for k, v in data.items() if k != "cfg" and not (k in DEFAULT_CFG_DICT and DEFAULT_CFG_DICT[k] == v)}


def resolve_train_args(spec: RunSpec) -> dict[str, Any]:
    """The Ultralytics arguments the workers get: user's keys over a `cfg=` file's over the defaults that fit the
    dataset."""
    args = dict(spec.train)
    cfg = args.pop("cfg", None)
    if cfg:
        args = {**load_cfg_file(str(cfg)), **args}
    if spec.is_synthetic:
        args = {**EMBEDDED_TRAIN_DEFAULTS, **args}
    args.setdefault("model", DEFAULT_MODEL)
    from ultralytics.cfg import DEFAULT_CFG_DICT

    for key in ("batch", "epochs"):  # Ultralytics' defaults, made explicit: batch is split over workers
        args.setdefault(key, DEFAULT_CFG_DICT[key])
    return validate_train_args(args)


def check_batch(batch: Any, num_workers: int, min_workers: int | None = None) -> int:
    """The global batch is fixed and split evenly across however many workers run, so it must divide each."""
    for n in range(min_workers or num_workers, num_workers):
        check_batch(batch, n)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise UserError(
            f"batch={batch} must be a whole number under Ray (AutoBatch needs a single process): e.g. batch={16 * num_workers}"
        )
    if batch < num_workers or batch % num_workers:
        fix = max(num_workers, batch // num_workers * num_workers)
        raise UserError(
            f"batch={batch} must be a multiple of the {num_workers} workers (each gets batch/{num_workers}): use batch={fix}"
        )
    return batch


_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def check_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise UserError(f"--name '{name}' must be letters, digits, '.', '_' or '-': e.g. --name yolo26n-exp1")
    return name
