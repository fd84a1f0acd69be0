"""Photometric distortion of an 8-bit RGB image, as mmsegmentation's `PhotoMetricDistortion`
(which mmdetection shares): brightness, then contrast either before or after saturation and
hue, each applied with probability 1/2.

    brightness  + U(-32, 32)
    contrast    x U(0.5, 1.5)
    saturation  S x U(0.5, 1.5) in HSV
    hue         H + randint[-18, 18) on OpenCV's 0-180 hue scale

Every step saturates to 0..255 and truncates to uint8, as the published one does. Draws come
from a `torch.Generator` (the sample's own: see data/augment.py), in the published order. The
HSV conversion is OpenCV's 8-bit definition (H in degrees / 2, S and V in 0..255), written out
in NumPy so no OpenCV is needed.
"""

from __future__ import annotations

import numpy as np
import torch


def _randint(low: int, high: int, generator: torch.Generator) -> int:
    """An integer in [low, high), like numpy's randint."""
    return int(torch.randint(low, high, (1,), generator=generator).item())


def _uniform(low: float, high: float, generator: torch.Generator) -> float:
    return float(torch.empty(1, dtype=torch.float64).uniform_(low, high, generator=generator).item())


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> uint8 HSV with H in [0, 180), as OpenCV's COLOR_RGB2HSV."""
    x = rgb.astype(np.float32)
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    v = x.max(axis=-1)
    diff = v - x.min(axis=-1)
    s = np.where(v > 0, diff * 255 / np.maximum(v, 1e-12), 0)
    safe = np.maximum(diff, 1e-12)
    h = np.where(v == r, 60 * (g - b) / safe, np.where(v == g, 120 + 60 * (b - r) / safe, 240 + 60 * (r - g) / safe))
    h = np.where(diff > 0, h, 0)
    h = np.where(h < 0, h + 360, h)
    out = np.stack([np.rint(h / 2) % 180, np.rint(s), v], axis=-1)
    return out.astype(np.uint8)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """The inverse of `rgb_to_hsv` (OpenCV's COLOR_HSV2RGB for 8-bit images)."""
    h = hsv[..., 0].astype(np.float32) * 2 / 60      # sector in [0, 6)
    s = hsv[..., 1].astype(np.float32) / 255
    v = hsv[..., 2].astype(np.float32)
    sector = np.floor(h).astype(np.int64) % 6
    f = h - np.floor(h)
    p, q, t = v * (1 - s), v * (1 - s * f), v * (1 - s * (1 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    out = np.zeros(hsv.shape, dtype=np.float32)
    for k, (r, g, b) in enumerate(choices):
        where = sector == k
        out[where] = np.stack([r, g, b], axis=-1)[where]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def photometric_distortion(rgb: np.ndarray, generator: torch.Generator, brightness_delta: int = 32,
                           contrast: tuple[float, float] = (0.5, 1.5), saturation: tuple[float, float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> the same, distorted (see the module docstring)."""
    img = rgb
    if _randint(0, 2, generator):
        img = _convert(img, beta=_uniform(-brightness_delta, brightness_delta, generator))
    contrast_first = _randint(0, 2, generator) == 1

    def adjust_contrast(img: np.ndarray) -> np.ndarray:
        if _randint(0, 2, generator):
            return _convert(img, alpha=_uniform(*contrast, generator))
        return img

    if contrast_first:
        img = adjust_contrast(img)
    if _randint(0, 2, generator):
        hsv = rgb_to_hsv(img)
        hsv[..., 1] = _convert(hsv[..., 1], alpha=_uniform(*saturation, generator))
        img = hsv_to_rgb(hsv)
    if _randint(0, 2, generator):
        hsv = rgb_to_hsv(img)
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + _randint(-hue_delta, hue_delta, generator)) % 180
        img = hsv_to_rgb(hsv)
    if not contrast_first:
        img = adjust_contrast(img)
    return img
