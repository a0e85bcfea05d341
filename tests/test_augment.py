"""Issue 9: batched augmentation (`--loader device`) against Ultralytics' own transforms, on CPU.

The same random draws are fed to Ultralytics' transforms and to ours: for the geometry, Ultralytics' own
matrix and mosaic layout are handed to our warp. Boxes must match, and images must match up to interpolation.
A second dataset of solid rectangles checks that every output box still sits on its object, through mosaic,
perspective and flips.
"""

from __future__ import annotations

import os
import random
import signal

import cv2
import numpy as np
import pytest
import torch
from ultralytics.utils.ops import xywh2xyxy

from raytrain_yolo.core.config import SyntheticSpec
from raytrain_yolo.data.synthetic import ensure_synthetic
from raytrain_yolo.train.augment import AugmentHyp, Draws, augment, hsv_jitter, layout, perspective_matrix, transform_labels, warp
from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader

S = 96  # imgsz


def ultralytics_dataset(data_yaml, imgsz: int, **hyp):
    from ultralytics.cfg import get_cfg
    from ultralytics.data import build_yolo_dataset
    from ultralytics.data.utils import check_det_dataset

    cfg = get_cfg(overrides={"imgsz": imgsz, "data": str(data_yaml), **hyp})
    data = check_det_dataset(str(data_yaml))
    return build_yolo_dataset(cfg, data["train"], 8, data, mode="train", stride=32)


@pytest.fixture(scope="module")
def shapes_yaml():
    return ensure_synthetic(SyntheticSpec(train=12, val=4, imgsz=S, seed=3))


@pytest.fixture(scope="module")
def rects_yaml(tmp_path_factory):
    """Solid rectangles of distinct colours on gray-free noise, in images of several aspect ratios."""
    root = tmp_path_factory.mktemp("rects")
    rng = np.random.default_rng(0)
    colors = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
        for i in range(8 if split == "train" else 2):
            h, w = [(120, 80), (80, 120), (100, 100), (60, 140)][i % 4]
            img = rng.integers(0, 40, (h, w, 3), dtype=np.uint8)  # dark noise, far from every object colour
            lines = []
            for c in range(2):
                bw, bh = int(rng.integers(w // 5, w // 2)), int(rng.integers(h // 5, h // 2))
                x0 = int(rng.integers(0, w - bw)) if c == 0 else w - bw
                y0 = 0 if c == 0 else h - bh
                img[y0:y0 + bh, x0:x0 + bw] = colors[c][::-1]  # written as BGR
                lines.append(f"{c} {(x0 + bw / 2) / w} {(y0 + bh / 2) / h} {bw / w} {bh / h}\n")
            cv2.imwrite(str(root / "images" / split / f"{i}.png"), img)
            (root / "labels" / split / f"{i}.txt").write_text("".join(lines))
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: red\n  1: green\n")
    return root / "data.yaml"


@pytest.mark.quick
def test_matrix_equals_ultralytics_for_the_same_draws():
    from ultralytics.data.augment import RandomPerspective

    rp = RandomPerspective(degrees=12, translate=0.2, scale=0.4, shear=6, perspective=0.0004, size=(S, S))
    canvas = np.zeros((2 * S, 2 * S - 10, 3), np.uint8)
    random.seed(7)
    m_ultra, scale = rp._compute_affine_matrix(canvas, (S, S))
    random.seed(7)  # replay the same eight draws, in Ultralytics' order: P, rotation, scale, shear, translation
    px, py, deg, sc, shx, shy, tx, ty = (
        random.uniform(*r) for r in [(-0.0004, 0.0004)] * 2 + [(-12, 12), (0.6, 1.4)] + [(-6, 6)] * 2 + [(0.3, 0.7)] * 2
    )
    t = lambda *v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    d = Draws(mosaic=None, partners=None, center=None, perspective=t(px, py), degrees=t(deg)[0], scale=t(sc)[0],
              shear=t(shx, shy), translate=t(tx, ty), hsv=None, flipud=None, fliplr=None)
    m_ours = perspective_matrix(t(2 * S - 10, 2 * S), S, d)[0].numpy()
    assert scale == pytest.approx(sc)
    np.testing.assert_allclose(m_ours, m_ultra, rtol=1e-5, atol=1e-6)


@pytest.mark.quick
@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_mosaic_and_perspective_match_ultralytics(shapes_yaml, seed):
    """Ultralytics' Mosaic + RandomPerspective vs our warp, given Ultralytics' own layout and matrix."""
    from ultralytics.data.augment import Mosaic, RandomPerspective

    ds = ultralytics_dataset(shapes_yaml, S)
    ds.buffer = list(range(len(ds.labels)))  # Mosaic picks partners from this buffer: make it the whole set
    random.seed(seed)
    mosaic = Mosaic(ds, imgsz=S, p=1.0)
    labels = ds.get_image_and_label(seed)
    params = mosaic.get_params(labels)
    partners = [ds.im_files.index(lb["im_file"]) for lb in labels["mix_labels"]]
    labels = mosaic.apply_instances(mosaic.apply_image(labels, params), params)
    xc, yc = params["layout"][3]["x1a"], params["layout"][3]["y1a"]
    rp = RandomPerspective(degrees=5, translate=0.1, scale=0.5, shear=2, size=(S, S))
    p = rp.get_params(labels)
    out = rp.apply_instances(rp.apply_image(labels, p), p)
    ultra_img = torch.from_numpy(out["img"][..., ::-1].transpose(2, 0, 1).copy()).float()
    out["instances"].convert_bbox("xyxy")
    ultra_boxes = torch.from_numpy(out["instances"].bboxes).double()

    dd = DeviceDataset(ultralytics_dataset(shapes_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    one = lambda v: torch.tensor([v])  # noqa: E731
    d = Draws(mosaic=one(True), partners=torch.tensor([partners]), center=torch.tensor([[xc, yc]]),
              perspective=None, degrees=None, scale=one(p["scale"]).double(), shear=None, translate=None,
              hsv=None, flipud=one(False), fliplr=one(False))
    lay = layout_with_matrix(torch.tensor([seed]), dd.hw, d, torch.from_numpy(p["M"]).double())
    ours = warp(dd.images, lay, d, S)[0]
    cls, xywh, _ = transform_labels(dd.boxes, lay, d, S)
    xyxy = xywh2xyxy(xywh).double() * S

    assert len(ultra_boxes) > 0
    torch.testing.assert_close(cls.flatten(), torch.from_numpy(out["cls"]).float().flatten())
    torch.testing.assert_close(xyxy, ultra_boxes, atol=0.02, rtol=0)
    diff = (ours - ultra_img).abs()
    assert diff.mean() < 1.5, diff.mean()  # bilinear in float vs cv2's fixed point; seams at tile edges
    assert (diff > 30).float().mean() < 0.01


@pytest.mark.quick
@pytest.mark.parametrize("seed", [0, 1])
def test_perspective_without_mosaic_matches_ultralytics(shapes_yaml, seed):
    """The close_mosaic path: RandomPerspective straight on the resized image (its own canvas)."""
    from ultralytics.data.augment import RandomPerspective

    ds = ultralytics_dataset(shapes_yaml, S)
    labels = ds.get_image_and_label(seed)
    random.seed(seed)
    rp = RandomPerspective(degrees=8, translate=0.1, scale=0.5, shear=3, size=(S, S))
    p = rp.get_params(labels)
    out = rp.apply_instances(rp.apply_image(labels, p), p)
    ultra_img = torch.from_numpy(out["img"][..., ::-1].transpose(2, 0, 1).copy()).float()
    out["instances"].convert_bbox("xyxy")

    dd = DeviceDataset(ultralytics_dataset(shapes_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    one = lambda v: torch.tensor([v])  # noqa: E731
    d = Draws(mosaic=one(False), partners=torch.zeros(1, 3, dtype=torch.long), center=torch.zeros(1, 2, dtype=torch.long),
              perspective=None, degrees=None, scale=one(p["scale"]).double(), shear=None, translate=None,
              hsv=None, flipud=one(False), fliplr=one(False))
    lay = layout_with_matrix(torch.tensor([seed]), dd.hw, d, torch.from_numpy(p["M"]).double())
    assert lay.tiles.shape == (1, 1) and lay.canvas_wh.tolist() == [[dd.hw[seed, 1], dd.hw[seed, 0]]]
    ours = warp(dd.images, lay, d, S)[0]
    cls, xywh, _ = transform_labels(dd.boxes, lay, d, S)
    xyxy = xywh2xyxy(xywh).double() * S
    assert len(xyxy) > 0
    torch.testing.assert_close(xyxy, torch.from_numpy(out["instances"].bboxes).double(), atol=0.02, rtol=0)
    torch.testing.assert_close(cls.flatten(), torch.from_numpy(out["cls"]).float().flatten())
    assert (ours - ultra_img).abs().mean() < 1.5


def layout_with_matrix(idx, hw, d, M):
    """Our mosaic layout for these draws, with Ultralytics' matrix in place of ours."""
    d.perspective = torch.zeros(1, 2, dtype=torch.float64)
    d.degrees = torch.zeros(1, dtype=torch.float64)
    d.shear = torch.zeros(1, 2, dtype=torch.float64)
    d.translate = torch.zeros(1, 2, dtype=torch.float64)
    lay = layout(idx, hw, d, S)
    lay.M = M[None]
    return lay


@pytest.mark.quick
@pytest.mark.parametrize("seed", [0, 5])
def test_hsv_matches_ultralytics(shapes_yaml, seed):
    from ultralytics.data.augment import RandomHSV

    bgr = cv2.imread(str(ultralytics_dataset(shapes_yaml, S).im_files[seed]))
    np.random.seed(seed)
    ultra = RandomHSV(0.015, 0.7, 0.4).apply_image({"img": bgr.copy()})["img"][..., ::-1]
    np.random.seed(seed)
    gains = torch.from_numpy(np.random.uniform(-1, 1, 3) * [0.015, 0.7, 0.4])[None]
    rgb = torch.from_numpy(bgr[..., ::-1].transpose(2, 0, 1).copy()).float()[None]
    ours = hsv_jitter(rgb, gains)[0].round().clamp(0, 255)
    diff = (ours - torch.from_numpy(ultra.transpose(2, 0, 1).copy()).float()).abs()
    assert diff.mean() < 1.5 and diff.max() <= 12, (diff.mean(), diff.max())


def rect_loader(rects_yaml, batch=8, **hyp):
    src = ultralytics_dataset(rects_yaml, S)
    ds = DeviceDataset(src, AugmentHyp(imgsz=S, hsv_h=0, hsv_s=0, hsv_v=0, **hyp), torch.device("cpu"))
    return DeviceLoader(ds, batch_size=batch, rank=0, world_size=1, seed=0)


@pytest.mark.quick
@pytest.mark.parametrize("hyp", [{}, {"flipud": 0.5, "degrees": 0.0, "scale": 0.9}, {"mosaic": 0.0}, {"mosaic": 0.5}])
def test_every_box_stays_on_its_object(rects_yaml, hyp):
    """Rectangles fill their boxes exactly; after augmentation each kept box must still be its colour."""
    loader = rect_loader(rects_yaml, **hyp)
    colors = torch.tensor([[255, 0, 0], [0, 255, 0]]).float()
    checked = 0
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        for b in loader:
            for cls, (x, y, w, h), i in zip(b["cls"].flatten(), (b["bboxes"] * S).tolist(), b["batch_idx"]):
                x1, y1, x2, y2 = (int(round(v)) for v in (x - w / 2 + 1, y - h / 2 + 1, x + w / 2 - 1, y + h / 2 - 1))
                if x2 - x1 < 3 or y2 - y1 < 3:
                    continue
                patch = b["img"][int(i), :, y1:y2, x1:x2].float()
                near = ((patch - colors[int(cls)][:, None, None]).abs().max(0).values < 40).float().mean()
                assert near > 0.9, (epoch, int(i), int(cls), float(near))
                checked += 1
    assert checked > 20


@pytest.mark.quick
def test_fixed_seed_gives_the_same_batches(rects_yaml):
    a, b = rect_loader(rects_yaml), rect_loader(rects_yaml)
    first = [next(iter(a)), next(iter(b))]
    for key in ("img", "cls", "bboxes", "batch_idx"):
        assert torch.equal(first[0][key], first[1][key]), key
    a.sampler.set_epoch(1)
    assert not torch.equal(next(iter(a))["img"], first[0]["img"])


@pytest.mark.quick
def test_close_mosaic_keeps_each_image_to_its_own_objects(rects_yaml):
    loader = rect_loader(rects_yaml)
    per_image = lambda b: torch.bincount(b["batch_idx"].long(), minlength=len(b["img"]))  # noqa: E731
    assert max(per_image(b).max() for b in loader) > 2  # mosaic brings in other images' rectangles
    loader.dataset.close_mosaic()
    for epoch in range(3):
        loader.sampler.set_epoch(epoch)
        assert all(per_image(b).max() <= 2 for b in loader)


@pytest.mark.quick
def test_whole_batch_is_ultralytics_format(shapes_yaml):
    ds = DeviceDataset(ultralytics_dataset(shapes_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    out = augment(ds.images, ds.hw, ds.boxes, torch.arange(6), ds.hyp, torch.Generator().manual_seed(0))
    assert out["img"].shape == (6, 3, S, S) and out["img"].dtype == torch.uint8
    n = len(out["cls"])
    assert n > 0 and out["cls"].shape == (n, 1) and out["bboxes"].shape == (n, 4) and out["batch_idx"].shape == (n,)
    assert out["bboxes"].min() >= 0 and out["bboxes"].max() <= 1


def test_device_loader_trains_under_ray_ddp(tmp_path, mlflow_server):
    """`fit --loader device` on 2 gloo workers: ranks split each epoch, mosaic closes, the loss falls.

    The same run is issue 22's "MLflow server gone for good" cell (a launch of its own would cost ~45 s): it logs to
    the session's MLflow server through a TCP path that is cut once the first checkpoint is registered and never
    restored. Training ends complete; the console says once that the server does not answer; the summary names what
    never reached MLflow: exactly the epochs after those the server has, and the run's end. The run joins the
    session's head, whose workers do not inherit the driver's environment: MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 (no
    waiting out MLflow's backoff at the end, about 4 minutes by default) reaches rank 0 with the driver's other
    MLflow settings (tracking.client_settings), so the run ends within the bound below."""
    from collections import Counter

    from mlflow import MlflowClient

    from conftest import load_summary, shared_head, start_cli, total_train_loss, wait_for
    from test_faults import registered_checkpoints
    from test_tracking import CuttableLink

    n_train, epochs = 64, 4
    link = CuttableLink(mlflow_server)
    link.up()
    head = shared_head()
    head.wait_idle()
    log = tmp_path / "fit.log"
    fit = start_cli("fit", "--cpu", "--num-workers", 2, "--loader", "device", "--storage-path", tmp_path,
                    "--name", "dev", "--trace-samples", "--tracking-uri", link.uri, "--experiment", "mlflow-gone",
                    "--no-validate-untrained",
                    "--synthetic-train", n_train, "--synthetic-val", 16, f"epochs={epochs}", "batch=16", "imgsz=96",
                    "close_mosaic=1", log_path=log, env={**head.driver_env, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"})
    try:
        wait_for(lambda: registered_checkpoints(tmp_path / "dev") >= 1 or fit.poll() is not None, 300,
                 what="the first checkpoint")
        link.cut()
        rc = fit.wait(timeout=150)  # the rest of the run; MLflow's default retries at the end would take minutes more
    finally:
        link.cut()
        if fit.poll() is None:
            os.killpg(fit.pid, signal.SIGKILL)
    out = log.read_text()
    assert rc == 0, out[-3000:]
    s = load_summary(tmp_path, "dev")
    assert out.count("training goes on") == 1 and "did not get summary.json" in out, out[-3000:]  # rank 0, the driver
    client = MlflowClient(mlflow_server)  # the server's own view, never cut
    run = client.get_run(s["mlflow_run_id"])
    sent = sorted(m.step for m in client.get_metric_history(run.info.run_id, "lr/pg0"))
    # Rank 0 hands an epoch to MLflow once its checkpoint is registered, one report later (issue 39): the path is
    # cut right after the first checkpoint, so the server may hold no epoch; what it lacks is named below.
    assert sent == list(range(1, len(sent) + 1)) and len(sent) < epochs, sent
    unsent = s["tracking_unsent"]
    assert [u for u in unsent if u.endswith("'s metrics")] == [f"epoch {e}'s metrics" for e in range(len(sent) + 1, epochs + 1)], unsent
    assert "run status FINISHED" in unsent and run.info.status == "RUNNING", (unsent, run.info.status)
    worker_log = (tmp_path / "dev" / "run.log").read_text()  # the workers' full output (issue 14's console)
    assert "Closing dataloader mosaic" in worker_log  # Ultralytics' own close_mosaic call
    s = load_summary(tmp_path, "dev")
    assert s["epochs_completed"] == epochs and s["world_size"] == 2
    losses = [total_train_loss(h) for h in s["history"]]
    assert losses[-1] < losses[0], losses
    ranks = {w["rank"]: w for w in s["workers"]}
    assert ranks[0]["params_sha256"] == ranks[1]["params_sha256"]
    for e in range(epochs):
        seen = Counter(i for r in (0, 1) for i in ranks[r]["samples"][e]["indices"])
        assert set(seen) == set(range(n_train)) and max(seen.values()) == 1, e
    assert ranks[0]["samples"][0]["indices"] != ranks[0]["samples"][1]["indices"]  # reshuffled each epoch
    # --trace-samples records what each rank really trained on: the order its sampler names for that epoch (once
    # test_gpu_path's one-worker fit of its own).
    from torch.utils.data import DistributedSampler

    for r in (0, 1):
        for e in range(epochs):
            expected = DistributedSampler(range(n_train), num_replicas=2, rank=r, shuffle=True, seed=0)
            expected.set_epoch(e)
            assert ranks[r]["samples"][e]["indices"] == list(expected), (r, e)


@pytest.mark.quick
def test_a_dataset_too_big_for_device_memory_is_refused_with_the_fix():
    from raytrain_yolo.train.loader import check_fits

    check_fits(16, 96, torch.device("cpu"))
    with pytest.raises(MemoryError, match="--loader ultralytics"):
        check_fits(10**9, 640, torch.device("cpu"))


@pytest.mark.quick
def test_loading_in_chunks_stores_every_image(rects_yaml, monkeypatch):
    """Images of several aspect ratios (so gray padding must be reset per chunk), loaded 3 at a time."""
    import raytrain_yolo.train.loader as loader_mod

    whole = DeviceDataset(ultralytics_dataset(rects_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    monkeypatch.setattr(loader_mod, "LOAD_CHUNK", 3)  # 8 images: chunks of 3, 3 and 2
    chunked = DeviceDataset(ultralytics_dataset(rects_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    assert torch.equal(whole.images, chunked.images) and torch.equal(whole.hw, chunked.hw)
    assert len(set(map(tuple, whole.hw.tolist()))) > 1
    ds = ultralytics_dataset(rects_yaml, S)
    for i in (0, 4, 7):
        im, _, (h, w) = ds.load_image(i)
        assert torch.equal(chunked.images[i, :, :h, :w], torch.from_numpy(im[..., ::-1].transpose(2, 0, 1).copy()))


@pytest.mark.quick
def test_chunked_warp_gives_the_same_batch(rects_yaml, monkeypatch):
    import raytrain_yolo.train.augment as aug

    ds = DeviceDataset(ultralytics_dataset(rects_yaml, S), AugmentHyp(imgsz=S), torch.device("cpu"))
    idx = torch.arange(20) % len(ds)
    run = lambda: augment(ds.images, ds.hw, ds.boxes, idx, ds.hyp, torch.Generator().manual_seed(3))  # noqa: E731
    whole = run()
    monkeypatch.setattr(aug, "CHUNK", 7)  # 20 images: chunks of 7, 7 and 6, each with its own HSV and flips
    chunked = run()
    for key in ("img", "cls", "bboxes", "batch_idx"):
        assert torch.equal(whole[key], chunked[key]), key


@pytest.mark.quick
def test_plain_rows_of_a_mixed_batch_keep_their_own_labels_once(rects_yaml):
    """Issue 44, 1: at 0 < mosaic < 1 a batch mixes mosaic and plain images. A plain image holds its own two
    rectangles once each, as Ultralytics' pipeline gives it (no Mosaic: RandomPerspective of the image alone); it
    came back with every box four times (the four zero-offset tiles of its row each kept their labels)."""
    from raytrain_yolo.train.augment import draw

    ds = DeviceDataset(ultralytics_dataset(rects_yaml, S), AugmentHyp(imgsz=S, mosaic=0.5), torch.device("cpu"))
    own = (ds.boxes.start[1:] - ds.boxes.start[:-1])  # labels per image in the dataset: 2
    plain_rows = 0
    for seed in range(6):
        idx = torch.arange(len(own))
        d = draw(ds.hyp, len(idx), len(own), torch.Generator().manual_seed(seed))  # augment's own first draw
        out = augment(ds.images, ds.hw, ds.boxes, idx, ds.hyp, torch.Generator().manual_seed(seed))
        per_row = torch.bincount(out["batch_idx"].long(), minlength=len(idx))
        for row in torch.nonzero(~d.mosaic).flatten().tolist():
            plain_rows += 1
            assert per_row[row] <= own[idx[row]], (seed, row, int(per_row[row]))
            boxes = out["bboxes"][out["batch_idx"] == row]
            assert len(torch.unique(boxes, dim=0)) == len(boxes), "a box given twice"
        assert bool(d.mosaic.any()), "the batch mixes mosaic rows in"
    assert plain_rows >= 6


@pytest.mark.quick
def test_mixed_mosaic_batches_have_ultralytics_box_counts(rects_yaml):
    """Issue 44, 1, against Ultralytics' own pipeline: at mosaic=0.5 the boxes per training image, averaged over
    many draws, are those of Ultralytics' Mosaic + RandomPerspective at the same probability (each plain image's
    boxes four times gave about 1.6x as many)."""
    from ultralytics.cfg import get_cfg

    hyp = {"mosaic": 0.5, "mixup": 0.0, "cutmix": 0.0}
    theirs = ultralytics_dataset(rects_yaml, S, **hyp)
    their_counts = [len(theirs[i % len(theirs)]["cls"]) for i in range(400)]
    ours = DeviceDataset(ultralytics_dataset(rects_yaml, S), AugmentHyp.from_args(get_cfg(overrides={"imgsz": S, **hyp})),
                         torch.device("cpu"))
    n = len(ours.hw)
    our_counts = []
    for seed in range(50):
        out = augment(ours.images, ours.hw, ours.boxes, torch.arange(n), ours.hyp, torch.Generator().manual_seed(seed))
        our_counts += torch.bincount(out["batch_idx"].long(), minlength=n).tolist()
    mine, their = np.mean(our_counts), np.mean(their_counts)
    assert abs(mine - their) < 0.2 * their, (mine, their)
