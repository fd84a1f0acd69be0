"""Fixed 2-D sine-cosine position embeddings, laid out as MAE lays them out.

The layout matters for number-for-number agreement with published checkpoints: the first half
of the channels encodes the column (x) coordinate and the second half the row (y), each half
as [sin | cos] over frequencies 1 / 10000^(2i/d). Computed in float64, then cast, as MAE does.
"""

from __future__ import annotations

import torch


def _sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    # positions: (M,) float64 -> (M, dim)
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions[:, None] * omega[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int, cls_token: bool = False) -> torch.Tensor:
    """(1, [1 +] grid_h * grid_w, dim) float32; the cls slot, when asked for, is all zeros."""
    if dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64),
        torch.arange(grid_w, dtype=torch.float64),
        indexing="ij",
    )
    emb = torch.cat(
        [_sincos_1d(dim // 2, cols.reshape(-1)), _sincos_1d(dim // 2, rows.reshape(-1))], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float().unsqueeze(0)
