"""What a `predict` source is: the images and videos Ultralytics' own predictor would read from it, and the files
in it that it would not, decided before any model is loaded.

- a local file, folder (its top level, as Ultralytics reads it), glob pattern (`dir/*.jpg`, `dir/**/*.jpg`),
  `.txt`/`.csv` list (a line that does not exist where the command runs is read relative to the list), or a Python
  list of those: Ultralytics' `LoadImagesAndVideos` lists it;
- an object-storage prefix, object, or a `.txt` list of object URIs (`s3://...`): listed with pyarrow, every
  level below the prefix (Ultralytics reads no object storage);
- webcams, streams (`rtsp://`, `rtmp://`, `tcp://`, `.streams`), screen captures (Ultralytics' `check_source`)
  and `http(s)://` URLs (nothing is downloaded) are refused in one line.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raytrain_yolo.core import storage
from raytrain_yolo.core.errors import UserError

FORMS = ("a folder of images or videos, an image, a video, a glob such as 'dir/*.jpg', a .txt list of paths or an "
         "s3:// prefix")


@dataclass(frozen=True)
class Source:
    """A resolved `source=`: `images` and `videos` as `fs` (a pyarrow filesystem) names them; `prefix` turns
    those names back into the user's paths (`s3://` for object storage, '' locally); `skipped`: the files of the
    source that are not predicted, each {"path", "reason"} (named on the console and in `_summary.json`)."""

    images: list[str]
    videos: list[str]
    fs: Any
    prefix: str
    skipped: list[dict[str, str]] = field(default_factory=list)


def resolve_source(source: str | list[str]) -> Source:
    """The source as Ultralytics' predictor reads it; UserError (one line, naming the source and the forms that
    are read) for what a batch job over files cannot read."""
    import pyarrow.fs as pafs

    if isinstance(source, (list, tuple)):
        if not source:
            raise UserError("source= is an empty list: give image paths")
        if storage.is_uri(str(source[0])):
            return _object_list([str(s) for s in source])
        return _local([str(s) for s in source], str(source[0]))
    src = str(source)
    refuse_live(src)
    if storage.is_uri(src):
        return _object_storage(src)
    if Path(src).suffix.lower() == ".txt" and Path(src).is_file():
        lines = [x.strip() for x in Path(src).read_text(encoding="utf-8-sig").splitlines() if x.strip()]
        if lines and storage.is_uri(lines[0]):
            return _object_list(lines)
    found = _local(src, src)
    return Source(found.images, found.videos, pafs.LocalFileSystem(), "", found.skipped)


def refuse_live(src: str) -> None:
    """Refuse, naming it, a source that is no set of files: what Ultralytics' `check_source` calls a webcam or
    stream, or a screenshot, and an http(s) URL (`check_source` would download it; nothing is downloaded here)."""
    low = src.lower()
    if low.startswith(("http://", "https://")):
        raise UserError(f"source={src} is a URL, and nothing is downloaded here: copy the files to a folder or to "
                        "object storage (s3://bucket/prefix) and pass that")
    from ultralytics.data.build import check_source

    if storage.is_uri(src) and not low.startswith(("rtsp://", "rtmp://", "tcp://")):
        return  # object storage: check_source has no word for it
    _, webcam, screenshot, *_ = check_source(src)
    if screenshot:
        raise UserError(f"source={src} is a screen capture, which a batch job cannot predict: pass {FORMS}, or use "
                        "YOLO(model).predict(source='screen') for live input")
    if webcam:
        raise UserError(f"source={src} is a webcam or a live stream, which a batch job cannot predict: pass {FORMS}, "
                        "or use YOLO(model).predict(source=..., stream=True) for live input")


def _local(source: str | list[str], named: str) -> Source:
    """Ultralytics' `LoadImagesAndVideos` listing (its file suffix rules, its folder depth, its .txt/.csv lists)."""
    import pyarrow.fs as pafs
    from ultralytics.data.loaders import LoadImagesAndVideos

    from raytrain_yolo.core.console import ultralytics_quiet

    try:
        with ultralytics_quiet():
            loader = LoadImagesAndVideos(source)
    except FileNotFoundError as e:
        text = str(e).strip().splitlines()[0]
        if text.endswith(" does not exist"):
            raise UserError(f"source={named} not found ({text.removesuffix(' does not exist')}): pass {FORMS}") from None
        raise UserError(f"source={named} holds no images or videos: pass {FORMS}") from None
    loader.close()
    images, videos = loader.files[: loader.ni], loader.files[loader.ni:]
    listed = set(loader.files)
    skipped = [{"path": p, "reason": "not an image or video file (Ultralytics' predictor does not read it)"}
               for p in _candidates(source) if p not in listed]
    return Source(images, videos, pafs.LocalFileSystem(), "", skipped)


def _candidates(source: str | list[str]) -> list[str]:
    """The files a folder or glob `source` holds at the depth Ultralytics reads it, whatever their kind."""
    if not isinstance(source, str):
        return []
    path = str(Path(source).absolute())
    if "*" in path:
        found = glob.glob(path, recursive=True)
    elif os.path.isdir(path):
        found = glob.glob(os.path.join(glob.escape(path), "*.*"))
    else:
        return []
    return sorted(f for f in found if os.path.isfile(f))


def _object_storage(src: str) -> Source:
    """An object-storage prefix (every object under it), one object, or a `.txt` object listing URIs or paths."""
    import pyarrow.fs as pafs

    fs, root = pafs.FileSystem.from_uri(src)
    prefix = src.split("://", 1)[0] + "://"
    info = fs.get_file_info(root)
    if info.type == pafs.FileType.Directory:
        found = [f.path for f in fs.get_file_info(pafs.FileSelector(root, recursive=True)) if f.type == pafs.FileType.File]
        return _by_kind(sorted(found), fs, prefix, src)
    if info.type == pafs.FileType.File and root.lower().endswith(".txt"):
        with fs.open_input_stream(root) as f:
            lines = [x.strip() for x in f.read().decode().splitlines() if x.strip()]
        if not lines:
            raise UserError(f"source={src} lists no images: put one image path per line")
        return _object_list(lines) if storage.is_uri(lines[0]) else resolve_source(lines)
    if info.type == pafs.FileType.File:
        return _by_kind([root], fs, prefix, src)
    raise UserError(f"source={src} not found: pass {FORMS}")


def _object_list(uris: list[str]) -> Source:
    import pyarrow.fs as pafs

    fs, _ = pafs.FileSystem.from_uri(uris[0])
    prefix = uris[0].split("://", 1)[0] + "://"
    return _by_kind([u[len(prefix):] for u in uris], fs, prefix, uris[0])


def _by_kind(paths: list[str], fs, prefix: str, src: str) -> Source:
    """Objects sorted by Ultralytics' suffix rules: images are read, videos and anything else named as skipped
    (a video in object storage is not read frame by frame here: copy it to a folder)."""
    from ultralytics.data.utils import IMG_FORMATS, VID_FORMATS

    def suffix(p: str) -> str:
        name = p.rsplit("/", 1)[-1]
        return name.rsplit(".", 1)[-1].lower() if "." in name else ""

    images = [p for p in paths if suffix(p) in IMG_FORMATS]
    skipped = [{"path": prefix + p, "reason": "a video in object storage: copy it to a local or shared folder to "
                "predict its frames" if suffix(p) in VID_FORMATS else "not an image or video file"}
               for p in paths if suffix(p) not in IMG_FORMATS]
    if not images:
        raise UserError(f"source={src} holds no images ({', '.join(sorted(IMG_FORMATS))}): point it at a folder "
                        "of images")
    return Source(images, [], fs, prefix, skipped)
