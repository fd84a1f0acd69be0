"""The HOG target computed the way the published LocalMIM code computes it, step for step.

One frozen HOG layer per scale, called once per colour channel: per scale and per channel the
whole pipeline runs again (3x3 Sobel convolution with reflect padding, magnitude, atan2 phase,
hard binning, pooling, L2 norm), although only the pooling differs between scales. The
product's `HOGTarget` computes the same numbers with one gradient pass per image; this module
is what `localmim benchmark` times it against, and what the tests compare it with.

Unlike `HOGTarget` it does not turn autocast off, as the published code does not: under fp16
autocast on a GPU its convolution runs in fp16.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from localmim_cli.targets.base import ReconstructionTarget


class PublishedHOGLayer(nn.Module):
    """One scale's HOG of one channel: (N, 1, H, W) -> (N, nbins, H / cell, W / cell)."""

    def __init__(self, nbins: int, cell_px: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.nbins, self.cell_px = nbins, cell_px
        kernel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect", bias=bias is not None)
        self.conv.weight.data = torch.stack([kernel, kernel.t()]).unsqueeze(1)
        if bias is not None:
            self.conv.bias.data = bias.detach().clone().reshape(2)
        self.conv.requires_grad_(False)

    @torch.no_grad()
    def forward(self, channel: torch.Tensor) -> torch.Tensor:
        g = self.conv(channel)  # (N, 2, H, W)
        magnitude = g.norm(dim=1, keepdim=True)
        phase = torch.atan2(g[:, 0], g[:, 1]).unsqueeze(1) / math.pi * self.nbins
        hist = torch.zeros(g.shape[0], self.nbins, *g.shape[2:], dtype=magnitude.dtype, device=g.device)
        hist.scatter_(1, phase.floor().long() % self.nbins, magnitude)
        return F.normalize(F.avg_pool2d(hist, self.cell_px, stride=self.cell_px), p=2, dim=1)


class PublishedHOG(ReconstructionTarget):
    """All scales, as published: for each scale, its own layer over R, G and B in turn.

    bias: (scales, 2) fixed Sobel biases, one pair per scale (published `--hog_bias`), or None.
    """

    def __init__(self, nbins: int, cells_px: list[int], bias: torch.Tensor | None = None):
        super().__init__()
        self.nbins = nbins
        self.cells_px = list(cells_px)
        self.dims = [3 * nbins] * len(cells_px)
        self.layers = nn.ModuleList(
            PublishedHOGLayer(nbins, cell, None if bias is None else bias[k]) for k, cell in enumerate(cells_px))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        targets = []
        for layer in self.layers:
            per_channel = [layer(images[:, c:c + 1]) for c in range(images.shape[1])]
            # (B, 3 * nbins, h, w) -> (B, h * w, 3 * nbins), channel blocks R, G, B
            targets.append(torch.cat(per_channel, dim=1).flatten(2).transpose(1, 2))
        return targets
