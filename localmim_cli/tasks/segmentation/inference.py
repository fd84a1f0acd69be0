"""Inference of a segmenter on whole images: the published test modes.

    slide   windows of `crop` x `crop` every `stride` pixels (the last row and column of windows
            flush with the image's far edges), each window's logits at full resolution, summed
            and divided by how many windows cover each pixel (mmsegmentation's slide_inference)
    whole   the image at once (a Swin takes any size; a ViT only its crop size)

Both return logits (B, K, H, W) for the images as given; `predict_labels` then resizes them
to the size the labels have (the published test resizes images, and scores predictions at the
original size) and takes the argmax. An image smaller than the window is padded at the bottom
and right (0, the normalized mean colour) so every window is `crop` x `crop`, the size a ViT's
position embeddings and relative position bias were built for; the padding's logits are cut off.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch
from torch.nn import functional as F

if TYPE_CHECKING:
    import numpy as np

Predict = Callable[[torch.Tensor], torch.Tensor]   # (N, 3, crop, crop) -> (N, K, crop, crop) logits


def window_starts(size: int, crop: int, stride: int) -> list[int]:
    """Start offsets along one side: every `stride`, the last window ending at the edge."""
    if size <= crop:
        return [0]
    n = (size - crop + stride - 1) // stride + 1
    return [min(i * stride, size - crop) for i in range(n)]


@torch.no_grad()
def slide_logits(predict: Predict, images: torch.Tensor, num_classes: int, crop: int, stride: int,
                 batch_size: int = 8) -> torch.Tensor:
    """(B, 3, H, W) -> (B, K, H, W) averaged window logits (float32), windows batched `batch_size`
    at a time."""
    b, _, h, w = images.shape
    padded = F.pad(images, (0, max(crop - w, 0), 0, max(crop - h, 0)))
    ph, pw = padded.shape[-2:]
    boxes = [(y, x) for y in window_starts(ph, crop, stride) for x in window_starts(pw, crop, stride)]
    total = torch.zeros(b, num_classes, ph, pw, device=images.device)
    count = torch.zeros(1, 1, ph, pw, device=images.device)
    for first in range(0, len(boxes), max(1, batch_size // b)):
        chunk = boxes[first:first + max(1, batch_size // b)]
        windows = torch.cat([padded[:, :, y:y + crop, x:x + crop] for y, x in chunk])   # (len(chunk) * B, 3, c, c)
        logits = predict(windows).float().reshape(len(chunk), b, num_classes, crop, crop)
        for (y, x), part in zip(chunk, logits):
            total[:, :, y:y + crop, x:x + crop] += part
            count[:, :, y:y + crop, x:x + crop] += 1
    return (total / count)[:, :, :h, :w]


@torch.no_grad()
def whole_logits(predict: Predict, images: torch.Tensor) -> torch.Tensor:
    return predict(images).float()


def predict_labels(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, K, h, w) logits -> (B, H, W) labels at `size`, logits resized bilinearly first."""
    if tuple(logits.shape[-2:]) != tuple(size):
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
    return logits.argmax(dim=1)


def infer(predict: Predict, images: torch.Tensor, num_classes: int, mode: str, crop: int, stride: int,
          batch_size: int = 8) -> torch.Tensor:
    """Logits (B, K, H, W) of `images` in test mode `mode` ("slide" or "whole")."""
    if mode == "slide":
        return slide_logits(predict, images, num_classes, crop, stride, batch_size)
    return whole_logits(predict, images)


@torch.no_grad()
def predict_image(predict: Predict, image: "np.ndarray", num_classes: int, scale: tuple[int, int], mode: str,
                  crop: int, stride: int, batch_size: int = 8, device: torch.device | None = None) -> torch.Tensor:
    """(H, W) labels of one (H, W, 3) uint8 image as validation predicts them: the image resized
    (keeping its ratio) to `scale`, normalized, inferred in `mode`, the logits resized back to the
    image's own size."""
    from localmim_cli.tasks.segmentation.augment import normalize, rescaled_size, resize_image

    x = normalize(resize_image(image, rescaled_size(image.shape[:2], scale)))[None]
    logits = infer(predict, x.to(device) if device is not None else x, num_classes, mode, crop, stride, batch_size)
    return predict_labels(logits, tuple(image.shape[:2]))[0]
