"""Images for `visualize` and probes: found, read, centre-cropped, resized and normalized as the model sees them.

The preprocessing is the published reference's (and MAE's demo's): RGB, centre square crop, bicubic
resize (Pillow) to the model's input size, /255, ImageNet mean/std. It reproduces the conformance
reference's `images_uint8` and `images` exactly. Files are decoded by `images.load_rgb`, as in
pretraining (upright by EXIF, alpha composited on black, 16-bit scaled). The uint8 crop is kept
alongside the normalized tensor, so a figure can paste the exact input pixels back in.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from localmim_cli.data import images
from localmim_cli.data.images import IMAGENET_MEAN, IMAGENET_STD
from localmim_cli.data.sources import Member
from localmim_cli.errors import DataError


@dataclass
class PreparedImage:
    path: Path | Member  # a file, or a member of a tar shard
    pixels: np.ndarray    # (S, S, 3) uint8: the centre crop at the model's input size
    tensor: torch.Tensor  # (3, S, S) float32: pixels / 255, ImageNet-normalized (the model's input)


def find_images(items: list[Path]) -> list[Path]:
    """Image files as given; folders searched recursively (as `pretrain` searches them), in order.

    A path that does not exist, a file that is not an image, or a folder without images is an
    error naming it (DataError).
    """
    found: list[Path] = []
    for item in items:
        item = Path(item).expanduser()
        if not item.exists():
            raise DataError(f"{item}: no such image file or folder")
        found.extend(images.find_images(item))
    return found


def centre_crop_resize(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """(S, S, 3) uint8 -> (3, S, S) float32, /255 then ImageNet mean/std."""
    x = torch.from_numpy(np.array(pixels, dtype=np.uint8)).permute(2, 0, 1).float() / 255
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (x - mean) / std


def to_uint8(normalized: np.ndarray) -> np.ndarray:
    """(H, W, 3) ImageNet-normalized values -> uint8 pixels (undo mean/std, x255, round, clip)."""
    x = normalized.astype(np.float64) * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    return np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)


def prepare_image(path: Path | Member, size: int) -> PreparedImage:
    """Decode as training decodes (upright by EXIF, 8-bit RGB), centre-crop, resize, normalize.
    `path` may be a tar shard member, as training images may be."""
    ref = path if isinstance(path, Member) else Path(path)
    rgb = images.load_rgb(ref)
    pixels = np.asarray(centre_crop_resize(rgb, size), dtype=np.uint8)
    return PreparedImage(ref, pixels, normalize(pixels))
