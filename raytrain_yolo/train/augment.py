"""Ultralytics' detection training augmentation, done for a whole batch at once in torch (on the GPU when
training runs there).

Why: Ultralytics augments one image at a time on CPU dataloader workers. Mosaic plus random perspective
runs at roughly 65 images/s per core, so a 16-core GPU node tops out near 1000 images/s for YOLO26n at
640 px, whatever the GPU could do. Here each output image is one bilinear warp of its four mosaic tiles,
read from a tensor of decoded images. The same code runs on CPU, which is how the tests check it.

It follows `ultralytics.data.augment.v8_transforms` for the detect task: Mosaic(4) → RandomPerspective
(degrees, translate, scale, shear, perspective) → RandomHSV → RandomFlip up-down → RandomFlip left-right
→ RGB. Mosaic is applied with probability `mosaic`, and `close_mosaic` switches it off. The matrices and
box rules are Ultralytics': M = T·S·R·P·C; boxes are made from the four transformed corners, clipped, and
kept by `box_candidates`. Where it differs, on purpose:
- the three mosaic partners are drawn from the whole dataset, not from Ultralytics' buffer of recently
  loaded images;
- one bilinear warp per image, in float. cv2 uses 5-bit fixed point and rounds to uint8 between steps.
  HSV is computed in float rather than through 8-bit lookup tables;
- a pixel within one pixel of the mosaic canvas edge is gray, not half-blended;
- boxes come from box corners even when a label file carries polygons, and `area_thr` is always 0.1.
  Ultralytics re-fits boxes to warped polygons; with its default degrees=0 and shear=0 this changes nothing;
- mixup, cutmix, copy_paste and bgr are not implemented: `unsupported()` names them so the caller can refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from ultralytics.utils.ops import xyxy2xywh

GRAY = 114  # Ultralytics' fill value for mosaic canvas and warp borders
UNSUPPORTED = ("mixup", "cutmix", "copy_paste", "bgr")  # must be 0 for batched augmentation


@dataclass(frozen=True)
class AugmentHyp:
    """The Ultralytics hyperparameters this module implements (Ultralytics' defaults)."""

    imgsz: int = 640
    mosaic: float = 1.0
    degrees: float = 0.0
    translate: float = 0.1
    scale: float = 0.5
    shear: float = 0.0
    perspective: float = 0.0
    hsv_h: float = 0.015
    hsv_s: float = 0.7
    hsv_v: float = 0.4
    flipud: float = 0.0
    fliplr: float = 0.5

    @classmethod
    def from_args(cls, args: Any) -> AugmentHyp:
        """From the Ultralytics args namespace of the training run."""
        values = {f.name: getattr(args, f.name, f.default) for f in fields(cls)}
        return cls(**{**values, "imgsz": int(values["imgsz"])})


def unsupported(args: dict[str, Any]) -> list[str]:
    """Ultralytics arguments set to something this module does not implement, as `key=value` strings."""
    bad = [f"{k}={args[k]}" for k in UNSUPPORTED if args.get(k)]
    if args.get("rect"):
        bad.append("rect=True")
    if isinstance(args.get("scale"), (list, tuple)):
        bad.append(f"scale={args['scale']}")
    return bad


@dataclass
class Draws:
    """Every random choice for one batch, on CPU: what Ultralytics draws per image, drawn per batch."""

    mosaic: torch.Tensor  # (B,) bool
    partners: torch.Tensor  # (B, 3) dataset indices of the other three mosaic tiles
    center: torch.Tensor  # (B, 2) mosaic centre (xc, yc), whole pixels of the 2s x 2s canvas
    perspective: torch.Tensor  # (B, 2)
    degrees: torch.Tensor  # (B,)
    scale: torch.Tensor  # (B,)
    shear: torch.Tensor  # (B, 2) degrees
    translate: torch.Tensor  # (B, 2) fraction of the output size
    hsv: torch.Tensor  # (B, 3) gains, already multiplied by hsv_h, hsv_s, hsv_v
    flipud: torch.Tensor  # (B,) bool
    fliplr: torch.Tensor  # (B,) bool


def draw(hyp: AugmentHyp, batch: int, num_images: int, gen: torch.Generator) -> Draws:
    """All random choices for a batch, from one generator: same seed, same batch."""

    def u(lo, hi, *shape):
        return lo + (hi - lo) * torch.rand(batch, *shape, generator=gen, dtype=torch.float64)

    s = hyp.imgsz
    return Draws(
        mosaic=torch.rand(batch, generator=gen) < hyp.mosaic,
        partners=torch.randint(num_images, (batch, 3), generator=gen),
        center=u(s / 2, 3 * s / 2, 2).floor().long(),  # Ultralytics: int(random.uniform(s/2, 3s/2))
        perspective=u(-hyp.perspective, hyp.perspective, 2),
        degrees=u(-hyp.degrees, hyp.degrees),
        scale=u(1 - hyp.scale, 1 + hyp.scale),
        shear=u(-hyp.shear, hyp.shear, 2),
        translate=u(0.5 - hyp.translate, 0.5 + hyp.translate, 2),
        hsv=u(-1.0, 1.0, 3) * torch.tensor([hyp.hsv_h, hyp.hsv_s, hyp.hsv_v], dtype=torch.float64),
        flipud=torch.rand(batch, generator=gen) < hyp.flipud,
        fliplr=torch.rand(batch, generator=gen) < hyp.fliplr,
    )


def perspective_matrix(canvas_wh: torch.Tensor, size: int, d: Draws) -> torch.Tensor:
    """Ultralytics' RandomPerspective matrix M = T @ S @ R @ P @ C for each image, (B, 3, 3) float64."""
    n = canvas_wh.shape[0]
    eye = torch.eye(3, dtype=torch.float64).repeat(n, 1, 1)
    C, P, R, S, T = (eye.clone() for _ in range(5))
    C[:, 0, 2], C[:, 1, 2] = -canvas_wh[:, 0] / 2, -canvas_wh[:, 1] / 2
    P[:, 2, 0], P[:, 2, 1] = d.perspective[:, 0], d.perspective[:, 1]
    a = torch.deg2rad(d.degrees)  # cv2.getRotationMatrix2D(angle=a, center=(0, 0), scale=s)
    R[:, 0, 0], R[:, 0, 1] = d.scale * torch.cos(a), d.scale * torch.sin(a)
    R[:, 1, 0], R[:, 1, 1] = -d.scale * torch.sin(a), d.scale * torch.cos(a)
    S[:, 0, 1], S[:, 1, 0] = torch.tan(torch.deg2rad(d.shear[:, 0])), torch.tan(torch.deg2rad(d.shear[:, 1]))
    T[:, 0, 2], T[:, 1, 2] = d.translate[:, 0] * size, d.translate[:, 1] * size
    return T @ S @ R @ P @ C


@dataclass
class Layout:
    """Where each output image's tiles sit on its canvas, and the canvas-to-output matrix."""

    tiles: torch.Tensor  # (B, D) dataset index of each tile; D = 4 with mosaic, else 1
    offset: torch.Tensor  # (B, D, 2) top-left corner of each tile on the canvas (x, y)
    canvas_wh: torch.Tensor  # (B, 2)
    M: torch.Tensor  # (B, 3, 3) float64, canvas -> output pixels


def layout(idx: torch.Tensor, hw: torch.Tensor, d: Draws, size: int) -> Layout:
    """Ultralytics' Mosaic._mosaic4 placement: tiles meet at the centre (xc, yc) of a 2s x 2s canvas.

    Without mosaic, the canvas is the image itself (RandomPerspective then centres and scales it).
    """
    n = idx.shape[0]
    depth = 4 if bool(d.mosaic.any()) else 1
    tiles = torch.cat([idx[:, None], d.partners], 1)[:, :depth]
    tiles = torch.where(d.mosaic[:, None], tiles, idx[:, None])  # non-mosaic rows use only tile 0
    h, w = hw[tiles, 0], hw[tiles, 1]  # (B, D)
    xc, yc = d.center[:, 0:1], d.center[:, 1:2]
    offset = torch.zeros(n, depth, 2, dtype=torch.long)
    if depth == 4:
        offset[:, :, 0] = torch.cat([xc - w[:, :1], xc, xc - w[:, 2:3], xc], 1)
        offset[:, :, 1] = torch.cat([yc - h[:, :1], yc - h[:, 1:2], yc, yc], 1)
        offset = torch.where(d.mosaic[:, None, None], offset, 0)
    canvas = torch.stack([w[:, 0], h[:, 0]], 1)
    canvas = torch.where(d.mosaic[:, None], 2 * size, canvas)
    return Layout(tiles, offset, canvas, perspective_matrix(canvas.double(), size, d))


CHUNK = 32  # images warped at once: bounds the float working memory (about 40 MB per image at 640 px)


def warp(store: torch.Tensor, lay: Layout, d: Draws, size: int) -> torch.Tensor:
    """Mosaic + perspective for the whole batch: (B, 3, size, size) float on store's device."""
    return torch.cat([img for _, img in warp_chunks(store, lay, d, size)])


def warp_chunks(store: torch.Tensor, lay: Layout, d: Draws, size: int):
    """Mosaic + perspective as one bilinear sample per output pixel; yields (slice, float images) per chunk.

    `store` is (N, 3, S, S) uint8, each image top-left with GRAY padding. Each output pixel is mapped back onto
    its canvas, assigned to the quadrant (tile) it falls in, and sampled from that tile with a 3-D grid_sample
    whose depth axis picks the tile. Tiles are offset by -GRAY so that zero padding reads as the gray border.
    """
    dev, side = store.device, store.shape[-1]
    ys, xs = torch.meshgrid(torch.arange(size, device=dev), torch.arange(size, device=dev), indexing="ij")
    pix = torch.stack([xs, ys, torch.ones_like(xs)], 0).reshape(3, -1).float()  # (3, size*size)
    # The batch's small tables go to the device once: a blocking copy per chunk would stall the host each time.
    minv, all_mosaic, all_center, all_offset, all_tiles, all_canvas = to_device(
        dev, torch.linalg.inv(lay.M).float(), d.mosaic, d.center, lay.offset.float(), lay.tiles, lay.canvas_wh.float())
    for lo in range(0, lay.tiles.shape[0], CHUNK):
        sl = slice(lo, lo + CHUNK)
        b, depth = all_tiles[sl].shape
        q = minv[sl] @ pix  # canvas coordinates of every output pixel
        q = (q[:, :2] / q[:, 2:3]).reshape(b, 2, size, size)
        qx, qy = q[:, 0], q[:, 1]
        mosaic = all_mosaic[sl][:, None, None]
        if depth == 4:
            center = all_center[sl]
            k = (qy >= center[:, 1, None, None]).long() * 2 + (qx >= center[:, 0, None, None]).long()
            k = torch.where(mosaic, k, 0)
        else:
            k = torch.zeros_like(qx, dtype=torch.long)
        off = all_offset[sl]
        ox = torch.gather(off[:, :, 0], 1, k.flatten(1)).view_as(qx)
        oy = torch.gather(off[:, :, 1], 1, k.flatten(1)).view_as(qy)
        grid = torch.stack(
            [(qx - ox) * (2 / (side - 1)) - 1, (qy - oy) * (2 / (side - 1)) - 1,
             k.float() * (2 / max(depth - 1, 1)) - 1], -1)
        src = store[all_tiles[sl].flatten()].view(b, depth, 3, side, side).transpose(1, 2)
        # float32 throughout: a float16 grid would be off by up to ~0.3 px at 640 px
        out = F.grid_sample(src.float() - GRAY, grid[:, None], mode="bilinear", padding_mode="zeros",
                            align_corners=True)[:, :, 0]
        cw, ch = all_canvas[sl].unbind(1)
        inside = (qx > -0.5) & (qx < cw[:, None, None] - 0.5) & (qy > -0.5) & (qy < ch[:, None, None] - 0.5)
        yield sl, out * (inside | ~mosaic)[:, None] + GRAY


def to_device(dev: torch.device, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Small per-batch CPU tables onto `dev` through pinned memory: queued copies, no host sync per table."""
    if dev.type != "cuda":
        return list(tensors)
    return [t.pin_memory().to(dev, non_blocking=True) for t in tensors]


def hsv_jitter(img: torch.Tensor, gains: torch.Tensor) -> torch.Tensor:
    """RandomHSV on RGB floats in 0..255: hue shifted by a fraction of the circle, saturation and value scaled."""
    g = gains.to(img.device, torch.float32)[:, :, None, None]
    x = img / 255
    v, _ = x.max(1, keepdim=True)
    delta = v - x.min(1, keepdim=True)[0]
    s = torch.where(v > 0, delta / v.clamp_min(1e-12), 0)
    r, gr, b = x.split(1, dim=1)
    safe = delta.clamp_min(1e-12)
    h = torch.where(v == r, (gr - b) / safe, torch.where(v == gr, 2 + (b - r) / safe, 4 + (r - gr) / safe))
    h = torch.where(delta > 0, h / 6, 0) % 1
    h = (h + g[:, 0:1]) % 1
    s = (s * (1 + g[:, 1:2])).clamp(0, 1)
    v = (v * (1 + g[:, 2:3])).clamp(0, 1)

    def channel(n):  # HSV -> RGB without branches
        kk = (n + h * 6) % 6
        return v - v * s * torch.minimum(kk, 4 - kk).clamp(0, 1)

    return torch.cat([channel(5), channel(3), channel(1)], 1) * 255


@dataclass
class Labels:
    """All of a dataset's boxes in one table: rows of image `i` are `start[i]:start[i+1]`, CPU tensors."""

    cls: torch.Tensor  # (L,) float
    xyxy: torch.Tensor  # (L, 4) float64, pixels of the stored (resized) image
    start: torch.Tensor  # (N + 1,) long


def transform_labels(labels: Labels, lay: Layout, d: Draws, size: int):
    """Boxes through mosaic, perspective and flips, with Ultralytics' clipping and candidate rules.

    Returns (cls (n, 1), bboxes (n, 4) normalised xywh, batch_idx (n,)), the batch format of its loss.
    """
    counts = labels.start[lay.tiles + 1] - labels.start[lay.tiles]  # (B, D)
    # A plain (non-mosaic) row of a batch that has mosaic rows is laid out as four copies of its image with zero
    # offsets; only its first tile is drawn, so only that tile's labels are its own.
    counts = torch.where(d.mosaic[:, None] | (torch.arange(counts.shape[1]) == 0), counts, 0)
    owner = torch.arange(counts.numel()).repeat_interleave(counts.flatten())  # flat (b, tile) per row
    first = labels.start[lay.tiles].flatten()[owner]
    within = torch.arange(owner.numel()) - (counts.flatten().cumsum(0) - counts.flatten())[owner]
    rows = first + within
    b = owner // lay.tiles.shape[1]
    box = labels.xyxy[rows] + lay.offset.flatten(0, 1)[owner].repeat(1, 2).double()
    cw, ch = lay.canvas_wh[b, 0:1].double(), lay.canvas_wh[b, 1:2].double()
    mosaic = d.mosaic[b]
    clipped = torch.cat([box[:, 0::2].clamp(min=0).minimum(cw), box[:, 1::2].clamp(min=0).minimum(ch)], 1)[:, [0, 2, 1, 3]]
    box = torch.where(mosaic[:, None], clipped, box)  # Mosaic clips to its canvas, then drops empty boxes
    keep = ~mosaic | ((box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1]))
    box, b, rows = box[keep], b[keep], rows[keep]

    corners = box[:, [0, 1, 2, 3, 0, 3, 2, 1]].reshape(-1, 4, 2)
    xy = torch.cat([corners, torch.ones_like(corners[..., :1])], -1) @ lay.M[b].transpose(1, 2)
    xy = xy[..., :2] / xy[..., 2:3]
    new = torch.cat([xy.min(1).values, xy.max(1).values], 1).clamp(0, size)
    old = (box[:, 2:] - box[:, :2]) * d.scale[b, None]
    wh = new[:, 2:] - new[:, :2]
    ar = torch.maximum(wh[:, 0] / (wh[:, 1] + 1e-16), wh[:, 1] / (wh[:, 0] + 1e-16))
    ok = (wh[:, 0] > 2) & (wh[:, 1] > 2) & (wh.prod(1) / (old.prod(1) + 1e-16) > 0.1) & (ar < 100)
    new, b, rows = new[ok], b[ok], rows[ok]

    ud, lr = d.flipud[b], d.fliplr[b]
    new = torch.where(ud[:, None], torch.stack([new[:, 0], size - new[:, 3], new[:, 2], size - new[:, 1]], 1), new)
    new = torch.where(lr[:, None], torch.stack([size - new[:, 2], new[:, 1], size - new[:, 0], new[:, 3]], 1), new)
    return labels.cls[rows][:, None], (xyxy2xywh(new) / size).float(), b.float()


def augment(store: torch.Tensor, hw: torch.Tensor, labels: Labels, idx: torch.Tensor, hyp: AugmentHyp,
            gen: torch.Generator) -> dict[str, torch.Tensor]:
    """One training batch in Ultralytics' format, images uint8 RGB on the store's device, labels on CPU."""
    size, dev = hyp.imgsz, store.device
    d = draw(hyp, idx.shape[0], hw.shape[0], gen)
    lay = layout(idx, hw, d, size)
    out = torch.empty((idx.shape[0], 3, size, size), dtype=torch.uint8, device=dev)
    hsv, flipud, fliplr = to_device(dev, d.hsv, d.flipud, d.fliplr)
    for sl, img in warp_chunks(store, lay, d, size):  # each chunk finished before the next: bounded memory
        if hyp.hsv_h or hyp.hsv_s or hyp.hsv_v:
            img = hsv_jitter(img, hsv[sl])
        img = torch.where(flipud[sl][:, None, None, None], img.flip(-2), img)
        img = torch.where(fliplr[sl][:, None, None, None], img.flip(-1), img)
        out[sl] = img.round_().clamp_(0, 255)
    cls, bboxes, batch_idx = transform_labels(labels, lay, d, size)
    return {"img": out, "cls": cls, "bboxes": bboxes, "batch_idx": batch_idx}

