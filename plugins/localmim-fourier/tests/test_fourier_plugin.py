"""localmim-fourier's own tests: the target contract (through localmim's conformance helpers) and
the numbers: amplitudes of known signals, the layout of a cell's vector, the drawing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from localmim_cli.plugins.testing import check_target
from localmim_fourier import FourierAmplitudeTarget, FourierOptions, plugin


@pytest.mark.parametrize("options", [{}, {"log": False}, {"drop_dc": True}, {"normalize": False}])
def test_keeps_the_target_contract(options):
    target = check_target(plugin, options, cells_px=[2, 4, 8, 16])
    drop = int(options.get("drop_dc", False))
    assert target.dims == [3 * (c * (c // 2 + 1) - drop) for c in (2, 4, 8, 16)]


def test_installed_entry_point_resolves_to_this_plugin():
    check_target("fourier", cells_px=[4, 8])


def test_values_are_rfft2_amplitudes_per_cell_and_channel():
    target = FourierAmplitudeTarget(FourierOptions(log=False, normalize=False), [4])
    images = torch.randn(2, 3, 8, 12)
    out = target(images)[0]  # (2, 2*3 cells, 3 * 4 * 3)
    assert out.shape == (2, 6, 36)
    for b, row, col, chan in [(0, 0, 0, 0), (1, 1, 2, 2), (1, 0, 1, 1)]:
        patch = images[b, chan, row * 4:(row + 1) * 4, col * 4:(col + 1) * 4]
        expected = torch.fft.rfft2(patch, norm="ortho").abs().reshape(-1)
        cell = row * 3 + col  # row-major cells
        torch.testing.assert_close(out[b, cell, chan * 12:(chan + 1) * 12], expected)


def test_amplitude_ignores_where_a_pattern_sits_in_its_cell():
    """A circular shift inside the cell changes only the phase."""
    target = FourierAmplitudeTarget(FourierOptions(), [8])
    images = torch.randn(1, 3, 8, 8)
    shifted = torch.roll(images, shifts=(3, 5), dims=(2, 3))
    torch.testing.assert_close(target(images)[0], target(shifted)[0], atol=1e-5, rtol=1e-5)


def test_normalized_per_cell_and_float32_under_autocast():
    target = FourierAmplitudeTarget(FourierOptions(), [4, 8])
    images = torch.randn(2, 3, 16, 16).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outs = target(images)
    for t in outs:
        assert t.dtype == torch.float32
        torch.testing.assert_close(t.mean(-1), torch.zeros(t.shape[:2]), atol=1e-5, rtol=0)
        torch.testing.assert_close(t.var(-1), torch.ones(t.shape[:2]), atol=1e-3, rtol=0)


def test_one_pixel_cells_are_refused():
    with pytest.raises(ValueError, match="cells of \\[1\\] px"):
        FourierAmplitudeTarget(FourierOptions(), [1, 4])


def test_render_draws_the_centred_full_spectrum():
    """A horizontal cosine of frequency 2 in an 8 px cell: two peaks 2 px left and right of the
    tile's centre (the zero frequency, at index 4 after fftshift), nothing else."""
    target = FourierAmplitudeTarget(FourierOptions(log=False, normalize=False), [8])
    x = torch.arange(8, dtype=torch.float32)
    wave = torch.cos(2 * math.pi * 2 * x / 8).expand(8, 8)
    cells = target(wave.expand(1, 3, 8, 8))[0].reshape(1, 1, -1)
    tile = target.render(cells, 8)
    assert tile.shape == (8, 8, 3) and tile.dtype == np.uint8
    peaks = set(zip(*np.nonzero(tile[:, :, 0])))
    assert peaks == {(4, 2), (4, 6)}


def test_render_mirrors_the_half_spectrum_like_numpy():
    target = FourierAmplitudeTarget(FourierOptions(log=False, normalize=False), [8])
    patch = torch.rand(3, 8, 8)
    tile = target.render(target(patch[None])[0].reshape(1, 1, -1), 8)
    full = np.fft.fftshift(np.abs(np.fft.fft2(patch.double().numpy(), norm="ortho")), axes=(-2, -1))
    scaled = (full - full.min()) / (full.max() - full.min())
    np.testing.assert_array_equal(tile, np.rint(scaled.transpose(1, 2, 0) * 255).astype(np.uint8))
