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
           "vit-l16-hog-800ep"}
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
