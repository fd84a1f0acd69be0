"""Normalized pixels per cell (MAE's norm_pix_loss target; the published Swin 'Pixel' target)."""

from __future__ import annotations

import numpy as np
import torch

from localmim_cli.plugins.api import TargetPlugin
from localmim_cli.targets.pixel_options import PIXEL_SUMMARY, PixelOptions  # noqa: F401  (re-exported)
from localmim_cli.targets.base import TARGET_API_VERSION, ReconstructionTarget

PIXEL_NORM_EPS = 1e-6


def cells_of(images: torch.Tensor, cell: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, (H/cell)*(W/cell), cell*cell*C), values ordered row, column, channel."""
    batch, chans, height, width = images.shape
    h, w = height // cell, width // cell
    x = images.reshape(batch, chans, h, cell, w, cell)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(batch, h * w, cell * cell * chans)


def cell_statistics(cells: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased variance over each cell's values (MAE uses torch.var's default)."""
    return cells.mean(dim=-1, keepdim=True), cells.var(dim=-1, keepdim=True)


class PixelTarget(ReconstructionTarget):
    draws_pixels = True

    def __init__(self, options: PixelOptions, cells_px: list[int]):
        super().__init__()
        self.options = options
        self.cells_px = list(cells_px)
        self.dims = [3 * c * c for c in cells_px]

    @property
    def legend(self) -> str:
        if not self.options.normalize:
            return "Pixel predictions: the predicted pixels as they are, ImageNet mean and std undone."
        return ("Pixel predictions: pixels un-normalized with true cell statistics (each predicted "
                "cell gets the mean and variance of the true cell, as MAE's demo does), so their "
                "brightness and contrast come from the input.")

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            targets = []
            for cell in self.cells_px:
                x = cells_of(images, cell)
                if self.options.normalize:
                    mean, var = cell_statistics(x)
                    x = (x - mean) / (var + PIXEL_NORM_EPS) ** 0.5
                targets.append(x)
        return targets

    def render(self, cells, cell_px: int, image=None) -> np.ndarray:
        """Map (h, w, 3 * cell_px**2) cells of normalized pixels back to an (h*c, w*c, 3) uint8 image.

        With `normalize` on, each cell is un-normalized with the mean and variance of the TRUE
        cell of `image` (the normalized (3, H, W) model input), as MAE's demo does: a prediction
        only says how the pixels vary inside a cell, so its brightness and contrast are borrowed
        from the truth. Then ImageNet mean/std are undone and values rounded and clipped to 0..255.
        Rendering the target itself this way gives back the input pixels.
        """
        from localmim_cli.data.prepared import to_uint8

        x = torch.as_tensor(cells).detach().cpu().double()
        if x.ndim != 3 or x.shape[-1] != 3 * cell_px * cell_px:
            raise ValueError(f"pixel cells of {cell_px}px must be (h, w, {3 * cell_px * cell_px}), "
                             f"got shape {tuple(x.shape)}")
        h, w, _ = x.shape
        if self.options.normalize:
            if image is None:
                raise ValueError("normalized pixel cells need the true image to be un-normalized")
            truth = cells_of(torch.as_tensor(image).detach().cpu().double()[None], cell_px)[0]
            if truth.shape[0] != h * w:
                raise ValueError(f"image gives {truth.shape[0]} cells of {cell_px}px, cells grid is {h}x{w}")
            mean, var = cell_statistics(truth)
            x = x.reshape(h * w, -1) * (var + PIXEL_NORM_EPS) ** 0.5 + mean
        # (h, w, row, col, channel) -> (h*c, w*c, 3)
        x = x.reshape(h, w, cell_px, cell_px, 3).permute(0, 2, 1, 3, 4).reshape(h * cell_px, w * cell_px, 3)
        return to_uint8(x.numpy())


plugin = TargetPlugin(
    name="pixel",
    api_version=TARGET_API_VERSION,
    options=PixelOptions,
    build=PixelTarget,
    summary=PIXEL_SUMMARY,
)
