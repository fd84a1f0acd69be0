"""Seeded augmentation: crop parameters from (seed, epoch, index), resizing, flipping, normalizing.

Every random choice a sample gets (its crop, its flip, its masking noise) comes from a
`torch.Generator` seeded by a hash of (seed, epoch, index). Nothing reads the global RNG, so a
sample is the same whatever the worker count, process count or the order samples are asked for,
and a resumed run sees exactly the images it would have seen.

The view itself is cut two ways from the same parameters: from a Pillow image (`pillow_view`,
the CPU path in loader workers) or from a uint8 tensor on any device (`tensor_view`, the GPU
path after batched nvJPEG decoding). From the same decoded pixels the two give the same floats;
see `tensor_view`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from localmim_cli.seeding import derive_seed

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop aspect-ratio range (torchvision's default)




def generator_for(seed: int, *parts: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(seed, *parts))


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return torch.empty(1).uniform_(low, high, generator=generator).item()


def random_resized_crop_params(
    width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
    generator: torch.Generator,
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a crop, by torchvision's `RandomResizedCrop.get_params`.

    Ten tries at a random area share and log-uniform aspect ratio; if none fits, a central crop
    clamped to the ratio range. Same draws in the same order, but from `generator`.
    """
    area = width * height
    log_ratio = torch.log(torch.tensor(ratio))  # float32, as torchvision, so rounding matches too
    for _ in range(10):
        target_area = area * _uniform(scale[0], scale[1], generator)
        aspect = torch.exp(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)).item()
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator).item())
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator).item())
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draft_size_for(img_size: int, min_scale: float, min_ratio: float = CROP_RATIO[0]) -> int:
    """Decoded side that keeps every RandomResizedCrop at >= img_size pixels.

    The narrowest crop has side sqrt(min_scale * W * H * min_ratio) >= min(W, H) *
    sqrt(min_scale * min_ratio), so decoding with min(W, H) >= this size means crops are only
    ever resized down, never up: the JPEG draft costs no detail the output could show.
    """
    return math.ceil(img_size / math.sqrt(min_scale * min_ratio))


# uint8 value -> normalized float, per channel: (3, 256). A table lookup in numpy instead of
# torch arithmetic: torch's elementwise ops on one small image stalled on intra-op threads in
# the main process here (7-40 ms vs 0.3 ms at 224 px on a busy 2-core machine).
_NORMALIZE = ((np.arange(256)[None, :] / 255 - np.array(IMAGENET_MEAN)[:, None])
              / np.array(IMAGENET_STD)[:, None]).astype(np.float32)


def to_tensor(img: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float32 (3, H, W), ImageNet mean/std normalized."""
    pixels = np.asarray(img, dtype=np.uint8)  # (H, W, 3)
    return torch.from_numpy(np.stack([_NORMALIZE[c][pixels[:, :, c]] for c in range(3)]))  # (3, H, W)


def center_crop_transform(img_size: int, crop_fraction: float = 0.875) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation transform: shorter side to img_size / crop_fraction (bicubic), centre crop, normalize."""

    def transform(img: Image.Image) -> torch.Tensor:
        short = img_size / crop_fraction
        factor = short / min(img.size)
        resized = img.resize((max(img_size, round(img.width * factor)),
                              max(img_size, round(img.height * factor))), Image.BICUBIC)
        left, top = (resized.width - img_size) // 2, (resized.height - img_size) // 2
        return to_tensor(resized.crop((left, top, left + img_size, top + img_size)))  # (3, S, S)

    return transform



# ---------------------------------------------------------------------------------------------
# One sample's view, from a Pillow image or from a tensor on any device


class ViewParams(NamedTuple):
    """Where a training view is cut, in full-resolution upright pixels, and whether it is flipped."""
    top: int
    left: int
    height: int
    width: int
    flip: bool


def view_params(full_size: tuple[int, int], crop_scale: tuple[float, float], hflip: bool,
                generator: torch.Generator) -> ViewParams:
    """The crop (then the flip) drawn from `generator`, in that order, as the dataset always has."""
    top, left, h, w = random_resized_crop_params(*full_size, crop_scale, CROP_RATIO, generator)
    flip = hflip and torch.rand(1, generator=generator).item() < 0.5
    return ViewParams(top, left, h, w, bool(flip))


def pillow_view(image: Image.Image, reduction: int, p: ViewParams, size: int) -> torch.Tensor:
    """The view of an RGB Pillow image decoded at 1/reduction of full size -> float (3, S, S)."""
    r = reduction  # the crop is in full-resolution pixels; cut it from the reduced decode
    box = (p.left / r, p.top / r, (p.left + p.width) / r, (p.top + p.height) / r)
    view = image.resize((size, size), Image.BICUBIC, box=box)
    if p.flip:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return to_tensor(view)


@functools.lru_cache(maxsize=None)
def _normalize_table(device: torch.device) -> torch.Tensor:
    """`to_tensor`'s uint8 -> normalized table (3, 256), copied to a device once, not per step."""
    return torch.from_numpy(_NORMALIZE).to(device)


def _bicubic(x: torch.Tensor) -> torch.Tensor:
    """Pillow's bicubic kernel (a = -0.5; torch's plain bicubic uses -0.75)."""
    a, x = -0.5, x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


_BITS = 22  # Pillow's PRECISION_BITS for 8-bit images (32 - 8 - 2)


def resample_weights(in_size: int, start: float, end: float, out_size: int,
                     device: torch.device) -> tuple[int, torch.Tensor]:
    """Pillow's resampling of [start, end) of an axis of in_size pixels to out_size, as a matrix.

    Returns (first input pixel used, (out_size, n) float64 weights in Pillow's fixed point, i.e.
    integers summing to about 2**22 per row). Same support (2 x the scale when reducing, so it
    antialiases), same reach past the box up to the image's edge, same normalization and
    rounding as Pillow's ImagingResample, so the products below reproduce its integers exactly.
    """
    scale = (end - start) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    first = max(0, math.floor(start - support - 1))
    last = min(in_size, math.ceil(end + support + 1))
    centers = start + (torch.arange(out_size, dtype=torch.float64, device=device) + 0.5) * scale
    lo = (centers - support + 0.5).floor().clamp(min=0)[:, None]
    hi = (centers + support + 0.5).floor().clamp(max=in_size)[:, None]
    j = torch.arange(first, last, dtype=torch.float64, device=device)[None, :]
    w = _bicubic((j - centers[:, None] + 0.5) / filterscale) * ((j >= lo) & (j < hi))
    w = w / w.sum(1, keepdim=True)
    fixed = torch.sign(w) * torch.floor(w.abs() * (1 << _BITS) + 0.5)  # C's (int)(k * 2**22 +- 0.5)
    return first, fixed


def _apply_fixed(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Pillow's fixed-point accumulation and clip to 8 bits; exact in float64 for 8-bit inputs."""
    return torch.floor((weights @ x + (1 << (_BITS - 1))) / (1 << _BITS)).clamp_(0, 255)


def tensor_view(image: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """The view of a uint8 (3, H, W) full-resolution image on any device -> float (3, S, S).

    The resize is Pillow's bicubic (as `pillow_view` runs it) written as two matrix products:
    horizontal pass, rounded to 8 bits, then vertical, in Pillow's fixed point, then the same
    normalization table. So from the same pixels it equals `pillow_view` exactly. torch's own
    `interpolate(mode="bicubic", antialias=True)` has the same kernel but reads only inside the
    crop and keeps floats: views came out 0.2 levels apart on average, 17 at crop edges. What
    is left between the GPU and CPU paths is the decoders' IDCT rounding (nvJPEG vs libjpeg).
    """
    _, height, width = image.shape
    x0, wx = resample_weights(width, p.left, p.left + p.width, size, image.device)
    y0, wy = resample_weights(height, p.top, p.top + p.height, size, image.device)
    region = image[:, y0:y0 + wy.shape[1], x0:x0 + wx.shape[1]].to(torch.float64)  # (3, h, w)
    rows = _apply_fixed(wx, region.transpose(1, 2)).transpose(1, 2)   # (3, h, S): horizontal pass
    view = _apply_fixed(wy, rows)                                      # (3, S, S): vertical pass
    if p.flip:
        view = view.flip(-1)
    levels = view.to(torch.int64).view(3, -1)                          # exact integers 0..255
    return torch.gather(_normalize_table(view.device), 1, levels).view(3, size, size)  # as to_tensor
