"""Reconstruction targets: normalized pixels and HOG, checked against hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from localmim_cli.targets.hog import HOGOptions, HOGTarget
from localmim_cli.targets.pixel import PixelOptions, PixelTarget

# ------------------------------------------------------------------------------------ pixels


def hand_pixel_cells(image: torch.Tensor, cell: int, normalize: bool) -> list[list[float]]:
    """One (1, 3, H, W) image -> per cell (row-major) its values ordered row, column, channel."""
    _, chans, height, width = image.shape
    cells = []
    for ci in range(height // cell):
        for cj in range(width // cell):
            values = [float(image[0, ch, ci * cell + r, cj * cell + c])
                      for r in range(cell) for c in range(cell) for ch in range(chans)]
            if normalize:
                n = len(values)
                mean = sum(values) / n
                var = sum((v - mean) ** 2 for v in values) / (n - 1)  # unbiased
                values = [(v - mean) / math.sqrt(var + 1e-6) for v in values]
            cells.append(values)
    return cells


@pytest.mark.parametrize("normalize", [True, False])
def test_pixel_target_matches_hand_computation(normalize):
    torch.manual_seed(0)
    image = torch.randn(1, 3, 4, 4)
    target = PixelTarget(PixelOptions(normalize=normalize), [2])
    (out,) = target(image)
    assert out.shape == (1, 4, 12)
    expected = torch.tensor(hand_pixel_cells(image, 2, normalize), dtype=torch.float64).unsqueeze(0)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_pixel_target_ordering_is_row_column_channel():
    # value = 100*channel + 10*row + column, so each element says where it came from
    ch, r, c = torch.meshgrid(torch.arange(3), torch.arange(4), torch.arange(4), indexing="ij")
    image = (100 * ch + 10 * r + c).float().unsqueeze(0)
    (out,) = PixelTarget(PixelOptions(normalize=False), [2])(image)
    # cell (row 0, col 1): pixels rows 0-1, cols 2-3
    assert out[0, 1, :6].tolist() == [2, 102, 202, 3, 103, 203]
    assert out[0, 1, 6:].tolist() == [12, 112, 212, 13, 113, 213]
    # cell (row 1, col 0) is the third cell in raster order
    assert out[0, 2, 0].item() == 20


def test_pixel_target_shapes_and_dims():
    images = torch.randn(2, 3, 16, 16)
    target = PixelTarget(PixelOptions(), [1, 2, 4, 8])
    assert target.dims == [3, 12, 48, 192]
    outs = target(images)
    for out, cell, dim in zip(outs, [1, 2, 4, 8], target.dims):
        assert out.shape == (2, (16 // cell) ** 2, dim)
        assert out.dtype == torch.float32


def test_normalized_pixels_have_zero_mean_unit_unbiased_std():
    (out,) = PixelTarget(PixelOptions(), [4])(torch.rand(2, 3, 8, 8) * 5 + 3)
    torch.testing.assert_close(out.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.std(-1), torch.ones(2, 4), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------ HOG


def oriented_ramp(phases: list[float], size: int = 16) -> torch.Tensor:
    """(1, 3, size, size): channel c a linear ramp whose Sobel orientation atan2(gx, gy) is phases[c].

    The target's gradient channels are g0 = -8 * d/dx and g1 = -8 * d/dy of a ramp
    I = a*x + b*y (interior pixels), so a = -sin(phase), b = -cos(phase).
    """
    y, x = torch.meshgrid(torch.arange(size, dtype=torch.float64),
                          torch.arange(size, dtype=torch.float64), indexing="ij")
    chans = [-math.sin(p) * x - math.cos(p) * y for p in phases]
    return torch.stack(chans).unsqueeze(0).float()


def interior_cells(target: torch.Tensor, size: int, cell: int, nbins: int) -> torch.Tensor:
    """Cells whose pixels do not touch the image border (reflect padding breaks the ramp there).

    (B, cells, 3*nbins) -> (n_interior, 3, nbins)
    """
    side = size // cell
    grid = target.reshape(target.shape[0], side, side, 3, nbins)
    return grid[:, 1:-1, 1:-1].reshape(-1, 3, nbins)


NBINS = 9
SIZE = 16
CELL = 4


def test_soft_hog_puts_a_bin_centre_orientation_into_one_bin():
    bins = [1, 4, 7]  # a different bin per channel also checks the R, G, B block order
    phases = [(b + 0.5) * math.pi / NBINS for b in bins]
    image = oriented_ramp(phases, SIZE)
    for soft in (True, False):
        (out,) = HOGTarget(HOGOptions(nbins=NBINS, soft=soft), [CELL])(image)
        cells = interior_cells(out, SIZE, CELL, NBINS)
        assert cells.shape[0] == 4
        for ch, b in enumerate(bins):
            expected = torch.zeros(cells.shape[0], NBINS)
            expected[:, b] = 1.0
            torch.testing.assert_close(cells[:, ch], expected, atol=1e-4, rtol=0,
                                       msg=f"soft={soft} channel {ch} bin {b}")


def test_soft_hog_splits_a_halfway_orientation_equally():
    edges = [2, 5, 8]  # halfway between centres b - 0.5 and b + 0.5, i.e. on the edge at b
    phases = [e * math.pi / NBINS for e in edges]
    (out,) = HOGTarget(HOGOptions(nbins=NBINS, soft=True), [CELL])(oriented_ramp(phases, SIZE))
    cells = interior_cells(out, SIZE, CELL, NBINS)
    for ch, e in enumerate(edges):
        expected = torch.zeros(cells.shape[0], NBINS)
        expected[:, e - 1] = expected[:, e] = 1 / math.sqrt(2)  # equal halves, then L2-normalized
        torch.testing.assert_close(cells[:, ch], expected, atol=1e-4, rtol=0, msg=f"channel {ch}")


def test_soft_hog_wraps_around_between_last_and_first_bin():
    # orientation 0 (== pi, unsigned) is halfway between the centres of the last and first bins
    (out,) = HOGTarget(HOGOptions(nbins=NBINS, soft=True), [CELL])(oriented_ramp([0.0] * 3, SIZE))
    cells = interior_cells(out, SIZE, CELL, NBINS)
    torch.testing.assert_close(cells[..., 0], torch.full(cells.shape[:2], 1 / math.sqrt(2)), atol=1e-4, rtol=0)
    torch.testing.assert_close(cells[..., -1], torch.full(cells.shape[:2], 1 / math.sqrt(2)), atol=1e-4, rtol=0)


def test_soft_and_hard_hog_differ_but_both_are_l2_normalized_per_cell_per_channel():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    cells = [4, 8, 16]
    hard = HOGTarget(HOGOptions(nbins=NBINS, soft=False), cells)(images)
    soft = HOGTarget(HOGOptions(nbins=NBINS, soft=True), cells)(images)
    for h, s in zip(hard, soft):
        assert (h - s).abs().max() > 1e-2
        for t in (h, s):
            norms = t.reshape(*t.shape[:2], 3, NBINS).norm(dim=-1)
            torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)
            assert (t >= 0).all()


@pytest.mark.parametrize("nbins", [9, 18])
def test_hog_output_shapes(nbins):
    images = torch.randn(2, 3, 64, 64)
    cells = [4, 8, 16, 32]
    target = HOGTarget(HOGOptions(nbins=nbins), cells)
    assert target.dims == [3 * nbins] * 4
    outs = target(images)
    assert len(outs) == len(cells)
    for out, cell in zip(outs, cells):
        assert out.shape == (2, (64 // cell) ** 2, 3 * nbins)
        assert out.dtype == torch.float32


def test_hog_bias_buffer_and_effect():
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32)
    cells = [4, 8, 16, 32]
    plain = HOGTarget(HOGOptions(bias=False), cells)
    biased = HOGTarget(HOGOptions(bias=True), cells)
    assert plain.sobel_bias is None
    bias = biased.sobel_bias
    assert bias.shape == (len(cells), 2)
    assert bias.abs().max() <= 1 / 3
    assert "sobel_bias" in biased.state_dict()  # persistent: published checkpoints carry it
    assert "sobel" not in plain.state_dict()    # the Sobel kernel is a constant

    out_plain, out_biased = plain(images), biased(images)
    for p, b in zip(out_plain, out_biased):
        assert p.shape == b.shape
        assert (p - b).abs().max() > 1e-3

    # a zero bias is the unbiased target, scale by scale
    biased.sobel_bias.zero_()
    for p, b in zip(out_plain, biased(images)):
        torch.testing.assert_close(b, p, atol=1e-6, rtol=0)


def test_hog_is_float32_under_autocast():
    images = torch.randn(1, 3, 32, 32)
    target = HOGTarget(HOGOptions(), [4, 8])
    expected = target(images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target(images.bfloat16())
    for e, g in zip(expected, got):
        assert g.dtype == torch.float32
    # bf16 inputs are rounded, so only the float32 input path is exact
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = target(images)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, atol=0, rtol=0)
