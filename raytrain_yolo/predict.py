"""`python -m raytrain_yolo.predict`: batch prediction with Ray Data, results as Parquet.

    python -m raytrain_yolo.predict model=best.pt source=/data/images --output /data/preds
    python -m raytrain_yolo.predict --gpu --num-workers 8 model=models:/shapes/3 source=s3://bucket/images --output s3://bucket/preds

The pipeline: list the source as Ultralytics' predictor reads it (data/sources.py: a folder, an image or video, a
glob, a .txt list, or an object-storage prefix), read the images' bytes and decode them with Ultralytics' own
image reader, read the videos' frames as its loader does, letterbox both on CPU tasks (Ultralytics' own LetterBox),
run Ultralytics' predictor on a pool of model actors (one GPU each with --gpu), and write one Parquet row per
object with pyarrow. Ray Data streams the stages and shows their progress. Files that do not decode, and files of
the source that are no image or video, are skipped and named. From Python: `predict(model, source, output, ...)`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from raytrain_yolo.core import storage
from raytrain_yolo.core.cli import OneLineParser, add_job_flags, run_main, stop_ray
from raytrain_yolo.core.cluster import on_this_node
from raytrain_yolo.core.config import ScalingSpec, parse_key_values, validate_train_args
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.data.sources import FORMS, Source, resolve_source
from raytrain_yolo.plan.job import JobPlan, Weights, plan

LIGHT_CPUS = 0.1  # per read, letterbox and write task: light work that must fit beside the model actors
LIGHT_RESERVE = 0.5  # CPUs a CPU-only cluster keeps free of model actors, for those tasks
DEFAULT_BATCH = 16  # images per model call (Ultralytics' predict default is 1: one image per call)
SUMMARY = "_summary.json"  # beside the Parquet files; marks a folder as predict's own output
IN_PROGRESS = "_in_progress.json"  # written first, removed last: a predict that failed half-way left this folder
LABELS = "_labels"  # save_txt: Ultralytics' label files, beside the Parquet files (a leading _: Parquet readers skip it)
NAMED_UNREADABLE = 20  # unreadable files named on the console (all of them are in _summary.json)


def schema(task: str):
    import pyarrow as pa

    f32 = pa.list_(pa.float32())
    fields = [("image", pa.string()), ("frame", pa.int32()), ("class", pa.int32()), ("name", pa.string()),
              ("confidence", pa.float32()), ("box", f32)]
    fields += {"pose": [("keypoints", pa.list_(f32))], "segment": [("polygon", pa.list_(f32))],
               "obb": [("obb", f32), ("corners", pa.list_(f32))]}.get(task, [])
    return pa.schema(fields)


class Ledger:
    """A small actor the pipeline's tasks report to, so the driver can say what happened to every image: the files
    that did not decode, and per model call the images it ran and the rows it returned (keyed by the call's first
    image, so a call Ray retries is counted once)."""

    def __init__(self):
        self.unreadable: set[str] = set()
        self.calls: dict[str, tuple[int, int, int]] = {}

    def add_unreadable(self, paths: list[str]) -> None:
        self.unreadable.update(paths)

    def add_call(self, first: str, images: int, frames: int, rows: int) -> None:
        """One model call: `first` names its first image (or video frame, `path#frame`)."""
        self.calls[first] = (images, frames, rows)

    def report(self) -> dict[str, Any]:
        """{"unreadable": sorted paths, "images"/"frames": images and video frames the model ran, "rows": rows it
        returned}."""
        return {"unreadable": sorted(self.unreadable), "images": sum(c[0] for c in self.calls.values()),
                "frames": sum(c[1] for c in self.calls.values()), "rows": sum(c[2] for c in self.calls.values())}


def decode_letterbox(batch: dict[str, np.ndarray], letterbox: dict, prefix: str, read_flag: int,
                     ledger) -> dict[str, Any]:
    """CPU stage: file bytes -> the image Ultralytics' predictor reads from that file (BGR, or (H, W, 1) for a
    1-channel model) -> Ultralytics' letterbox. Files that do not decode are left out and reported to `ledger`."""
    import tempfile

    import ray

    from raytrain_yolo.train.adapter import letterbox as apply_letterbox, read_image

    images, shapes, paths, unreadable = [], [], [], []
    with tempfile.TemporaryDirectory(prefix="raytrain-yolo-read-") as tmp:
        for data, path in zip(batch["bytes"], batch["path"]):
            im = read_image(data, str(path), read_flag, tmp)
            if im is None:
                unreadable.append(prefix + str(path))
                continue
            images.append(im)
            shapes.append(im.shape[:2])
            paths.append(prefix + str(path))
    if unreadable:
        ray.get(ledger.add_unreadable.remote(unreadable))
    boxed = apply_letterbox(images, **letterbox)
    return _letterboxed(paths, [0] * len(paths), shapes, boxed)


def _letterboxed(paths: list[str], frames: list[int], shapes: list, boxed: list) -> dict[str, Any]:
    """A batch for the model stage: each image's user path, video frame (0 for an image), original size, pixels."""
    out = np.empty(len(boxed), dtype=object)
    out[:] = boxed
    return {"path": np.array(paths, dtype=str), "frame": np.array(frames, np.int64),
            "orig_hw": np.array(shapes, np.int64).reshape(-1, 2),
            "image": out if len({b.shape for b in boxed}) != 1 else np.stack(boxed)}


def video_frames(batch: dict[str, np.ndarray], letterbox: dict, read_flag: int, vid_stride: int, size: int,
                 ledger):
    """CPU stage, a generator: each video's frames as Ultralytics' `LoadImagesAndVideos` reads them (every
    `vid_stride`-th frame, numbered from 1, up to the frame count OpenCV reports over the stride; grayscale for a
    1-channel model), letterboxed, `size` frames at a time, never mixing two videos. A video that does not open is
    reported to `ledger` as unreadable."""
    import cv2
    import ray

    from raytrain_yolo.train.adapter import letterbox as apply_letterbox

    for path in map(str, batch["path"]):
        cap = cv2.VideoCapture(path)
        if not cap.isOpened():
            ray.get(ledger.add_unreadable.remote([path]))
            continue
        total, frame, buf = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) / vid_stride), 0, []
        try:
            while True:
                ok = all(cap.grab() for _ in range(vid_stride))
                ok, im = cap.retrieve() if ok else (False, None)
                if not ok or im is None:
                    break
                if read_flag == cv2.IMREAD_GRAYSCALE:
                    im = cv2.cvtColor(im, cv2.COLOR_BGR2GRAY)[..., None]
                frame += 1
                buf.append((frame, im))
                if len(buf) == size or frame == total:
                    yield _letterboxed([path] * len(buf), [f for f, _ in buf], [i.shape[:2] for _, i in buf],
                                       apply_letterbox([i for _, i in buf], **letterbox))
                    buf = []
                if frame == total:
                    break
            if buf:
                yield _letterboxed([path] * len(buf), [f for f, _ in buf], [i.shape[:2] for _, i in buf],
                                   apply_letterbox([i for _, i in buf], **letterbox))
        finally:
            cap.release()


class ModelActor:
    """Model stage: one Ultralytics predictor per actor; images grouped by letterboxed shape, one call per group."""

    def __init__(self, weights: Weights, args: dict, task: str, ledger, labels: dict | None = None):
        import tempfile

        import ray

        from raytrain_yolo.train.adapter import BatchPredictor

        self.predict, self.schema, self.ledger = BatchPredictor(weights.local(), args), schema(task), ledger
        # save_txt: where the label files go (<output>/_labels), each source file's Ultralytics stem (label_stems,
        # put in the object store once by the driver), and a scratch file for `Results.save_txt` to write.
        self.labels_dir = labels["dir"] if labels else None
        self.stems = ray.get(labels["stems"]) if labels else {}
        self.save_conf = bool(args.get("save_conf"))
        self.scratch = tempfile.TemporaryDirectory(prefix="raytrain-yolo-txt-") if labels else None

    def __call__(self, batch: dict[str, np.ndarray]):
        import pyarrow as pa
        import ray

        from raytrain_yolo.train.adapter import result_rows

        images, paths, hw, frames = batch["image"], batch["path"], batch["orig_hw"], batch["frame"]
        groups: dict[tuple, list[int]] = {}
        for i in range(len(paths)):
            groups.setdefault(tuple(images[i].shape), []).append(i)
        rows = []
        for idx in groups.values():
            results = self.predict([images[i] for i in idx], [str(paths[i]) for i in idx], [tuple(hw[i]) for i in idx])
            for i, r in zip(idx, results):
                frame = int(frames[i]) or None  # a video's frame number, from 1; None for an image
                rows += [{"image": r.path, "frame": frame, **row} for row in result_rows(r)]
                if self.labels_dir:
                    self._save_txt(r, frame)
        if len(paths):
            videos = int(np.count_nonzero(frames))
            first = f"{paths[0]}#{int(frames[0])}" if frames[0] else str(paths[0])
            ray.get(self.ledger.add_call.remote(first, len(paths) - videos, videos, len(rows)))
        return pa.Table.from_pylist(rows, schema=self.schema)

    def _save_txt(self, result, frame: int | None) -> None:
        """Ultralytics' `save_txt` file of one image or video frame (`Results.save_txt`: its lines, its name),
        written under `<output>/_labels/`; none for an image without objects, as Ultralytics writes none."""
        txt = Path(self.scratch.name) / "labels.txt"
        txt.unlink(missing_ok=True)  # save_txt appends
        result.save_txt(str(txt), save_conf=self.save_conf)
        if txt.is_file():
            stem = self.stems[result.path] + ("" if frame is None else f"_{frame}")
            storage.write_text(f"{self.labels_dir}/{stem}.txt", txt.read_text())


def label_stems(paths: list[str]) -> dict[str, str]:
    """The file stem Ultralytics' predictor gives each source file's `save_txt` labels, in its reading order (images,
    then videos): the file's stem, and `-2`, `-3`, ... for a stem already taken (`bus.jpg` and `bus.png`), as
    `BasePredictor.write_results` names them (a video's frames add `_<frame>`)."""
    stems: dict[str, str] = {}
    taken: set[str] = set()
    for path in paths:
        stem = base = Path(path).stem
        k = 1
        while stem in taken:
            k += 1
            stem = f"{base}-{k}"
        taken.add(stem)
        stems[path] = stem
    return stems


def _output_fs(out: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(out) if storage.is_uri(out) else (pafs.LocalFileSystem(), out)


def check_output(out: str) -> bool:
    """Whether `out` holds a previous predict's output (its _summary.json), which this run replaces. A folder that
    holds anything else is refused: predict never appends to, or deletes, files it did not write."""
    import pyarrow.fs as pafs

    fs, root = _output_fs(out)
    try:
        infos = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    except OSError:  # a file, or no permission: check_writable names the problem
        return False
    if not infos:
        return False
    if any(i.base_name in (SUMMARY, IN_PROGRESS) and i.type == pafs.FileType.File for i in infos):
        return True  # a finished predict's output, or one that failed half-way: this run replaces it
    names = ", ".join(sorted(i.base_name for i in infos)[:3])
    more = ", ..." if len(infos) > 3 else ""
    raise UserError(f"--output {out} already holds files that predict did not write ({names}{more}): choose a new "
                    "or empty folder")


def clear_output(out: str) -> None:
    """Delete a previous predict's files from `out` (check_output said they are its own)."""
    fs, root = _output_fs(out)
    fs.delete_dir_contents(root, missing_dir_ok=True)


def rows_written(out: str) -> int:
    """Rows in the Parquet files under `out`, from their footers (the files Ray Data wrote, read back)."""
    import pyarrow.dataset as pads

    fs, root = _output_fs(out)
    try:
        return pads.dataset(root, filesystem=fs, format="parquet").count_rows()
    except FileNotFoundError:  # no object anywhere: no file was written
        return 0


def warn_skipped(unreadable: list[str], skipped: list[dict[str, str]]) -> None:
    """Name on stderr the files that were not predicted: those that did not decode (as Ultralytics' predictor warns
    of each) and those of the source it does not read; all of them are in _summary.json."""
    for what, paths in (("unreadable file(s), as Ultralytics does", unreadable),
                        ("file(s) of the source that are no image or readable video",
                         [f"{s['path']} ({s['reason']})" for s in skipped])):
        if paths:
            shown = ", ".join(paths[:NAMED_UNREADABLE])
            more = f" and {len(paths) - NAMED_UNREADABLE} more" if len(paths) > NAMED_UNREADABLE else ""
            print(f"warning: skipped {len(paths)} {what}: {shown}{more} (listed in {SUMMARY})", file=sys.stderr,
                  flush=True)


def predict(model: str, source: str | list[str], output: str | None = None, scaling: ScalingSpec | None = None,
            storage_path: str = "runs/raytrain", name: str | None = None, tracking_uri: str | None = None,
            wait_s: float = 0, allow_node_local: bool = False, **overrides: Any) -> dict[str, Any]:
    """Predict every image and video frame of `source` (data.sources: the files Ultralytics' predictor reads) with
    Ray Data; Parquet files under `output`, one row per object (`frame`: the video frame, from 1; null for an
    image). Returns the summary `_summary.json` holds. The source and output are checked before the model loads."""
    import ray

    if source is None:
        raise UserError(f"no source= given: pass {FORMS}")
    overrides = validate_train_args(dict(overrides))
    batch = int(overrides.pop("batch", DEFAULT_BATCH))
    found: dict[str, Any] = {}

    def check(task: str | None, out_dir: str) -> tuple[dict[str, str], str]:
        storage.refuse_credentials(source, "source=")
        storage.refuse_credentials(output, "--output")
        out = output or f"{out_dir}/predictions"
        found["out"] = out = out if storage.is_uri(out) else storage.normalise(out)
        found["replace"] = check_output(out)
        storage.check_writable(out, "--output" if output else "--storage-path")
        found["source"] = src = resolve_source(source)
        paths = src.images + src.videos
        local = {"source": os.path.commonpath(paths) if len(paths) > 1 else paths[0]} if not src.prefix else {}
        return local, out  # the read and write tasks run on any node

    job = plan(model, scaling or ScalingSpec(), storage_path, name, "predict", tracking_uri, wait_s, check,
               allow_node_local=allow_node_local, check_first=True)
    out, src = found["out"], found["source"]
    if found["replace"]:
        clear_output(out)
    storage.write_text(f"{out}/{IN_PROGRESS}", json.dumps({"model": job.model, "source": str(source)}))
    start = time.perf_counter()
    ledger = ray.remote(Ledger).options(**on_this_node()).remote()  # a lost worker node must not take the count
    labels = {"dir": f"{out}/{LABELS}", "stems": ray.put(label_stems([src.prefix + p for p in src.images] +
                                                                       src.videos))} \
        if overrides.get("save_txt") else None
    _pipeline(job, src, overrides, batch, ledger, labels).write_parquet(out, ray_remote_args={"num_cpus": LIGHT_CPUS})
    seconds = time.perf_counter() - start
    seen = ray.get(ledger.report.remote())
    ray.kill(ledger)
    summary = _summary(job, source, src, seen, out, batch, seconds)
    check_accounted(summary, seen["rows"])
    warn_skipped(seen["unreadable"], src.skipped)
    storage.write_text(f"{out}/{SUMMARY}", json.dumps(summary, indent=2))
    storage.delete(f"{out}/{IN_PROGRESS}")
    return summary


def _pipeline(job: JobPlan, src: Source, overrides: dict, batch: int, ledger, labels: dict | None = None):
    """The Ray Data pipeline: images read and letterboxed, video frames read and letterboxed, on light CPU tasks;
    the model on `job.num_workers` actors."""
    import ray

    from raytrain_yolo.train.adapter import predict_args

    p = predict_args(job.model, {**overrides, "device": job.device})
    opts = job.remote_options()
    if not job.use_gpu:  # leave room for the letterbox tasks beside the model actors
        total = ray.cluster_resources().get("CPU", 0)
        opts["num_cpus"] = min(job.cpus_per_worker, max(0.1, (total - LIGHT_RESERVE) / job.num_workers))
    light = {"num_cpus": LIGHT_CPUS, "runtime_env": opts["runtime_env"]}
    parts = []
    if src.images:
        ds = ray.data.read_binary_files(src.images, include_paths=True, filesystem=src.fs, num_cpus=LIGHT_CPUS)
        parts.append(ds.map_batches(decode_letterbox, batch_size=batch, **light, fn_kwargs={
            "letterbox": p["letterbox"], "prefix": src.prefix, "read_flag": p["read_flag"], "ledger": ledger}))
    if src.videos:
        ds = ray.data.from_items([{"path": v} for v in src.videos])
        parts.append(ds.map_batches(video_frames, batch_size=1, **light, fn_kwargs={
            "letterbox": p["letterbox"], "read_flag": p["read_flag"], "size": batch, "ledger": ledger,
            "vid_stride": int(p["args"].get("vid_stride") or 1)}))
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    return ds.map_batches(ModelActor, fn_constructor_kwargs={"weights": job.weights, "args": p["args"],
                                                             "task": job.task, "ledger": ledger, "labels": labels},
                          batch_size=batch, concurrency=job.num_workers, num_cpus=opts["num_cpus"],
                          num_gpus=opts["num_gpus"], runtime_env=opts["runtime_env"])


def _summary(job: JobPlan, source, src: Source, seen: dict, out: str, batch: int, seconds: float) -> dict[str, Any]:
    """What `_summary.json` holds: what was listed, predicted, unreadable and skipped, and where the rows are."""
    videos = {src.prefix + v for v in src.videos}
    unreadable = [u for u in seen["unreadable"] if u not in videos]
    return {"model": job.model, "task": job.task,
            "source": source if isinstance(source, str) else f"{len(src.images) + len(src.videos)} paths",
            "images": len(src.images), "predicted": seen["images"], "unreadable_count": len(unreadable),
            "unreadable": unreadable, "videos": len(src.videos), "frames": seen["frames"],
            "unreadable_videos": sorted(videos & set(seen["unreadable"])),
            "skipped_count": len(src.skipped), "skipped": src.skipped,
            "rows": rows_written(out), "output": out, "workers": job.num_workers,
            "device": "cuda" if job.use_gpu else "cpu", "batch": batch, "seconds": seconds,
            "images_per_second": (seen["images"] + seen["frames"]) / seconds}


def check_accounted(summary: dict[str, Any], model_rows: int) -> None:
    """Every listed image was predicted or named unreadable, and the Parquet files hold every row the model returned;
    anything else is a bug here, never to be passed over."""
    lost = summary["images"] - summary["predicted"] - summary["unreadable_count"]
    if lost or summary["rows"] != model_rows:
        raise RuntimeError(f"predict lost data: {lost} of {summary['images']} images never reached the model, and the "
                           f"Parquet files under {summary['output']} hold {summary['rows']} rows of the {model_rows} "
                           "the model returned")


EPILOG = """\
Ultralytics prediction arguments go among the flags, in any order, in key=value form, as for `yolo predict`:
  model=PATH.pt|models:/NAME/VERSION source=DIR|IMAGE|VIDEO|'DIR/*.jpg'|LIST.txt|s3://bucket/prefix conf=0.25
  iou=0.7 imgsz=640 batch=16 (images per model call) max_det=300 classes=0,2 vid_stride=1
A folder is read at its top level, as Ultralytics reads it ('DIR/**/*.jpg' goes deeper); webcams, streams, screen
captures and http(s) URLs are refused (nothing is downloaded).
Rows: image, frame (a video's frame number from 1; empty for an image), class, name, confidence, box (x1 y1 x2 y2
in the image's pixels), and keypoints (pose: [x, y, conf]
per keypoint), polygon (segment: the mask outline's [x, y] points) or obb and corners (obb: x y w h angle, and
the 4 corners). Images without objects have no rows. The Parquet files go to --output DIR (default
<storage-path>/<name>/predictions), with _summary.json beside them; save_txt=True (save_conf=True) adds
Ultralytics' label files under _labels/ there.
"""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m raytrain_yolo.predict", epilog=EPILOG,
                      description="Run a YOLO model over many images with Ray Data; write the objects as Parquet.",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model=, source= and Ultralytics arguments")
    add_job_flags(p, "predict")
    p.add_argument("--output", metavar="DIR", help="folder or URI for the Parquet files")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)

    def body() -> int:
        kv = parse_key_values(ns.overrides)
        source = kv.pop("source", None)
        scaling = ScalingSpec(num_workers=ns.num_workers, use_gpu=ns.use_gpu, cpus_per_worker=ns.cpus_per_worker)
        s = predict(kv.pop("model", None), str(source) if source is not None else None, ns.output, scaling,
                    ns.storage_path, ns.name, ns.tracking_uri, ns.wait_for_resources, ns.allow_node_local, **kv)
        stop_ray()
        skipped = f", {s['unreadable_count']} unreadable skipped" if s["unreadable_count"] else ""
        skipped += f", {s['skipped_count']} other files skipped" if s["skipped_count"] else ""
        frames = f" and {s['frames']} frames of {s['videos']} videos" if s["videos"] else ""
        print(f"predicted  {s['predicted']} of {s['images']} images{frames}{skipped} on {s['workers']} x {s['device']} in "
              f"{s['seconds']:.1f} s ({s['images_per_second']:.1f} images/s)\nparquet    {s['rows']} rows in "
              f"{s['output']}", flush=True)
        return 0

    return run_main(body, ns.debug, job="predict")


if __name__ == "__main__":
    sys.exit(main())
