"""`--loader device`: the training set decoded once into device memory, augmented per batch by `augment.py`.

Ultralytics' trainer only needs a few things from its train loader: iteration, `len`, `sampler` (with
`set_epoch`), `batch_size`, `drop_last`, `num_workers`, `reset()`, and `dataset.close_mosaic()` and
`dataset.labels`. This module supplies exactly those, so the training loop stays Ultralytics' own.
Validation keeps Ultralytics' loader.

Images come from Ultralytics' own dataset: its label parsing and cache, and `load_image`, which resizes the
long side to imgsz. They are stored as one uint8 tensor (N, 3, imgsz, imgsz), RGB, with gray padding. That
is about 1.2 MB per image at 640 px, so a 4096-image set takes 5 GB. When the set does not fit in half the
free device memory, the loader refuses and names `--loader ultralytics` as the fix.
"""

from __future__ import annotations

import dataclasses
import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import DistributedSampler

from raytrain_yolo.train.augment import GRAY, AugmentHyp, Labels, augment

STORE_FRACTION = 0.5  # of free device memory the decoded images may take
LOAD_CHUNK = 256  # images decoded into host memory before each copy to the device


class DeviceDataset:
    """The decoded training images and their boxes, ready for batched augmentation."""

    def __init__(self, source, hyp: AugmentHyp, device: torch.device):
        self.source = source  # an Ultralytics YOLODataset (its transforms are never called)
        self.hyp = hyp
        n, s = len(source.labels), hyp.imgsz
        check_fits(n, s, device)
        self.images = torch.full((n, 3, s, s), GRAY, dtype=torch.uint8, device=device)
        self.hw = torch.zeros(n, 2, dtype=torch.long)
        staging = torch.empty((min(n, LOAD_CHUNK), 3, s, s), dtype=torch.uint8)  # host memory stays bounded

        def load(j, i):
            im, _, (h, w) = source.load_image(i)
            staging[j, :, :h, :w] = torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))  # BGR->RGB
            self.hw[i] = torch.tensor([h, w])

        source.augment = False  # only read images: no mosaic buffer, no per-image cache kept in the source
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:  # cv2 decode/resize release the GIL
            for lo in range(0, n, LOAD_CHUNK):
                ids = range(lo, min(n, lo + LOAD_CHUNK))
                staging.fill_(GRAY)
                list(pool.map(load, range(len(ids)), ids))
                self.images[lo:lo + len(ids)].copy_(staging[:len(ids)])
        self.boxes = _labels_table(source.labels, self.hw)

    @property
    def labels(self):
        return self.source.labels

    @property
    def im_files(self) -> list[str]:
        return self.source.im_files

    def __len__(self) -> int:
        return len(self.source.labels)

    def close_mosaic(self, hyp=None) -> None:
        """Called by Ultralytics' trainer for the last `close_mosaic` epochs."""
        self.hyp = dataclasses.replace(self.hyp, mosaic=0.0)

    def batch(self, idx: list[int], gen: torch.Generator) -> dict:
        out = augment(self.images, self.hw, self.boxes, torch.tensor(idx), self.hyp, gen)
        files = [self.source.im_files[i] for i in idx]
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


class DeviceLoader:
    """Iterates batches of `DeviceDataset` in DistributedSampler order, one rank's share per epoch."""

    num_workers = 0

    def __init__(self, dataset: DeviceDataset, batch_size: int, rank: int, world_size: int, seed: int,
                 drop_last: bool = False):
        self.dataset = dataset
        self.batch_size = batch_size
        self.drop_last = drop_last  # as Ultralytics under compile=: no odd-sized last batch to recompile for
        self.sampler = EpochSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
        self.rank, self.seed = rank, seed

    def __len__(self) -> int:
        n = len(self.sampler) / self.batch_size
        return math.floor(n) if self.drop_last else math.ceil(n)

    def __iter__(self):
        epoch = self.sampler.begin_pass()  # runs at the first batch: a created, unused iterator starts no epoch
        gen = torch.Generator().manual_seed((self.seed * 100_003 + epoch) * 1_009 + self.rank)
        order = list(self.sampler)
        for lo in range(0, len(self) * self.batch_size, self.batch_size):
            yield self.dataset.batch(order[lo:lo + self.batch_size], gen)

    def reset(self) -> None:
        """Ultralytics calls this after close_mosaic; nothing is prefetched, so nothing to drop."""

    def close(self) -> None:
        self.dataset.images = self.dataset.images[:0]


def check_fits(n: int, imgsz: int, device: torch.device) -> None:
    need = n * 3 * imgsz * imgsz
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need > STORE_FRACTION * free:
        raise MemoryError(
            f"--loader device needs {need / 1e9:.1f} GB for {n} images at imgsz={imgsz} but {device.type} has "
            f"{free / 1e9:.1f} GB free: use --loader ultralytics, a smaller imgsz, or fraction=<0..1>"
        )


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
    """The train loader for an Ultralytics detection trainer (see adapter.DeviceLoaderMixin)."""
    import torch.distributed as dist
    from ultralytics.data import build_yolo_dataset
    from ultralytics.utils import LOCAL_RANK
    from ultralytics.utils.torch_utils import torch_distributed_zero_first, unwrap_model

    args = trainer.args
    gs = max(int(unwrap_model(trainer.model).stride.max()), 32)
    cfg = type(args)(**{**vars(args), "cache": False})  # the device store is the cache
    with torch_distributed_zero_first(LOCAL_RANK):  # as Ultralytics: one rank writes the labels *.cache
        source = build_yolo_dataset(cfg, img_path, batch_size, trainer.data, mode="train", rect=False, stride=gs)
    dataset = DeviceDataset(source, AugmentHyp.from_args(args), trainer.device)
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    return DeviceLoader(dataset, batch_size, rank, world, int(args.seed), drop_last=bool(args.compile))
