"""The local decoders follow each TapOutput: its prefix-token count and its grid.

A small encoder written as a plugin would write it carries two prefix tokens (registers) on every
tap; nothing outside its TapOutputs says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localmim_cli.encoders.base import MaskedEncoder, TapInfo, TapOutput
from localmim_cli.model.localmim import DecoderShape, LocalMIM
from localmim_cli.targets.pixel import PixelOptions, PixelTarget

IMG, PATCH, DIM = 32, 8, 16


class RegisterEncoder(MaskedEncoder):
    """Patch embedding, `n_registers` learnt prefix tokens, one attention block per tap."""

    def __init__(self, n_registers: int = 2, reported_grid: tuple[int, int] | None = None):
        super().__init__()
        side = IMG // PATCH
        self.unit_px, self.unit_grid = PATCH, (side, side)
        self.taps, self.tap_layers = [TapInfo(DIM, PATCH)] * 2, [1, 2]
        self.reported_grid = reported_grid or self.unit_grid
        self.embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.registers = nn.Parameter(torch.randn(1, n_registers, DIM))
        self.blocks = nn.ModuleList(nn.TransformerEncoderLayer(DIM, 2, 32, batch_first=True) for _ in self.taps)

    def forward_taps(self, images, ids_keep, ids_restore):
        x = self.embed(images).flatten(2).transpose(1, 2)  # (B, L, D)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, DIM))
        x = torch.cat([self.registers.expand(x.shape[0], -1, -1), x], dim=1)
        taps = []
        for block in self.blocks:
            x = block(x)
            taps.append(TapOutput(x, self.registers.shape[1], self.reported_grid, ids_restore))
        return taps


def model_with(encoder: MaskedEncoder) -> LocalMIM:
    torch.manual_seed(0)
    return LocalMIM(encoder, PixelTarget(PixelOptions(), [8, 8]), [1.0, 1.0], DecoderShape(16, 1, 2)).eval()


def test_prefix_tokens_are_counted_from_each_tap():
    model = model_with(RegisterEncoder(n_registers=2))
    images, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, 16)
    out = model(images, noise=noise)
    assert [p.shape for p in out.preds] == [(2, 16, 192)] * 2 and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.encoder.registers.grad.abs().sum() > 0  # the decoders attend to the registers

    # Both registers sit at position zero: swapping them changes nothing.
    with torch.no_grad():
        before = model(images, noise=noise).preds
        model.encoder.registers.copy_(model.encoder.registers.flip(1))
        after = model(images, noise=noise).preds
    for a, b in zip(before, after):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_stored_prefix_rows_only_shape_the_table():
    """The position table keeps `encoder.n_prefix` zero rows (as published checkpoints store
    them); the decoder's output does not depend on how many there are."""
    model = model_with(RegisterEncoder(n_registers=2))
    assert model.decoders[0].pos_embed.shape == (1, 16, 16)  # n_prefix left at 0
    encoder = RegisterEncoder(n_registers=2)
    encoder.n_prefix = 1
    encoder.load_state_dict(model.encoder.state_dict())
    other = model_with(encoder)
    assert other.decoders[0].pos_embed.shape == (1, 17, 16)
    assert not other.decoders[0].pos_embed[:, :1].any()
    state = {k: v for k, v in model.state_dict().items() if not k.endswith("pos_embed")}
    other.load_state_dict(state, strict=False)
    images, noise = torch.randn(2, 3, IMG, IMG), torch.rand(2, 16)
    with torch.no_grad():
        for a, b in zip(model(images, noise=noise).preds, other(images, noise=noise).preds):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_tap_on_another_grid_is_named():
    model = model_with(RegisterEncoder(reported_grid=(2, 8)))
    with pytest.raises(ValueError, match=r"encoder tap at layer 1 returned a 2x8 grid; its decoder was built for 4x4"):
        model(torch.randn(1, 3, IMG, IMG))
