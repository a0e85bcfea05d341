"""`--loader device`: the training set held on the training device's side, augmented per batch by `augment.py`.

Ultralytics' trainer only needs a few things from its train loader: iteration, `len`, `sampler` (with
`set_epoch`), `batch_size`, `drop_last`, `num_workers`, `reset()`, and `dataset.close_mosaic()` and
`dataset.labels`. This module supplies exactly those, so the training loop stays Ultralytics' own.
Validation keeps Ultralytics' loader.

Images come from Ultralytics' own dataset: its label parsing and cache, and `load_image`, which resizes the
long side to imgsz. Where they are kept (store.py) is chosen per run, `--loader device` choosing by size:
- decoded: one uint8 tensor (N, 3, imgsz, imgsz) in device memory, RGB, gray padding, about 1.2 MB per image at
  640 px; every rank holds the whole set and takes DistributedSampler's share of it each epoch, as Ultralytics'
  own loader does. Used when the set fits in half the free device memory (`--loader device-decoded` insists on it).
- jpeg: the files' JPEG bytes in host memory, decoded on the device per batch (`--loader device-jpeg`), when the
  decoded set does not fit and the compressed shard does (half the available host memory, shared by the node's
  ranks);
- stream: the bytes read from disk per batch (`--loader device-stream`), when neither fits.
With jpeg and stream each rank holds only a fixed shard of the set (`ShardSampler`): a random split made once
from the seed, shuffled anew each epoch within the shard, so no image bytes move between ranks. The difference
from DistributedSampler: a rank sees the same images every epoch (every image is still trained once per epoch
across the ranks, and mosaic partners come from the rank's own shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from raytrain_yolo.train.augment import GRAY, AugmentHyp, Labels, augment
from raytrain_yolo.train.store import EncodedStore, rgb_chw

STORE_FRACTION = 0.5  # of free device memory the decoded images may take
HOST_FRACTION = 0.5  # of available host memory the node's compressed shards may take together
LOAD_CHUNK = 256  # images decoded into host memory before each copy to the device
STORES = ("decoded", "jpeg", "stream")


class DeviceDataset:
    """The training images (one of STORES) and their boxes, ready for batched augmentation.

    ids: the dataset positions this rank holds (its shard), in order; None for all of them. Every table here is
    indexed by position in `ids`.
    """

    def __init__(self, source, hyp: AugmentHyp, device: torch.device, store: str = "decoded",
                 ids: list[int] | None = None):
        self.source = source  # an Ultralytics YOLODataset (its transforms are never called)
        self.hyp = hyp
        self.ids = list(range(len(source.labels))) if ids is None else list(ids)
        self.kind = store
        source.augment = False  # only read images: no mosaic buffer, no per-image cache kept in the source
        if store == "decoded":
            self.images, self.hw = self._decode_all(device)
        else:
            shapes = torch.tensor([source.labels[i]["shape"] for i in self.ids], dtype=torch.long)
            self.images = EncodedStore([source.im_files[i] for i in self.ids], shapes, hyp.imgsz, device,
                                       lambda k: source.load_image(self.ids[k])[0], stream=store == "stream")
            self.hw = self.images.hw
        self.boxes = _labels_table(self.labels, self.hw)

    def _decode_all(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        n, s = len(self.ids), self.hyp.imgsz
        check_fits(n, s, device)
        images = torch.full((n, 3, s, s), GRAY, dtype=torch.uint8, device=device)
        hw = torch.zeros(n, 2, dtype=torch.long)
        staging = torch.empty((min(n, LOAD_CHUNK), 3, s, s), dtype=torch.uint8)  # host memory stays bounded

        def load(j, k):
            im, _, (h, w) = self.source.load_image(self.ids[k])
            staging[j, :, :h, :w] = rgb_chw(im)
            hw[k] = torch.tensor([h, w])

        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # cv2 decode/resize release the GIL
            for lo in range(0, n, LOAD_CHUNK):
                ks = range(lo, min(n, lo + LOAD_CHUNK))
                staging.fill_(GRAY)
                list(pool.map(load, range(len(ks)), ks))
                images[lo:lo + len(ks)].copy_(staging[:len(ks)])
        return images, hw

    @property
    def held(self) -> tuple[int, str]:
        """(bytes this rank's store holds, where): "device" (decoded), "host" (jpeg), "disk" (stream: only the
        non-JPEG images, if any, are held)."""
        if self.kind == "decoded":
            return self.images.numel(), "device"
        return self.images.held_bytes, "host" if self.kind == "jpeg" else "disk"

    @property
    def labels(self) -> list[dict]:
        return [self.source.labels[i] for i in self.ids]

    @property
    def im_files(self) -> list[str]:
        return [self.source.im_files[i] for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def close_mosaic(self, hyp=None) -> None:
        """Called by Ultralytics' trainer for the last `close_mosaic` epochs."""
        self.hyp = dataclasses.replace(self.hyp, mosaic=0.0)

    def batch(self, idx: list[int], gen: torch.Generator) -> dict:
        out = augment(self.images, self.hw, self.boxes, torch.tensor(idx), self.hyp, gen)
        files = [self.source.im_files[self.ids[i]] for i in idx]
        shapes = [tuple(int(v) for v in self.hw[i]) for i in idx]
        s = self.hyp.imgsz
        return {**out, "im_file": files, "ori_shape": shapes, "resized_shape": [(s, s)] * len(idx)}


class EpochSampler(DistributedSampler):
    """A DistributedSampler that knows its epoch even when nobody calls `set_epoch`.

    Ultralytics calls `set_epoch` only when RANK != -1, so on one worker it never does. Each pass takes the
    epoch `set_epoch` named, or else the one after the previous pass: a new order and new draws every epoch.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._named = False  # set_epoch was called since the last pass began
        self._passes = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self._named = True

    def begin_pass(self) -> int:
        if self._passes and not self._named:
            self.epoch += 1
        self._named, self._passes = False, self._passes + 1
        return self.epoch


class ShardSampler(EpochSampler):
    """A fixed shard of the dataset per rank, shuffled anew each epoch within it (see the module docstring).

    `shard`: the dataset positions this rank holds, a random split made once from `seed` (the same split on every
    rank; shard sizes differ by at most one). Each pass yields positions *within* the shard, `num_samples` of them
    (DistributedSampler's per-rank count: a shorter shard repeats its first image of the epoch), so that every
    rank takes the same number of steps.
    """

    def __init__(self, n: int, num_replicas: int, rank: int, seed: int):
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        split = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        self.shard = sorted(split[rank::num_replicas])
        if not self.shard:
            raise ValueError(f"{n} training images cannot give each of {num_replicas} ranks a shard")

    def __iter__(self):
        gen = torch.Generator().manual_seed((self.seed * 100_003 + self.epoch) * 1_009 + self.rank)
        order = torch.randperm(len(self.shard), generator=gen).tolist()
        return iter(order + order[:self.num_samples - len(order)])


class DeviceLoader:
    """Iterates batches of `DeviceDataset`, one rank's share per epoch: DistributedSampler's order over the whole
    set (the default), or a `ShardSampler`'s over the rank's shard (then `dataset` holds just that shard)."""

    num_workers = 0

    def __init__(self, dataset: DeviceDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 drop_last: bool = False, sampler: EpochSampler | None = None, prefetch: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last  # as Ultralytics under compile=: no odd-sized last batch to recompile for
        self.sampler = sampler or EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.rank, self.seed = rank, seed
        self.prefetch = prefetch  # --prefetch: `_prefetched` builds batch i+1 while batch i trains

    def __len__(self) -> int:
        n = len(self.sampler) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        epoch = self.sampler.begin_pass()  # runs at the first batch: a created, unused iterator starts no epoch
        gen = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        order = list(self.sampler)
        batches = (self.dataset.batch(order[lo:lo + self.batch_size], gen)
                   for lo in range(0, len(self) * self.batch_size, self.batch_size))
        yield from (_prefetched(batches, self.dataset.images.device) if self.prefetch else batches)

    def reset(self) -> None:
        """Ultralytics calls this after close_mosaic; nothing is prefetched, so nothing to drop."""

    def close(self) -> None:
        """Ultralytics calls this when training ends: let the images go."""
        images = self.dataset.images
        if isinstance(images, torch.Tensor):
            self.dataset.images = images[:0]
        else:
            images.release()


def _prefetched(batches, device: torch.device):
    """`batches`, each built one step ahead on a background thread: the host work of augmentation (draws, layout,
    labels, decoding) overlaps the training step. On CUDA the thread queues its kernels on a side stream and the
    training stream waits for that batch's event only; the same batches, in the same order, either way."""
    import queue
    import threading

    ready: queue.Queue = queue.Queue(maxsize=1)  # one batch ahead: double buffering
    stop = threading.Event()
    cuda = device.type == "cuda"
    side = torch.cuda.Stream(device) if cuda else None

    def produce():
        try:
            with torch.cuda.stream(side) if cuda else contextlib.nullcontext():
                for b in batches:
                    event = torch.cuda.Event() if cuda else None
                    if cuda:
                        event.record(side)
                    while not stop.is_set():
                        try:
                            ready.put((b, event, None), timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if stop.is_set():
                        return
        except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
            ready.put((None, None, e))
            return
        ready.put((None, None, None))

    thread = threading.Thread(target=produce, name="device-loader-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            b, event, error = ready.get()
            if error is not None:
                raise error
            if b is None:
                return
            if cuda:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for v in b.values():
                    if isinstance(v, torch.Tensor) and v.is_cuda:
                        v.record_stream(current)  # its memory stays the batch's until the step is done with it
            yield b
    finally:  # the epoch ended, or the trainer stopped early: the thread ends too
        stop.set()
        while thread.is_alive():
            try:
                ready.get_nowait()
            except queue.Empty:
                thread.join(timeout=0.1)


def _free_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def decoded_fits(n: int, imgsz: int, device: torch.device) -> bool:
    """Whether n decoded images at imgsz fit in STORE_FRACTION of the device's free memory."""
    return n * 3 * imgsz * imgsz <= STORE_FRACTION * _free_bytes(device)


def check_fits(n: int, imgsz: int, device: torch.device) -> None:
    """The decoded store's check: refuse, naming the fixes, when its images do not fit."""
    if not decoded_fits(n, imgsz, device):
        need, free = n * 3 * imgsz * imgsz, _free_bytes(device)
        raise MemoryError(
            f"--loader device-decoded needs {need / 1e9:.1f} GB for {n} images at imgsz={imgsz} but {device.type} "
            f"has {free / 1e9:.1f} GB free: use --loader device (keeps them compressed when they do not fit), "
            "--loader ultralytics, a smaller imgsz, or fraction=<0..1>"
        )


def host_budget() -> float:
    """Bytes of host memory one rank's compressed shard may hold: HOST_FRACTION of what is available, shared by
    the ranks of this node (LOCAL_WORLD_SIZE, which Ray Train sets)."""
    return HOST_FRACTION * _free_bytes(torch.device("cpu")) / max(int(os.environ.get("LOCAL_WORLD_SIZE", 1)), 1)


def choose_store(loader: str, files: list[str], imgsz: int, device: torch.device, world_size: int) -> str:
    """One of STORES. `--loader device` takes the first that fits: decoded (all images, this device), jpeg (this
    rank's shard of the files' bytes, host memory), else stream; `--loader device-KIND` takes KIND, and refuses
    jpeg whose shard does not fit (decoded refuses in check_fits)."""
    kind = loader.removeprefix("device").removeprefix("-") or "auto"
    if kind == "decoded" or (kind == "auto" and decoded_fits(len(files), imgsz, device)):
        return "decoded"
    if kind == "stream":
        return "stream"
    shard = sum(os.path.getsize(f) for f in files) / max(world_size, 1)
    if shard <= host_budget():
        return "jpeg"
    if kind == "jpeg":
        raise MemoryError(f"--loader device-jpeg needs {shard / 1e9:.1f} GB of host memory per rank for the "
                          f"compressed images, more than {host_budget() / 1e9:.1f} GB: use --loader device-stream")
    return "stream"


def agree_store(kind: str) -> str:
    """The store every rank uses: each rank chose by its own free memory, and near the threshold they disagreed
    (rank 0 holds more: the EMA, the validator), so some images trained twice an epoch and others never (a decoded
    store samples the whole set, the others a fixed shard per rank). The ranks take the most frugal choice among
    them (decoded, then jpeg, then stream), which fits on every rank. A collective of all ranks."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return kind
    kinds: list = [None] * dist.get_world_size()
    dist.all_gather_object(kinds, kind)
    return max(kinds, key=STORES.index)


def _labels_table(labels: list[dict], hw: torch.Tensor) -> Labels:
    """Ultralytics' per-image normalised xywh boxes as one table of pixel xyxy on the stored images."""
    from ultralytics.utils.ops import xywh2xyxy

    counts = [len(lb["cls"]) for lb in labels]
    start = torch.zeros(len(labels) + 1, dtype=torch.long)
    start[1:] = torch.tensor(counts, dtype=torch.long).cumsum(0)
    if not sum(counts):
        return Labels(torch.zeros(0), torch.zeros(0, 4, dtype=torch.float64), start)
    cls = torch.from_numpy(np.concatenate([lb["cls"].reshape(-1) for lb in labels])).float()
    xywh = torch.from_numpy(np.concatenate([lb["bboxes"].reshape(-1, 4) for lb in labels])).double()
    img = torch.arange(len(labels)).repeat_interleave(torch.tensor(counts))
    h, w = hw[img, 0:1].double(), hw[img, 1:2].double()
    return Labels(cls, xywh2xyxy(xywh) * torch.cat([w, h, w, h], 1), start)


def build(trainer, img_path: str, batch_size: int) -> DeviceLoader:
    """The train loader for an Ultralytics detection trainer (see adapter.DeviceLoaderMixin); the store chosen by
    `trainer.device_loader` (`device`, or `device-KIND`), said once on rank 0."""
    import time

    import torch.distributed as dist
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import LOGGER, RANK
    from ultralytics.utils.torch_utils import torch_distributed_zero_first, unwrap_model

    args = trainer.args
    gs = max(int(unwrap_model(trainer.model).stride.max()), 32)
    cfg = type(args)(**{**vars(args), "cache": False})  # the device store is the cache
    with torch_distributed_zero_first(RANK):  # one rank of the cluster writes the labels *.cache, then the others
        source = build_yolo_dataset(cfg, img_path, batch_size, trainer.data, mode="train", rect=False, stride=gs)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    hyp, seed = AugmentHyp.from_args(args), int(args.seed)
    start = time.perf_counter()
    kind = agree_store(choose_store(getattr(trainer, "device_loader", "device"), source.im_files, hyp.imgsz,
                                    trainer.device, world))
    if kind == "decoded":
        sampler, dataset = None, DeviceDataset(source, hyp, trainer.device)
    else:
        sampler = ShardSampler(len(source.labels), world, rank, seed)
        dataset = DeviceDataset(source, hyp, trainer.device, kind, sampler.shard)
    if rank == 0:
        held, where = dataset.held
        extra = "" if kind == "decoded" or not dataset.images.fallbacks else (
            f", {dataset.images.fallbacks} not JPEG (decoded on the CPU)")
        LOGGER.info(f"device loader: {kind} store, {len(dataset)} of {len(source.labels)} images on this rank{extra}, "
                    f"{held / 1e6:.1f} MB held ({where}), ready in {time.perf_counter() - start:.1f} s")
    return DeviceLoader(dataset, batch_size, rank, world, seed, drop_last=bool(args.compile), sampler=sampler,
                        prefetch=bool(getattr(trainer, "device_prefetch", False)))
