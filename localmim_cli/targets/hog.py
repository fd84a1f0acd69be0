"""Per-channel HOG target, computed exactly as the published LocalMIM code computes it.

Per colour channel: Sobel gradients by a 3x3 float32 convolution with reflect padding,
orientation atan2(gx, gy) (x-gradient first: unsigned, measured from the y axis), hard binning
floor(phase / pi * nbins) mod nbins, magnitude into its bin, mean over each cell, L2 norm of
each cell's histogram. The numbers are the published ones (to float rounding); how they are
reached is cheaper: see `_cell_sums`. Channels are concatenated R, G, B, giving 3 * nbins values per cell.

Why a convolution and not shifted slices: many pixels sit exactly on a bin edge, so rounding
decides their bin; the convolution's rounding is what the published checkpoints were trained on.
Why float32 under autocast: the same reason; fp16 gradients move pixels across bin edges.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from localmim_cli.plugins.api import TargetPlugin
from localmim_cli.targets.hog_options import HOG_SUMMARY, HOGOptions  # noqa: F401  (re-exported)
from localmim_cli.targets.base import TARGET_API_VERSION, ReconstructionTarget, zoom_for


def sobel_kernels() -> torch.Tensor:
    # (2, 1, 3, 3): channel 0 ~ -d/dx, channel 1 its transpose ~ -d/dy (signs cancel: unsigned bins)
    k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
    return torch.stack([k, k.t()]).unsqueeze(1)


class HOGTarget(ReconstructionTarget):
    def __init__(self, options: HOGOptions, cells_px: list[int]):
        super().__init__()
        self.options = options
        self.cells_px = list(cells_px)
        self.nbins = options.nbins
        self.dims = [3 * options.nbins] * len(cells_px)
        self.register_buffer("sobel", sobel_kernels(), persistent=False)
        if options.bias:
            # One frozen bias pair per scale, drawn like PyTorch's default conv bias init
            # (U(-1/3, 1/3) for a 1x3x3 kernel), as each published HOG layer draws its own.
            bound = 1 / math.sqrt(9)
            self.register_buffer("sobel_bias", torch.empty(len(cells_px), 2).uniform_(-bound, bound))
        else:
            self.sobel_bias = None

    def _gradients(self, channels: torch.Tensor) -> torch.Tensor:
        """(N, 1, H, W) -> (N, S', 2, H, W); S' = 1 without bias (shared by all scales), else S."""
        padded = F.pad(channels, (1, 1, 1, 1), mode="reflect")
        if self.sobel_bias is None:
            return F.conv2d(padded, self.sobel).unsqueeze(1)
        n_scales = len(self.cells_px)
        weight = self.sobel.repeat(n_scales, 1, 1, 1)  # (2S, 1, 3, 3): all scales in one pass
        g = F.conv2d(padded, weight, self.sobel_bias.reshape(-1))
        return g.unflatten(1, (n_scales, 2))

    def _cell_sums(self, g: torch.Tensor, cell: int) -> torch.Tensor:
        """(N, 2, H, W) gradients -> (N, H // cell, W // cell, nbins): each cell's magnitude per bin.

        Sums, not means: the L2 normalisation that follows cancels the 1 / cell^2. Each pixel's
        magnitude is added straight into its (cell, bin) slot, so no per-pixel histogram (nbins
        planes of the full image) is ever built, zeroed or pooled. Bins last: the normalisation
        then reduces over contiguous memory. Pixels past the last whole cell are dropped, as
        average pooling drops them.
        """
        n = g.shape[0]
        h, w = g.shape[2] // cell, g.shape[3] // cell
        gx, gy = g[:, 0, :h * cell, :w * cell], g[:, 1, :h * cell, :w * cell]
        magnitude = (gx * gx + gy * gy).sqrt().reshape(n, -1)
        position = (torch.atan2(gx, gy) / math.pi * self.nbins).reshape(n, -1)
        rows = torch.arange(h * cell, device=g.device) // cell
        cols = torch.arange(w * cell, device=g.device) // cell
        slot = ((rows[:, None] * w + cols[None, :]) * self.nbins).reshape(1, -1)  # first bin of each pixel's cell
        sums = torch.zeros(n, h * w * self.nbins, dtype=g.dtype, device=g.device)
        if not self.options.soft:
            sums.scatter_add_(1, slot + position.floor().long() % self.nbins, magnitude)
        else:
            # Soft: bin b's centre is at b + 0.5; share the magnitude between the two centres around it.
            below = (position - 0.5).floor()
            upper_weight = position - 0.5 - below
            sums.scatter_add_(1, slot + below.long() % self.nbins, magnitude * (1 - upper_weight))
            sums.scatter_add_(1, slot + (below.long() + 1) % self.nbins, magnitude * upper_weight)
        return sums.reshape(n, h, w, self.nbins)

    @staticmethod
    def _merge(sums: torch.Tensor, factor: int) -> torch.Tensor:
        """(N, h, w, nbins) cell sums -> the sums of cells `factor` times larger (whole ones)."""
        if factor == 1:
            return sums
        n, h, w, nbins = sums.shape
        h, w = h // factor, w // factor
        return sums[:, :h * factor, :w * factor].reshape(n, h, factor, w, factor, nbins).sum((2, 4))

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        batch, n_chan, height, width = images.shape
        with torch.autocast(device_type=images.device.type, enabled=False):
            channels = images.float().reshape(batch * n_chan, 1, height, width)
            grads = self._gradients(channels)
            # Without bias every scale shares one gradient field: sum it into the finest cells once,
            # then merge those into each coarser cell that they tile.
            finest = min(self.cells_px)
            shared = None if self.sobel_bias is not None else self._cell_sums(grads[:, 0], finest)
            targets = []
            for k, cell in enumerate(self.cells_px):
                if shared is not None and cell % finest == 0:
                    sums = self._merge(shared, cell // finest)
                else:
                    sums = self._cell_sums(grads[:, k if self.sobel_bias is not None else 0], cell)
                hist = F.normalize(sums, p=2, dim=-1)  # (B*3, h, w, nbins)
                h, w = hist.shape[1:3]
                # (B*3, h, w, nbins) -> (B, h*w, 3*nbins), channel blocks R, G, B
                targets.append(hist.reshape(batch, n_chan, h * w, self.nbins).transpose(1, 2)
                               .reshape(batch, h * w, n_chan * self.nbins))
        return targets

    legend = ("HOG: one line glyph per cell and orientation bin, along the edge direction of the bin "
              "(perpendicular to its gradient), length and brightness = (bin - cell's smallest bin) / "
              "(largest - smallest); R, G and B histograms summed. Predictions drawn the same way.")
    min_draw_px = 8  # a glyph needs room for its angle to be seen

    def render(self, cells, cell_px: int, image=None, *, zoom: int | None = None) -> np.ndarray:
        """Draw HOG cells as oriented line glyphs, white on black, one glyph per cell.

        cells: (h, w, 3 * nbins), the R, G, B histograms of each cell (a target or a prediction);
        the three channel blocks are summed to one histogram, negative weights count as 0.
        Returns (h * g, w * g, 3) uint8 with g = cell_px * zoom pixels per glyph; zoom by default
        the smallest giving at least 8 px (so 4-px cells stay legible; 1 from 8 px cells up).

        Angle: bin b holds gradients whose phase atan2(gx, gy) lies in [b, b + 1) * 180/nbins
        degrees. With this target's Sobel signs (gx ~ -d/dx, gy ~ -d/dy, rows downward) that
        phase, modulo 180 degrees, is the on-screen angle of the edge, i.e. of the line
        perpendicular to the gradient, counter-clockwise from horizontal. Bin b's glyph is a line
        through the cell centre at theta_b = (b + 0.5) * 180/nbins degrees counter-clockwise from
        horizontal: along (column, row) = (cos theta_b, -sin theta_b) in array coordinates.
        Length and brightness are the bin's weight above the cell's smallest bin, over the cell's
        range (largest minus smallest): the largest bin spans the cell less a 1-px margin at full
        white, the smallest draws nothing. Why the range and not the largest bin alone: a
        regression to the mean predicts some weight in every bin, which drawn against the largest
        bin is a star hiding the orientations the prediction prefers; for targets, whose smallest
        bin is usually 0, both ways agree. Overlapping glyphs keep the brighter.
        `image` is not used.
        """
        del image
        weights = cells.detach().cpu().double().numpy() if torch.is_tensor(cells) else np.asarray(cells, np.float64)
        if weights.ndim != 3 or weights.shape[-1] % 3:
            raise ValueError(f"HOG cells must be (h, w, 3 * nbins), got shape {weights.shape}")
        h, w, dim = weights.shape
        nbins = dim // 3
        hist = np.clip(weights.reshape(h, w, 3, nbins).sum(axis=2), 0, None)
        low = hist.min(axis=-1, keepdims=True)
        span = hist.max(axis=-1, keepdims=True) - low
        rel = np.divide(hist - low, span, out=np.zeros_like(hist), where=span > 0)
        g = cell_px * (int(zoom) if zoom else zoom_for(self.min_draw_px, [cell_px]))
        offsets = np.arange(g) + 0.5 - g / 2  # pixel centres relative to the cell centre
        col, row = np.meshgrid(offsets, offsets)  # (g, g), indexed [row, col]
        half_length = max(g / 2 - 1, 0.5)
        canvas = np.zeros((h, w, g, g))
        for b in range(nbins):
            theta = (b + 0.5) * math.pi / nbins
            along = np.abs(col * math.cos(theta) - row * math.sin(theta))
            across = np.abs(col * math.sin(theta) + row * math.cos(theta))
            on_line = across <= 0.5 + 1e-9
            reach = rel[:, :, b, None, None] * half_length  # (h, w, 1, 1)
            drawn = (on_line & (along <= reach + 1e-9) & (reach > 0)) * rel[:, :, b, None, None]
            np.maximum(canvas, drawn, out=canvas)
        gray = np.rint(canvas.transpose(0, 2, 1, 3).reshape(h * g, w * g) * 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)


plugin = TargetPlugin(
    name="hog",
    api_version=TARGET_API_VERSION,
    options=HOGOptions,
    build=HOGTarget,
    summary=HOG_SUMMARY,
)
