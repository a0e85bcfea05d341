"""Issue 7: every mistake ends fast with one line naming the problem and the fix; nothing left behind."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import psutil
import pytest
import torch

from conftest import NO_RAY, free_port, mlflow_runs, shared_head, shared_head_pids
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

HANG = 90  # seconds: a case still running by then is a hang (a failure), not a slow success


def ray_pids() -> set[int]:
    """Ray's processes under this one (a local Ray a command started), but for the session's shared head
    (tests/raycluster.py), which stays up."""
    out = set()
    for p in psutil.Process().children(recursive=True):
        try:
            name, cmd = p.name(), " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "gcs_server" in name or "raylet" in name or cmd.startswith("ray::"):
            out.add(p.pid)
    return out - shared_head_pids()


class Hang(Exception):
    pass


def _hang(signum, frame):
    raise Hang(f"still running after {HANG} s: a hang, not a one-line error")


@pytest.fixture
def fails(tmp_path, capfd, monkeypatch):
    """Run the command's `main(args)` in this process, as `python -m raytrain_yolo.<module>` does (one process per
    case would pay seconds of imports each); assert exit 2, one `error:` line with the key words, no traceback,
    nothing left. Only the cases that say `ray=True` may get as far as Ray: they join the session's shared head, as a
    command with RAY_ADDRESS does; for the others RAY_ADDRESS names a port nothing listens on, so a refusal that came
    only after joining Ray would end in another error than the one the case expects."""
    import importlib

    def check(*args, words=(), env=None, tracking=False, module="fit", ray=False):
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        flags = ["--tracking-uri", uri] if tracking else ["--no-tracking"]
        if ray:
            shared_head().wait_idle()
        before = ray_pids()
        for k, v in (env or (shared_head().driver_env if ray else {"RAY_ADDRESS": NO_RAY})).items():
            monkeypatch.setenv(k, v)
        main = importlib.import_module(f"raytrain_yolo.{module}").main
        capfd.readouterr()
        previous = signal.signal(signal.SIGALRM, _hang)
        signal.alarm(HANG)
        try:
            rc = main([str(a) for a in ("--storage-path", tmp_path / "runs", *flags, *args)])
        except SystemExit as e:  # argparse's own exit, as the interpreter would turn it into a status
            rc = e.code
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        err = capfd.readouterr().err
        last = err.strip().splitlines()[-1] if err.strip() else ""
        assert rc == 2, (rc, err[-2000:])
        assert last.startswith("error: "), err[-2000:]
        for w in words:
            assert w.lower() in last.lower(), (w, last)
        assert "Traceback" not in err
        leaked = [psutil.Process(p) for p in ray_pids() - before if psutil.pid_exists(p)]
        assert not leaked, f"Ray processes survived the failed run: {[' '.join(p.cmdline())[:120] for p in leaked]}"
        import ray

        assert not ray.is_initialized(), "the command left this process joined to Ray"
        if tracking and (tmp_path / "mlflow.db").exists():
            _, runs = mlflow_runs(uri)
            assert all(r.info.status != "RUNNING" for r in runs)
        return last

    return check


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small valid YOLO dataset (a copy of the synthetic one) that each test may break."""
    src = ensure_synthetic(SyntheticSpec(train=8, val=4, imgsz=64)).parent
    return src


def copy_dataset(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    text = (dst / "data.yaml").read_text().replace(f"path: {src}", f"path: {dst}")
    (dst / "data.yaml").write_text(text)
    return dst / "data.yaml"


# --- data ---------------------------------------------------------------------------------------------------

@pytest.mark.quick
def test_missing_data_yaml(fails, tmp_path):
    fails(f"data={tmp_path}/nope/data.yaml", words=("not found", "data.yaml"))


@pytest.mark.quick
def test_data_yaml_does_not_parse(fails, tmp_path):
    bad = tmp_path / "data.yaml"
    bad.write_text("train: [images/train\nval: images/val\n")
    fails(f"data={bad}", words=("not valid YAML", "line"))


@pytest.mark.quick
def test_missing_image_folder(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "images" / "val")
    fails(f"data={data}", words=("val: images/val", "does not exist"))


@pytest.mark.quick
def test_roboflow_layout_gets_a_hint(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    data.write_text(data.read_text().replace("train: images/train", "train: ../train/images"))
    fails(f"data={data}", words=("does not exist", "did you mean train: images/train"))


@pytest.mark.quick
def test_missing_label_folder(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "labels" / "train")
    fails(f"data={data}", words=("no label folder", "labels/train"))


@pytest.mark.parametrize("line, words", [  # Ultralytics' verify_image_label is the judge, and says why
    ("0 0.5 0.5 0.2", ("different numbers of columns",)),
    ("7 0.5 0.5 0.2 0.2", ("class 7", "0-2")),
    ("1 0.5 1.7 0.2 0.2", ("out of bounds", "1.7")),
])
@pytest.mark.quick
def test_malformed_label_line_names_file_and_line(fails, dataset, tmp_path, line, words):
    data = copy_dataset(dataset, tmp_path / "d")
    label = tmp_path / "d" / "labels" / "train" / "000003.txt"
    label.write_text(label.read_text() + line + "\n")
    fails(f"data={data}", words=(*words, "images/train/000003.jpg", "labels/train/000003.txt", "would skip",
                                 "--allow-bad-labels", "fix the file"))


def test_allow_bad_labels_passes_the_label_check(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    (tmp_path / "d" / "labels" / "train" / "000003.txt").write_text("9 0.5 0.5 0.2 0.2\n")
    # Past the label check, the next rule stops it (no training in this test): the cluster is too small.
    fails(f"data={data}", "--allow-bad-labels", "--cpu", "--num-workers", 1, "--cpus-per-worker", 64,
          words=("64 CPUs",), ray=True)


# --- model --------------------------------------------------------------------------------------------------

@pytest.mark.quick
def test_unknown_model_yaml(fails):
    fails("model=yolo99z.yaml", words=("model=yolo99z.yaml", "yolo26n.yaml"))


@pytest.mark.quick
def test_missing_pt(fails, tmp_path):
    fails(f"model={tmp_path}/w.pt", words=("not found", "nothing is downloaded"))


@pytest.mark.quick
def test_corrupt_pt(fails, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint at all")
    fails(f"model={tmp_path}/w.pt", words=("cannot be loaded", "corrupt"))


@pytest.mark.quick
def test_pt_of_another_task(fails, tmp_path):
    from ultralytics import YOLO

    YOLO("yolo26n-pose.yaml").save(str(tmp_path / "pose.pt"))
    fails(f"model={tmp_path}/pose.pt", "task=detect", words=("pose model", "task=detect"))


@pytest.mark.quick
def test_a_task_without_a_trainer_here_is_refused_before_ray(fails, tmp_path):
    """Ultralytics 8.4 also trains classify, semantic and depth models; these jobs have no trainer, validator or rows
    for them, so one line says so before Ray starts (a classify model went as far as the workers), in fit and in
    predict alike."""
    from ultralytics import YOLO

    fails("model=yolo26n-cls.yaml", words=("model=yolo26n-cls.yaml is a classify model", "detect, pose, segment, obb"))
    YOLO("yolo26n-cls.yaml").save(str(tmp_path / "cls.pt"))
    import cv2
    import numpy as np

    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.jpg"), np.zeros((32, 32, 3), np.uint8))  # the source is checked first
    fails(f"model={tmp_path}/cls.pt", f"source={tmp_path / 'images'}", module="predict", tracking=True,
          words=("is a classify model",))


# --- arguments ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args, words", [
    (("--bogus",), ("unrecognized arguments: --bogus", "--help")),
    (("epoch=3",), ("'epoch'", "did you mean 'epochs'")),
    (("amp=fp8",), ("amp=fp8", "fp16, bf16, fp32")),
    (("cache=ssd",), ("cache=ssd", "ram, disk")),
    (("--num-workers", 2, "batch=3"), ("batch=3", "multiple of the 2 workers", "batch=2")),
    (("--num-workers", 4, "batch=2"), ("batch=2", "multiple of the 4 workers")),
    (("epochs=0",), ("epochs",)),
    (("epochs=-3",), ("epochs",)),
    (("epochs=ten",), ("epochs", "int")),
    (("--num-workers", "two"), ("two", "MIN-MAX")),
    (("device=0",), ("device=", "--gpu/--cpu")),
    (("batch=-1",), ("batch=-1", "AutoBatch")),
    (("--loader", "gpu"), ("--loader gpu", "ultralytics, device")),
    (("--loader", "device", "mixup=0.5"), ("mixup=0.5", "--loader ultralytics")),
    (("--loader", "device", "model=yolo26n-pose.yaml"), ("task=pose", "--loader ultralytics")),
    (("--loader", "device-tiles"), ("--loader device-tiles is not one of", "device-jpeg")),
    (("--prefetch",), ("--prefetch builds batches of --loader device", "add --loader device")),
    # Issue 39: values Ultralytics refuses only once training starts, refused before Ray by Ultralytics' own code.
    (("optimizer=Adagrad",), ("optimizer=Adagrad", "not found in list of available optimizers", "AdamW")),
    (("pretrained=nowhere/w.pt",), ("pretrained=nowhere/w.pt not found", "nothing is downloaded")),
])
@pytest.mark.quick
def test_bad_arguments(fails, args, words):
    fails("--cpu", *args, words=words)


# --- resources ----------------------------------------------------------------------------------------------

CPUS = os.cpu_count() or 1  # the local Ray has at most this many: ask for more, on any machine


def test_more_workers_than_cpus(fails):
    n = 4 * CPUS
    fails("--cpu", "--num-workers", n, f"batch={n}", words=(f"need {n} CPUs",), tracking=True, ray=True)


def test_more_cpus_per_worker_than_the_cluster(fails):
    # Ray puts one worker's CPUs on one node: a worker larger than every node is refused as such, naming the fix.
    fails("--cpu", "--num-workers", 2, "--cpus-per-worker", 2 * CPUS,
          words=(f"one worker needs {2 * CPUS} CPUs on one node", "--cpus-per-worker"), tracking=True, ray=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: tests/test_gpu_path.py trains on it")
def test_gpu_on_a_cluster_without_gpus(fails):
    fails("--gpu", words=("no GPUs", "--cpu"), tracking=True, ray=True)


def test_waiting_for_resources_is_explicit_and_bounded(fails):
    n = 4 * CPUS
    fails("--cpu", "--num-workers", n, f"batch={n}", "--wait-for-resources", 4, words=("waited 4 s", f"need {n} CPUs"), ray=True)


# --- infrastructure -----------------------------------------------------------------------------------------

@pytest.mark.quick
def test_ray_address_that_does_not_answer(fails):
    fails(env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}, words=("does not answer", "unset it"))


@pytest.mark.quick
def test_unwritable_storage_path(fails, tmp_path):
    locked = tmp_path / "locked"
    locked.write_text("a file, not a folder")
    fails("--storage-path", locked / "runs", words=("cannot write", "writable path"))


@pytest.mark.quick
def test_unreachable_tracking_server(fails):
    fails("--tracking-uri", f"http://127.0.0.1:{free_port()}", words=("does not answer", "--no-tracking"), tracking=True)


@pytest.mark.quick
def test_tune_reports_bad_space_in_one_line(fails):
    fails("--amp", "fp8", words=("fp8", "fp16, bf16, fp32"), module="tune")


@pytest.mark.quick
def test_deleted_mlflow_experiment_is_named_with_the_restore_command(fails, tmp_path):
    """MLflow refuses new runs in a deleted experiment (and refuses to create one of the same name): said before
    Ray starts, with the command that restores it."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("gone")
    client.delete_experiment(exp_id)
    fails("--cpu", "--experiment", "gone", tracking=True,
          words=("experiment 'gone'", "is deleted", f"mlflow experiments restore --experiment-id {exp_id}",
                 "--experiment NAME"))


@pytest.mark.quick
def test_error_lines_carry_no_terminal_colour_codes(capfd):
    """An error raised inside a worker often carries Ultralytics' colour codes; the last line is plain text."""
    from raytrain_yolo.core.cli import run_main
    from raytrain_yolo.core.errors import UserError

    def user_error():
        raise UserError("\x1b[34m\x1b[1mtrain: \x1b[0mNo labels found in /data/labels")

    def worker_error():
        raise RuntimeError("\x1b[31mDataset 'x.yaml' images not found\x1b[0m")

    assert run_main(user_error, debug=False) == 2
    assert capfd.readouterr().err == "error: train: No labels found in /data/labels\n"
    assert run_main(worker_error, debug=False) == 1
    last = capfd.readouterr().err.strip().splitlines()[-1]
    assert "\x1b" not in last and "RuntimeError: Dataset 'x.yaml' images not found" in last
