"""localmim-hiera's own tests: the encoder contract (through localmim's conformance helpers), and
the one piece of logic of our own, the order of the visible tokens, against a brute-force replay
of Hiera's own token layout."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from localmim_cli.plugins.testing import check_encoder
from localmim_cli.model.masking import masking_from_noise
from localmim_hiera import HieraOptions, MaskedHiera, plugin


def test_default_small_hiera_keeps_the_encoder_contract():
    encoder = check_encoder(plugin, img_size=64)
    assert encoder.unit_px == 32 and encoder.unit_grid == (2, 2)
    assert encoder.tap_layers == [1, 2, 3, 4]
    assert [(t.channels, t.stride_px) for t in encoder.taps] == [(32, 4), (64, 8), (128, 16), (256, 32)]


def test_installed_entry_point_resolves_to_this_plugin():
    encoder = check_encoder("hiera", {"embed_dim": 16}, img_size=64, tap_layers=[1, 3])
    assert encoder.tap_layers == [1, 3] and len(encoder.trunk.blocks) == 1 + 1 + 2  # stage 4 dropped


@pytest.mark.parametrize("options, img_size", [
    ({"embed_dim": 16, "patch_stride": 2, "patch_kernel": 3, "patch_padding": 1}, 64),  # 16 px units
    ({"embed_dim": 16, "q_pool": 2}, 96),                                                  # no pool at stage 4, 3x3 units
    ({"embed_dim": 16, "stages": [1, 1, 1], "mask_unit_size": 4,
      "mask_unit_attn": [True, False, False]}, 64),                                        # 3 stages, 16 px units
])
def test_other_layouts_keep_the_contract(options, img_size):
    check_encoder(plugin, options, img_size=img_size)


def test_to_timm_gives_the_same_features():
    encoder = MaskedHiera(HieraOptions(embed_dim=16), 64).eval()
    images = torch.randn(2, 3, 64, 64)
    model = encoder.to_timm()
    with torch.no_grad():
        ours = encoder.forward_features(images)
        theirs = model.forward_head(model.forward_features(images), pre_logits=True)
    torch.testing.assert_close(ours, theirs)


def test_bad_options_are_explained():
    with pytest.raises(ValueError, match="mask_unit_size 4 must be q_stride"):
        HieraOptions(mask_unit_size=4)
    with pytest.raises(ValueError, match="not a timm Hiera configuration"):
        HieraOptions(arch="vit_base_patch16_224")
    with pytest.raises(ValueError, match="not divisible by Hiera's mask unit of 32 px"):
        MaskedHiera(HieraOptions(), 48)
    with pytest.raises(ValueError, match="hiera taps are stage numbers"):
        MaskedHiera(HieraOptions(), 64, [2, 5])


# ------------------------------------------------------------------------------ token order


class _Labels(nn.Module):
    """Stands in for the patch embedding: every token carries a label instead of features."""

    def __init__(self, labels: torch.Tensor):
        super().__init__()
        self.labels = labels  # (N,) in raster order of the stage-1 token grid

    def forward(self, x, mask=None):
        return self.labels.to(x.dtype)[None, :, None].expand(x.shape[0], -1, 1).clone()


class _PoolOnly(nn.Module):
    """A Hiera block reduced to its pooling (the same max over the unrolled stride dimension)."""

    def __init__(self, q_stride: int):
        super().__init__()
        self.q_stride = q_stride

    def forward(self, x):
        if self.q_stride > 1:
            x = x.view(x.shape[0], self.q_stride, -1, x.shape[-1]).amax(dim=1)
        return x


@pytest.mark.parametrize("options, img_size", [
    ({"embed_dim": 8}, 128),
    ({"embed_dim": 8, "q_pool": 1}, 96),
    ({"embed_dim": 8, "stages": [1, 1, 1], "mask_unit_size": 4, "mask_unit_attn": [True, False, False]}, 48),
])
def test_ids_restore_puts_every_visible_token_back_on_its_cell(options, img_size):
    """Label each stage-1 token with the index of the cell it falls in on a tap's grid, push the
    labels through Hiera's own unroll, mask-unit dropping, pooling layout and reroll, then undo the
    shuffle as the LocalMIM decoder does: every visible cell must get its own label back."""
    encoder = MaskedHiera(HieraOptions(**options), img_size).eval()
    trunk = encoder.trunk
    trunk.pos_embed = nn.Parameter(torch.zeros(1, trunk.pos_embed.shape[1], 1))
    trunk.blocks = nn.ModuleList(_PoolOnly(block.attn.q_stride) for block in trunk.blocks)
    encoder.tap_norms = nn.ModuleList(nn.Identity() for _ in encoder.taps)
    tokens_side = img_size // trunk.patch_stride[0]
    units = encoder.num_units
    batch = 3
    masking = masking_from_noise(torch.rand(batch, units, generator=torch.Generator().manual_seed(1)), 0.5)
    images = torch.zeros(batch, 3, img_size, img_size)
    for k, tap in enumerate(encoder.taps):
        cell_tokens = tap.stride_px // trunk.patch_stride[0]  # stage-1 tokens per cell side
        y, x = torch.meshgrid(torch.arange(tokens_side), torch.arange(tokens_side), indexing="ij")
        side = tokens_side // cell_tokens
        labels = (y // cell_tokens) * side + x // cell_tokens
        trunk.patch_embed = _Labels(labels.reshape(-1))
        out = encoder.forward_taps(images, masking.ids_keep, masking.ids_restore)[k]
        assert out.grid == (side, side)
        visible = out.tokens[..., 0]  # (B, n_visible) labels in the encoder's token order
        placeholder = torch.full((batch, side * side - visible.shape[1]), -1.0)
        restored = torch.cat([visible, placeholder], dim=1).gather(1, out.ids_restore)  # decoder's unshuffle
        per_unit_side = side // encoder.unit_grid[0]
        hidden_units = masking.mask.reshape(batch, *encoder.unit_grid).bool()
        hidden = hidden_units.repeat_interleave(per_unit_side, 1).repeat_interleave(per_unit_side, 2).reshape(batch, -1)
        cells = torch.arange(side * side, dtype=restored.dtype).expand(batch, -1)
        assert torch.equal(restored[~hidden], cells[~hidden]), f"tap {k}: tokens land on the wrong cells"
        assert torch.all(restored[hidden] == -1)
