"""Normalized pixels per cell (MAE's norm_pix_loss target; the published Swin 'Pixel' target)."""

from __future__ import annotations

import torch
from pydantic import BaseModel, ConfigDict, Field

from localmim_cli.plugin_api import TargetPlugin
from localmim_cli.targets.base import TARGET_API_VERSION, ReconstructionTarget

PIXEL_NORM_EPS = 1e-6


class PixelOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    normalize: bool = Field(True, description="per cell: subtract the mean, divide by sqrt(var + 1e-6)")


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
    def __init__(self, options: PixelOptions, cells_px: list[int]):
        super().__init__()
        self.options = options
        self.cells_px = list(cells_px)
        self.dims = [3 * c * c for c in cells_px]

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


plugin = TargetPlugin(
    name="pixel",
    api_version=TARGET_API_VERSION,
    options=PixelOptions,
    build=PixelTarget,
    summary="per-cell normalized RGB pixels (MAE norm_pix; published Swin target)",
)
