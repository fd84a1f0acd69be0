"""What a target plugin provides (interface version 1).

A target turns a batch of normalized images into one tensor of per-cell vectors for each cell
size the model asks for. It is built once for the list of cell sizes, so it can share work
between scales (HOG computes gradients once and pools them per scale).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

TARGET_API_VERSION = 1


class ReconstructionTarget(nn.Module):
    """Base class of targets.

    cells_px: the cell sizes it was built for, in pixels, in the model's tap order
    dims:     length of one cell's target vector at each of those cell sizes
    """

    cells_px: list[int]
    dims: list[int]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) normalized images -> [(B, (H/c)*(W/c), dims[k]) for k, c in enumerate(cells_px)]."""
        raise NotImplementedError

    def render(self, cells: np.ndarray | torch.Tensor, cell_px: int,
               image: np.ndarray | torch.Tensor | None = None) -> np.ndarray:
        """Draw one image's (h, w, dim) grid of target vectors (a target or a prediction).

        Returns an (h*s, w*s, 3) uint8 RGB image, s pixels per cell: s = cell_px for targets that
        draw pixels; a target drawing glyphs may use more (HOG draws at least 8 px per cell and
        says so in its own docstring; `visualize` scales every panel to a common size).
        `image` is the normalized (3, H, W) image the model was fed, for targets that need it
        (normalized pixels are un-normalized with the true cell's mean and variance).
        Targets without a drawing raise NotImplementedError; `visualize` then shows each cell's
        vector length instead.
        """
        raise NotImplementedError
