"""Issue 39: one plan per run, resolved once the way Ultralytics resolves it, recorded with the run and compared on
every rerun with the same --name before Ray starts."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest

from conftest import NO_RAY, TASK_MODELS, TINY_ARGS, TINY_TRAIN
from raytrain_yolo.core.config import RunSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.core.errors import UserError


def tiny_checkpoint(path: Path, **train_args) -> Path:
    """A real Ultralytics checkpoint of an untrained YOLO26n whose training arguments are `train_args` (what
    Ultralytics' trainer stores in the model it saves)."""
    import torch
    from ultralytics import YOLO

    model = YOLO("yolo26n.yaml").model
    model.args = {"task": "detect", "data": "elsewhere/data.yaml", **train_args}
    torch.save({"model": model, "epoch": -1, "optimizer": None, "train_args": model.args}, path)
    return path


@pytest.mark.quick
def test_resume_allow_list_is_ultralytics_own():
    """RESUME_MAY_CHANGE is what BaseTrainer.check_resume lets a resume change: every key in its source, and no
    key of that set missing here."""
    from ultralytics.engine.trainer import BaseTrainer

    from raytrain_yolo.plan.rerun import RESUME_MAY_CHANGE

    source = inspect.getsource(BaseTrainer.check_resume)
    allowed = source.split("allowed = {", 1)[1].split("}", 1)[0]
    theirs = set(re.findall(r'^\s*"(\w+)"', allowed, flags=re.M))
    assert theirs == set(RESUME_MAY_CHANGE), (theirs ^ set(RESUME_MAY_CHANGE))


@pytest.mark.quick
def test_a_checkpoint_keeps_its_imgsz_as_in_ultralytics(tmp_path):
    """Fine-tuning a checkpoint trained at 64 px without imgsz= trains at 64 px in Ultralytics (Model._reset_ckpt_args
    keeps imgsz and single_cls; not lr0, not data); the user's imgsz= wins; a cfg= file replaces the checkpoint's
    arguments, as `YOLO(model).train(cfg=...)` does."""
    from ultralytics import YOLO

    from raytrain_yolo.plan.request import check_request

    ckpt = tiny_checkpoint(tmp_path / "good.pt", imgsz=64, single_cls=True, lr0=0.5)
    theirs = YOLO(str(ckpt)).overrides
    spec = RunSpec(train={"model": str(ckpt)}, tracking=TrackingSpec(enabled=False), storage_path=str(tmp_path))
    _, args, task = check_request(spec)
    assert task == "detect" and args["imgsz"] == theirs["imgsz"] == 64 and args["single_cls"] is True
    assert args.get("lr0") != 0.5 and "elsewhere" not in str(args.get("data"))
    _, args, _ = check_request(RunSpec(train={"model": str(ckpt), "imgsz": 96}, tracking=TrackingSpec(enabled=False)))
    assert args["imgsz"] == 96
    (tmp_path / "hyp.yaml").write_text("lr0: 0.03\n")
    _, args, _ = check_request(RunSpec(train={"model": str(ckpt), "cfg": str(tmp_path / "hyp.yaml")},
                                       tracking=TrackingSpec(enabled=False)))
    assert args["imgsz"] == 160 and args["lr0"] == 0.03  # the embedded data's default, not the checkpoint's


def recorded_run(tmp_path, **train) -> RunSpec:
    """The record an unfinished run leaves (its driver lost mid-run): plan.json, no summary."""
    from raytrain_yolo.plan.request import check_request
    from raytrain_yolo.plan.run_plan import RunPlan, write_record

    spec = RunSpec(train={"epochs": 6, "lr0": 0.01, "imgsz": 64, **train}, tracking=TrackingSpec(enabled=False),
                   synthetic=SyntheticSpec(train=8, val=4, imgsz=64), storage_path=str(tmp_path), name="r1")
    spec, args, task = check_request(spec)
    write_record(RunPlan(spec, args, task))
    assert json.loads((tmp_path / "r1" / "plan.json").read_text())["asked"]["train_args"]["lr0"] == 0.01
    return spec


@pytest.mark.quick
def test_a_rerun_of_an_unfinished_run_with_other_arguments_is_refused_before_ray(tmp_path, capfd, monkeypatch):
    """The driver was lost; the same --name again with epochs=10 lr0=0.02 would have resumed epochs=6 lr0=0.01 and
    exited 0. Refused in one line naming each key with both values, before Ray (RAY_ADDRESS answers nothing)."""
    from conftest import refused_in_process

    recorded_run(tmp_path)
    argv = ["--cpu", "--num-workers", "2", "--storage-path", str(tmp_path), "--name", "r1", "--no-tracking",
            "--synthetic-train", "8", "--synthetic-val", "4", "--synthetic-size", "64", "imgsz=64",
            "epochs=10", "lr0=0.02"]
    line = refused_in_process("fit", argv, capfd, monkeypatch)
    assert "epochs 6 -> 10" in line and "lr0 0.01 -> 0.02" in line and "--name" in line, line


@pytest.mark.quick
def test_a_resume_takes_what_ultralytics_resume_may_change_and_says_so(tmp_path):
    from raytrain_yolo.plan.request import check_request
    from raytrain_yolo.plan import RunPlan, rerun

    spec = recorded_run(tmp_path)
    spec.train["imgsz"] = 96
    spec, args, task = check_request(spec)
    finished, taken = rerun.decide(spec.run_dir, spec.name, RunPlan(spec, args, task).record()["asked"], None)
    assert finished is None and len(taken) == 1 and "imgsz=96" in taken[0] and "imgsz=64" in taken[0], taken


def test_a_finished_run_rerun_returns_its_summary_without_ray(task_run, capfd, monkeypatch):
    """The finished run's command again: its summary at once, no Ray (RAY_ADDRESS answers nothing), no new MLflow
    run or model version (none is started); the same with another lr0 is refused naming it."""
    from raytrain_yolo import fit

    _, s = task_run("detect")
    storage = str(Path(s["ray_result_path"]).parent)
    monkeypatch.setenv("RAY_ADDRESS", NO_RAY)
    args = ["--cpu", "--num-workers", "2", "--storage-path", storage, "--name", "detect", "--no-tracking",
            "--synthetic-train", str(TINY_TRAIN["train"]), "--synthetic-val", str(TINY_TRAIN["val"]),
            "--synthetic-size", str(TINY_TRAIN["imgsz"]), f"model={TASK_MODELS['detect']}", *TINY_ARGS]
    assert fit.main(args) == 0
    out = capfd.readouterr().out
    assert "finished already" in out and f"epochs                     {s['epochs_completed']} of" in out, out
    assert s["best_checkpoint"] in out
    assert fit.main([*args, "lr0=0.02"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr0 0.002 -> 0.02" in err[0], err
    record = json.loads((Path(storage) / "detect" / "plan.json").read_text())
    assert record["asked"]["train_args"]["lr0"] == 0.002 and record["asked"]["task"] == "detect"


def test_a_run_the_trainer_stopped_is_finished(tmp_path, capfd, monkeypatch):
    """time= (Ultralytics' own limit, hours) stops the run inside its first epoch of 2: console and summary say
    "stopped early at epoch 1 of 2", the final weights are stripped as Ultralytics strips them, the plan is in the
    checkpoint's state, and the same command again returns at once (no Ray) instead of training epoch 2."""
    import torch

    from conftest import run_cli

    args = ["--cpu", "--num-workers", "2", "--storage-path", tmp_path, "--name", "stop", "--no-tracking",
            "--no-validate-untrained", "--synthetic-train", TINY_TRAIN["train"], "--synthetic-val", TINY_TRAIN["val"],
            "--synthetic-size", TINY_TRAIN["imgsz"], *TINY_ARGS, "time=0.00001"]
    proc = run_cli("fit", *args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = json.loads((tmp_path / "stop" / "summary.json").read_text())
    assert s["stopped_early"]["epoch"] == s["epochs_completed"] == 1 and s["stopped_early"]["epochs"] == 2, s
    assert "time=" in s["stopped_early"]["reason"] and "stopped early at epoch 1 of 2" in proc.stdout
    ckpt = torch.load(s["last_checkpoint"], map_location="cpu", weights_only=False)
    assert ckpt.get("optimizer") is None, "the final last.pt keeps no optimizer state"
    state = json.loads((Path(s["last_checkpoint"]).parent / "raytrain_state.json").read_text())
    assert state["stopped_early"] == s["stopped_early"] and state["plan"]["asked"]["train_args"]["time"] == 0.00001
    again = run_cli("fit", *args, ray="none")
    assert again.returncode == 0 and "finished already" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
    assert "stopped early at epoch 1 of 2" in again.stdout


@pytest.mark.quick
def test_resume_of_a_plain_ultralytics_checkpoint_is_refused_with_fixes_that_apply(tmp_path, capfd, monkeypatch):
    """Issue 39: resume=True with model= a plain Ultralytics last.pt (or resume=last.pt) was told to "rerun the same
    command with the same --name", which no run of this tool has: the line names the three ways that apply."""
    from conftest import refused_in_process

    last = tiny_checkpoint(tmp_path / "last.pt", imgsz=64)
    for argv in ([f"model={last}", "resume=True"], [f"resume={last}"]):
        line = refused_in_process("fit", ["--storage-path", str(tmp_path), "--no-tracking", *argv], capfd, monkeypatch)
        assert f"yolo train resume model={last}" in line and f"pass model={last}" in line and "--name" in line, line
