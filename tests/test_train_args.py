"""Issue 21, part 7: Ultralytics' training arguments under DDP. What Ultralytics' own multi-GPU path adjusts is adjusted
the same way here, and nothing is left for one rank to decide alone: `rect=True` (ranks with unequal batch counts
would wait for each other forever), `time=` (each rank re-estimated the epoch count from its own clock and rebuilt
its schedule from it) and `cfg=FILE` (Ultralytics' way to load arguments from a YAML, which was silently ignored)."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import pytest
import yaml

from conftest import load_summary, run_cli
from raytrain_yolo.core.config import RunSpec, SyntheticSpec, TrackingSpec
from raytrain_yolo.data.synthetic import ensure_synthetic


def hyp_file(tmp_path: Path, **extra) -> Path:
    """A copy of Ultralytics' own default.yaml with a few values changed: the form users keep their `cfg=` in."""
    from ultralytics.cfg import DEFAULT_CFG_PATH

    cfg = yaml.safe_load(Path(DEFAULT_CFG_PATH).read_text())
    cfg.update(lr0=0.0042, fliplr=0.25, epochs=7, **extra)
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.quick
def test_cfg_file_is_read_under_the_arguments_given_with_it(tmp_path):
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.core.preflight import check_run

    spec = RunSpec(train={"cfg": str(hyp_file(tmp_path)), "epochs": 2}, tracking=TrackingSpec(enabled=False),
                   synthetic=SyntheticSpec(train=8, val=4, imgsz=64), storage_path=str(tmp_path / "runs"))
    _, args, _ = check_run(spec)
    # The file's values, the command line's over them (as YOLO.train(cfg=..., epochs=2) does), no `cfg` left over;
    # the copy's `device: null`, `name: null`, ... are Ultralytics' defaults and change nothing.
    assert args["lr0"] == 0.0042 and args["fliplr"] == 0.25 and args["epochs"] == 2 and "cfg" not in args
    with pytest.raises(UserError, match=r"cfg=.*nope.yaml not found"):
        check_run(RunSpec(train={"cfg": str(tmp_path / "nope.yaml")}, tracking=TrackingSpec(enabled=False),
                          storage_path=str(tmp_path / "runs")))
    with pytest.raises(UserError, match=r"'device=' is not accepted here"):  # a Ray-owned value that is not the default
        check_run(RunSpec(train={"cfg": str(hyp_file(tmp_path, device="0"))}, tracking=TrackingSpec(enabled=False),
                          storage_path=str(tmp_path / "runs")))


def mixed_shapes(tmp_path: Path) -> Path:
    """16 training images, half of them cut to 64x32: with rect=True their batches have two shapes, and two ranks
    of one rect sampler get unequal numbers of batches. Labels stay valid (each box lies in the kept half or is
    dropped)."""
    src = ensure_synthetic(SyntheticSpec(train=16, val=4, imgsz=64)).parent
    dst = tmp_path / "mixed"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.cache"))
    (dst / "data.yaml").write_text((dst / "data.yaml").read_text().replace(f"path: {src}", f"path: {dst}"))
    for i, img in enumerate(sorted((dst / "images" / "train").glob("*.jpg"))):
        if i % 2:
            continue
        cv2.imwrite(str(img), cv2.imread(str(img))[:32])
        label = dst / "labels" / "train" / f"{img.stem}.txt"
        kept = []
        for line in label.read_text().splitlines():
            c, x, y, w, h = line.split()
            if float(y) + float(h) / 2 <= 0.5:  # entirely in the kept top half: the same box, in the half-height image's units
                kept.append(f"{c} {x} {float(y) * 2:.6f} {w} {float(h) * 2:.6f}")
        label.write_text("\n".join(kept) + ("\n" if kept else ""))
    return dst / "data.yaml"


# Non-default values of Ultralytics training arguments that DDP must honour on every rank (optimiser, schedule,
# loss gains, augmentation, seed), trained together in the one 2-rank run below: each must reach Ultralytics'
# own args.yaml unchanged, and the ranks must end with the same weights.
HONOURED = {"optimizer": "AdamW", "momentum": 0.9, "weight_decay": 0.001, "cos_lr": True, "warmup_epochs": 0.5,
            "close_mosaic": 1, "nbs": 16, "box": 5.0, "cls": 0.7, "mosaic": 0.5, "degrees": 5.0, "seed": 3}


def test_rect_time_cfg_and_other_arguments_under_two_ranks(tmp_path):
    """One 2-rank run with rect, time and cfg, and HONOURED: it ends (a hang is this test's timeout), rect is turned
    off with Ultralytics' own warning, the time limit stops it with both ranks holding the same weights, the cfg
    file's values trained, and every HONOURED value is what Ultralytics ran with. time=0.002 h (7 s) is several
    epochs of 16 images at 64 px on 2 CPU workers, so the per-epoch re-estimate of the epoch count runs at least
    once before the limit."""
    mixed_shapes(tmp_path)
    hyp_file(tmp_path)
    # data= and cfg= relative to the command's working directory, which the workers (on the session's head) do not
    # share: each path argument is resolved once, on the driver.
    proc = run_cli("fit", "--cpu", "--num-workers", 2, "--no-tracking", "--storage-path", "runs",
                   "--name", "args", "data=mixed/data.yaml", "model=yolo26n.yaml", "imgsz=64", "batch=8", "epochs=50",
                   "rect=True", "time=0.002", "cfg=hyp.yaml", "workers=0",
                   *(f"{k}={v}" for k, v in HONOURED.items()), timeout=420, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load_summary(tmp_path / "runs", "args")
    log = (tmp_path / "runs" / "args" / "run.log").read_text()
    assert "'rect=True' is incompatible with Multi-GPU training, setting 'rect=False'" in log
    assert 1 <= s["epochs_completed"] < 50, s["epochs_completed"]  # the time limit ended it, not epochs=50
    ranks = {w["rank"]: w["params_sha256"] for w in s["workers"]}
    assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
    assert s["train_args"]["lr0"] == 0.0042 and s["train_args"]["fliplr"] == 0.25
    ran = yaml.safe_load((Path(s["ultralytics_dir"]) / "args.yaml").read_text())
    assert {k: ran[k] for k in HONOURED} == HONOURED
    # (args.yaml keeps rect=True: Ultralytics writes it before its DDP setup turns rect off, as in its own DDP.)
    assert ran["lr0"] == 0.0042 and ran["fliplr"] == 0.25


def test_a_finished_run_asked_for_more_epochs_is_refused_with_the_command_that_continues(task_run, capsys,
                                                                                          monkeypatch):
    """Issue 21, part 2: `fit --name r1 ... epochs=2` again with epochs=3. Ultralytics cannot resume a finished run
    to a longer schedule, so this ends before Ray with the exact command that starts a new run from r1's weights
    (and a rerun with the same epochs stays what it was: it finishes at once)."""
    import shlex

    from conftest import NO_RAY, TASK_MODELS, TINY_ARGS, TINY_TRAIN
    from raytrain_yolo import fit

    _, s = task_run("detect")
    storage = str(Path(s["ray_result_path"]).parent)
    monkeypatch.setenv("RAY_ADDRESS", NO_RAY)  # refused before Ray, or it would end in another error
    args = ["--cpu", "--num-workers", "2", "--storage-path", storage, "--name", "detect", "--no-tracking",
            "--synthetic-train", str(TINY_TRAIN["train"]), "--synthetic-val", str(TINY_TRAIN["val"]),
            "--synthetic-size", str(TINY_TRAIN["imgsz"]), f"model={TASK_MODELS['detect']}",
            *[a for a in TINY_ARGS if not a.startswith("epochs=")], "epochs=3"]
    assert fit.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "finished its 2 epochs" in err[0] and "epochs=3" in err[0], err
    command = shlex.split(err[0].split("start a new run from its weights: ", 1)[1])
    assert command[:3] == ["python", "-m", "raytrain_yolo.fit"]
    ns = fit.build_parser().parse_args(command[3:])
    assert ns.name == "detect-more" and ns.storage_path == storage
    assert f"model={s['last_checkpoint']}" in ns.overrides and "epochs=3" in ns.overrides


@pytest.mark.quick
def test_path_arguments_are_made_absolute_once_on_the_driver(tmp_path, monkeypatch):
    """Issue 21, part 4: data=, model=, cfg= and source= relative to where the command runs are resolved there, in
    every job (key=value pairs and a --config file alike): trials, workers and job entrypoints run elsewhere."""
    from raytrain_yolo import fit, tune
    from raytrain_yolo.core.cli import spec_from_args
    from raytrain_yolo.core.config import parse_key_values

    for d in ("d", "imgs"):
        (tmp_path / d).mkdir()
    for f, text in (("d/data.yaml", "x"), ("w.pt", "x"), ("hyp.yaml", "lr0: 0.1"), ("run.yaml", "data: d/data.yaml")):
        (tmp_path / f).write_text(text)
    monkeypatch.chdir(tmp_path)
    kv = parse_key_values(["data=d/data.yaml", "model=w.pt", "cfg=hyp.yaml", "source=imgs", "epochs=3"])
    assert kv == {"data": str(tmp_path / "d" / "data.yaml"), "model": str(tmp_path / "w.pt"),
                  "cfg": str(tmp_path / "hyp.yaml"), "source": str(tmp_path / "imgs"), "epochs": 3}
    # Names Ultralytics resolves itself, URIs and the embedded dataset are not paths here.
    assert parse_key_values(["model=yolo26n.yaml", "data=s3://b/d.yaml"]) == {"model": "yolo26n.yaml",
                                                                             "data": "s3://b/d.yaml"}
    for module in (fit, tune):
        spec = spec_from_args(module.build_parser().parse_args(["--config", "run.yaml", "model=w.pt"]), ["model=w.pt"])
        assert spec.train["data"] == str(tmp_path / "d" / "data.yaml") and spec.train["model"] == str(tmp_path / "w.pt")
