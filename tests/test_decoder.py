"""The local decoders follow each TapOutput: its prefix-token count and its grid.

A small encoder written as a plugin would write it carries two prefix tokens (registers) on every
tap; nothing outside its TapOutputs says so.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localmim_cli.encoders.base import MaskedEncoder, TapInfo, TapOutput
from localmim_cli.model.build import build_model
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


# ------------------------------------------------------------------------------ the loss-only path


def vit_model(decoder_depth: int = 1) -> LocalMIM:
    from test_model import small_settings
    settings = small_settings(scales=(4.0, 2.0, 1.0, 0.5))
    settings = settings.model_copy(update={"decoder": settings.decoder.model_copy(update={"depth": decoder_depth})})
    return build_model(settings)


def swin_model() -> LocalMIM:
    """Four stages on 2 px patches, 64 px images: a 4x4 grid of 16 px mask units."""
    from test_swin_model import tiny_settings
    settings = tiny_settings()
    encoder = settings.encoder.model_copy(update={"options": {**settings.encoder.options, "patch_size": 2}})
    return build_model(settings.model_copy(update={"encoder": encoder, "img_size": 64, "scales": [4.0, 2.0, 1.0, 0.5]}))


def in_float64(model: LocalMIM) -> LocalMIM:
    model = model.train().double()
    model.target.float()   # HOG computes in float32 whatever its input
    return model


def forward_and_gradients(model: LocalMIM, images, noise, loss_only: bool):
    model.zero_grad()
    torch.manual_seed(5)   # the same drop-path draws in both forwards
    out = model(images, noise=noise, loss_only=loss_only)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build, img, units", [(vit_model, 32, 16), (lambda: vit_model(decoder_depth=2), 32, 16),
                                               (swin_model, 64, 16)], ids=["vit", "vit-decoders-2-deep", "swin"])
def test_loss_only_path_gives_the_same_losses_and_gradients(build, img, units):
    torch.manual_seed(0)
    model = in_float64(build())
    g = torch.Generator().manual_seed(1)
    images = torch.randn(2, 3, img, img, generator=g, dtype=torch.float64)
    noise = torch.rand(2, units, generator=g, dtype=torch.float64)
    full, full_grads = forward_and_gradients(model, images, noise, loss_only=False)
    only, only_grads = forward_and_gradients(model, images, noise, loss_only=True)

    # scales 4, 2, 1 decode only their masked tokens; 0.5 pools neighbours and runs in full
    assert [c is None for c in only.cells] == [False, False, False, True]
    for k, cells in enumerate(only.cells[:3]):
        # exactly the cells that carry loss weight: the masked three quarters of each scale's
        assert only.masks[k].min() > 0
        assert cells.numel() == full.masks[k].count_nonzero() == full.masks[k].numel() * 3 // 4
        at = cells.unsqueeze(-1).expand(-1, -1, full.preds[k].shape[-1])
        torch.testing.assert_close(only.preds[k], full.preds[k].gather(1, at), rtol=1e-12, atol=1e-12)
        assert torch.equal(only.targets[k], full.targets[k].gather(1, at))
    torch.testing.assert_close(only.losses, full.losses, rtol=1e-6, atol=1e-9)
    assert only_grads.keys() == full_grads.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for name, grad in full_grads.items():
        assert torch.allclose(only_grads[name], grad, rtol=1e-6, atol=1e-10), name


def test_loss_only_path_computes_less():
    from localmim_cli.tasks.benchmark import count_flops
    torch.manual_seed(0)
    model = vit_model().train()
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 16)
    full, only = (count_flops(lambda: model(images, noise=noise, loss_only=lo).loss.backward()) for lo in (False, True))
    assert only < 0.95 * full


def test_decoders_run_in_full_where_rows_need_different_counts_or_nothing_is_hidden():
    """Decoders batch their rows, so each image must need as many tokens. Masking hides as many
    units in every image, but an encoder whose tap is coarser than its mask units can need
    more tokens in one image than in another; then, and where nothing is hidden, a decoder runs
    in full."""
    from localmim_cli.model.masking import mask_at_scale
    torch.manual_seed(0)
    model = vit_model()

    def weights(mask):
        return [mask_at_scale(mask, model.encoder.unit_grid, s) for s in model.scales]

    unequal = torch.zeros(2, 16)
    unequal[0, :12], unequal[1, :11] = 1, 1
    assert model.loss_tokens(weights(unequal)) == [None] * 4
    equal = torch.zeros(2, 16)
    equal[0, :12], equal[1, 4:] = 1, 1
    tokens = model.loss_tokens(weights(equal))
    assert tokens[3] is None   # scale 0.5 pools: always in full
    for t in tokens[:3]:
        assert torch.equal(t, torch.stack([torch.arange(12), torch.arange(4, 16)]))

    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = model(images, mask=torch.zeros(2, 16), loss_only=True)
    assert out.cells == [None] * 4 and out.loss == 0
    assert [p.shape[1] for p in out.preds] == [256, 64, 16, 4]
