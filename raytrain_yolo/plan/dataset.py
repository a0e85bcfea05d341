"""The dataset check: a data.yaml and its splits as Ultralytics' own readers see them, every image/label pair through
Ultralytics' `verify_image_label`, refused in one line naming the file and the fix."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from raytrain_yolo.core.console import ultralytics_quiet
from raytrain_yolo.core.errors import UserError, ultralytics_says

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
               single_cls: bool = False, fraction: float = 1.0) -> DataCheck:
    """The data.yaml and its `splits` as Ultralytics sees them: `check_det_dataset` resolves the file (path:,
    names/nc, the split folders), then Ultralytics' own label scan checks every image/label pair of each split
    and writes (or reuses) the `labels/<split>.cache` its datasets read (`LabelScan`), so the workers and the next
    run do not scan again. `training`: the train split is the one Ultralytics builds with augmentation, where it
    requires labels, and of which it keeps `fraction` (the training argument)."""
    p = Path(data).expanduser()
    raw = _read_yaml(p, data)
    cfg = _ultralytics_dataset(p, data, raw, splits[-1])
    if task == "pose":
        _check_kpt_shape(cfg, data)
    found = DataCheck(cfg, str(Path(cfg["path"]).resolve()), _cwd_relative(raw))
    for key in splits:
        train = training and key == "train"
        found.splits[key] = _check_split(key, raw, found, task, data, allow_bad_labels, train, single_cls,
                                         fraction if train else 1.0)
    return found


def read_data_yaml(data: str) -> dict[str, Any]:
    """The data.yaml itself, read (not its images): the cheap first check, before any model is loaded."""
    return _read_yaml(Path(data).expanduser(), data)


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
        raise UserError(f"data={data}: {ultralytics_says(e, p)}: fix the data.yaml") from None
    except Exception as e:  # noqa: BLE001 - Ultralytics refuses with TypeError, SyntaxError, KeyError, ...
        raise UserError(f"data={data}: {ultralytics_says(e, p)}{_names_hint(raw)}: fix the data.yaml") from None


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


def label_scan(cfg: dict, task: str, single_cls: bool, augment: bool, fraction: float):
    """Ultralytics' own scan of a split, without the rest of a dataset: a `YOLODataset` that sets only what its
    scanning methods read, so that `get_img_files` lists the images (folders searched recursively, `.txt` lists,
    `fraction`), `_load_or_scan_cache` reads the `labels/<split>.cache` its datasets read (reused when its hash
    matches, else written by `cache_labels`, which runs `verify_image_label` on every pair), and `verify_labels`
    checks the label kinds (segment and OBB need a polygon per box). No image is decoded, no transform built."""
    from ultralytics.data.dataset import YOLODataset

    class LabelScan(YOLODataset):
        def __init__(self):  # noqa: D107 - YOLODataset's own would read every image's shape and build transforms
            self.data, self.single_cls, self.augment, self.prefix, self.fraction = cfg, single_cls, augment, "", fraction
            self.use_segments, self.use_keypoints, self.use_obb = task == "segment", task == "pose", task == "obb"

    return LabelScan()


def _scan(scan, folders: list[str], key: str, data: str) -> tuple[list[str], dict]:
    """(the image files, the cache: `labels` of the usable pairs, `results` (found, missing, empty, corrupt,
    total), `msgs`), as Ultralytics' dataset gets them, its progress bar and info lines kept off the console (its
    LOGGER above INFO also disables its TQDM); its refusals as one line."""
    with ultralytics_quiet():
        return _scan_loud(scan, folders, key, data)


def _scan_loud(scan, folders: list[str], key: str, data: str) -> tuple[list[str], dict]:
    try:
        scan.im_files = scan.get_img_files(folders)
    except FileNotFoundError:
        raise UserError(f"no images in {', '.join(folders)} ({key}: of data={data}): put .jpg/.png files there "
                        f"or fix {key}: in the data.yaml") from None
    label_files = scan.get_label_files()
    cache, _ = scan._load_or_scan_cache(Path(label_files[0]).parent.with_suffix(".cache"), scan.get_cache_hash())
    return scan.im_files, cache


def _check_split(key: str, raw: dict, found: DataCheck, task: str, data: str, allow_bad_labels: bool,
                 augment: bool, single_cls: bool, fraction: float = 1.0) -> SplitCheck:
    """One split through Ultralytics' label scan (label_scan), refused as Ultralytics would refuse it (no image
    left, no label found for training, boxes where polygons are needed); corrupt pairs refused unless
    allow_bad_labels."""
    cfg = found.data
    folders = cfg[key] if isinstance(cfg[key], list) else [cfg[key]]
    for folder in folders:
        if not Path(folder).exists():
            raise UserError(_missing_split(key, raw, Path(folder), Path(found.root), data))
    scan = label_scan(cfg, task, single_cls, augment, fraction)
    try:
        im_files, cache = _scan(scan, folders, key, data)
    except ValueError:  # cache_labels: "No labels found" in a split Ultralytics trains on
        raise UserError(_no_labels(key, scan.im_files, data)) from None
    kept = cache["labels"]
    nf, nm, ne, nc, _ = cache["results"]
    corrupt = [(m.split(": ignoring corrupt image/label: ", 1)[0], _reason(m)) for m in cache["msgs"]
               if "ignoring corrupt image/label: " in m]
    if not kept:
        raise UserError(f"Ultralytics finds no usable image in {key}: of data={data} ({len(corrupt)} corrupt, "
                        f"e.g. {corrupt[0][0]}: {corrupt[0][1]}): fix the images and their labels")
    if corrupt and not allow_bad_labels:
        im, why = corrupt[0]
        raise UserError(f"{im} with labels {_label_file(im)}: Ultralytics would skip this image ({why}): fix the "
                        f"file, or pass --allow-bad-labels to skip such images as Ultralytics does "
                        f"({len(corrupt)} in {key}:)")
    try:
        scan.verify_labels(kept, Path(f"{key}.cache"))
    except ValueError as e:
        raise UserError(f"{key}: of data={data}: {ultralytics_says(e)}: use a {task} dataset or a detect "
                        "model") from None
    out = SplitCheck(len(kept), nf, sum(len(lb["cls"]) for lb in kept), sum(len(lb["cls"]) == 0 for lb in kept),
                     [f"{im}: {why}" for im, why in corrupt])
    if corrupt:
        print(f"labels     {key}: {len(corrupt)} of {len(im_files)} image/label pairs skipped, as Ultralytics "
              f"does (--allow-bad-labels), e.g. {out.skipped[0]}", flush=True)
    elif nf == 0:
        print(f"labels     {key}: no label files for its {len(im_files)} images (Ultralytics reads them as "
              f"backgrounds, e.g. {_label_file(im_files[0])} for {Path(im_files[0]).name})", flush=True)
    return out


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
