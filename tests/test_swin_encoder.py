"""The swin encoder: window grouping, the encoder contract, the unmasked forward and to_timm()."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from torch import nn

from localmim_cli.plugins.checks import probe_images
from localmim_cli.plugins.testing import check_encoder
from localmim_cli.encoders.swin import (MaskedSwin, SwinOptions, build_swin, plugin, published_merged_coords,
                                        unit_token_coords)
from localmim_cli.encoders.swin_blocks import WindowAttention
from localmim_cli.encoders.swin_groups import (grid_coords, one_group, packed_groups, window_ids,
                                               window_partition)
from localmim_cli.encoders.swin_timm import swap_merge_chunks, timm_architecture
from localmim_cli.model.masking import masking_from_noise

TINY = {"arch": None, "embed_dim": 16, "depths": [2, 2, 2, 2], "num_heads": [1, 2, 2, 4]}


def window_by_window(attn: WindowAttention, x: torch.Tensor, coords: torch.Tensor, grid, window: int,
                     shift: int) -> torch.Tensor:
    """Reference: each window's tokens attend among themselves only, one window at a time."""
    ids = window_ids(coords[0], grid, window, shift)
    out = torch.empty_like(x)
    heads = attn.num_heads
    for w in ids.unique():
        sel = (ids == w).nonzero().squeeze(1)
        q, k, v = attn.qkv(x[:, sel]).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
        c = coords[0, sel]
        delta = c[:, None] - c[None, :] + window - 1
        bias = attn.relative_position_bias_table[delta[..., 0] * (2 * window - 1) + delta[..., 1]]
        a = (q * attn.scale) @ k.transpose(-2, -1) + bias.permute(2, 0, 1)
        out[:, sel] = (a.softmax(-1) @ v).transpose(1, 2).reshape(x.shape[0], len(sel), -1)
    return attn.proj(out)


@pytest.mark.parametrize("shift", [0, 2])
def test_grouped_attention_is_window_attention(shift):
    torch.manual_seed(0)
    grid, window = (20, 20), 5
    keep = torch.randperm(400)[:130].sort().values
    coords = grid_coords(grid)[:, keep]  # 130 scattered tokens: more than 2 * 5^2, so packed
    attn = WindowAttention(16, 2, window, qkv_bias=True)
    x = torch.randn(3, 130, 16)
    with torch.no_grad():
        expected = window_by_window(attn, x, coords, grid, window, shift)
        packed = packed_groups(coords, grid, window, shift)
        assert packed.groups == 6 and packed.size == 50
        for groups in (packed, one_group(coords, grid, window, shift)):
            assert (groups.attention_bias(attn.relative_position_bias_table) == -100).any()
            torch.testing.assert_close(attn(x, groups), expected, atol=1e-6, rtol=1e-5)


def test_window_partition_covers_a_full_grid_once():
    groups = window_partition((16, 16), 4, 2)
    assert (groups.groups, groups.size) == (25, 16)  # shifted by 2: windows of 2, 4, 4, 4, 2 per side
    assert torch.equal(groups.index[0, groups.slot[0]], torch.arange(256))
    assert int(groups.same.any(-1).sum()) == 256  # padding slots share a window with nothing


def test_published_coordinates_agree_with_positions_where_a_unit_is_one_token():
    ids_keep = torch.tensor([[3, 7, 20, 48]])
    assert torch.equal(published_merged_coords(ids_keep, (7, 7), 1), unit_token_coords(ids_keep, (7, 7), 1))
    # with 2x2 tokens per unit they differ: unit 3's first token sits at unit-major index 12
    assert published_merged_coords(ids_keep, (7, 7), 2)[0, 0].tolist() == [0, 12]
    assert unit_token_coords(ids_keep, (7, 7), 2)[0, 0].tolist() == [0, 6]


@pytest.mark.parametrize("window_coords", ["published", "grid"])
def test_encoder_keeps_the_plugin_contract(window_coords):
    # per-image masks, hidden pixels do not reach the taps, every parameter gets a gradient,
    # forward_features, and to_timm() features equal to forward_features
    encoder = check_encoder(plugin, {**TINY, "window_size": 4, "window_coords": window_coords}, img_size=128)
    assert [t.stride_px for t in encoder.taps] == [8, 16, 32, 32]
    assert [t.channels for t in encoder.taps] == [32, 64, 128, 128]
    assert encoder.unit_px == 32 and encoder.mask_shared_by_batch and encoder.n_prefix == 0


def test_one_layout_for_the_batch_or_one_per_image_give_the_same_taps():
    torch.manual_seed(0)
    encoder = build_swin(SwinOptions(**TINY, window_size=4), 128, None).eval()
    images = probe_images(2, 128, seed=1)
    masking = masking_from_noise(torch.rand(2, 16), 0.75)  # two different masks
    with torch.no_grad():
        both = encoder.forward_taps(images, masking.ids_keep, masking.ids_restore)
        for b in range(2):
            alone = encoder.forward_taps(images[b:b + 1], masking.ids_keep[b:b + 1], masking.ids_restore[b:b + 1])
            for k, (x, y) in enumerate(zip(both, alone)):
                torch.testing.assert_close(x.tokens[b:b + 1], y.tokens, atol=1e-5, rtol=1e-5, msg=f"tap {k}")
                assert torch.equal(x.ids_restore[b:b + 1], y.ids_restore)


@pytest.mark.parametrize("img_size, window", [(128, 4), (224, 14)])
def test_to_timm_gives_the_same_features_and_rebuilds_from_its_name(img_size, window):
    torch.manual_seed(0)
    encoder = build_swin(SwinOptions(**TINY, window_size=window), img_size, None).eval()
    with torch.no_grad():  # away from the identity init of the norms
        for p in encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = probe_images(2, img_size, seed=0)
    model = encoder.to_timm()
    with torch.no_grad():
        ours = encoder.forward_features(images)
        theirs = model.forward_head(model.forward_features(images), pre_logits=True)
    assert (ours - theirs).abs().max().item() < 1e-5

    arch, args = model.pretrained_cfg["architecture"], model.model_args
    json.dumps(args)  # export writes them to config.json
    rebuilt = timm.create_model(arch, num_classes=0, **args).eval()
    rebuilt.load_state_dict(model.state_dict())  # strict: the same keys and shapes
    with torch.no_grad():
        default_eps = rebuilt.forward_head(rebuilt.forward_features(images), pre_logits=True)
        for m in rebuilt.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = encoder.layer_norm_eps
        same_eps = rebuilt.forward_head(rebuilt.forward_features(images), pre_logits=True)
    # timm's LayerNorm eps is 1e-5 and cannot be passed: within export's 1e-4, exact otherwise
    assert (ours - default_eps).abs().max().item() < 1e-4
    assert (ours - same_eps).abs().max().item() < 1e-5


def test_timm_name_says_the_size_whatever_arch_filled():
    assert timm_architecture(SwinOptions()) == "swin_base_patch4_window7_224"
    assert timm_architecture(SwinOptions(arch="swin_large", window_size=14)) == "swin_large_patch4_window7_224"
    assert timm_architecture(SwinOptions(arch=None, embed_dim=96, depths=[2, 2, 6, 2],
                                         num_heads=[3, 6, 12, 24])) == "swin_tiny_patch4_window7_224"
    # `arch` defaults to swin_base, but other widths make another model: not called swin_base
    custom = SwinOptions(embed_dim=32, depths=[2, 2, 2, 2], num_heads=[1, 2, 4, 8])
    assert custom.arch is None and custom.size_name() is None
    assert timm_architecture(custom) == "swin_tiny_patch4_window7_224"
    assert timm_architecture(SwinOptions(patch_size=2)) == "swin_tiny_patch4_window7_224"


def test_to_timm_refuses_grids_its_windows_do_not_tile():
    encoder = build_swin(SwinOptions(**TINY, window_size=3), 128, None)
    with pytest.raises(NotImplementedError, match="not a whole number"):
        encoder.to_timm()
    assert encoder.forward_features(probe_images(1, 128)).shape == (1, 128)  # ours still runs


def test_to_timm_needs_the_last_stage():
    encoder = build_swin(SwinOptions(**TINY), 224, [1, 2])
    assert len(encoder.layers) == 2 and [t.channels for t in encoder.taps] == [32, 64]
    with pytest.raises(NotImplementedError, match="last stage"):
        encoder.to_timm()


def test_merge_chunk_swap_is_its_own_inverse_and_swaps_the_middle():
    w = torch.arange(8.0)
    assert swap_merge_chunks(w).tolist() == [0, 1, 4, 5, 2, 3, 6, 7]
    x = torch.randn(3, 8)
    assert torch.equal(swap_merge_chunks(swap_merge_chunks(x)), x)


def test_options_fill_from_arch_and_refuse_what_does_not_fit():
    base = SwinOptions()
    assert (base.embed_dim, base.depths, base.num_heads, base.window_size) == (128, [2, 2, 18, 2], [4, 8, 16, 32], 7)
    assert SwinOptions(arch="swin_large", window_size=14).num_heads == [6, 12, 24, 48]
    with pytest.raises(ValueError, match="missing"):
        SwinOptions(arch=None, embed_dim=32)
    with pytest.raises(ValueError, match="one entry per stage"):
        SwinOptions(arch=None, embed_dim=32, depths=[2, 2], num_heads=[1])
    with pytest.raises(ValueError, match="not divisible"):
        SwinOptions(arch=None, embed_dim=30, depths=[2], num_heads=[4])
    with pytest.raises(ValueError, match="extra"):
        SwinOptions(depth=12)
    with pytest.raises(ValueError, match="mask unit"):
        MaskedSwin(SwinOptions(**TINY), 112, [1, 2, 3, 4])
    with pytest.raises(ValueError, match="outside"):
        MaskedSwin(SwinOptions(**TINY), 128, [1, 5])
