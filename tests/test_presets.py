"""Shipped presets: each validates, says what it is, and holds the published numbers it claims."""

from __future__ import annotations

import math

import pytest
import torch

from localmim_cli.model.build import build_model
from localmim_cli.encoders.vit import default_vit_taps
from localmim_cli.config.layers import resolve
from localmim_cli.config.presets import PresetInfo, effective_batch, list_presets, load_preset, scaled_lr, scaling_line
from localmim_cli.errors import PresetError
from localmim_cli.config.schema import PretrainSettings

SHIPPED = {"demo", "vit-s16-hog", "vit-b16-hog-1600ep", "vit-b16-hog-100ep", "vit-b16-hog-1gpu",
           "vit-l16-hog-800ep", "swin-demo", "swin-b-hog-400ep", "swin-b-pixel-400ep", "swin-l-hog-800ep"}
N_SAMPLE_PHOTOS = 7


def resolved(name: str):
    info, values = load_preset(name)
    return resolve(PretrainSettings, preset=values, preset_name=info.name, environ={})


def test_list_presets_names_and_headers():
    infos = list_presets()
    assert {i.name for i in infos} >= SHIPPED
    assert [i.name for i in infos] == sorted(i.name for i in infos)
    for info in infos:
        assert isinstance(info, PresetInfo) and info.builtin
        assert info.path.endswith(f"{info.name}.toml")  # the file is named after the preset
        assert info.kind in ("pretrain", "finetune")
        assert info.summary and "\n" not in info.summary
        paragraphs = info.description.split("\n\n")
        assert len(paragraphs) >= 3, f"{info.name}: describe use, sources and hardware"
        assert all(p and "\n" not in p for p in paragraphs)
    assert {i.name for i in list_presets(kind="pretrain")} >= SHIPPED
    assert list_presets(kind="no-such-kind") == []


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_preset_validates(name):
    r = resolved(name)
    assert isinstance(r.settings, PretrainSettings)
    assert r.provenance["train.epochs"] == f"preset:{name}"
    assert r.plugin_options["model.encoder.options"] is not None


@pytest.mark.parametrize("name", ["demo", "vit-s16-hog"])
def test_small_presets_build_a_model(name):
    model = build_model(resolved(name).settings.model)
    assert len(model.cells_px) == 4


def test_demo_runs_a_forward_pass_and_fits_its_budget():
    s = resolved("demo").settings
    model = build_model(s.model)
    assert model.encoder.tap_layers == [1, 2, 5, 6]
    assert model.cells_px == [2, 4, 8, 16]
    out = model(torch.randn(2, 3, s.model.img_size, s.model.img_size))
    assert torch.isfinite(out.loss)
    assert 64 <= N_SAMPLE_PHOTOS * s.data.repeats <= 128
    assert s.data.path is None  # the built-in sample photos
    assert s.train.device == s.train.precision == "auto"
    steps = s.train.epochs * (N_SAMPLE_PHOTOS * s.data.repeats // s.train.batch_size)
    assert steps <= 1000  # about 3 minutes on 2 CPU cores
    assert 0 < s.train.checkpoint_every and steps // s.train.checkpoint_every <= 10  # few writes
    assert sum(p.numel() for p in model.parameters()) < 2_000_000


def test_published_vit_b_recipe():
    s = resolved("vit-b16-hog-1600ep").settings
    assert s.model.encoder.options == {"arch": "vit_base", "patch_size": 16}
    assert s.model.target.name == "hog" and s.model.target.options == {"nbins": 9, "bias": False}
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.base_lr, s.optim.min_lr) == (1600, 40, 2e-4, 1e-6)
    assert (s.model.mask_ratio, s.data.crop_scale, s.optim.weight_decay, s.optim.betas) == \
        (0.75, (0.2, 1.0), 0.05, (0.9, 0.95))
    assert s.optim.clip_grad is None and s.optim.lr is None and s.model.taps is None
    short = resolved("vit-b16-hog-100ep").settings
    assert (short.train.epochs, short.optim.warmup_epochs) == (100, 10)
    assert short.model == s.model and short.data == s.data


def test_published_vit_l_recipe():
    r = resolved("vit-l16-hog-800ep")
    s = r.settings
    assert s.model.target.options == {"nbins": 18, "bias": True}
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.base_lr) == (800, 40, 1.5e-4)
    assert s.model.taps is None
    assert default_vit_taps(r.plugin_options["model.encoder.options"].depth) == [2, 4, 22, 24]


def test_published_swin_b_recipes():
    """Method digest sections 1.7 and 2.1: Swin-B, window 7, a decoder per stage at its own grid."""
    hog, pixel = resolved("swin-b-hog-400ep"), resolved("swin-b-pixel-400ep")
    s = hog.settings
    assert s.model.encoder.name == "swin" and s.model.taps is None
    options = hog.plugin_options["model.encoder.options"]
    assert (options.embed_dim, options.depths, options.num_heads) == (128, [2, 2, 18, 2], [4, 8, 16, 32])
    assert (options.patch_size, options.window_size, options.drop_path) == (4, 7, 0.0)
    assert (s.model.img_size, s.model.scales, s.model.mask_ratio, s.model.layer_norm_eps) == \
        (224, [1.0] * 4, 0.75, 1e-6)
    assert s.model.target.options == {"nbins": 18, "bias": True}
    assert (s.model.decoder.width, s.model.decoder.depth, s.model.decoder.num_heads) == ([64, 128, 128, 128], 1, 4)
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.base_lr, s.optim.min_lr) == (400, 40, 1e-4, 0.0)
    assert (s.optim.betas, s.optim.weight_decay, s.optim.clip_grad, s.data.crop_scale) == \
        ((0.9, 0.95), 0.05, None, (0.2, 1.0))
    assert effective_batch(s, 8) == 2048 and math.isclose(scaled_lr(s, 8), 8e-4)
    p = pixel.settings
    assert p.model.target.name == "pixel" and pixel.plugin_options["model.target.options"].normalize
    assert p.model.model_copy(update={"target": s.model.target}) == s.model
    assert (p.optim, p.train, p.data) == (s.optim, s.train, s.data)


def test_swin_b_preset_builds_the_published_encoder():
    from localmim_cli.encoders.swin import build_swin

    r = resolved("swin-b-hog-400ep")
    with torch.device("meta"):  # shapes without 88 M initialised weights
        encoder = build_swin(r.plugin_options["model.encoder.options"], 224, None)
    assert encoder.tap_layers == [1, 2, 3, 4] and encoder.unit_grid == (7, 7) and encoder.unit_px == 32
    assert [(t.channels, t.stride_px) for t in encoder.taps] == [(256, 8), (512, 16), (1024, 32), (1024, 32)]
    assert [stage.window_size for stage in encoder.layers] == [7, 7, 7, 7]
    params = sum(p.numel() for n, p in encoder.named_parameters() if not n.startswith("tap_norms"))
    assert 86e6 < params < 88e6  # Swin-B without its classifier


def test_published_swin_l_recipe():
    r = resolved("swin-l-hog-800ep")
    s = r.settings
    options = r.plugin_options["model.encoder.options"]
    assert (options.embed_dim, options.depths, options.num_heads, options.window_size) == \
        (192, [2, 2, 18, 2], [6, 12, 24, 48], 14)
    assert s.model.target.options == {"nbins": 18, "bias": True} and s.model.scales == [1.0] * 4
    assert s.model.decoder.width == [64, 128, 128, 128] and s.model.decoder.num_heads == 4
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.base_lr, s.optim.min_lr) == (800, 40, 1e-4, 0.0)
    assert (s.train.batch_size, s.train.accum_steps) == (128, 4)
    assert effective_batch(s, 8) == 4096 and math.isclose(scaled_lr(s, 8), 1.6e-3)


def test_swin_demo_is_a_small_swin_on_the_sample_photos():
    r = resolved("swin-demo")
    s = r.settings
    model = build_model(s.model)
    # The published shape at 128 px: 4x4 mask units of 32 px, a decoder per stage at scale 1.
    assert model.encoder.unit_px == 32 and model.encoder.unit_grid == (4, 4)
    assert model.encoder.tap_layers == [1, 2, 3, 4] and model.cells_px == [8, 16, 32, 32]
    out = model(torch.randn(2, 3, s.model.img_size, s.model.img_size))
    assert torch.isfinite(out.loss) and out.losses.shape == (4,)
    assert model.encoder.to_timm() is not None  # its windows tile every stage: finetune and export work
    assert s.data.path is None and s.train.device == s.train.precision == "auto"
    steps = s.train.epochs * (N_SAMPLE_PHOTOS * s.data.repeats // s.train.batch_size)
    assert steps <= 500  # a few minutes on 2 CPU cores
    assert 0 < s.train.checkpoint_every and steps // s.train.checkpoint_every <= 10
    assert sum(p.numel() for p in model.parameters()) < 3_000_000


def test_published_swin_b_finetune_recipe():
    """Method digest section 2.2 and the authors' Swin README: batch 1024, lr 4e-3, layer decay 0.9."""
    from localmim_cli.config.schema import FinetuneSettings

    info, values = load_preset("swin-b-ft")
    assert info.kind == "finetune" and info.world_size == 8
    s = resolve(FinetuneSettings, preset=values, preset_name=info.name, environ={}).settings
    assert effective_batch(s, 8) == 1024 and math.isclose(scaled_lr(s, 8), 4e-3)
    assert (s.model.arch, s.model.drop_path, s.model.head_init_std, s.model.img_size) == \
        ("swin_base_patch4_window7_224", 0.1, 2e-5, None)
    assert (s.train.epochs, s.optim.warmup_epochs, s.optim.min_lr, s.optim.layer_decay) == (100, 20, 2.5e-7, 0.9)
    assert (s.optim.betas, s.optim.weight_decay, s.optim.label_smoothing) == ((0.9, 0.999), 0.05, 0.1)
    assert (s.mixup.mixup, s.mixup.cutmix, s.mixup.prob, s.mixup.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (s.data.auto_augment, s.data.reprob, s.data.remode, s.data.recount) == \
        ("rand-m9-mstd0.5-inc1", 0.25, "pixel", 1)
    assert (s.data.crop_scale, s.data.eval_crop_fraction, s.data.interpolation) == ((0.08, 1.0), 0.875, "bicubic")
    # The HOG checkpoint's variant, as the README gives it: accumulate 2, keep the absolute lr.
    hog = s.model_copy(update={"train": s.train.model_copy(update={"accum_steps": 2}),
                               "optim": s.optim.model_copy(update={"lr": 4e-3})})
    assert effective_batch(hog, 8) == 2048 and scaled_lr(hog, 8) == 4e-3


def test_published_segmentation_recipes():
    """Method digest section 2.3 (the authors' ADE20K configs): 16 crops of 512 per step, 160k
    iterations, 1500 warmup iterations then poly power 1; ViT-B: AdamW 4e-4, wd 0.05, layer decay
    0.65, drop path 0.1, slide test at stride 341; Swin-B: 6e-5, wd 0.01 off position biases and
    norms, no layer decay, drop path 0.3, fp32, whole-image test."""
    from localmim_cli.config.segmentation import SegmentationSettings

    for name in ("seg-vit-b-ade20k", "seg-swin-b-ade20k", "seg-small"):
        info, values = load_preset(name)
        assert info.kind == "finetune" and info.task == "segmentation"
    s = resolve(SegmentationSettings, preset=load_preset("seg-vit-b-ade20k")[1], environ={}).settings
    assert effective_batch(s, 8) == 16 and math.isclose(scaled_lr(s, 8), 4e-4)
    assert (s.train.iterations, s.optim.warmup_steps, s.optim.warmup_ratio, s.optim.power, s.optim.min_lr) == \
        (160000, 1500, 1e-6, 1.0, 0.0)
    assert (s.optim.betas, s.optim.weight_decay, s.optim.layer_decay, s.model.drop_path) == ((0.9, 0.999), 0.05, 0.65, 0.1)
    assert (s.model.img_size, s.model.decoder_channels, s.model.aux_channels, s.model.aux_weight) == (512, 768, 256, 0.4)
    assert (s.model.rel_pos_bias, s.model.layer_scale, s.model.arch) == (True, 1.0, "vit_base_patch16_224")
    assert (s.val.mode, s.val.stride, s.data.scale, s.data.ratio_range, s.data.cat_max_ratio) == \
        ("slide", 341, (2048, 512), (0.5, 2.0), 0.75)
    w = resolve(SegmentationSettings, preset=load_preset("seg-swin-b-ade20k")[1], environ={}).settings
    assert effective_batch(w, 8) == 16 and math.isclose(scaled_lr(w, 8), 6e-5)
    assert (w.optim.weight_decay, w.optim.layer_decay, w.model.drop_path, w.train.precision, w.val.mode) == \
        (0.01, 1.0, 0.3, "fp32", "whole")
    assert set(w.optim.no_decay_names) == {"absolute_pos_embed", "relative_position_bias_table", "norm"}
    assert w.model.decoder_channels == 512 and not w.optim.no_decay_1d


def test_batch_and_lr_arithmetic():
    b = resolved("vit-b16-hog-1600ep").settings
    assert effective_batch(b, 8) == 2048 and math.isclose(scaled_lr(b, 8), 1.6e-3)
    assert effective_batch(b, 1) == 256 and math.isclose(scaled_lr(b, 1), 2e-4)
    one = resolved("vit-b16-hog-1gpu").settings
    assert effective_batch(one, 1) == 2048 and math.isclose(scaled_lr(one, 1), 1.6e-3)
    assert one.model == b.model and one.optim == b.optim and one.train.epochs == b.train.epochs
    large = resolved("vit-l16-hog-800ep").settings
    assert effective_batch(large, 8) == 4096 and math.isclose(scaled_lr(large, 8), 2.4e-3)
    # plain dicts work too, and an absolute lr wins over scaling
    assert effective_batch({"train": {"batch_size": 32, "accum_steps": 2}}, 4) == 256
    assert scaled_lr({"train": {"batch_size": 32}, "optim": {"base_lr": 1e-3, "lr": 5e-4}}, 4) == 5e-4
    assert "= 2048; lr = 0.0002 x 2048 / 256 = 0.0016" in scaling_line(b, 8)
    with pytest.raises(ValueError):
        effective_batch(b, 0)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_world_size_matches_the_description(name):
    info, _ = load_preset(name)
    if info.world_size > 1:
        assert f"{info.world_size} GPUs" in info.description


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(PresetError) as err:
        load_preset("vit-b16-hog-1600")
    msg = str(err.value)
    assert "no preset named 'vit-b16-hog-1600'" in msg and "did you mean 'vit-b16-hog-1600ep'" in msg
    for name in SHIPPED:
        assert name in msg


def test_user_preset_file(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('[preset]\nname = "mine"\nkind = "pretrain"\nsummary = "s"\ndescription = "d"\n'
                    "[settings.train]\nepochs = 3\n")
    info, values = load_preset(str(path))
    assert (info.name, info.builtin, info.world_size, values) == ("mine", False, 1, {"train": {"epochs": 3}})
    r = resolve(PretrainSettings, preset=values, preset_name=info.name, environ={})
    assert r.settings.train.epochs == 3 and r.provenance["train.epochs"] == "preset:mine"


@pytest.mark.parametrize("text, expect", [
    ('[settings.train]\nepochs = 3\n', "expected exactly a [preset] and a [settings] table"),
    ('[preset]\nname = "x"\nkind = "eval"\nsummary = "s"\ndescription = "d"\n[settings]\n', "preset.kind"),
    ('[preset]\nname = "x"\nkind = "pretrain"\nsummary = "s"\ndescription = "d"\nextra = 1\n[settings]\n',
     "preset.extra"),
    ("[preset\n", "not valid TOML"),
])
def test_malformed_user_preset(tmp_path, text, expect):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(PresetError, match="bad.toml") as err:
        load_preset(str(path))
    assert expect in str(err.value)
    with pytest.raises(PresetError, match="no such file"):
        load_preset(str(tmp_path / "missing.toml"))
