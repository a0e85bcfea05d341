"""`python -m raytrain_yolo.fit`: train YOLO26 on Ray Train workers.

    python -m raytrain_yolo.fit                                  # embedded default: synthetic shapes, yolo26n.yaml
    python -m raytrain_yolo.fit --num-workers 4 --gpu data=/data/coco8/data.yaml model=yolo26n.yaml epochs=50 batch=256
    RAY_ADDRESS=auto python -m raytrain_yolo.fit --storage-path s3://bucket/runs --name exp1 data=...
"""

from __future__ import annotations

import argparse
import sys

from raytrain_yolo.core.cli import OneLineParser, add_run_flags, plain, run_main, spec_from_args, stop_ray

EPILOG = """\
Ultralytics training arguments go among the flags, in any order, in Ultralytics' own key=value form, e.g.
  batch=64 imgsz=640 epochs=10 amp=bf16 workers=8 cache=ram data=path/to/data.yaml model=yolo26n.yaml
batch is the global batch, split evenly over the workers. device=, project= and name= are Ray's to decide.
Without data= the embedded synthetic dataset is generated (once, into ~/.cache/raytrain_yolo or
$RAYTRAIN_YOLO_CACHE) and trained with imgsz=160 epochs=20 batch=16 optimizer=SGD unless you override them.
RAY_ADDRESS, when set, names the cluster to join; otherwise a local Ray starts.
"""


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog="python -m raytrain_yolo.fit",
        description="Train an Ultralytics YOLO model with Ray Train (one DDP process per worker).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Ultralytics training arguments")
    add_run_flags(p)
    p.add_argument("--validate-untrained", action=argparse.BooleanOptionalAction, default=None,
                   help="validate the untrained model first, to show what training bought (default: on for the "
                   "embedded synthetic data only)")
    p.add_argument("--trace-samples", action="store_true", help="record each rank's sample indices per epoch")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    ns = p.parse_args(argv)

    def body() -> int:
        from raytrain_yolo.plan import prepare
        from raytrain_yolo.train.launch import format_summary, launch

        spec = spec_from_args(ns, ns.overrides)
        if ns.validate_untrained is not None:
            spec.validate_untrained = ns.validate_untrained
        spec.trace_samples = spec.trace_samples or ns.trace_samples
        plan = prepare(spec, argv=list(sys.argv[1:] if argv is None else argv))
        for line in plan.taken:
            print(line, flush=True)
        if plan.finished is not None:
            print(f"run {plan.spec.name} finished already with these arguments: its summary (nothing was started)",
                  flush=True)
        result = launch(plan, show_epochs=True)
        stop_ray()
        print(format_summary(result.summary, result.summary_path), flush=True)
        if result.summary.get("error"):
            print(f"error: training failed: {plain(result.summary['error'])}", file=sys.stderr)
            return 1
        return 0

    return run_main(body, ns.debug)


if __name__ == "__main__":
    sys.exit(main())
