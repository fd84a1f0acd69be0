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

    def render(self, cells: np.ndarray, cell_px: int, image: np.ndarray | None = None) -> np.ndarray:
        """Draw a (h, w, dim) grid of target vectors as an (h*cell_px, w*cell_px, 3) uint8 image.

        `image` is the true RGB image (uint8, same size) for targets that need it to be drawn
        (normalized pixels are un-normalized with the true cell's statistics).
        """
        raise NotImplementedError
