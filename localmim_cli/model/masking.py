"""MAE-style per-sample random masking, and the mask seen at each reconstruction scale."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Masking:
    """Which mask units each image keeps.

    ids_keep:    (B, n_keep)  indices of the visible units, in the order the encoder sees them
    ids_restore: (B, L)       position of each unit in [visible..., masked...]; unshuffles decoders
    mask:        (B, L)       1.0 = masked, 0.0 = visible, in raster order over the unit grid
    """

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def keep_count(num_units: int, mask_ratio: float) -> int:
    """Units left visible: MAE's int(L * (1 - ratio)), so 49 of 196 at ratio 0.75."""
    return int(num_units * (1 - mask_ratio))


def masking_from_noise(noise: torch.Tensor, mask_ratio: float) -> Masking:
    """The units with the smallest noise stay visible (MAE convention)."""
    batch, num_units = noise.shape
    n_keep = keep_count(num_units, mask_ratio)
    if n_keep < 1:
        raise ValueError(f"mask ratio {mask_ratio} leaves no visible patch out of {num_units}")
    ids_shuffle = torch.argsort(noise, dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    mask = torch.ones(batch, num_units, device=noise.device)
    mask[:, :n_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return Masking(ids_keep=ids_shuffle[:, :n_keep], ids_restore=ids_restore, mask=mask)


def masking_from_mask(mask: torch.Tensor) -> Masking:
    """Build the index tensors from an explicit mask (B, L), 1 = masked.

    Every row must hide the same number of units, since the encoder batches visible tokens.
    Visible units keep raster order, which is what argsort of a 0/1 noise gives (stable sort).
    """
    mask = mask.float()
    counts = mask.sum(dim=1)
    if not torch.all(counts == counts[0]):
        raise ValueError("every image in a batch must have the same number of masked patches")
    ids_shuffle = torch.argsort(mask, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_keep = mask.shape[1] - int(counts[0].item())
    return Masking(ids_keep=ids_shuffle[:, :n_keep], ids_restore=ids_restore, mask=mask)


def mask_at_scale(mask: torch.Tensor, grid: tuple[int, int], scale: float) -> torch.Tensor:
    """The per-cell loss weight at a prediction grid `scale` times finer than the unit grid.

    Finer grids repeat each unit's bit (nearest); coarser ones average it, so a 2x2 block of
    units that is partly masked still counts, weighted by its masked fraction (published ViT).
    (B, h*w) -> (B, h*s * w*s)
    """
    batch = mask.shape[0]
    m = mask.reshape(batch, 1, *grid)
    if scale >= 1:
        factor = int(scale)
        if factor > 1:
            m = m.repeat_interleave(factor, dim=2).repeat_interleave(factor, dim=3)
    else:
        factor = round(1 / scale)
        m = F.avg_pool2d(m, factor, stride=factor)
    return m.flatten(1)


def unit_major_restore(ids_restore: torch.Tensor, grid: tuple[int, int], per_side: int) -> torch.Tensor:
    """ids_restore of a grid `per_side` times finer than the unit grid, for encoders that keep
    each mask unit's tokens together (hierarchical encoders).

    Such an encoder's tokens are: the visible units in ids_keep order, then the hidden ones, each
    unit as per_side x per_side tokens row by row. Returns, for every cell of the fine grid in
    raster order, its position in that sequence: (B, L) -> (B, L * per_side**2).
    """
    rows, cols = grid[0] * per_side, grid[1] * per_side
    y = torch.arange(rows, device=ids_restore.device).unsqueeze(1)
    x = torch.arange(cols, device=ids_restore.device).unsqueeze(0)
    unit = ((y // per_side) * grid[1] + x // per_side).reshape(-1)
    offset = ((y % per_side) * per_side + x % per_side).reshape(-1)
    batch = ids_restore.shape[0]
    return ids_restore.gather(1, unit.expand(batch, -1)) * per_side**2 + offset
