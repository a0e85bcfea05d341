"""`python -m raytrain_yolo.val`: validate a checkpoint on a dataset split, spread over Ray workers.

    python -m raytrain_yolo.val model=runs/raytrain/exp/checkpoint_.../best.pt data=/data/mydata/data.yaml
    python -m raytrain_yolo.val --num-workers 8 --gpu model=models:/shapes/3 data=... split=test --output m.json

Each worker (a Ray task) runs Ultralytics' own validator on a shard of Ultralytics' own batches; the driver's
validator merges their statistics and computes the metrics once with Ultralytics' metric code, so the result is
what `YOLO(model).val(...)` gives in one process (adapter.ShardValidatorMixin).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from contextlib import contextmanager
from typing import Any

from raytrain_yolo.core import storage
from raytrain_yolo.core.cli import OneLineParser, add_job_flags, run_main, stop_ray
from raytrain_yolo.core.config import ScalingSpec, parse_key_values, validate_train_args
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.plan.dataset import DataCheck, check_data, read_data_yaml
from raytrain_yolo.plan.job import JobPlan, Weights, plan

VAL_DEFAULTS = {"plots": False}  # plots need a font download; pass plots=True where the font is installed


def validate(model: str, data: str, split: str = "val", scaling: ScalingSpec | None = None,
             storage_path: str = "runs/raytrain", name: str | None = None, tracking_uri: str | None = None,
             wait_s: float = 0, allow_node_local: bool = False, **overrides: Any) -> dict[str, Any]:
    """Validate `model` on `split` of `data` over Ray workers; returns (and writes) the metrics as a dict."""
    import ray

    if data is None:
        raise UserError("no data= given: pass the data.yaml of the dataset to validate on")
    storage.refuse_credentials(data, "data=")
    overrides = validate_train_args({**VAL_DEFAULTS, **overrides, "split": split})
    data = str(storage.normalise(data)) if not storage.is_uri(data) else data

    if not storage.is_uri(data):
        read_data_yaml(data)  # the data.yaml first: a missing one is refused before the model loads
    found: dict[str, DataCheck] = {}

    def check(task: str, out_dir: str) -> tuple[dict[str, str], str]:
        found["data"] = check_data(data, task, splits=(split,), training=False,
                                             single_cls=bool(overrides.get("single_cls")))
        return {"data": data}, ""  # only the driver writes: the metrics

    job = plan(model, scaling or ScalingSpec(), storage_path, name, "val", tracking_uri, wait_s, check,
               allow_node_local=allow_node_local)

    from raytrain_yolo.train.adapter import sharded_validator, val_args

    args = val_args(job.model, {**overrides, "data": data, "project": job.out_dir, "name": "ultralytics",
                                "exist_ok": True})
    shard_fn = ray.remote(_validate_shard).options(**job.remote_options())
    root = found["data"].root if found["data"].cwd_relative else ""  # a relative path: as resolved here
    refs = [shard_fn.remote(job.weights, {**args, "device": job.device}, (i, job.num_workers), root)
            for i in range(job.num_workers)]
    results = ray.get(refs)
    with local_project(args) as merged_args:
        yolo, merger = sharded_validator(job.model, {**merged_args, "device": "cpu"}, None, results)
        stats = merger(model=yolo.model)
        outputs = publish_outputs(merger.save_dir, f"{job.out_dir}/ultralytics", merged_args)
    out = {**_report(job, data, split, merger, stats), "outputs": outputs}
    storage.write_text(f"{job.out_dir}/val.json", json.dumps(out, indent=2, default=float))
    return out


def _validate_shard(weights: Weights, args: dict, shard: tuple[int, int], data_root: str = "") -> dict:
    """One Ray worker: Ultralytics' validator over this shard's batches; returns the raw statistics. `data_root`:
    the dataset root the driver resolved, for a data.yaml whose relative path: depends on the working directory."""
    from raytrain_yolo.data.sync import pin_root
    from raytrain_yolo.train.adapter import sharded_validator

    if data_root:
        args = {**args, "data": pin_root(args["data"], data_root)}

    with local_project(args, always=True) as args:  # its save_txt/save_json files go back to the driver
        yolo, validator = sharded_validator(weights.local(), args, shard)
        validator(model=yolo.model)
        return validator.shard_result


def publish_outputs(save_dir, dest: str, args: dict) -> dict[str, Any]:
    """Where the merged validator's `save_json`/`save_txt` files are, as Ultralytics names them
    (`predictions.json`, `labels/<image>.txt`), copied to `dest` when the run's folder is object storage (the
    validator wrote them to a node-local folder)."""
    files = [f for f in [save_dir / "predictions.json", *sorted((save_dir / "labels").glob("*.txt"))] if f.is_file()]
    where = dest if storage.is_uri(dest) else str(save_dir)
    if storage.is_uri(dest):
        for f in files:
            storage.write_text(f"{dest}/{f.relative_to(save_dir).as_posix()}", f.read_text())
    json_file = save_dir / "predictions.json"
    return {"predictions_json": f"{where}/predictions.json" if json_file.is_file() else None,
            "labels": f"{where}/labels" if args.get("save_txt") else None,
            "label_files": sum(1 for f in files if f.suffix == ".txt")}


@contextmanager
def local_project(args: dict, always: bool = False):
    """`args` with Ultralytics' `project=` on this node: the run's folder when --storage-path is a local path, else
    (and `always`: a shard's own) a temporary folder removed at the end (Ultralytics makes `project` with pathlib,
    so an `s3://` URI became a folder literally named `s3:` in each worker's working directory)."""
    if not always and not storage.is_uri(str(args.get("project", ""))):
        yield args
        return
    folder = tempfile.mkdtemp(prefix="raytrain-yolo-val-")
    try:
        yield {**args, "project": folder}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _report(job: JobPlan, data: str, split: str, merger, stats: dict) -> dict[str, Any]:
    return {
        "model": job.model,
        "task": job.task,
        "data": data,
        "split": split,
        "workers": job.num_workers,
        "device": "cuda" if job.use_gpu else "cpu",
        "images": int(merger.seen),
        "instances": int(merger.metrics.nt_per_class.sum()) if merger.metrics.nt_per_class is not None else 0,
        # what YOLO(model).val() returns (its metrics' results_dict); what else the validator computed (save_json's
        # COCO metrics of the merged predictions, zeros where Ultralytics could not evaluate them) beside it
        "metrics": {k: float(v) for k, v in merger.metrics.results_dict.items()},
        "coco_metrics": {k: float(v) for k, v in stats.items() if k not in merger.metrics.results_dict},
        "speed_ms_per_image": {k: float(v) for k, v in merger.speed.items()},
        "output_dir": job.out_dir,
    }


EPILOG = """\
Ultralytics validation arguments go among the flags, in any order, in key=value form, as for `yolo val`:
  model=PATH.pt|models:/NAME/VERSION data=PATH/data.yaml split=val|test|train imgsz=640 batch=16 conf=0.001 iou=0.7
Defaults are those of Ultralytics' model.val() (imgsz from the checkpoint), except plots=False.
The metrics go to <storage-path>/<name>/val.json, and to --output FILE too when given.
"""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m raytrain_yolo.val", epilog=EPILOG,
                      description="Validate a YOLO checkpoint on a dataset split, sharded over Ray workers.",
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="model=, data=, split= and Ultralytics arguments")
    add_job_flags(p, "val")
    p.add_argument("--output", metavar="FILE", help="also write the metrics as JSON to FILE (a path or a URI)")
    return p


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)

    def body() -> int:
        kv = parse_key_values(ns.overrides)
        scaling = ScalingSpec(num_workers=ns.num_workers, use_gpu=ns.use_gpu, cpus_per_worker=ns.cpus_per_worker)
        out = validate(kv.pop("model", None), kv.pop("data", None), kv.pop("split", "val"), scaling, ns.storage_path,
                       ns.name, ns.tracking_uri, ns.wait_for_resources, ns.allow_node_local, **kv)
        stop_ray()
        text = json.dumps(out, indent=2, default=float)
        if ns.output:
            storage.write_text(storage.normalise(ns.output), text)
        print(f"metrics    {ns.output or out['output_dir'] + '/val.json'}", flush=True)
        return 0

    return run_main(body, ns.debug, job="val")


if __name__ == "__main__":
    sys.exit(main())
