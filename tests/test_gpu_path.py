"""Issue 15: the GPU path's correctness, checked on any machine; the GPU tests run where there is a GPU.

- one worker: `--loader device` must see a new order and new augmentation draws every epoch, although
  Ultralytics never calls `set_epoch` at world size 1, and a fixed seed must still give the same run;
- `--trace-samples` records the images each epoch really trained on, for both loaders (checked on the fits that
  already run: test_augment's 2-rank device-loader run, test_core's one-worker run);
- the adapter refuses an Ultralytics without the methods it adapts, and YOLO26 detection has no unused
  parameters (so DDP runs with `find_unused_parameters=False`);
- on a GPU machine: one GPU worker trains, and the device loader on CUDA gives the CPU's batch for the same draws.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DistributedSampler

from conftest import load_summary, run_cli, total_train_loss
from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic
from raytrain_yolo.train.augment import AugmentHyp, augment
from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader

S = 64
N = 24
GPU = torch.cuda.is_available()


def source_dataset(imgsz: int = S, n: int = N):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    data_yaml = ensure_synthetic(SyntheticSpec(train=n, val=8, imgsz=imgsz, seed=5))
    cfg = get_cfg(overrides={"imgsz": imgsz, "data": str(data_yaml)})
    data = check_det_dataset(str(data_yaml))
    return build_yolo_dataset(cfg, data["train"], 8, data, mode="train", stride=32)


@pytest.fixture(scope="module")
def device_dataset():
    return DeviceDataset(source_dataset(), AugmentHyp(imgsz=S), torch.device("cpu"))


def one_epoch(loader: DeviceLoader) -> tuple[list[int], dict[int, torch.Tensor]]:
    """The order one pass used, and each image's augmented pixels by dataset index."""
    order, images = [], {}
    for b in loader:
        idx = [loader.dataset.im_files.index(f) for f in b["im_file"]]
        order += idx
        images.update(zip(idx, b["img"]))
    return order, images


@pytest.mark.quick
def test_one_worker_device_loader_changes_order_and_draws_every_epoch(device_dataset):
    """Ultralytics calls set_epoch only when RANK != -1; on one worker the loader must count epochs itself."""
    loader = DeviceLoader(device_dataset, batch_size=8, rank=0, world_size=1, seed=0)
    (o1, i1), (o2, i2) = one_epoch(loader), one_epoch(loader)
    assert sorted(o1) == sorted(o2) == list(range(N))
    assert o1 != o2, "epoch 2 replayed epoch 1's order"
    same = sum(torch.equal(i1[k], i2[k]) for k in range(N))
    assert same == 0, f"{same} of {N} images got epoch 1's mosaic/perspective draws again"
    again = DeviceLoader(device_dataset, batch_size=8, rank=0, world_size=1, seed=0)
    (r1, j1), (r2, j2) = one_epoch(again), one_epoch(again)
    assert (r1, r2) == (o1, o2), "a fixed seed must give the same orders"
    assert all(torch.equal(i1[k], j1[k]) and torch.equal(i2[k], j2[k]) for k in range(N)), "and the same draws"


@pytest.mark.quick
def test_set_epoch_still_names_the_epoch(device_dataset):
    """Under DDP Ultralytics names each epoch, and a resumed run names its first: that epoch's order is used."""
    loader = DeviceLoader(device_dataset, batch_size=8, rank=0, world_size=1, seed=0)
    loader.sampler.set_epoch(5)
    order, _ = one_epoch(loader)
    expected = DistributedSampler(range(N), num_replicas=1, rank=0, shuffle=True, seed=0)
    expected.set_epoch(5)
    assert order == list(expected)
    expected.set_epoch(6)
    assert one_epoch(loader)[0] == list(expected), "the pass after a named epoch is the next epoch"


@pytest.mark.quick
def test_an_ultralytics_without_the_adapted_methods_is_refused(monkeypatch):
    from ultralytics.models.yolo.detect import DetectionTrainer

    import raytrain_yolo.train.adapter as adapter

    renamed = type("RenamedTrainer", (DetectionTrainer,), {"_build_train_pipeline": None})
    monkeypatch.setitem(adapter.TASK_TRAINERS, "detect", renamed)
    with pytest.raises(RuntimeError, match=r"Ultralytics 8\.\d+\.\d+ has no RenamedTrainer\._build_train_pipeline"):
        adapter.trainer_class("detect")


@pytest.mark.quick
def test_yolo26_detection_leaves_no_parameter_unused(tmp_path):
    """Why DDP may skip its unused-parameter search for detect: every trainable parameter gets a gradient."""
    from ultralytics.models.yolo.detect import DetectionTrainer

    data = ensure_synthetic(SyntheticSpec(train=16, val=4, imgsz=S, seed=0))
    t = DetectionTrainer(overrides={"data": str(data), "model": "yolo26n.yaml", "imgsz": S, "batch": 8, "workers": 0,
                                    "device": "cpu", "amp": False, "plots": False, "project": str(tmp_path),
                                    "name": "unused", "exist_ok": True})
    t.callbacks = {k: [] for k in t.callbacks}  # no integrations (MLflow) in this bare trainer
    t._setup_train()
    batch = t.preprocess_batch(next(iter(t.train_loader)))
    loss, _ = t.model(batch)
    loss.sum().backward()
    trainable = [n for n, p in t.model.named_parameters() if p.requires_grad]
    unused = [n for n, p in t.model.named_parameters() if p.requires_grad and p.grad is None]
    assert len(trainable) > 300 and unused == []


@pytest.mark.quick
def test_ddp_wrap_gives_the_gradient_of_the_plain_module():
    """The wrap used for CPU workers and for rewrapping on GPUs, on a one-process gloo group."""
    import torch.distributed as dist

    from conftest import free_port
    from raytrain_yolo.train.adapter import ddp_wrap

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        ddp = ddp_wrap(copy.deepcopy(plain), None, find_unused=False, static_graph=False)
        x = torch.randn(16, 4)
        for _ in range(2):  # a second step fails if the reducer expected gradients that never came
            plain.zero_grad(), ddp.zero_grad()
            plain(x).pow(2).mean().backward()
            ddp(x).pow(2).mean().backward()
        for a, b in zip(plain.parameters(), ddp.module.parameters()):
            assert torch.allclose(a.grad, b.grad)
        assert ddp.find_unused_parameters is False
    finally:
        dist.destroy_process_group()


# --- on a GPU machine ------------------------------------------------------------------------------------------

gpu_only = pytest.mark.skipif(not GPU, reason="no GPU on this machine")


@gpu_only
def test_one_gpu_worker_trains(tmp_path):
    proc = run_cli("fit", "--gpu", "--num-workers", 1, "--storage-path", tmp_path, "--name", "gpu", "--no-tracking",
                   "--synthetic-train", 64, "--synthetic-val", 16, "epochs=2", "batch=16", f"imgsz={S}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    s = load_summary(tmp_path, "gpu")
    assert s["device"] == "cuda" and s["workers"][0]["device"] == "cuda:0" and s["epochs_completed"] == 2
    assert s["device_name"] == torch.cuda.get_device_name(0)
    assert total_train_loss(s["history"][-1]) < total_train_loss(s["history"][0])


@gpu_only
def test_device_loader_on_cuda_gives_the_cpu_batch_for_the_same_draws():
    source = source_dataset()
    cpu = DeviceDataset(source, AugmentHyp(imgsz=S), torch.device("cpu"))
    cuda = DeviceDataset(source_dataset(), AugmentHyp(imgsz=S), torch.device("cuda", 0))
    assert torch.equal(cpu.images, cuda.images.cpu())
    idx = torch.arange(N)
    a = augment(cpu.images, cpu.hw, cpu.boxes, idx, cpu.hyp, torch.Generator().manual_seed(1))
    b = augment(cuda.images, cuda.hw, cuda.boxes, idx, cuda.hyp, torch.Generator().manual_seed(1))
    assert b["img"].is_cuda
    diff = (a["img"].float() - b["img"].cpu().float()).abs()
    assert diff.mean() < 0.05 and diff.max() <= 2, (float(diff.mean()), float(diff.max()))  # rounding only
    assert torch.equal(a["cls"], b["cls"].cpu()) and torch.equal(a["batch_idx"], b["batch_idx"].cpu())
    assert torch.allclose(a["bboxes"], b["bboxes"].cpu(), atol=1e-4)

