"""Seeded augmentation: crop parameters from (seed, epoch, index), resizing, flipping, normalizing.

Every random choice a sample gets (its crop, its flip, its masking noise) comes from a
`torch.Generator` seeded by a hash of (seed, epoch, index). Nothing reads the global RNG, so a
sample is the same whatever the worker count, process count or the order samples are asked for,
and a resumed run sees exactly the images it would have seen.

The view itself is cut two ways from the same parameters: from a Pillow image (`pillow_view`,
the CPU path in loader workers) or from a uint8 tensor on any device (`tensor_view`, the GPU
path after batched nvJPEG decoding). They agree to within resampling noise; see `tensor_view`.
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
def _stats_255(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std in 8-bit units, (3, 1, 1) each, made once per device (no copy per step)."""
    mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float64) * 255
    std = torch.tensor(IMAGENET_STD, dtype=torch.float64) * 255
    return mean.float().view(3, 1, 1).to(device), std.float().view(3, 1, 1).to(device)


def tensor_view(image: torch.Tensor, p: ViewParams, size: int) -> torch.Tensor:
    """The view of a uint8 (3, H, W) full-resolution image on any device -> float (3, S, S).

    Matches `pillow_view` as closely as torch allows: torch's antialiased bicubic is a port of
    Pillow's resampling (same a = -0.5 kernel, same support scaled by the reduction), and the
    result is rounded to 8 bits before normalizing, as Pillow's uint8 output is. What remains:
    Pillow's filter reads pixels just outside the crop box at its edges where torch clamps to the
    crop, and float32 vs Pillow's fixed-point accumulation; the CPU path's JPEG draft decode
    adds libjpeg's scaled IDCT. tests/test_data_gpu_path.py states the tolerance measured.
    """
    crop = image[:, p.top:p.top + p.height, p.left:p.left + p.width].float().unsqueeze(0)
    view = F.interpolate(crop, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    view = view.round_().clamp_(0, 255)
    if p.flip:
        view = view.flip(-1)
    mean, std = _stats_255(view.device)
    return (view - mean) / std  # (3, S, S)
