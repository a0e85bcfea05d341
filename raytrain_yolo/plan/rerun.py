"""A rerun with the same `--name`: its request compared with the one recorded with the run, before Ray starts.

- the run finished (its summary says every epoch trained, or the trainer stopped it early) and nothing changed:
  nothing to train, the recorded summary is the answer (no Ray, no MLflow run, no model version);
- it did not finish: it resumes; what Ultralytics' resume may change (`RESUME_MAY_CHANGE`) is taken, with a line;
- anything else changed: refused in one line naming each key with both values and the ways forward. A finished
  run asked for more epochs is refused with the command that starts a new run from its weights (Ultralytics' resume
  cannot extend a finished schedule: its learning rate already decayed to `lrf`).
"""

from __future__ import annotations

import json
import shlex
from typing import Any

from raytrain_yolo.core import storage
from raytrain_yolo.core.errors import UserError

# Ultralytics' BaseTrainer.check_resume (8.4.190) lets a resume change these and ignores every other argument
# ("Resume ignores ..., using checkpoint values"). A test holds this set against that method's source.
RESUME_MAY_CHANGE = frozenset({"imgsz", "batch", "device", "close_mosaic", "augmentations", "save_period", "workers",
                               "cache", "patience", "time", "freeze", "val", "plots", "channels_last",
                               "distill_model", "save_dir"})


def summary_of(run_dir: str) -> dict[str, Any] | None:
    """The run's summary.json, when it has one that can be read."""
    try:
        text = storage.read_text(f"{run_dir}/summary.json")
        return json.loads(text) if text else None
    except (OSError, ValueError):
        return None


def is_finished(summary: dict[str, Any] | None) -> bool:
    """Every epoch trained, or the trainer stopped the run itself (patience=, time=): nothing left to train."""
    if not summary or summary.get("error") or not summary.get("last_checkpoint"):
        return False
    return bool(summary.get("stopped_early")) or summary.get("epochs_completed") == summary.get("epochs_requested")


def asked_before(record: dict[str, Any] | None, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the run was started with: its plan record, else (a run from before plans were kept) its summary."""
    if record:
        return record.get("asked")
    if summary and summary.get("train_args"):
        return {"train_args": summary["train_args"], "task": summary.get("task"), "loader": summary.get("loader")}
    return None


def _plain(value: Any) -> Any:
    return json.loads(storage.redact(json.dumps(value, default=str)))


def changes(before: dict[str, Any], now: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(key, before, now) for every Ultralytics argument and run setting that differs; settings `before` does not
    hold (an older record) are not compared. Values are compared as recorded: JSON, credentials masked."""
    before, now = _plain(before), _plain(now)
    out = []
    old_args, new_args = before.get("train_args") or {}, now.get("train_args") or {}
    for key in sorted(set(old_args) | set(new_args)):
        if old_args.get(key) != new_args.get(key):
            out.append((key, old_args.get(key, "(unset)"), new_args.get(key, "(unset)")))
    for key in ("task", "loader", "prefetch", "synthetic"):
        if key in before and before.get(key) != now.get(key):
            out.append((f"--{key}" if key in ("loader", "prefetch") else key, before.get(key), now.get(key)))
    return out


def _listed(items: list[tuple[str, Any, Any]]) -> str:
    return ", ".join(f"{k} {old} -> {new}" for k, old, new in items)


def decide(run_dir: str, name: str, asked: dict[str, Any], argv: list[str] | None
           ) -> tuple[dict[str, Any] | None, tuple[str, ...]]:
    """(the finished summary when there is nothing to train, the lines of changes a resume takes); raises
    UserError for a change the run cannot take. `asked` is RunPlan.record()["asked"]; `argv` this command's
    arguments (for the command a refusal suggests)."""
    from raytrain_yolo.plan.run_plan import read_record

    summary = summary_of(run_dir)
    before = asked_before(read_record(run_dir), summary)
    if before is None:
        return None, ()
    found = changes(before, asked)
    refused = [c for c in found if c[0] not in RESUME_MAY_CHANGE]
    taken = [c for c in found if c[0] in RESUME_MAY_CHANGE]
    if is_finished(summary):
        if refused and {c[0] for c in refused} == {"epochs"}:
            raise UserError(_more_epochs(summary, name, run_dir, refused[0], argv))
        if refused:
            raise UserError(f"run '{name}' in {run_dir} finished with other arguments ({_listed(refused)}): rerun "
                            f"it as it was to see its summary, or start a new run (a new --name; model= its "
                            f"last.pt to start from its weights)")
        lines = tuple(f"run '{name}' finished already: {k} {old} -> {new} not applied, nothing is left to train"
                      for k, old, new in taken)
        return summary, lines
    if refused:
        keys = ", ".join(sorted(RESUME_MAY_CHANGE - {"device", "save_dir"}))
        raise UserError(f"run '{name}' in {run_dir} was started with other arguments ({_listed(refused)}) and a "
                        f"resume keeps those (Ultralytics' resume may change only {keys}): pass the started values "
                        "to resume it, or use a new --name for a new run")
    return None, tuple(f"resume takes {k}={new} (the run was started with {k}={old}): Ultralytics' resume may "
                       "change it" for k, old, new in taken)


def _more_epochs(summary: dict[str, Any], name: str, run_dir: str, change: tuple, argv: list[str] | None) -> str:
    """The refusal of more epochs for a finished run, with the exact command that starts a new run from its
    weights: this command with a new --name and `model=` the finished run's last.pt."""
    _, trained, wanted = change
    args = [a for a in (argv or []) if not a.startswith("model=")]
    for i, a in enumerate(args):
        if a == "--name" and i + 1 < len(args):
            args[i + 1] = f"{name}-more"
        elif a.startswith("--name="):
            args[i] = f"--name={name}-more"
    if "--name" not in args and not any(a.startswith("--name=") for a in args):
        args += ["--name", f"{name}-more"]
    command = shlex.join(["python", "-m", "raytrain_yolo.fit", *args, f"model={summary['last_checkpoint']}"])
    storage_path = run_dir.rsplit("/", 1)[0]
    return (f"run '{name}' in {storage_path} finished its {trained} epochs and cannot be resumed to "
            f"epochs={wanted} (its learning rate already decayed on a {trained}-epoch schedule): start a new run "
            f"from its weights: {storage.redact(command)}")
