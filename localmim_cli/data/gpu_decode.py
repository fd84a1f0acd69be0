"""The GPU data path: the batch's JPEGs decoded together by nvJPEG, their views cut on the GPU.

Loader workers send JPEG bytes and the view parameters they drew from (seed, epoch, index)
(`PretrainImages(jpeg_bytes=True)`); here, in the main process, one `decode_jpeg` call decodes
the whole batch on the device, and `augment.tensor_view` cuts, resizes, flips and normalizes
each image there. The rows the workers already decoded (non-JPEGs, CMYK, progressive or rotated
JPEGs) arrive as pixels. Nothing here waits on the device: view parameters are read from the
batch's CPU tensors, and copies from pinned memory are asynchronous.

`data.decode = auto` takes this path when training on CUDA; `cpu` never, `gpu` always (CUDA only).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from localmim_cli.data.augment import ViewParams, tensor_view
from localmim_cli.errors import UsageError


def uses_gpu_decode(setting: str, device: torch.device) -> bool:
    """Whether `data.decode` = setting decodes on `device`."""
    if setting == "gpu" and device.type != "cuda":
        raise UsageError(f"data.decode = 'gpu' needs a CUDA device, but this run trains on {device}; "
                         f"use data.decode = auto or cpu")
    return setting == "gpu" or (setting == "auto" and device.type == "cuda")


def decode_batch(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor] | None:
    """uint8 (3, H, W) images on `device`, or None when the decoder refuses the batch."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        return None


def place_views(batch: dict[str, Any], images: torch.Tensor, img_size: int,
                cpu_sample: Callable[[int, int], torch.Tensor]) -> torch.Tensor:
    """Fill the rows of `images` (on the device) whose JPEGs the batch carries as bytes.

    If the device decoder refuses the batch (a file it cannot read), those rows are made by
    `cpu_sample(epoch, index)`, the dataset's own CPU path, which names a bad file or skips it
    exactly as the workers would have.
    """
    slots = batch["jpeg_slots"]
    if not slots:
        return images
    decoded = decode_batch(batch["jpeg"], images.device)
    views = batch["view"].tolist()  # a CPU tensor: no device sync
    for k, slot in enumerate(slots):
        if decoded is None:
            key = (int(batch["epoch"][slot]), int(batch["index"][slot]))
            images[slot] = cpu_sample(*key).to(images.device, non_blocking=True)
        else:
            p = ViewParams(*views[slot][:4], flip=bool(views[slot][4]))
            images[slot] = tensor_view(decoded[k], p, img_size)
    return images
