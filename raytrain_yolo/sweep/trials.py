"""What both sweeps do with their trials' MLflow runs once Tune is done."""

from __future__ import annotations

import os
import signal
import threading

from raytrain_yolo.core.config import RunSpec


def fit_tuner(tuner, interrupted: str):
    """`tuner.fit()`'s results; raises KeyboardInterrupt(`interrupted`: what the user can do now) when Ctrl-C
    (SIGINT) interrupted the sweep: the sweep's MLflow run ends KILLED, nothing is ranked, the command exits 130.

    Tune catches the first SIGINT itself: it saves the experiment's state, stops the trials and returns them as if
    they had ended (an interrupted trial is TERMINATED with the epochs it reached). Ranked as such, the sweep wrote
    best.yaml from half-trained trials, ended its MLflow runs FINISHED, and the same command then resumed the
    sweep into new MLflow runs. Tune's handler puts back the handler it found once it fires: ours is installed
    first, so finding it in place afterwards means that Tune saw a SIGINT. (Where Tune installs no handler - not the
    main thread, TUNE_DISABLE_SIGINT_HANDLER - ours raises KeyboardInterrupt, Python's default.)"""
    if threading.current_thread() is not threading.main_thread():
        return tuner.fit()

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        results = tuner.fit()
        caught = signal.getsignal(signal.SIGINT) is interrupt and not int(os.getenv("TUNE_DISABLE_SIGINT_HANDLER", "0"))
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt(interrupted)
    return results


def close_trial_runs(spec: RunSpec, rows: list[dict], done: str) -> None:
    """Trials that Ray stopped or that failed could not end their own MLflow runs: end them, tagged with their row's
    status and reason. `done` is the status of a trial that ended by itself ("finished", "ok"): left alone. A trial
    that the scheduler stopped (ASHA, PBT) may have ended its run FAILED on the way out (its Train controller died
    with it): that run is FINISHED too, tagged `stopped early`; a failed trial's is FAILED."""
    from raytrain_yolo.core.tracking import end_open_run, resolve_uri

    uri = resolve_uri(spec)
    for r in rows:
        if r["status"] == done or not r.get("trial"):
            continue
        status = "FAILED" if r["status"] in ("failed", "out of memory") else "FINISHED"
        end_open_run(uri, spec.tracking.experiment, f"{spec.run_dir}/trials/{r['trial']}", status,
                     {"raytrain_yolo.status": r["status"], "raytrain_yolo.reason": r.get("reason") or ""},
                     ended=("RUNNING", "FAILED") if r["status"] == "stopped early" else ("RUNNING",))


def trial_name(trial) -> str:
    """Tune trial and folder name, and the name of the trial's Ray Train run and MLflow run key, in both sweeps
    (no '-': the accuracy sweep's exploited runs are `<trial>-e<epoch>-from-<donor>`)."""
    return f"trial_{trial.trial_id}"
