"""The multi-scale adapter dense tasks share (model/feature_pyramid.py), and the parts of the
segmentation recipe that are plain arithmetic: the poly schedule, layer-wise lr decay, sliding
windows, the scores, the seeded augmentation."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from localmim_cli.model.feature_pyramid import StagePyramid, ViTPyramid, default_vit_taps, resize_positions
from localmim_cli.weights.encoder_weights import EncoderWeights, ViTShape
from localmim_cli.weights.sources import create_vit

pytestmark = pytest.mark.usefixtures("one_thread")


def random_vit(shape: ViTShape, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    vit = create_vit(shape, pooling="pool")
    with torch.no_grad():
        for p in vit.parameters():    # away from the init, so a dropped or misplaced weight shows
            p.normal_(0, 0.2)
    return vit.eval()


def test_vit_taps_are_the_pretraining_taps_and_distinct_for_small_depths():
    assert default_vit_taps(12) == [2, 4, 10, 12]          # published out_indices [1, 3, 9, 11]
    assert default_vit_taps(24) == [2, 4, 22, 24]
    assert default_vit_taps(4) == [1, 2, 3, 4]
    assert default_vit_taps(6) == [2, 3, 5, 6]


def test_the_vit_pyramid_starts_as_the_pretrained_vit_and_reaches_strides_4_to_32():
    shape = ViTShape(32, 8, 32, 4, 2)
    vit = random_vit(shape)
    pyramid = ViTPyramid(shape, 64, [1, 2, 3, 4]).eval()
    report = pyramid.load_vit(EncoderWeights("published", "vit.pth", shape, vit.state_dict(), "pool"))
    # Every encoder tensor placed (the qkv bias as Beit's q and v biases); the new parts named.
    assert len(report.loaded) == len(vit.state_dict()) + shape.depth     # each qkv bias -> q and v
    assert "encoder.blocks.*.attn.relative_position_bias_table" in report.describe()
    assert "positions resampled 4^2 -> 8^2" in report.describe()

    # At the start (zero relative position bias, layer scale 1) the taps are the ViT's own, at
    # the ViT's resampled positions; the key bias the conversion drops cancels in softmax.
    x = torch.randn(2, 3, 64, 64)
    vit64 = create_vit(ViTShape(64, 8, 32, 4, 2), pooling="pool").eval()
    state = vit.state_dict()
    state["pos_embed"] = resize_positions(state["pos_embed"], 4, 8)
    vit64.load_state_dict(state)
    with torch.no_grad():
        ours = pyramid.encoder.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True)
        theirs = vit64.forward_intermediates(x, indices=[0, 1, 2, 3], intermediates_only=True, norm=False)
        levels = pyramid(x)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert [tuple(t.shape) for t in levels] == [(2, 32, 16, 16), (2, 32, 8, 8), (2, 32, 4, 4), (2, 32, 2, 2)]
    assert pyramid.feature_info.channels() == [32] * 4 and pyramid.feature_info.reduction() == [4, 8, 16, 32]


def test_the_published_pyramid_for_16_px_patches():
    pyramid = ViTPyramid(ViTShape(64, 16, 32, 4, 2), 64)
    fpn1, fpn2, fpn3, fpn4 = pyramid.levels
    assert [type(m).__name__ for m in fpn1] == ["ConvTranspose2d", "BatchNorm2d", "GELU", "ConvTranspose2d"]
    assert [type(m).__name__ for m in fpn2] == ["ConvTranspose2d"]
    assert isinstance(fpn3, nn.Identity) and isinstance(fpn4, nn.MaxPool2d) and fpn4.kernel_size == 2
    table = pyramid.encoder.blocks[0].attn.relative_position_bias_table
    assert table.abs().max() == 0                                          # zero at the start
    assert torch.equal(pyramid.encoder.blocks[0].gamma_1, torch.ones(32))  # layer scale 1.0


def test_a_feature_pyramid_network_takes_the_levels_as_they_are():
    from torchvision.ops import FeaturePyramidNetwork

    pyramid = ViTPyramid(ViTShape(32, 8, 32, 4, 2), 64).eval()
    fpn = FeaturePyramidNetwork(pyramid.feature_info.channels(), 16)
    with torch.no_grad():
        out = fpn(OrderedDict((f"p{i}", t) for i, t in enumerate(pyramid(torch.randn(1, 3, 64, 64)))))
    assert [tuple(t.shape[-2:]) for t in out.values()] == [(16, 16), (8, 8), (4, 4), (2, 2)]


def test_swin_stages_behind_new_norms():
    import timm

    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, num_classes=0, img_size=64,
                             embed_dim=16, depths=[1, 1, 2, 1], num_heads=[1, 1, 1, 1], window_size=4,
                             strict_img_size=False, always_partition=True)
    pyramid = StagePyramid(swin).eval()
    with torch.no_grad():
        levels = pyramid(torch.randn(1, 3, 96, 64))     # any size: windows pad
    assert [tuple(t.shape[1:]) for t in levels] == [(16, 24, 16), (32, 12, 8), (64, 6, 4), (128, 3, 2)]
    assert pyramid.feature_info.reduction() == [4, 8, 16, 32]
    # Swin fine-tuning's lr-decay ids: embedding 0, blocks counted over stages, merges with the block before
    assert pyramid.num_layers == 5 + 2
    assert pyramid.layer_of("encoder.patch_embed.proj.weight") == 0
    assert pyramid.layer_of("encoder.layers.2.blocks.1.mlp.fc1.weight") == 1 + 1 + 1 + 1
    assert pyramid.layer_of("encoder.layers.2.downsample.reduction.weight") == 2
    assert pyramid.layer_of("norms.0.weight") == 6


# ---------------------------------------------------------------------------------------------
# The recipe's arithmetic


def test_poly_schedule_with_linear_warmup_is_mmcvs():
    from localmim_cli.engine.schedule import PolySchedule

    s = PolySchedule(lr=4e-4, min_lr=0.0, total_steps=160000, power=1.0, warmup_steps=1500, warmup_ratio=1e-6)
    poly = lambda step: 4e-4 * (1 - step / 160000)          # noqa: E731
    assert s.at(0) == pytest.approx(4e-4 * 1e-6)
    assert s.at(750) == pytest.approx(poly(750) * (1 - 0.5 * (1 - 1e-6)))
    assert s.at(1500) == pytest.approx(poly(1500))
    assert s.at(80000) == pytest.approx(2e-4)
    assert s.at(160000) == 0.0


def test_layer_decay_groups_follow_beits_constructor():
    from localmim_cli.engine.param_groups import layer_decay_groups
    from localmim_cli.tasks.segmentation.model import Segmenter

    model = Segmenter(ViTPyramid(ViTShape(32, 8, 32, 4, 2), 32), 3, decoder_channels=16, aux_channels=8)
    groups = layer_decay_groups(model, 0.05, 0.5, no_decay_1d=True, no_decay_names=[])
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())

    def group(name):
        return by_param[id(named[name])]
    assert group("pyramid.encoder.patch_embed.proj.weight")["lr_scale"] == 0.5 ** 5     # layer 0 of 6
    assert group("pyramid.encoder.blocks.0.attn.qkv.weight")["lr_scale"] == 0.5 ** 4
    assert group("pyramid.encoder.blocks.3.attn.qkv.weight")["lr_scale"] == 0.5 ** 1
    assert group("decode_head.classifier.weight")["lr_scale"] == 1.0
    assert group("pyramid.levels.0.0.weight")["lr_scale"] == 1.0
    assert group("pyramid.encoder.pos_embed")["weight_decay"] == 0.05   # as BEiT's constructor gives it
    assert group("pyramid.encoder.blocks.0.gamma_1")["weight_decay"] == 0.0
    assert group("pyramid.encoder.blocks.0.attn.relative_position_bias_table")["weight_decay"] == 0.05
    assert sum(len(g["params"]) for g in groups) == len(named)
    swin_rule = layer_decay_groups(model, 0.01, 1.0, no_decay_1d=False, no_decay_names=["relative_position_bias_table"])
    by_param = {id(p): g for g in swin_rule for p in g["params"]}
    assert group("pyramid.encoder.blocks.0.attn.relative_position_bias_table")["weight_decay"] == 0.0
    assert group("decode_head.classifier.bias")["weight_decay"] == 0.01


def test_sliding_windows_cover_the_image_as_mmsegmentation_slides():
    from localmim_cli.tasks.segmentation.inference import slide_logits, window_starts

    assert window_starts(512, 512, 341) == [0]
    assert window_starts(683, 512, 341) == [0, 171]          # the last window flush with the edge
    assert window_starts(2048, 512, 341) == [0, 341, 682, 1023, 1364, 1536]
    # A per-pixel model gives the same logits slid (any stride) as whole, and on an image smaller than the window
    conv = nn.Conv2d(3, 5, 1)
    image = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(conv, image, 5, crop=32, stride=21, batch_size=3), conv(image))
        torch.testing.assert_close(slide_logits(conv, image[:, :, :20], 5, crop=32, stride=21), conv(image[:, :, :20]))


def test_scores_are_over_the_whole_split_with_absent_classes_skipped():
    from localmim_cli.tasks.segmentation.metric import confusion, scores

    target = torch.tensor([[0, 0, 1, 1], [0, 255, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 0, 0]])
    m = confusion(pred, target, 4)
    assert m.tolist() == [[2, 1, 0, 0], [1, 2, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    s = scores(m, ["a", "b", "c", "d"])
    assert s["per_class"]["a"]["IoU"] == pytest.approx(100 * 2 / 4)
    assert s["per_class"]["b"]["IoU"] == pytest.approx(100 * 2 / 4)
    assert s["per_class"]["d"]["IoU"] is None                   # never labelled, never predicted
    assert s["mIoU"] == pytest.approx(50.0) and s["aAcc"] == pytest.approx(100 * 4 / 6)


def test_augmentation_is_a_function_of_seed_epoch_and_index():
    from localmim_cli.data.augment import generator_for
    from localmim_cli.tasks.segmentation.augment import IGNORE, SegAugment, crop_offsets

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    mask = (np.arange(90)[None, :].repeat(60, 0) // 30).astype(np.uint8)    # three vertical bands
    augment = SegAugment(crop=32, scale=(128, 32), ratio_range=(0.5, 2.0))
    a = augment(image, mask, generator_for(0, "segment", 3, 7))
    b = augment(image.copy(), mask.copy(), generator_for(0, "segment", 3, 7))
    c = augment(image, mask, generator_for(0, "segment", 4, 7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert a[0].shape == (3, 32, 32) and a[1].shape == (32, 32)
    assert set(a[1].unique().tolist()) <= {0, 1, 2, IGNORE}
    # cat_max_ratio: a crop of one band only is redrawn while another crop is possible
    one_class = [crop_offsets(mask, 25, 0.75, generator_for(1, k)) for k in range(20)]
    assert all(len(np.unique(mask[t:t + 25, l:l + 25])) > 1 for t, l in one_class)


def test_reduce_zero_label_ignores_other_and_shifts_the_classes(tmp_path):
    from PIL import Image

    from localmim_cli.tasks.segmentation.data import read_mask

    Image.fromarray(np.array([[0, 1, 2], [150, 255, 3]], dtype=np.uint8), mode="L").save(tmp_path / "m.png")
    assert read_mask(tmp_path / "m.png", True).tolist() == [[255, 0, 1], [149, 255, 2]]
    assert read_mask(tmp_path / "m.png", False).tolist() == [[0, 1, 2], [150, 255, 3]]
