"""The published segmentation training pipeline (mmsegmentation's ADE20K config), per sample:

    resize (keep ratio) to scale x U(ratio_range)   bilinear image, nearest mask
    random crop crop x crop, cat_max_ratio          up to 10 redraws while one class dominates
    horizontal flip                                 probability hflip
    photometric distortion                          data/photometric.py
    normalize (ImageNet mean / std), pad to crop    image 0, mask 255 (ignored)

and the validation resize (keep ratio to `scale`, no ratio). Every draw comes from the sample's
own generator (seeded by run seed, epoch and index), so a sample is the same in any worker and
after a resume. Resizing follows OpenCV's (which mmsegmentation uses): bilinear with half-pixel
centres and no antialiasing for images, nearest (floor) for masks.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from localmim_cli.data.augment import IMAGENET_MEAN, IMAGENET_STD
from localmim_cli.data.photometric import photometric_distortion

IGNORE = 255   # mask value left out of the loss and the scores


@dataclass(frozen=True)
class SegAugment:
    crop: int
    scale: tuple[int, int] = (2048, 512)
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    hflip: float = 0.5
    photometric: bool = True

    def __call__(self, image: np.ndarray, mask: np.ndarray, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(H, W, 3) uint8 RGB and (H, W) uint8 labels -> (3, crop, crop) float, (crop, crop) int64."""
        ratio = float(torch.empty(1, dtype=torch.float64).uniform_(*self.ratio_range, generator=generator))
        size = rescaled_size(image.shape[:2], (int(self.scale[0] * ratio), int(self.scale[1] * ratio)))
        image, mask = resize_image(image, size), resize_mask(mask, size)
        top, left = crop_offsets(mask, self.crop, self.cat_max_ratio, generator)
        image = image[top:top + self.crop, left:left + self.crop]
        mask = mask[top:top + self.crop, left:left + self.crop]
        if torch.rand(1, generator=generator).item() < self.hflip:
            image, mask = image[:, ::-1], mask[:, ::-1]
        if self.photometric:
            image = photometric_distortion(np.ascontiguousarray(image), generator)
        return pad_to(normalize(image), mask, self.crop)


def rescaled_size(hw: tuple[int, int], scale: tuple[int, int]) -> tuple[int, int]:
    """(h, w) resized to fit `scale` (long, short) keeping the aspect ratio, as mmcv's imrescale:
    the factor is min(max(scale) / long side, min(scale) / short side), sides rounded."""
    h, w = hw
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return int(h * factor + 0.5), int(w * factor + 0.5)


def resize_image(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 -> (h, w, 3) uint8, bilinear (OpenCV's INTER_LINEAR: no antialiasing)."""
    if tuple(image.shape[:2]) == tuple(hw):
        return image
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1)[None].float()
    y = F.interpolate(x, size=hw, mode="bilinear", align_corners=False)
    return y[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()


def resize_mask(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(H, W) labels -> (h, w), nearest (source pixel floor(dst * H / h), as INTER_NEAREST)."""
    if tuple(mask.shape) == tuple(hw):
        return mask
    rows = np.minimum((np.arange(hw[0]) * (mask.shape[0] / hw[0])).astype(np.int64), mask.shape[0] - 1)
    cols = np.minimum((np.arange(hw[1]) * (mask.shape[1] / hw[1])).astype(np.int64), mask.shape[1] - 1)
    return mask[rows[:, None], cols[None, :]]


def crop_offsets(mask: np.ndarray, crop: int, cat_max_ratio: float, generator: torch.Generator) -> tuple[int, int]:
    """(top, left) of a crop x crop window (smaller images: the whole side). With cat_max_ratio
    < 1, redrawn up to 10 times while the crop holds one labelled class only or one class covers
    cat_max_ratio or more of its labelled pixels; after 10 redraws the last draw stands."""
    def draw() -> tuple[int, int]:
        top = int(torch.randint(0, max(mask.shape[0] - crop, 0) + 1, (1,), generator=generator))
        left = int(torch.randint(0, max(mask.shape[1] - crop, 0) + 1, (1,), generator=generator))
        return top, left

    top, left = draw()
    if cat_max_ratio < 1:
        for _ in range(10):
            window = mask[top:top + crop, left:left + crop]
            counts = np.bincount(window.ravel(), minlength=256)
            counts = counts[np.arange(256) != IGNORE]
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            top, left = draw()
    return top, left


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32, ImageNet mean and std."""
    x = torch.from_numpy(np.require(image, requirements=["C", "W"])).permute(2, 0, 1).float().div_(255)
    mean = torch.tensor(IMAGENET_MEAN)[:, None, None]
    std = torch.tensor(IMAGENET_STD)[:, None, None]
    return (x - mean) / std


def pad_to(image: torch.Tensor, mask: np.ndarray, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad bottom and right to side x side: the image with 0 (after normalization), the mask with IGNORE."""
    labels = torch.from_numpy(np.require(mask, requirements=["C", "W"])).long()
    h, w = labels.shape
    if h < side or w < side:
        image = F.pad(image, (0, side - w, 0, side - h), value=0.0)
        labels = F.pad(labels, (0, side - w, 0, side - h), value=IGNORE)
    return image, labels
