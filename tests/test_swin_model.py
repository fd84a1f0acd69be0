"""LocalMIM assembled with the swin encoder from settings, and the published-layout importer's refusals."""

from __future__ import annotations

import pytest
import torch

from localmim_cli.model.build import build_model
from localmim_cli.plugins.checks import probe_images
from localmim_cli.model.masking import masking_from_noise
from localmim_cli.errors import CheckpointError
from localmim_cli.weights.published_swin import load_published_swin_into, to_published_swin
from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice


def tiny_settings(target: PluginChoice | None = None, **decoder) -> ModelSettings:
    return ModelSettings(
        encoder=PluginChoice(name="swin", options={"arch": None, "embed_dim": 16, "depths": [2, 2, 2, 2],
                                                   "num_heads": [1, 2, 2, 4], "window_size": 4}),
        target=target or PluginChoice(name="hog", options={"nbins": 18, "bias": True}),
        img_size=128,
        scales=[1.0, 1.0, 1.0, 1.0],
        decoder=DecoderSettings(**{"width": [16, 32, 32, 32], "num_heads": 4, **decoder}),
    )


def test_localmim_with_swin_trains_end_to_end():
    torch.manual_seed(0)
    model = build_model(tiny_settings())
    assert model.cells_px == [8, 16, 32, 32] and model.target.dims == [54] * 4
    assert [d.embed.out_features for d in model.decoders] == [16, 32, 32, 32]
    images = probe_images(3, 128, seed=0)
    out = model(images, noise=torch.rand(3, 16))
    assert torch.isfinite(out.loss) and out.losses.shape == (4,)
    assert [p.shape[1] for p in out.preds] == [256, 64, 16, 16]
    out.loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not no_grad, no_grad


def test_swin_gets_one_mask_per_batch_from_the_first_images_noise():
    model = build_model(tiny_settings())
    noise = torch.rand(3, 16)
    masking = model.masking(3, torch.device("cpu"), noise)
    expected = masking_from_noise(noise[:1], 0.75).mask
    assert torch.equal(masking.mask, expected.expand(3, -1))
    assert int(masking.mask[0].sum()) == 12  # 16 units, int(16 * 0.25) = 4 stay visible


def test_pixel_target_and_one_decoder_width():
    model = build_model(tiny_settings(PluginChoice(name="pixel"), width=32))
    assert [d.embed.out_features for d in model.decoders] == [32] * 4
    assert model.target.dims == [192, 768, 3072, 3072]


def test_pretraining_leaves_position_bias_tables_and_mask_tokens_undecayed():
    from localmim_cli.tasks.pretrain import param_groups

    model = build_model(tiny_settings())
    no_decay, decay = param_groups(model, 0.05)
    assert (no_decay["weight_decay"], decay["weight_decay"]) == (0.0, 0.05)
    undecayed = {id(p) for p in no_decay["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in undecayed}
    tables = {n for n in names if n.endswith("relative_position_bias_table")}
    tokens = {n for n in names if n.endswith("mask_token")}
    assert len(tables) == 8  # one per block: published pretraining skips names with 'position_bias'
    assert len(tokens) == len(model.decoders)  # ... and names with 'token': every decoder's mask token
    assert all(p.ndim == 1 or n in tables | tokens for n, p in model.named_parameters() if id(p) in undecayed)
    assert not any(("position_bias" in n or "token" in n) for n, p in model.named_parameters()
                   if id(p) not in undecayed)


def test_vit_pretraining_decays_the_mask_tokens_as_published():
    from localmim_cli.config.schema import PretrainSettings
    from localmim_cli.tasks.pretrain import param_groups

    model = build_model(PretrainSettings().model)
    no_decay, decay = param_groups(model, 0.05)
    decayed = {id(p) for p in decay["params"]}
    assert all(id(p) in decayed for n, p in model.named_parameters() if n.endswith("mask_token"))


def test_decoder_widths_must_match_the_taps():
    with pytest.raises(ValueError, match="3 decoder widths"):
        build_model(tiny_settings(width=[16, 32, 32]))


def test_importer_refuses_unknown_missing_and_altered_keys():
    model = build_model(tiny_settings())
    published = to_published_swin(model.state_dict())
    load_published_swin_into(model, published)  # our own weights, through the authors' layout

    with pytest.raises(CheckpointError, match="unknown keys.*encoder.head.weight"):
        load_published_swin_into(model, {**published, "encoder.head.weight": torch.zeros(1)})
    without = {k: v for k, v in published.items() if k != "decoder.2.norm.bias"}
    with pytest.raises(CheckpointError, match="missing.*decoders.2.norm.bias"):
        load_published_swin_into(model, without)
    index = "encoder.layers.0.blocks.0.attn.relative_position_index"
    with pytest.raises(CheckpointError, match="constants that differ.*relative_position_index"):
        load_published_swin_into(model, {**published, index: published[index].flip(0)})
    with pytest.raises(CheckpointError, match="constants that differ.*hog_enc.1.conv.weight"):
        load_published_swin_into(model, {**published, "hog_enc.1.conv.weight": -published["hog_enc.1.conv.weight"]})
    no_bias = {k: v for k, v in published.items() if not k.endswith("conv.bias")}
    with pytest.raises(CheckpointError, match="missing.*target.sobel_bias"):
        load_published_swin_into(model, no_bias)


def test_runs_under_bf16_autocast():
    torch.manual_seed(0)
    model = build_model(tiny_settings())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(probe_images(2, 128, seed=0), noise=torch.rand(2, 16))
    assert any(p.dtype == torch.bfloat16 for p in out.preds), "autocast did not take effect"
    assert all(t.dtype == torch.float32 for t in out.targets)
    assert torch.isfinite(out.loss) and out.loss.dtype == torch.float32


def test_finetuning_gives_its_drop_path_to_the_swin_encoder():
    from localmim_cli.weights.via_timm import PluginShape, init_classifier

    settings = tiny_settings()
    record = {"via": "to_timm", "encoder": settings.encoder.model_dump(), "img_size": 128, "taps": None}
    shape = PluginShape(record).with_drop_path(0.2)
    model = init_classifier(shape, None, num_classes=3, head_init_std=2e-5)
    last = model.layers[-1].blocks[-1]
    assert last.drop_path1.drop_prob == pytest.approx(0.2)  # timm's linear rule reaches the rate at the last block
    assert shape.timm_record(3)["plugin"]["encoder"]["options"]["drop_path"] == 0.2  # a resume rebuilds the same
