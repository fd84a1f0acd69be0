"""The cheap checks localmim applies to every plugin it builds (see registry.py): each returns
a list of problems, one line each, rather than raising. `testing.py` builds on them for plugin
authors' own tests."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from localmim_cli.encoders.base import MaskedEncoder, TapInfo
from localmim_cli.targets.base import ReconstructionTarget


# ---------------------------------------------------------------------------------------------
# Inputs


def probe_images(batch: int, side: int, seed: int | None = None) -> torch.Tensor:
    """(batch, 3, side, side) float32 images on the scale of ImageNet-normalized inputs.

    Without a seed: a fixed pattern (smooth waves, an oblique edge and a disc, different per
    image and channel) that touches no random generator, so calling it never changes a run's
    random stream. With a seed: that pattern plus seeded noise.
    """
    y, x = torch.meshgrid(torch.arange(side, dtype=torch.float32) / side,
                          torch.arange(side, dtype=torch.float32) / side, indexing="ij")
    images = []
    for b in range(batch):
        chans = []
        for c in range(3):
            f = 1 + b + c
            wave = torch.sin(2 * math.pi * (f * x + (c + 1) * y) + b)
            edge = ((x * (c + 1) + y * (b + 1)) % 1.0 > 0.5).float() * 2 - 1
            disc = (((x - 0.3 - 0.1 * c) ** 2 + (y - 0.6) ** 2) < 0.05).float()
            chans.append(0.8 * wave + 0.6 * edge + disc)
        images.append(torch.stack(chans))
    out = torch.stack(images)
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        out = out + 0.5 * torch.randn(out.shape, generator=gen)
    return out


# ---------------------------------------------------------------------------------------------
# Cheap structural checks (also used by localmim when it builds a plugin)


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def encoder_structure_problems(encoder: Any, img_size: int) -> list[str]:
    """What is wrong with a built encoder's description of itself (no forward is run)."""
    if not isinstance(encoder, MaskedEncoder):
        return [f"build returned a {type(encoder).__name__}, not a localmim_cli.encoders.base.MaskedEncoder"]
    problems = []
    unit_px, grid = getattr(encoder, "unit_px", None), getattr(encoder, "unit_grid", None)
    taps, layers = getattr(encoder, "taps", None), getattr(encoder, "tap_layers", None)
    if not _is_int(unit_px) or unit_px < 1:
        problems.append(f"unit_px is {unit_px!r}, not a positive int")
    if not (isinstance(grid, (tuple, list)) and len(grid) == 2 and all(_is_int(g) and g > 0 for g in grid)):
        problems.append(f"unit_grid is {grid!r}, not (rows, cols) of positive ints")
    elif not problems and (grid[0] * unit_px != img_size or grid[1] * unit_px != img_size):
        problems.append(f"unit_grid {tuple(grid)} of {unit_px} px units does not cover the "
                        f"{img_size}x{img_size} image")
    if not isinstance(taps, (list, tuple)) or not taps or not all(isinstance(t, TapInfo) for t in taps):
        problems.append(f"taps is {taps!r}, not a non-empty list of TapInfo")
        return problems
    if not isinstance(layers, (list, tuple)) or len(layers) != len(taps) or not all(_is_int(t) for t in layers):
        problems.append(f"tap_layers is {layers!r}: need one int per tap ({len(taps)} taps)")
    if problems:
        return problems
    for k, tap in enumerate(taps):
        where = f"tap {k} (layer {layers[k]})"
        if not _is_int(tap.channels) or tap.channels < 1 or not _is_int(tap.stride_px) or tap.stride_px < 1:
            problems.append(f"{where}: channels {tap.channels!r} and stride_px {tap.stride_px!r} must be positive ints")
            continue
        if tap.stride_px % unit_px and unit_px % tap.stride_px:
            problems.append(f"{where}: stride {tap.stride_px} px and the {unit_px} px mask unit do not "
                            "divide one another")
        elif any((g * unit_px) % tap.stride_px for g in grid):
            problems.append(f"{where}: stride {tap.stride_px} px does not divide the "
                            f"{grid[0] * unit_px}x{grid[1] * unit_px} image")
    return problems


def target_structure_problems(target: Any, cells_px: Sequence[int]) -> list[str]:
    """What is wrong with a built target's description of itself (no forward is run)."""
    if not isinstance(target, ReconstructionTarget):
        return [f"build returned a {type(target).__name__}, not a "
                "localmim_cli.targets.base.ReconstructionTarget"]
    problems = []
    cells, dims = getattr(target, "cells_px", None), getattr(target, "dims", None)
    if cells is None or list(cells) != list(cells_px):
        problems.append(f"cells_px is {cells!r}, but it was built for {list(cells_px)}")
    if not isinstance(dims, (list, tuple)) or len(dims) != len(cells_px) \
            or not all(_is_int(d) and d > 0 for d in dims):
        problems.append(f"dims is {dims!r}: need one positive int per cell size ({len(cells_px)})")
    return problems


def target_output_problems(target: ReconstructionTarget, images: torch.Tensor, output: Any) -> list[str]:
    """Does `output = target(images)` match the target's cells_px and dims? Shapes only."""
    cells, dims = list(target.cells_px), list(target.dims)
    if not isinstance(output, (list, tuple)) or len(output) != len(cells):
        what = f"a {type(output).__name__}" + (f" of {len(output)}" if isinstance(output, (list, tuple)) else "")
        return [f"forward returned {what}; expected a list of {len(cells)} tensors, one per cell size {cells}"]
    batch, _, height, width = images.shape
    problems = []
    for k, (cell, dim, t) in enumerate(zip(cells, dims, output)):
        expected = (batch, (height // cell) * (width // cell), dim)
        if not torch.is_tensor(t):
            problems.append(f"scale {k} ({cell} px cells): a {type(t).__name__}, not a tensor")
        elif tuple(t.shape) != expected:
            problems.append(f"scale {k} ({cell} px cells) of a {height}x{width} batch of {batch}: "
                            f"expected shape {expected} (batch, cells, dims[{k}]), got {tuple(t.shape)}")
        elif not t.is_floating_point():
            problems.append(f"scale {k} ({cell} px cells): dtype {t.dtype}, expected floating point")
    return problems
