"""Where `--loader device` keeps the training images: decoded in device memory, or compressed and decoded per batch.

A store is what `augment.warp_chunks` reads tiles from: `store[idx]` (idx a long tensor of k dataset positions)
gives (k, 3, S, S) uint8 RGB on `store.device`, each image top-left on GRAY padding at the size Ultralytics'
`load_image` gives it (long side S, aspect kept, `cv2.INTER_LINEAR`), with `store.shape == (N, 3, S, S)`.

- decoded (a plain tensor, loader.DeviceDataset): every image decoded once, 3*S*S bytes each (1.2 MB at 640 px):
  the fastest, and about 55,000 images at 640 px in half of a 141 GB H200.
- `EncodedStore(stream=False)` ("jpeg"): the files' own JPEG bytes (10-20x smaller than decoded pixels) in host
  memory, pinned on CUDA, decoded for each batch on the training device (`torchvision.io.decode_jpeg`: nvJPEG on
  CUDA, libjpeg-turbo on CPU) and resized there, bilinear with half-pixel centres as `cv2.INTER_LINEAR`.
- `EncodedStore(stream=True)` ("stream"): the same, with the bytes read from disk for each batch: nothing held per
  image, for sets whose compressed bytes do not fit either.

Images that are not JPEG (PNG, BMP, ...) are read by Ultralytics' own `load_image` on the CPU: held decoded in
host memory by "jpeg", read again for each batch by "stream"; the loader prints how many there are.
Pixels against Ultralytics' `load_image` (tests/test_store.py): identical where no resize is needed and the
decoder is libjpeg-turbo on both sides; within 2 grey levels (mean under 0.5) where it resizes (cv2's 11-bit
fixed-point weights against float ones). nvJPEG's IDCT may differ from libjpeg-turbo's by a few levels more.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from raytrain_yolo.train.augment import GRAY

JPEG_MAGIC = b"\xff\xd8"
READ_THREADS = 8  # file reads per batch in "stream" mode


def load_size(h0: int, w0: int, imgsz: int) -> tuple[int, int]:
    """(h, w) of Ultralytics' `load_image(rect_mode=True)` for an (h0, w0) image: long side to imgsz."""
    r = imgsz / max(h0, w0)
    if r == 1:
        return h0, w0
    return min(math.ceil(h0 * r), imgsz), min(math.ceil(w0 * r), imgsz)


def rgb_chw(im: np.ndarray) -> torch.Tensor:
    """An OpenCV/Ultralytics BGR HxWx3 image as a (3, H, W) uint8 RGB tensor."""
    return torch.from_numpy(np.ascontiguousarray(im[..., ::-1].transpose(2, 0, 1)))


def is_jpeg(path: str) -> bool:
    with open(path, "rb") as f:
        return f.read(2) == JPEG_MAGIC


class EncodedStore:
    """The training images as their JPEG bytes, decoded and resized on `device` for each batch (module docstring).

    files: the dataset's image paths (Ultralytics' `im_files`, positions 0..N-1); shapes: (N, 2) original (h0, w0)
    after EXIF orientation, as Ultralytics' label cache records them; load_image: `load_image(i) -> BGR HxWx3`
    for position i, used for the files that are not JPEG.
    """

    def __init__(self, files: list[str], shapes: torch.Tensor, imgsz: int, device: torch.device, load_image,
                 stream: bool = False):
        self.files, self.imgsz, self.device, self.stream = list(files), imgsz, device, stream
        self.shape = (len(self.files), 3, imgsz, imgsz)
        self.hw = torch.tensor([load_size(int(h), int(w), imgsz) for h, w in shapes.tolist()], dtype=torch.long)
        self.orig = shapes.clone()
        self._load_image = load_image
        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            self.jpeg = list(pool.map(is_jpeg, self.files))
        self.decoded: dict[int, torch.Tensor] = {}  # "jpeg" mode: the non-JPEG images, decoded once on the CPU
        self.data = torch.empty(0, dtype=torch.uint8)
        self.offsets = torch.zeros(len(self.files) + 1, dtype=torch.long)
        if not stream:
            self._hold()

    def _hold(self) -> None:
        sizes = [os.path.getsize(f) if j else 0 for f, j in zip(self.files, self.jpeg)]
        self.offsets[1:] = torch.tensor(sizes, dtype=torch.long).cumsum(0)
        data = torch.empty(int(self.offsets[-1]), dtype=torch.uint8)
        buf = data.numpy()

        def read(i):
            if self.jpeg[i]:
                buf[self.offsets[i]:self.offsets[i + 1]] = np.fromfile(self.files[i], np.uint8)
            else:
                self.decoded[i] = self._cpu_image(i)

        with ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as pool:
            list(pool.map(read, range(len(self.files))))
        self.data = data.pin_memory() if self.device.type == "cuda" else data

    def release(self) -> None:
        """Drop what is held (the loader's `close`)."""
        self.data, self.decoded = torch.empty(0, dtype=torch.uint8), {}

    @property
    def held_bytes(self) -> int:
        """Host bytes this store holds: the JPEG bytes plus the decoded non-JPEG images."""
        return self.data.numel() + sum(t.numel() for t in self.decoded.values())

    @property
    def fallbacks(self) -> int:
        """How many images are not JPEG (decoded on the CPU instead)."""
        return len(self.jpeg) - sum(self.jpeg)

    def _cpu_image(self, i: int) -> torch.Tensor:
        return rgb_chw(self._load_image(i))  # already at load size

    def _bytes(self, i: int) -> torch.Tensor:
        if self.stream:
            return torch.from_numpy(np.fromfile(self.files[i], np.uint8))
        return self.data[self.offsets[i]:self.offsets[i + 1]]

    def _resize(self, im: torch.Tensor, i: int) -> torch.Tensor:
        """One decoded (3, h0, w0) image to its load size, as cv2.resize(INTER_LINEAR) does it."""
        if tuple(im.shape[1:]) != tuple(self.orig[i].tolist()):
            raise RuntimeError(f"{self.files[i]} decodes to {tuple(im.shape[1:])} but Ultralytics' label cache says "
                               f"{tuple(self.orig[i].tolist())}: delete the labels *.cache files and rerun")
        h, w = self.hw[i].tolist()
        if (h, w) == tuple(im.shape[1:]):
            return im
        out = F.interpolate(im[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=False)
        return out[0].round_().clamp_(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        from torchvision.io import ImageReadMode, decode_jpeg

        ids = idx.tolist()
        unique = sorted(set(ids))
        out = torch.full((len(unique), 3, self.imgsz, self.imgsz), GRAY, dtype=torch.uint8, device=self.device)
        jpeg = [i for i in unique if self.jpeg[i]]
        if jpeg:
            if self.stream:
                with ThreadPoolExecutor(READ_THREADS) as pool:
                    data = list(pool.map(self._bytes, jpeg))
            else:
                data = [self._bytes(i) for i in jpeg]
            images = decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device, apply_exif_orientation=True)
            decoded = dict(zip(jpeg, images))
        else:
            decoded = {}
        for k, i in enumerate(unique):
            im = self._resize(decoded[i], i) if i in decoded else (
                self.decoded[i] if i in self.decoded else self._cpu_image(i)).to(self.device)
            out[k, :, :im.shape[1], :im.shape[2]] = im
        pos = {i: k for k, i in enumerate(unique)}
        return out[torch.tensor([pos[i] for i in ids], device=self.device)]
