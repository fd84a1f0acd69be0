"""Per-cell Fourier amplitude: a frequency-domain reconstruction target for LocalMIM.

Per image, per cell of c x c pixels and per colour channel: the amplitude of the cell's 2-D
discrete Fourier transform, |FFT2(cell)|, kept on the non-redundant half (rfft2: c x (c//2 + 1)
values; a real signal's spectrum is conjugate-symmetric), compressed with log(1 + a) and
normalized per cell (mean 0, variance 1 over the cell's 3 * c * (c//2 + 1) values, as MAE
normalizes pixels). Channels R, G, B, then frequency rows, then frequency columns.

Why: amplitude spectra say which frequencies and orientations a cell holds, but not where inside
the cell (the phase is dropped), so like HOG the target is a local texture descriptor that is
invariant to small shifts, while keeping frequency content HOG's 9 orientation bins lose.
Frequency-domain targets for masked image modeling: Xie et al., "Masked Frequency Modeling for
Self-Supervised Visual Pre-Training" (ICLR 2023); Liu et al., "The Devil is in the Frequency:
Geminated Gestalt Autoencoder for Self-Supervised Visual Pre-Training" (AAAI 2023), which
reconstructs amplitude and phase; the focal frequency loss of Jiang et al. (ICCV 2021).

Computed in float32 with autocast off (an FFT in bf16 is neither supported nor accurate), once
per batch, one rfft2 per cell size.
"""

from __future__ import annotations

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from localmim_cli.targets.base import ReconstructionTarget

NORM_EPS = 1e-6


class FourierOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    log: bool = Field(True, description="compress amplitudes with log(1 + a) (the DC term dominates otherwise)")
    normalize: bool = Field(True, description="per cell: subtract the mean, divide by sqrt(var + 1e-6)")
    drop_dc: bool = Field(False, description="leave out each channel's zero-frequency term (the cell mean)")


def spectrum_shape(cell: int) -> tuple[int, int]:
    """(rows, cols) of one channel's rfft2 half-spectrum of a cell x cell patch."""
    return cell, cell // 2 + 1


class FourierAmplitudeTarget(ReconstructionTarget):
    legend = ("Fourier: one tile per cell, its amplitude spectrum with the zero frequency at the "
              "centre and R, G, B spectra as R, G, B; each tile stretched from its own minimum "
              "(black) to maximum (white). Predictions drawn the same way.")

    def __init__(self, options: FourierOptions, cells_px: list[int]):
        super().__init__()
        small = [c for c in cells_px if c < 2]
        if small:
            raise ValueError(f"fourier target: cells of {small} px have no spectrum to speak of; "
                             "use cells of 2 px or more (lower the scale of that tap)")
        self.options = options
        self.cells_px = list(cells_px)
        self.dims = [3 * (r * c - int(options.drop_dc)) for r, c in map(spectrum_shape, cells_px)]

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        batch, chans, height, width = images.shape
        with torch.autocast(device_type=images.device.type, enabled=False):
            images = images.float()
            targets = []
            for cell in self.cells_px:
                h, w = height // cell, width // cell
                # (B, C, H, W) -> (B, h, w, C, cell, cell): one patch per cell and channel
                x = images.reshape(batch, chans, h, cell, w, cell).permute(0, 2, 4, 1, 3, 5)
                amp = torch.fft.rfft2(x, norm="ortho").abs()  # (B, h, w, C, cell, cell//2+1)
                if self.options.log:
                    amp = torch.log1p(amp)
                amp = amp.reshape(batch, h * w, chans, -1)
                if self.options.drop_dc:
                    amp = amp[..., 1:]
                amp = amp.reshape(batch, h * w, -1)
                if self.options.normalize:
                    mean, var = amp.mean(dim=-1, keepdim=True), amp.var(dim=-1, keepdim=True)
                    amp = (amp - mean) / (var + NORM_EPS) ** 0.5
                targets.append(amp)
        return targets

    def render(self, cells, cell_px: int, image=None) -> np.ndarray:
        """Draw each cell's amplitude spectrum as a cell_px x cell_px colour tile, zero frequency
        at the tile's centre (fftshift), low frequencies around it, high ones at the borders.

        cells: (h, w, dims) targets or predictions. The half-spectrum is mirrored into the full
        one (|F(-u, -v)| = |F(u, v)| for a real patch); R, G, B spectra are the tile's R, G, B.
        Each tile is stretched from its own minimum (black) to its maximum (white), so a
        prediction is drawn exactly as its target is. Returns (h * cell_px, w * cell_px, 3) uint8.
        `image` is not used.
        """
        del image
        x = cells.detach().cpu().double().numpy() if torch.is_tensor(cells) else np.asarray(cells, np.float64)
        rows, cols = spectrum_shape(cell_px)
        per_channel = rows * cols - int(self.options.drop_dc)
        if x.ndim != 3 or x.shape[-1] != 3 * per_channel:
            raise ValueError(f"fourier cells of {cell_px} px must be (h, w, {3 * per_channel}), got {x.shape}")
        h, w, _ = x.shape
        half = x.reshape(h, w, 3, per_channel)
        if self.options.drop_dc:  # draw the missing DC term at the tile's mean
            half = np.concatenate([half.mean(axis=-1, keepdims=True), half], axis=-1)
        half = half.reshape(h, w, 3, rows, cols)
        full = np.empty((h, w, 3, cell_px, cell_px))
        full[..., :cols] = half
        # columns beyond Nyquist: |F(u, v)| = |F(-u mod c, c - v)|
        u = (-np.arange(cell_px)) % cell_px
        for v in range(cols, cell_px):
            full[..., v] = half[..., u, cell_px - v]
        full = np.fft.fftshift(full, axes=(-2, -1))
        lo = full.min(axis=(2, 3, 4), keepdims=True)
        hi = full.max(axis=(2, 3, 4), keepdims=True)
        scaled = np.divide(full - lo, hi - lo, out=np.zeros_like(full), where=hi > lo)
        # (h, w, 3, r, c) -> (h, r, w, c, 3) -> (h * cell_px, w * cell_px, 3)
        tiles = scaled.transpose(0, 3, 1, 4, 2).reshape(h * cell_px, w * cell_px, 3)
        return np.rint(tiles * 255).astype(np.uint8)
