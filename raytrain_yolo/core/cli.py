"""Shared command-line pieces: the Ray/run flags, building a RunSpec from them, one-line errors."""

from __future__ import annotations

import argparse
import os
import re
import sys
import traceback
from typing import Any, Callable

from raytrain_yolo.core.config import RunSpec, absolute_paths, load_config_file, parse_key_values
from raytrain_yolo.core.errors import UserError
from raytrain_yolo.core.storage import redact

ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")  # terminal colours and cursor moves (Ultralytics colours its log)


def plain(text: str) -> str:
    """Text for an `error:` line: credentials redacted, terminal escape codes removed (an error raised inside a
    worker often carries Ultralytics' colour codes, which a log file or CI page shows raw)."""
    return ANSI_ESCAPE.sub("", redact(text))


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line naming the fix, exit status 2, and flags and key=value
    arguments may come in any order, as in Ultralytics' own CLI (`--cpu model=x.pt --name r epochs=1`)."""

    def parse_args(self, args=None, namespace=None):  # noqa: D401
        """Every job parses intermixed: plain argparse stops collecting key=value pairs at the first flag after
        them, and refuses a second block ("unrecognized arguments: epochs=1")."""
        return self.parse_intermixed_args(args, namespace)

    def error(self, message: str):  # noqa: D401
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        raise SystemExit(2)


def add_run_flags(p: argparse.ArgumentParser, sweep: bool = False) -> None:
    """The flags of a training job (fit, and tune with `sweep`: --num-workers is then a list of counts)."""
    _ray_flags(p, sweep)
    _tracking_flags(p)
    _synthetic_flags(p)
    p.add_argument("--allow-bad-labels", action="store_true",
                   help="train even if some label lines are malformed (Ultralytics skips those images)")
    p.add_argument("--config", help="YAML file: flat Ultralytics keys and/or sections train:, scaling:, tracking:, ...")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
    p.add_argument("--verbose", action="store_true",
                   help="show the full Ultralytics and Ray worker logs on the console too (they always go to the run's log file)")


def _ray_flags(p: argparse.ArgumentParser, sweep: bool) -> None:
    ray_g = p.add_argument_group("Ray (where and on how many workers)")
    if sweep:
        ray_g.add_argument("--num-workers", type=int_list, help="Ray Train workers per trial, e.g. 1,2 (a swept knob)")
    else:
        ray_g.add_argument("--num-workers", type=worker_range, help="Ray Train workers (DDP ranks); default: one per GPU, "
                           "else 2. MIN-MAX is elastic: training goes on with fewer workers and grows back; the "
                           "global batch stays fixed, so it must divide by every count in the range")
    dev = ray_g.add_mutually_exclusive_group()
    dev.add_argument("--gpu", dest="use_gpu", action="store_const", const=True, help="one GPU per worker (NCCL)")
    dev.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="CPU workers (gloo)")
    if not sweep:  # tune has --loader among its knobs
        ray_g.add_argument("--loader", help="ultralytics (default: Ultralytics' CPU dataloader) or device (augment each "
                           "batch on the GPU, the images held decoded there when they fit, else as JPEG bytes "
                           "decoded per batch; detect task); device-decoded, device-jpeg or device-stream name the "
                           "store")
        ray_g.add_argument("--prefetch", action="store_true", default=None,
                           help="with --loader device: build the next batch while this one trains (a thread, and a "
                           "side CUDA stream on GPUs)")
    ray_g.add_argument("--cpus-per-worker", type=float, help="CPUs Ray reserves per worker (default 1)")
    ray_g.add_argument(
        "--storage-path",
        help="where checkpoints, summary.json and Ultralytics' run folder go (default ./runs/raytrain); "
        "on a multi-node cluster it must be shared by all nodes: a cloud URI (s3://, gs://) or a shared filesystem",
    )
    ray_g.add_argument("--name", help="run name, the folder under --storage-path (default fit-<timestamp>)")
    ray_g.add_argument("--max-failures", type=int, help="worker-group restarts from the last checkpoint (default 0); "
                       "rerunning the same command with the same --name resumes a run whose driver died")
    ray_g.add_argument("--wait-for-resources", type=float, metavar="SECONDS",
                       help="wait this long for an autoscaling cluster to have the workers' CPUs/GPUs "
                       "(default 0: a request the cluster cannot meet fails at once)")
    ray_g.add_argument("--restart-wait", type=float, metavar="SECONDS",
                       help="with --max-failures: how long each restart waits for its workers to be placed again, "
                       "e.g. while an autoscaler replaces a lost node (default 600; 0: not at all)")
    ray_g.add_argument("--hang-timeout", type=float, metavar="SECONDS",
                       help="when no rank has progressed for this long, name the rank that stopped, write every "
                       "rank's Python stack under the run's folder and end the worker group (restarted under "
                       "--max-failures); default the larger of 600 and 5x the longest step, validation batch or "
                       "checkpoint upload seen; 0: off (the process-group timeout stays the last guard)")
    ray_g.add_argument("--storage-wait", type=float, metavar="SECONDS",
                       help="with an s3:// --storage-path: how long an upload keeps retrying while the endpoint "
                       "does not answer (a restart, a network cut) before the run fails (default 120)")
    ray_g.add_argument("--process-group-timeout", type=float, metavar="SECONDS",
                       help="how long ranks wait for each other in a collective, e.g. while rank 0 builds the label "
                       "cache of a large dataset (default 10800, Ultralytics' 3 hours)")
    ray_g.add_argument("--resize-check", type=float, metavar="SECONDS",
                       help="with --num-workers MIN-MAX: how often Ray Train checks whether more workers fit, to "
                       "grow the worker group back from the latest checkpoint (default 60)")
    ray_g.add_argument("--allow-node-local", action="store_true",
                       help="on a multi-node cluster, skip the check that every node sees --storage-path, a "
                       "file-based tracking store and data= (for paths that only look node-local)")
    ray_g.add_argument("--keep-checkpoints", type=int, help="checkpoints kept: the best N by fitness plus the latest (default 2)")


def _tracking_flags(p: argparse.ArgumentParser) -> None:
    trk = p.add_argument_group("MLflow tracking")
    trk.add_argument("--tracking-uri", help="MLflow tracking URI (default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    trk.add_argument("--experiment", help="MLflow experiment name (default $MLFLOW_EXPERIMENT_NAME, else raytrain_yolo)")
    trk.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    trk.add_argument("--register-model", metavar="NAME", help="register best.pt in the MLflow model registry")


def _synthetic_flags(p: argparse.ArgumentParser) -> None:
    syn = p.add_argument_group("embedded synthetic dataset (used when no data= is given)")
    syn.add_argument("--synthetic-train", type=int, help="training images (default 256)")
    syn.add_argument("--synthetic-val", type=int, help="validation images (default 64)")
    syn.add_argument("--synthetic-size", type=int, help="image side in pixels (default 160)")
    syn.add_argument("--synthetic-seed", type=int, help="generator seed (default 0)")


def worker_range(text: str) -> tuple[int | None, int]:
    """'4' -> (None, 4); '2-4' -> (2, 4)."""
    lo, sep, hi = text.partition("-")
    try:
        return (int(lo), int(hi)) if sep else (None, int(lo))
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of workers (N) or a range (MIN-MAX)") from None


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a comma-separated list of whole numbers, e.g. 16,32") from None


def str_list(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def bool_list(values: list[str] | None) -> list[bool] | None:
    """A knob's "true,false" values as booleans; one line naming the bad value otherwise."""
    if values is None:
        return None
    out = []
    for v in values:
        low = str(v).lower()
        if low not in ("true", "false"):
            raise UserError(f"'{v}' is not true or false")
        out.append(low == "true")
    return out


def spec_from_args(ns: argparse.Namespace, pairs: list[str]) -> RunSpec:
    """Embedded defaults < --config file < flags and key=value pairs."""
    base: dict[str, Any] = load_config_file(ns.config) if ns.config else {}
    try:
        spec = RunSpec.from_dict(base)
    except UserError as e:
        raise UserError(f"--config {ns.config}: {e}") from None
    spec.train = absolute_paths({**spec.train, **parse_key_values(pairs)})  # a --config file's paths too
    flags = {
        ("scaling", "min_workers"): ns.num_workers[0] if isinstance(ns.num_workers, tuple) else None,
        ("scaling", "num_workers"): ns.num_workers[1] if isinstance(ns.num_workers, tuple) else None,
        ("scaling", "use_gpu"): ns.use_gpu,
        ("scaling", "cpus_per_worker"): ns.cpus_per_worker,
        ("scaling", "pg_timeout_s"): ns.process_group_timeout,
        ("scaling", "resize_check_s"): ns.resize_check,
        ("tracking", "uri"): ns.tracking_uri,
        # As Ultralytics' MLflow integration chooses it: the flag, else MLFLOW_EXPERIMENT_NAME (platforms set it).
        ("tracking", "experiment"): ns.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME"),
        ("tracking", "register_model"): ns.register_model,
        ("synthetic", "train"): ns.synthetic_train,
        ("synthetic", "val"): ns.synthetic_val,
        ("synthetic", "imgsz"): ns.synthetic_size,
        ("synthetic", "seed"): ns.synthetic_seed,
        (None, "storage_path"): ns.storage_path,
        (None, "name"): ns.name,
        (None, "max_failures"): ns.max_failures,
        (None, "keep_checkpoints"): ns.keep_checkpoints,
        (None, "resource_wait_s"): ns.wait_for_resources,
        (None, "restart_wait_s"): getattr(ns, "restart_wait", None),
        (None, "hang_timeout_s"): getattr(ns, "hang_timeout", None),
        (None, "storage_wait_s"): getattr(ns, "storage_wait", None),
        (None, "loader"): ns.loader if isinstance(ns.loader, str) else None,  # a list is a tune knob
        (None, "prefetch"): ns.prefetch if isinstance(getattr(ns, "prefetch", None), bool) else None,
    }
    for (section, key), value in flags.items():
        if value is not None:
            setattr(getattr(spec, section) if section else spec, key, value)
    if ns.no_tracking:
        spec.tracking.enabled = False
    if ns.allow_bad_labels:
        spec.allow_bad_labels = True
    if ns.allow_node_local:
        spec.allow_node_local = True
    if ns.verbose:
        spec.verbose = True
    else:  # MLflow's own INFO lines (creating the database tables, ...) are not for this console
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    return spec


def stop_ray() -> None:
    """Shut down the Ray this process started or joined, so its log stream ends before our last line."""
    import ray

    if ray.is_initialized():
        ray.shutdown()


def hide_credentials() -> None:
    """Mask the URI credentials in this process's command line (`ps`, /proc/PID/cmdline), as database clients mask
    a password given as an argument. Ray records a driver's command line as its job's entrypoint (its job table,
    the dashboard, the exported events on disk), where `--tracking-uri http://user:PASSWORD@host` would be kept."""
    if all(redact(a) == a for a in sys.argv[1:]):
        return
    from subprocess import list2cmdline

    import psutil
    import ray._raylet

    ray._raylet.setproctitle(list2cmdline([redact(a) for a in psutil.Process().cmdline()]))


def run_main(body: Callable[[], int], debug: bool, job: str = "training") -> int:
    """Run a CLI body: user mistakes are one line and exit 2; a failed job is one line naming it (`job`:
    "training", "val", "predict", "sweep") and exit 1. URI credentials in the command line are masked in the
    process's title first (hide_credentials)."""
    hide_credentials()
    try:
        return body()
    except UserError as e:
        stop_ray()
        if debug:
            traceback.print_exc()
        print(f"error: {plain(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        stop_ray()
        print(f"interrupted: {e}" if str(e) else "interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # training failures from Ray, bugs: one line unless --debug
        stop_ray()
        if debug or os.environ.get("RAYTRAIN_YOLO_DEBUG"):
            traceback.print_exc()
        elif any(c.__name__ == "TrainingFailedError" for c in type(e).__mro__):
            print(redact(str(e).rstrip()), file=sys.stderr)  # the workers' own tracebacks (Ray Train gathers them)
        print(f"error: {job} failed: {plain(root_cause(e))} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1


def root_cause(e: BaseException) -> str:
    """The innermost error's first line: Ray wraps a worker's exception several times."""
    seen = e
    while True:
        nxt = seen.__cause__ or getattr(seen, "cause", None)
        if nxt is None or nxt is seen:
            break
        seen = nxt
    text = str(seen).strip().splitlines()
    line = text[-1] if text else ""
    if len(line) > 200 and ". " in line:  # Ray's messages run on with advice; keep the first sentence
        line = line[: line.index(". ") + 1]
    return f"{type(seen).__name__}: {line}".rstrip(": ")


def print_sweep(table: str, paths: dict[str, str], best, none_left: str) -> int:
    """A sweep's table and output files; exit status 1 when no trial made it (`none_left` says what)."""
    print(table)
    for what, path in paths.items():
        print(f"{what:<8} {redact(path)}")
    if best is None:
        print(f"error: {plain(none_left)}; see the reasons above", file=sys.stderr)
        return 1
    return 0


def add_job_flags(p: argparse.ArgumentParser, default_name: str) -> None:
    """The flags val and predict share with fit, meaning the same things."""
    ray_g = p.add_argument_group("Ray (where and on how many workers)")
    ray_g.add_argument("--num-workers", type=int, help="Ray workers (default: one per GPU, else 2)")
    dev = ray_g.add_mutually_exclusive_group()
    dev.add_argument("--gpu", dest="use_gpu", action="store_const", const=True, help="one GPU per worker")
    dev.add_argument("--cpu", dest="use_gpu", action="store_const", const=False, help="CPU workers")
    ray_g.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs Ray reserves per worker (default 1)")
    ray_g.add_argument("--storage-path", default="runs/raytrain", help="where outputs go (default ./runs/raytrain)")
    ray_g.add_argument("--name", help=f"run name, the folder under --storage-path (default {default_name}-<timestamp>)")
    ray_g.add_argument("--wait-for-resources", type=float, default=0, metavar="SECONDS",
                       help="wait this long for the cluster to have the workers' CPUs/GPUs (default 0)")
    ray_g.add_argument("--allow-node-local", action="store_true",
                       help="on a multi-node cluster, skip the check that every node sees model=, data=/source= "
                       "and the output folder (for paths that only look node-local)")
    p.add_argument("--tracking-uri", help="MLflow tracking URI, for model=models:/NAME/VERSION "
                   "(default $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory)")
    p.add_argument("--debug", action="store_true", help="show Python tracebacks")
