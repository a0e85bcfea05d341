"""`python -m raytrain_yolo.tune`: find the configuration that trains fastest here, in images/s.

    python -m raytrain_yolo.tune --batch 32,64,128 --workers 4,8 --amp fp16,bf16 --cache none,ram
    python -m raytrain_yolo.tune --objective map --trials 20 --num-workers 2 epochs=30 data=...   # best mAP (sweep/accuracy.py)
    python -m raytrain_yolo.tune --space experiments/tune-gpu.yaml data=/data/mydata/data.yaml
    python -m raytrain_yolo.fit --config runs/raytrain/<name>/best.yaml      # train with the winner
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

import yaml

from raytrain_yolo.core.cli import (OneLineParser, add_run_flags, bool_list, int_list, print_sweep, run_main,
                                    spec_from_args, stop_ray, str_list)
from raytrain_yolo.core.errors import UserError

EPILOG = """\
Each trial is a short real training run (same code path as fit) on your data (default: the embedded synthetic
set). images/s is measured in steady state over windows of --window-steps steps, after each epoch's warm-up,
counting images on all workers; ASHA stops trials that are slower than the others after --grace-windows.
Knobs not given keep the base configuration (key=value pairs, --config). Outputs under --storage-path/--name:
results.parquet, best.yaml (for fit --config), throughput.png, sweep.json.
"""


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="python -m raytrain_yolo.tune", description=__doc__.splitlines()[0].split(": ", 1)[1],
                      epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="base Ultralytics arguments (data=, model=, ...)")
    p.add_argument("--objective", choices=("throughput", "map"), default="throughput",
                   help="throughput (default): the fastest configuration; map: the hyperparameters that give the "
                   "best validation metric (each trial a full DDP training run of epochs=)")
    m = p.add_argument_group("accuracy sweep (--objective map; --space: Ultralytics' `key: [min, max]` form, "
                             "`key: {choices: [...]}`, fixed `key: value`; default: Ultralytics' own ranges)")
    m.add_argument("--trials", type=int, help="trials to run (default 10)")
    m.add_argument("--scheduler", choices=("asha", "pbt", "none"), help="asha (default): stop lagging trials; "
                   "pbt: restart them from a better trial's checkpoint with mutated values; none: run all")
    m.add_argument("--metric", help="what to maximise: fitness (default: Ultralytics' fitness, mAP50-95 for "
                   "detection) or a validation metric, e.g. mAP50")
    m.add_argument("--grace-epochs", type=int, help="ASHA: epochs every trial gets (default epochs/3, 1..10)")
    m.add_argument("--perturbation-epochs", type=int, help="PBT: epochs between exploits (default epochs/4)")
    g = p.add_argument_group("search space (comma-separated values; default: chosen for the hardware found)")
    g.add_argument("--space", help="YAML file with any of the knobs below and the budget keys")
    g.add_argument("--batch", type=int_list, help="global batch sizes, e.g. 32,64,128")
    g.add_argument("--workers", type=int_list, help="dataloader workers per training worker, e.g. 4,8")
    g.add_argument("--amp", type=str_list, help="fp16, bf16, fp32")
    g.add_argument("--cache", type=str_list, help="none, ram, disk")
    g.add_argument("--compile", type=str_list, help="e.g. false,true")
    g.add_argument("--channels-last", type=str_list, help="e.g. false,true")
    g.add_argument("--deterministic", type=str_list, help="e.g. true,false")
    g.add_argument("--loader", type=str_list, help="ultralytics, device, device-decoded, device-jpeg, device-stream "
                   "(see fit --help)")
    g.add_argument("--prefetch", type=str_list, help="device loaders: false,true (see fit --help)")
    b = p.add_argument_group("budget")
    b.add_argument("--window-steps", type=int, help="steady steps per measurement window (default 10)")
    b.add_argument("--windows", type=int, help="windows per trial (default 4)")
    b.add_argument("--grace-windows", type=int, help="windows before a trial may be stopped early (default 1)")
    b.add_argument("--no-early-stop", action="store_true", help="run every trial to its full budget")
    b.add_argument("--max-concurrent", type=int, help="trials at once (default: as many as the resources fit)")
    b.add_argument("--fresh-trials", action="store_true", help="each trial on a Ray Train run of its own (default: "
                   "trials of one worker count take turns on worker groups kept up for the sweep, which saves each "
                   "trial the group's start-up; an accuracy trial's checkpoints are then its Tune trial's)")
    add_run_flags(p, sweep=True)
    return p


def space_and_budget(ns):
    from raytrain_yolo.sweep.throughput import SweepBudget, SweepSpace

    raw = {}
    if ns.space:
        try:
            with open(ns.space) as f:
                raw = yaml.safe_load(f) or {}
        except OSError:
            raise UserError(f"--space file '{ns.space}' not found: pass an existing YAML file") from None
        except yaml.YAMLError:
            raise UserError(f"--space file '{ns.space}' is not valid YAML: fix its syntax") from None
    budget_keys = {f.name for f in dataclasses.fields(SweepBudget)}
    space_keys = {f.name for f in dataclasses.fields(SweepSpace)}
    unknown = set(raw) - budget_keys - space_keys
    if unknown:
        raise UserError(f"unknown key '{sorted(unknown)[0]}' in {ns.space}: use {', '.join(sorted(space_keys | budget_keys))}")
    space = SweepSpace(**{k: v for k, v in raw.items() if k in space_keys})
    budget = SweepBudget(**{k: v for k, v in raw.items() if k in budget_keys})
    flags = {"batch": ns.batch, "workers": ns.workers, "amp": ns.amp, "cache": ns.cache, "compile": bool_list(ns.compile),
             "channels_last": bool_list(ns.channels_last), "deterministic": bool_list(ns.deterministic),
             "num_workers": ns.num_workers, "loader": ns.loader, "prefetch": bool_list(ns.prefetch)}
    for k, v in flags.items():
        if v:
            setattr(space, k, v)
    for k in ("window_steps", "windows", "grace_windows", "max_concurrent"):
        if getattr(ns, k) is not None:
            setattr(budget, k, getattr(ns, k))
    if ns.no_early_stop:
        budget.early_stop = False
    if ns.fresh_trials:
        budget.warm = False
    for amp in space.amp:
        if amp not in ("fp16", "bf16", "fp32"):
            raise UserError(f"--amp value '{amp}' is not one of fp16, bf16, fp32")
    from raytrain_yolo.core.config import LOADERS

    for loader in space.loader:
        if loader not in LOADERS:
            raise UserError(f"--loader value '{loader}' is not one of {', '.join(LOADERS)}")
    for cache in space.cache:
        if str(cache).lower() not in ("none", "ram", "disk", "false"):
            raise UserError(f"--cache value '{cache}' is not one of none, ram, disk")
    if budget.window_steps < 1 or budget.windows < 1 or not 1 <= budget.grace_windows <= budget.windows:
        raise UserError("--window-steps and --windows must be >= 1, and 1 <= --grace-windows <= --windows")
    return space, budget


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    if ns.objective == "map":
        from raytrain_yolo.sweep import accuracy

        return run_main(lambda: accuracy.main(ns), ns.debug, job="sweep")
    for flag in ("trials", "scheduler", "metric", "grace_epochs", "perturbation_epochs"):
        if getattr(ns, flag) is not None:
            build_parser().error(f"--{flag.replace('_', '-')} belongs to the accuracy sweep: add --objective map")

    def body() -> int:
        from raytrain_yolo.sweep.throughput import format_table, run_sweep

        spec = spec_from_args(ns, ns.overrides)
        space, budget = space_and_budget(ns)
        result = run_sweep(spec, space, budget)
        stop_ray()
        knobs = [k for k in result.rows[0] if k not in ("trial", "windows", "images_per_second", "gpu_mem_gb",
                                                        "status", "reason")] if result.rows else []
        return print_sweep(format_table(result.rows, knobs), result.paths, result.best,
                           "no configuration finished its budget")

    return run_main(body, ns.debug, job="sweep")


if __name__ == "__main__":
    sys.exit(main())
