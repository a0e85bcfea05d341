"""Issue 24 (CPU part): the device loader's compressed stores and per-rank shards, against Ultralytics' `load_image`.

JPEG bytes decoded on the CPU device here (libjpeg-turbo, as cv2's); on a GPU the same code decodes with nvJPEG.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from raytrain_yolo.train.augment import AugmentHyp, augment
from raytrain_yolo.train.loader import DeviceDataset, DeviceLoader, ShardSampler
from test_augment import ultralytics_dataset

pytestmark = pytest.mark.quick

S = 64
CPU = torch.device("cpu")
# (h, w, how it is written): at S (no resize), larger (shrunk), smaller (enlarged), gray JPEG, EXIF-rotated, PNG
IMAGES = [(64, 48, "jpg"), (120, 90, "jpg"), (40, 30, "jpg"), (80, 64, "gray"), (48, 96, "exif"), (70, 50, "png")]


@pytest.fixture(scope="module")
def mixed_yaml(tmp_path_factory):
    """One box per image; the EXIF-rotated JPEG is stored sideways with orientation 6 (90 degrees clockwise to view),
    which Ultralytics (cv2) and the store must both apply."""
    root = tmp_path_factory.mktemp("mixed-store")
    rng = np.random.default_rng(1)
    for split in ("train", "val"):
        (root / "images" / split).mkdir(parents=True)
        (root / "labels" / split).mkdir(parents=True)
    for i, (h, w, kind) in enumerate(IMAGES):
        img = cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 0)  # JPEG-friendly texture
        name = f"{i}.png" if kind == "png" else f"{i}.jpg"
        path = root / "images" / "train" / name
        if kind == "png":
            cv2.imwrite(str(path), img)
        elif kind == "gray":
            cv2.imwrite(str(path), cv2.cvtColor(img, cv2.COLOR_BGR2GRAY), [cv2.IMWRITE_JPEG_QUALITY, 90])
        elif kind == "exif":
            exif = Image.Exif()
            exif[0x0112] = 6
            sideways = np.ascontiguousarray(np.rot90(img[..., ::-1], 1))  # (w, h): viewed after a turn clockwise
            Image.fromarray(sideways).save(path, quality=90, exif=exif)
        else:
            cv2.imwrite(str(path), img, [cv2.IMWRITE_JPEG_QUALITY, 90])
        (root / "labels" / "train" / f"{path.stem}.txt").write_text("0 0.5 0.5 0.4 0.4\n")
    cv2.imwrite(str(root / "images" / "val" / "v.jpg"), np.zeros((32, 32, 3), np.uint8))
    (root / "labels" / "val" / "v.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    (root / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n  0: thing\n")
    return root / "data.yaml"


def stores(data_yaml, *kinds):
    hyp = AugmentHyp(imgsz=S)
    return [DeviceDataset(ultralytics_dataset(data_yaml, S), hyp, CPU, kind) for kind in kinds]


def test_the_compressed_stores_give_ultralytics_load_image_pixels(mixed_yaml):
    """Against the decoded store (Ultralytics' `load_image`, BGR to RGB): the same sizes and boxes; the same pixels
    where no resize is needed (both libjpeg-turbo; PNG read by Ultralytics itself); within 2 grey levels, mean under
    0.5, where the image is shrunk or enlarged (cv2's 11-bit fixed-point bilinear weights against float ones)."""
    decoded, jpeg, stream = stores(mixed_yaml, "decoded", "jpeg", "stream")
    assert torch.equal(decoded.hw, jpeg.hw) and torch.equal(decoded.hw, stream.hw)
    assert torch.equal(decoded.boxes.xyxy, jpeg.boxes.xyxy)
    assert jpeg.images.fallbacks == 1 and jpeg.images.shape == decoded.images.shape
    idx = torch.arange(len(decoded))
    ours, theirs = jpeg.images[idx], decoded.images
    assert torch.equal(stream.images[idx], ours), "streamed bytes decode as held ones"
    files = decoded.im_files
    for i, f in enumerate(files):
        h0, w0 = decoded.source.labels[i]["shape"]
        diff = (ours[i].int() - theirs[i].int()).abs()
        if max(h0, w0) == S or f.endswith(".png"):
            assert diff.max() == 0, (f, diff.max())
        else:
            assert diff.max() <= 2 and diff.float().mean() < 0.5, (f, diff.max(), diff.float().mean())
    # The EXIF-rotated file is stored 96 tall and 48 wide; read upright it is 48 x 96, by Ultralytics (so by the
    # decoded store) and, pixel for pixel above, by the compressed ones.
    exif = next(i for i, f in enumerate(files) if f.endswith(f"{IMAGES.index((48, 96, 'exif'))}.jpg"))
    assert Image.open(files[exif]).size == (48, 96) and decoded.hw[exif].tolist() == [32, 64]


def test_a_batch_from_the_jpeg_store_is_the_decoded_stores_batch(mixed_yaml):
    """The same draws give the same boxes, and pixels within the store's tolerance, through mosaic and warp."""
    decoded, jpeg = stores(mixed_yaml, "decoded", "jpeg")
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 1, 2])
    a, b = (augment(d.images, d.hw, d.boxes, idx, d.hyp, torch.Generator().manual_seed(5)) for d in (decoded, jpeg))
    for key in ("cls", "bboxes", "batch_idx"):
        assert torch.equal(a[key], b[key]), key
    diff = (a["img"].int() - b["img"].int()).abs()
    assert diff.float().mean() < 0.5 and diff.max() <= 3, (diff.float().mean(), diff.max())


def test_each_rank_holds_a_fixed_shard_and_every_image_trains_once_per_epoch():
    """11 images over 3 ranks: shards of 4, 4 and 3, disjoint, covering all; each epoch each rank yields 4 positions
    (the 3-image shard repeats one), in a new order each epoch, every image among them."""
    n, world = 11, 3
    samplers = [ShardSampler(n, world, r, seed=7) for r in range(world)]
    shards = [s.shard for s in samplers]
    assert sorted(i for sh in shards for i in sh) == list(range(n))
    assert sorted(map(len, shards)) == [3, 4, 4]
    assert shards == [ShardSampler(n, world, r, seed=7).shard for r in range(world)], "the split depends on the seed only"
    orders = {}
    for epoch in range(3):
        seen = []
        for r, s in enumerate(samplers):
            s.set_epoch(epoch)
            local = list(s)
            assert len(local) == s.num_samples == 4
            orders[r, epoch] = local
            seen += [shards[r][k] for k in local]
        assert set(seen) == set(range(n)) and len(seen) == n + 1  # one repeat: the short shard's pad
    assert all(orders[r, 0] != orders[r, 1] or orders[r, 1] != orders[r, 2] for r in range(world)), orders
    big = ShardSampler(40, world, 1, seed=7)  # 13 images: a repeated order would be chance, not a missing reshuffle
    big.set_epoch(0)
    first = list(big)
    big.set_epoch(1)
    second = list(big)
    assert len(first) == len(second) == 14 and set(first) == set(second) == set(range(13)) and first != second


def test_a_sharded_loader_gives_batches_of_its_own_images(mixed_yaml):
    """Rank 1 of 2 with the jpeg store: it holds only its shard, and its batches carry those files only."""
    src = ultralytics_dataset(mixed_yaml, S)
    sampler = ShardSampler(len(src.labels), 2, 1, seed=0)
    ds = DeviceDataset(src, AugmentHyp(imgsz=S), CPU, "jpeg", sampler.shard)
    assert len(ds) == len(sampler.shard) == 3 and len(ds.images) == 3
    loader = DeviceLoader(ds, batch_size=2, rank=1, world_size=2, seed=0, sampler=sampler)
    files = {f for b in loader for f in b["im_file"]}
    assert files == {src.im_files[i] for i in sampler.shard}
    assert len(loader) == 2


def test_the_store_is_chosen_by_what_fits(mixed_yaml, monkeypatch):
    """`--loader device`: decoded when it fits, else the compressed shard in host memory, else streamed from disk;
    `device-jpeg` that does not fit names device-stream. (The budgets are shrunk to make the set 'too big'.)"""
    import raytrain_yolo.train.loader as loader_mod
    from raytrain_yolo.train.adapter import DeviceLoaderMixin, trainer_class

    files = ultralytics_dataset(mixed_yaml, S).im_files
    choose = loader_mod.choose_store
    assert choose("device", files, S, CPU, 2) == "decoded"
    assert choose("device-stream", files, S, CPU, 2) == "stream"
    monkeypatch.setattr(loader_mod, "STORE_FRACTION", 0.0)
    assert choose("device", files, S, CPU, 2) == "jpeg"
    with pytest.raises(MemoryError, match="--loader device .keeps them compressed"):
        loader_mod.check_fits(len(files), S, CPU)
    monkeypatch.setattr(loader_mod, "HOST_FRACTION", 0.0)
    assert choose("device", files, S, CPU, 2) == "stream"
    with pytest.raises(MemoryError, match="use --loader device-stream"):
        choose("device-jpeg", files, S, CPU, 2)
    trainer = trainer_class("detect", "device-jpeg")
    assert issubclass(trainer, DeviceLoaderMixin) and trainer.device_loader == "device-jpeg"


def test_prefetch_gives_the_same_batches_and_ends_with_the_epoch(mixed_yaml):
    """--prefetch (issue 23): each batch built one step ahead on a thread gives the very batches, in the same order,
    as building them in the step; a trainer that stops mid-epoch ends the thread; an error there reaches the step."""
    import threading

    src = ultralytics_dataset(mixed_yaml, S)
    ds = DeviceDataset(src, AugmentHyp(imgsz=S), CPU)
    plain, ahead = (DeviceLoader(ds, batch_size=2, rank=0, world_size=1, seed=4, prefetch=p) for p in (False, True))
    for epoch in range(2):
        plain.sampler.set_epoch(epoch)
        ahead.sampler.set_epoch(epoch)
        got = list(zip(plain, ahead, strict=True))
        assert len(got) == 3
        for a, b in got:
            assert a["im_file"] == b["im_file"] and all(torch.equal(a[k], b[k]) for k in ("img", "bboxes", "cls"))

    def prefetching() -> bool:
        return any(t.name == "device-loader-prefetch" for t in threading.enumerate())

    it = iter(ahead)
    next(it)
    assert prefetching()
    it.close()  # what a `break` out of Ultralytics' batch loop does to the generator
    assert not prefetching()

    def broken(idx, gen):
        raise RuntimeError("augmentation failed")

    ds.batch = broken
    with pytest.raises(RuntimeError, match="augmentation failed"):
        next(iter(ahead))


def _agree(rank: int, port: int, kinds: list, out) -> None:
    import torch.distributed as dist

    from raytrain_yolo.train.loader import agree_store

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=len(kinds))
    try:
        out.put((rank, agree_store(kinds[rank])))
    finally:
        dist.destroy_process_group()


@pytest.mark.quick
def test_every_rank_uses_the_store_that_fits_on_every_rank():
    """Issue 44, 2: two gloo ranks, one with room for the decoded store and one without: both use the compressed
    shard (near the threshold each rank chose by its own free memory; with a decoded store on one rank and a shard
    on the other, some images trained twice an epoch and others never)."""
    import torch.multiprocessing as mp

    from conftest import free_port

    ctx = mp.get_context("spawn")
    out, port, kinds = ctx.Queue(), free_port(), ["decoded", "jpeg"]
    procs = [ctx.Process(target=_agree, args=(r, port, kinds, out)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(60)
    assert got == {0: "jpeg", 1: "jpeg"}, got
