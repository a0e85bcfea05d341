"""Issue 7: every mistake ends fast with one line naming the problem and the fix; nothing left behind."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import psutil
import pytest
import torch

from conftest import free_port, mlflow_runs, run_cli
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic

HANG = 90  # seconds: a case still running by then is a hang (a failure), not a slow success


def ray_pids() -> set[int]:
    out = set()
    for p in psutil.process_iter(["name", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "gcs_server" in (p.info["name"] or "") or "raylet" in (p.info["name"] or "") or cmd.startswith("ray::"):
            out.add(p.pid)
    return out


@pytest.fixture
def fails(tmp_path):
    """Run fit with `args`; assert exit 2, one `error:` line with the key words, no traceback, nothing left."""

    def check(*args, words=(), env=None, tracking=False, module="fit"):
        before = ray_pids()
        uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
        flags = ["--tracking-uri", uri] if tracking else ["--no-tracking"]
        proc = run_cli(module, "--storage-path", tmp_path / "runs", *flags, *args, timeout=HANG, env=env)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
        assert last.startswith("error: "), proc.stderr[-2000:]
        for w in words:
            assert w.lower() in last.lower(), (w, last)
        assert "Traceback" not in proc.stderr
        leaked = ray_pids() - before
        assert not {p for p in leaked if psutil.pid_exists(p)}, "Ray processes survived the failed run"
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

def test_missing_data_yaml(fails, tmp_path):
    fails(f"data={tmp_path}/nope/data.yaml", words=("not found", "data.yaml"))


def test_data_yaml_does_not_parse(fails, tmp_path):
    bad = tmp_path / "data.yaml"
    bad.write_text("train: [images/train\nval: images/val\n")
    fails(f"data={bad}", words=("not valid YAML", "line"))


def test_missing_image_folder(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "images" / "val")
    fails(f"data={data}", words=("val: images/val", "does not exist"))


def test_roboflow_layout_gets_a_hint(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    data.write_text(data.read_text().replace("train: images/train", "train: ../train/images"))
    fails(f"data={data}", words=("does not exist", "did you mean train: images/train"))


def test_missing_label_folder(fails, dataset, tmp_path):
    data = copy_dataset(dataset, tmp_path / "d")
    shutil.rmtree(tmp_path / "d" / "labels" / "train")
    fails(f"data={data}", words=("no label folder", "labels/train"))


@pytest.mark.parametrize("line, words", [  # Ultralytics' verify_image_label is the judge, and says why
    ("0 0.5 0.5 0.2", ("different numbers of columns",)),
    ("7 0.5 0.5 0.2 0.2", ("class 7", "0-2")),
    ("1 0.5 1.7 0.2 0.2", ("out of bounds", "1.7")),
])
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
          words=("64 CPUs",))


# --- model --------------------------------------------------------------------------------------------------

def test_unknown_model_yaml(fails):
    fails("model=yolo99z.yaml", words=("model=yolo99z.yaml", "yolo26n.yaml"))


def test_missing_pt(fails, tmp_path):
    fails(f"model={tmp_path}/w.pt", words=("not found", "nothing is downloaded"))


def test_corrupt_pt(fails, tmp_path):
    (tmp_path / "w.pt").write_bytes(b"not a checkpoint at all")
    fails(f"model={tmp_path}/w.pt", words=("cannot be loaded", "corrupt"))


def test_pt_of_another_task(fails, tmp_path):
    from ultralytics import YOLO

    YOLO("yolo26n-pose.yaml").save(str(tmp_path / "pose.pt"))
    fails(f"model={tmp_path}/pose.pt", "task=detect", words=("pose model", "task=detect"))


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
])
def test_bad_arguments(fails, args, words):
    fails("--cpu", *args, words=words)


# --- resources ----------------------------------------------------------------------------------------------

CPUS = os.cpu_count() or 1  # the local Ray has at most this many: ask for more, on any machine


def test_more_workers_than_cpus(fails):
    n = 4 * CPUS
    fails("--cpu", "--num-workers", n, f"batch={n}", words=(f"need {n} CPUs",), tracking=True)


def test_more_cpus_per_worker_than_the_cluster(fails):
    fails("--cpu", "--num-workers", 2, "--cpus-per-worker", 2 * CPUS, words=(f"need {4 * CPUS} CPUs",), tracking=True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: tests/test_gpu_path.py trains on it")
def test_gpu_on_a_cluster_without_gpus(fails):
    fails("--gpu", words=("no GPUs", "--cpu"), tracking=True)


def test_waiting_for_resources_is_explicit_and_bounded(fails):
    n = 4 * CPUS
    fails("--cpu", "--num-workers", n, f"batch={n}", "--wait-for-resources", 4, words=("waited 4 s", f"need {n} CPUs"))


# --- infrastructure -----------------------------------------------------------------------------------------

def test_ray_address_that_does_not_answer(fails):
    fails(env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"}, words=("does not answer", "unset it"))


def test_unwritable_storage_path(fails, tmp_path):
    locked = tmp_path / "locked"
    locked.write_text("a file, not a folder")
    fails("--storage-path", locked / "runs", words=("cannot write", "writable path"))


def test_unreachable_tracking_server(fails):
    fails("--tracking-uri", f"http://127.0.0.1:{free_port()}", words=("does not answer", "--no-tracking"), tracking=True)


def test_tune_reports_bad_space_in_one_line(fails):
    fails("--amp", "fp8", words=("fp8", "fp16, bf16, fp32"), module="tune")
