"""Issue 21, part 7: Ultralytics' training arguments under DDP. What Ultralytics' own multi-GPU path adjusts is adjusted
the same way here, and nothing is left for one rank to decide alone: `rect=True` (ranks with unequal batch counts
would wait for each other forever), `time=` (each rank re-estimated the epoch count from its own clock and rebuilt
its schedule from it) and `cfg=FILE` (Ultralytics' way to load arguments from a YAML, which was silently ignored)."""

from __future__ import annotations

import re
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
    from raytrain_yolo.plan.request import check_run

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
    dropped). A `test:` split of 2 images (for split=test)."""
    src = ensure_synthetic(SyntheticSpec(train=16, val=4, imgsz=64)).parent
    dst = tmp_path / "mixed"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.cache"))
    (dst / "data.yaml").write_text((dst / "data.yaml").read_text().replace(f"path: {src}", f"path: {dst}")
                                   + "test: images/test\n")
    for kind, suffix in (("images", ".jpg"), ("labels", ".txt")):  # a test split of its own: 2 of the 4 val images
        (dst / kind / "test").mkdir()
        for f in sorted((dst / kind / "val").glob(f"*{suffix}"))[:2]:
            shutil.copy(f, dst / kind / "test" / f.name)
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
# loss gains, augmentation, early stopping, checkpointing, validation, seed, and what shapes the data and the model:
# single_cls, fraction, freeze, multi_scale, cache, workers; dis with a distill_model teacher; plots, save_json, profile;
# channels_last, which Ultralytics applies on CUDA only; cls_remap, which acts on a .pt's class names; val=False,
# validation at the last epoch only; split=test, the split the trainer validates on; verbose; the depth task's loss
# gains dlog, dgrad and dlam, which a detect run carries unused as Ultralytics' does), trained together in the one 2-rank run
# below: each must reach Ultralytics' own args.yaml unchanged, and the ranks must end with the same weights. (The
# other tasks' loss gains and augmentations are honoured the same way; for detect they change nothing.)
HONOURED = {"optimizer": "AdamW", "momentum": 0.9, "weight_decay": 0.001, "cos_lr": True, "warmup_epochs": 0.5,
            "close_mosaic": 1, "nbs": 16, "box": 5.0, "cls": 0.7, "mosaic": 0.5, "degrees": 5.0, "seed": 3,
            "lrf": 0.05, "warmup_momentum": 0.7, "warmup_bias_lr": 0.05, "dfl": 1.2, "hsv_h": 0.02, "hsv_s": 0.6,
            "hsv_v": 0.3, "translate": 0.05, "scale": 0.4, "shear": 1.0, "perspective": 0.0001, "flipud": 0.1,
            "mixup": 0.1, "cutmix": 0.1, "bgr": 0.1, "copy_paste": 0.1, "copy_paste_mode": "mixup", "erasing": 0.3,
            "auto_augment": "augmix", "dropout": 0.1, "pose": 10.0, "kobj": 0.9, "rle": 0.9, "angle": 0.9,
            "overlap_mask": False, "mask_ratio": 2, "iou": 0.6, "max_det": 100, "patience": 30, "save_period": 5,
            "deterministic": False, "single_cls": True, "fraction": 0.75, "freeze": 2, "multi_scale": 0.25,
            "cache": "ram", "workers": 0, "exist_ok": True, "pretrained": False, "conf": 0.005, "cls_pw": 0.5,
            "dis": 3.0, "profile": True, "channels_last": True, "save_json": True, "plots": False, "cls_remap": False,
            "val": False, "split": "test", "verbose": False, "dlog": 2.0, "dgrad": 0.25, "dlam": 0.5}

# Every other key of Ultralytics' default.yaml, by what happens to it here, and where that is checked. Together with
# HONOURED and RAY_OWNED_KEYS (refused in one line) they are the installed Ultralytics' keys, each once: a key a new
# Ultralytics adds fails test_every_ultralytics_argument_has_a_known_outcome until it is placed.
ADJUSTED = {  # changed the way Ultralytics' own multi-GPU path changes it, or decided once for every rank
    "rect": "turned off under DDP with Ultralytics' own warning (the 2-rank run here)",
    "time": "the time limit is decided on rank 0 and broadcast (the 2-rank run here)",
    "cfg": "read once on the driver, under the arguments given with it (test_cfg_file_is_read_under_...)",
    "data": "a relative path is made absolute once on the driver (test_path_arguments_are_made_absolute_...)",
    "model": "as data=; a name Ultralytics resolves itself is passed as given",
    "batch": "the global batch, split evenly over the workers; AutoBatch (-1) refused (test_errors)",
    "amp": "CUDA only: off on CPU workers, as Ultralytics' own check turns it off without a GPU; fp16/bf16 "
           "refused without one (test_tune)",
    "save": "save=False refused before Ray: a restart needs last.pt (test_fault_paths)",
    "distill_model": "a local, loadable .pt checked before Ray (nothing downloaded), its path made absolute; the "
                     "2-rank run here distils from one (test_distill_model_is_a_local_teacher_checked_before_ray)",
}
PASSED = {  # to every rank as given, as Ultralytics takes them (its own rules check the values: test_config_types).
    # epochs, imgsz, lr0 and fliplr train with non-default values in the 2-rank run below (lr0 and fliplr from its
    # cfg= file); task and mode are the job's own; compile is checked outside the suite, on 2 CPU ranks with a tiny
    # model (experiments/results/compile-ddp-cpu-2026-12-01.md: ranks in sync; a minute of 2 cores to compile) and
    # on YOLO26n by the GPU check (experiments/gpu-check.sh; compiling YOLO26n on 2 CPU cores takes over 15 minutes)
    "task", "mode", "epochs", "imgsz", "compile", "lr0", "fliplr",
}
NOT_FOR_TRAINING = {  # predict, export and tracking settings: accepted, and unused by Ultralytics' trainer as by ours
    "quantize", "dnn", "nms", "source", "vid_stride", "stream_buffer", "visualize", "augment", "agnostic_nms",
    "classes", "retina_masks", "embed", "show", "save_frames", "save_txt", "save_conf", "save_crop", "show_labels",
    "show_conf", "show_boxes", "line_width", "format", "optimize", "dynamic", "simplify", "opset", "workspace",
    "tracker",
}


@pytest.mark.quick
def test_every_ultralytics_argument_has_a_known_outcome():
    """Issue 21, part 7: the matrix over Ultralytics' training arguments. Each key of the installed Ultralytics'
    default.yaml is honoured under DDP (HONOURED, trained in the 2-rank run below), adjusted as Ultralytics' DDP
    adjusts it (ADJUSTED), passed as given (PASSED), not a training setting (NOT_FOR_TRAINING), or Ray's own and
    refused in one line before Ray starts (RAY_OWNED_KEYS) - never two of these, never none."""
    from ultralytics.cfg import DEFAULT_CFG_DICT

    from raytrain_yolo.core.config import RAY_OWNED_KEYS, validate_train_args
    from raytrain_yolo.core.errors import UserError

    groups = {"HONOURED": set(HONOURED), "ADJUSTED": set(ADJUSTED), "PASSED": PASSED,
              "NOT_FOR_TRAINING": NOT_FOR_TRAINING,
              # save_dir, which Ultralytics' trainer takes though default.yaml does not list it, is Ray's too
              "RAY_OWNED_KEYS": set(RAY_OWNED_KEYS) - {"save_dir"}}
    placed = [k for keys in groups.values() for k in keys]
    twice = sorted(k for k in set(placed) if placed.count(k) > 1)
    assert not twice, f"placed in two groups: {twice}"
    assert set(placed) == set(DEFAULT_CFG_DICT), (
        f"unplaced Ultralytics arguments: {sorted(set(DEFAULT_CFG_DICT) - set(placed))}; "
        f"not Ultralytics arguments: {sorted(set(placed) - set(DEFAULT_CFG_DICT))}")
    assert all(HONOURED[k] != DEFAULT_CFG_DICT[k] for k in HONOURED), "HONOURED must train non-default values"
    for key in RAY_OWNED_KEYS:
        with pytest.raises(UserError) as e:
            validate_train_args({key: "x"})
        start = "resume=x is Ultralytics' resume" if key == "resume" else f"'{key}=' is not accepted here: "
        assert str(e.value).startswith(start) and "\n" not in str(e.value)
    settings = {"show": True, "save_txt": True, "format": "onnx", "line_width": 2, "tracker": "bytetrack.yaml"}
    assert validate_train_args(settings) == settings  # accepted as Ultralytics' trainer accepts them


def test_rect_time_cfg_and_other_arguments_under_two_ranks(tmp_path):
    """One 2-rank run with rect, time and cfg, and HONOURED: it ends (a hang is this test's timeout), rect is turned
    off with Ultralytics' own warning, the time limit stops it with both ranks holding the same weights, the cfg
    file's values trained, and every HONOURED value is what Ultralytics ran with. time=0.002 h (7 s) is several
    epochs of 16 images at 64 px on 2 CPU workers, so the per-epoch re-estimate of the epoch count runs at least
    once before the limit."""
    mixed_shapes(tmp_path)
    hyp_file(tmp_path)
    teacher(tmp_path / "teacher.pt")
    # data=, cfg= and distill_model= relative to the command's working directory, which the workers (on the session's
    # head) do not share: each path argument is resolved once, on the driver.
    proc = run_cli("fit", "--cpu", "--num-workers", 2, "--no-tracking", "--storage-path", "runs",
                   "--name", "args", "data=mixed/data.yaml", "model=yolo26n.yaml", "imgsz=64", "batch=8", "epochs=50",
                   "rect=True", "time=0.002", "cfg=hyp.yaml", "distill_model=teacher.pt",
                   *(f"{k}={v}" for k, v in HONOURED.items()), timeout=420, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load_summary(tmp_path / "runs", "args")
    log = (tmp_path / "runs" / "args" / "run.log").read_text()
    assert "'rect=True' is incompatible with Multi-GPU training, setting 'rect=False'" in log
    # What single_cls and freeze did, in Ultralytics' own words on rank 0 (not only their values in args.yaml).
    assert "Overriding class names with single class." in log and re.search(r"Overriding model.yaml nc=\d+ with nc=1", log)
    assert "Freezing layer 'model.1." in log and "Freezing layer 'model.2." not in log
    # split=test: the trainer's validation set is the test split (Ultralytics' scan of its labels on rank 0).
    assert re.search(r"Scanning .*labels[/\\]test", log) and not re.search(r"Scanning .*labels[/\\]val", log)
    # Knowledge distillation ran on every rank (its loss is Ultralytics' train/dis_loss), from the driver's teacher.
    assert all("train/dis_loss" in h for h in s["history"]), s["history"][-1]
    assert 1 <= s["epochs_completed"] < 50, s["epochs_completed"]  # the time limit ended it, not epochs=50
    ranks = {w["rank"]: w["params_sha256"] for w in s["workers"]}
    assert len(ranks) == 2 and ranks[0] == ranks[1], ranks
    assert s["train_args"]["lr0"] == 0.0042 and s["train_args"]["fliplr"] == 0.25
    ran = yaml.safe_load((Path(s["ultralytics_dir"]) / "args.yaml").read_text())
    assert {k: ran[k] for k in HONOURED} == HONOURED, {k: (v, ran[k]) for k, v in HONOURED.items() if ran[k] != v}
    # (args.yaml keeps rect=True: Ultralytics writes it before its DDP setup turns rect off, as in its own DDP.)
    assert ran["lr0"] == 0.0042 and ran["fliplr"] == 0.25 and ran["distill_model"] == str(tmp_path / "teacher.pt")


def teacher(path: Path) -> Path:
    """An Ultralytics checkpoint to distil from, written by Ultralytics itself (untrained YOLO26n: what the tests
    check is where it is read and that distillation runs, not what it teaches)."""
    from ultralytics import YOLO

    YOLO("yolo26n.yaml").save(path)
    return path


@pytest.mark.quick
def test_distill_model_is_a_local_teacher_checked_before_ray(tmp_path, monkeypatch):
    """Ultralytics downloads a teacher it does not find (`distill_model=yolo26s.pt`); nothing is downloaded here, so
    what is not a local, loadable .pt is refused before Ray in one line naming distill_model=; a relative path is the
    working directory's, made absolute for the workers."""
    from raytrain_yolo.core.config import parse_key_values
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.plan.request import check_run

    monkeypatch.chdir(tmp_path)
    teacher(tmp_path / "t.pt")
    (tmp_path / "bad.pt").write_text("not a checkpoint")

    def run(value):
        spec = RunSpec(train=parse_key_values([f"distill_model={value}"]), tracking=TrackingSpec(enabled=False),
                       synthetic=SyntheticSpec(train=8, val=4, imgsz=64), storage_path=str(tmp_path / "runs"))
        return check_run(spec)[1]["distill_model"]

    assert run("t.pt") == str(tmp_path / "t.pt")
    for value, words in (("yolo26s.pt", "distill_model=yolo26s.pt not found: pass the path of a local .pt file"),
                         ("yolo26s.yaml", "distill_model=yolo26s.yaml must be the teacher's trained weights, a .pt"),
                         ("bad.pt", "cannot be loaded")):
        with pytest.raises(UserError) as e:
            run(value)
        assert words in str(e.value) and "\n" not in str(e.value), e.value


@pytest.mark.quick
def test_split_is_the_split_the_trainer_validates_on(tmp_path):
    """Ultralytics' trainer validates on data[split]: with split=test that split must exist, and it is the one checked
    before Ray (a data.yaml without it failed on every rank after Ray started); the embedded dataset has train and val
    only."""
    from raytrain_yolo.core.errors import UserError
    from raytrain_yolo.plan.request import check_run

    data = mixed_shapes(tmp_path)

    def run(split, yaml_path=None):
        train = {"split": split, **({"data": str(yaml_path)} if yaml_path else {})}  # none: the embedded dataset
        return check_run(RunSpec(train=train, synthetic=SyntheticSpec(train=8, val=4, imgsz=64),
                                 tracking=TrackingSpec(enabled=False),
                                 storage_path=str(tmp_path / "runs")))[1]

    assert run("test", data)["split"] == "test"
    no_test = data.with_name("no-test.yaml")
    no_test.write_text(data.read_text().replace("test: images/test\n", ""))
    for where, words in ((no_test, f"data={no_test} has no 'test:' entry"),
                         (None, "split=test: the embedded dataset has train and val images only")):
        with pytest.raises(UserError) as e:
            run("test", where)
        assert words in str(e.value) and "\n" not in str(e.value), e.value


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
    """Issue 21, part 4: data=, model=, cfg=, source= and distill_model= relative to where the command runs are resolved there, in
    every job (key=value pairs and a --config file alike): trials, workers and job entrypoints run elsewhere."""
    from raytrain_yolo import fit, tune
    from raytrain_yolo.core.cli import spec_from_args
    from raytrain_yolo.core.config import parse_key_values

    for d in ("d", "imgs"):
        (tmp_path / d).mkdir()
    for f, text in (("d/data.yaml", "x"), ("w.pt", "x"), ("hyp.yaml", "lr0: 0.1"), ("run.yaml", "data: d/data.yaml")):
        (tmp_path / f).write_text(text)
    monkeypatch.chdir(tmp_path)
    kv = parse_key_values(["data=d/data.yaml", "model=w.pt", "cfg=hyp.yaml", "source=imgs", "epochs=3",
                           "distill_model=w.pt"])
    assert kv == {"data": str(tmp_path / "d" / "data.yaml"), "model": str(tmp_path / "w.pt"),
                  "cfg": str(tmp_path / "hyp.yaml"), "source": str(tmp_path / "imgs"), "epochs": 3,
                  "distill_model": str(tmp_path / "w.pt")}
    # Names Ultralytics resolves itself, URIs and the embedded dataset are not paths here.
    assert parse_key_values(["model=yolo26n.yaml", "data=s3://b/d.yaml"]) == {"model": "yolo26n.yaml",
                                                                             "data": "s3://b/d.yaml"}
    for module in (fit, tune):
        spec = spec_from_args(module.build_parser().parse_args(["--config", "run.yaml", "model=w.pt"]), ["model=w.pt"])
        assert spec.train["data"] == str(tmp_path / "d" / "data.yaml") and spec.train["model"] == str(tmp_path / "w.pt")
