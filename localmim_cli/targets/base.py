"""What a target plugin provides (interface version 1).

A target turns a batch of normalized images into one tensor of per-cell vectors for each cell
size the model asks for. It is built once for the list of cell sizes, so it can share work
between scales (HOG computes gradients once and pools them per scale).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from localmim_cli.plugins.api import TARGET_API_VERSION  # noqa: F401  (plugins import it from here)


class ReconstructionTarget(nn.Module):
    """Base class of targets.

    cells_px: the cell sizes it was built for, in pixels, in the model's tap order
    dims:     length of one cell's target vector at each of those cell sizes

    Optional, for `render` and the figures `visualize` makes (defaults keep older targets working):
    legend:       a sentence or two for a figure's notes: how `render` draws cells, and what
                  a drawn prediction shows; "" (default): the figure says the plugin draws them
    min_draw_px:  the fewest pixels a drawn cell needs to be legible (default 1: cell_px is
                  enough). A target that sets it above its smallest cell must accept `zoom`.
    draws_pixels: True when `render` draws cells as the image's own pixels, so a drawing of the
                  targets is the input picture (default False); figures then also show each
                  prediction pasted into the input's hidden patches
    """

    cells_px: list[int]
    dims: list[int]
    legend: str = ""
    min_draw_px: int = 1
    draws_pixels: bool = False

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalized images -> [(B, (H/c)*(W/c), dims[k]) for k, c in enumerate(cells_px)]."""
        raise NotImplementedError

    def render(self, cells: np.ndarray | torch.Tensor, cell_px: int,
               image: np.ndarray | torch.Tensor | None = None, *, zoom: int | None = None) -> np.ndarray:
        """Draw one image's (h, w, dim) grid of target vectors (a target or a prediction).

        Returns an (h*s, w*s, 3) uint8 RGB image, s pixels per cell: s = cell_px * zoom.
        `zoom` is a whole number; `visualize` passes it (one zoom for every scale, so panels line
        up) only where it is above 1, which happens only for targets whose `min_draw_px` exceeds
        a cell: targets that keep the default may leave the parameter out. Left None, the target
        picks the smallest zoom that reaches `min_draw_px`.
        `image` is the normalized (3, H, W) image the model was fed, for targets that need it
        (normalized pixels are un-normalized with the true cell's mean and variance).
        Targets without a drawing raise NotImplementedError; `visualize` then shows each cell's
        vector length instead.
        """
        raise NotImplementedError


def zoom_for(min_draw_px: int, cells_px: list[int]) -> int:
    """The smallest whole zoom that draws every one of these cells at least min_draw_px wide."""
    return max(-(-min_draw_px // cell) for cell in cells_px)
