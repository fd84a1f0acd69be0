"""The LocalMIM model on small CPU configurations: shapes, validation, masking, gradients,
published-checkpoint import, and plugin discovery."""

from __future__ import annotations

import argparse
import collections
import pathlib
import re

import pytest
import torch

from conftest import to_authors_layout
from localmim_cli.plugins import registry
from localmim_cli.model.build import build_model
from localmim_cli.model.masking import masking_from_noise
from localmim_cli.weights.published import load_published_into, read_published, settings_from_published
from localmim_cli.errors import CheckpointError
from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice

IMG, PATCH, DIM, DEPTH, HEADS = 32, 8, 32, 4, 2  # 4x4 patch grid


def small_settings(img=IMG, patch=PATCH, dim=DIM, depth=DEPTH, heads=HEADS, taps=(1, 2, 3, 4),
                   scales=(4.0, 2.0, 1.0, 0.5), dec_width=32, dec_heads=2, target="hog",
                   target_options=None, **extra) -> ModelSettings:
    return ModelSettings(
        encoder=PluginChoice(name="vit", options={"arch": None, "patch_size": patch, "embed_dim": dim,
                                                  "depth": depth, "num_heads": heads}),
        target=PluginChoice(name=target, options=target_options or {}),
        img_size=img,
        taps=list(taps),
        scales=list(scales),
        decoder=DecoderSettings(width=dec_width, depth=1, num_heads=dec_heads),
        **extra,
    )


def small_model(seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(small_settings(**kw))


def images_and_noise(batch=2, img=IMG, patch=PATCH, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, img, img, generator=g)
    noise = torch.rand(batch, (img // patch) ** 2, generator=g)
    return images, noise


# ------------------------------------------------------------------------------ shapes


def test_four_taps_shapes():
    model = small_model().eval()
    images, noise = images_and_noise()
    out = model(images, noise=noise)
    assert model.cells_px == [2, 4, 8, 16]
    assert out.losses.shape == (4,)
    assert torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.losses.sum())
    for pred, target, mask, cell in zip(out.preds, out.targets, out.masks, model.cells_px):
        cells = (IMG // cell) ** 2
        assert pred.shape == target.shape == (2, cells, 27)
        assert mask.shape == (2, cells)
    assert out.mask.shape == out.ids_restore.shape == (2, 16)
    assert out.mask.sum(1).tolist() == [12.0, 12.0]  # 75% of 16


def test_single_tap_ablation():
    model = small_model(taps=[DEPTH], scales=[1.0]).eval()
    assert len(model.decoders) == 1
    assert model.cells_px == [PATCH]
    images, noise = images_and_noise()
    out = model(images, noise=noise)
    assert out.losses.shape == (1,)
    assert torch.isfinite(out.loss)
    assert out.preds[0].shape == (2, 16, 27)


def test_pixel_target_model():
    model = small_model(target="pixel", taps=[2, 4], scales=[2.0, 1.0]).eval()
    out = model(*images_and_noise()[:1], noise=images_and_noise()[1])
    assert [p.shape[-1] for p in out.preds] == [3 * 4 * 4, 3 * 8 * 8]
    assert torch.isfinite(out.loss)


# ------------------------------------------------------------------------------ validation


@pytest.mark.parametrize("kwargs, phrase", [
    (dict(img=36), "not divisible by patch size"),
    (dict(img=48, patch=16), "pooling factor"),                      # 3x3 grid, scale 0.5
    (dict(scales=[4.0, 2.0, 1.0]), "one scale per tap"),
    (dict(taps=[1, 2, 3, 5]), "outside the encoder's layers 1..4"),
    (dict(taps=[0, 2, 3, 4]), "outside the encoder's layers 1..4"),
    (dict(scales=[4.0, 3.0, 1.0, 0.5]), "power of two"),
    (dict(taps=[2, 1, 3, 4]), "increasing and distinct"),
])
def test_invalid_configurations_raise_helpful_errors(kwargs, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        small_model(**kwargs)


def test_mask_ratio_leaving_no_visible_patch():
    with pytest.raises(ValueError, match="leaves no visible patch"):
        masking_from_noise(torch.rand(2, 16), 0.99)


def test_explicit_mask_rows_must_hide_the_same_count():
    model = small_model()
    mask = torch.zeros(2, 16)
    mask[0, :12] = 1
    mask[1, :11] = 1
    with pytest.raises(ValueError, match="same number of masked patches"):
        model(images_and_noise()[0], mask=mask)


# ------------------------------------------------------------------------------ masking


def test_explicit_mask_is_used_exactly():
    model = small_model().eval()
    images, _ = images_and_noise()
    mask = torch.zeros(2, 16)
    mask[0, [0, 3, 5, 6, 7, 8, 9, 10, 11, 12, 14, 15]] = 1
    mask[1, 4:] = 1
    out = model(images, mask=mask)
    assert torch.equal(out.mask, mask)
    # scale 0.5 (2x2 pooled): the masked share of each 2x2 block of patches
    expected = torch.nn.functional.avg_pool2d(mask.reshape(2, 1, 4, 4), 2).flatten(1)
    assert torch.equal(out.masks[3], expected)
    # scale 4: each patch's bit repeated over its 4x4 cells
    assert torch.equal(out.masks[0].reshape(2, 16, 16)[:, ::4, ::4].reshape(2, 16), mask)


def test_explicit_mask_matches_the_same_mask_drawn_from_noise():
    model = small_model().eval()
    images, noise = images_and_noise()
    with torch.no_grad():
        by_noise = model(images, noise=noise)
        by_mask = model(images, mask=by_noise.mask)
    assert torch.equal(by_mask.mask, by_noise.mask)
    # visible tokens in another order: same result up to rounding
    torch.testing.assert_close(by_mask.losses, by_noise.losses, rtol=1e-5, atol=1e-6)


def test_same_noise_same_loss():
    model = small_model().eval()
    images, noise = images_and_noise()
    with torch.no_grad():
        a = model(images, noise=noise)
        b = model(images, noise=noise.clone())
        c = model(images, noise=torch.rand(noise.shape, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(a.loss, b.loss)
    assert torch.equal(a.mask, b.mask)
    assert not torch.equal(a.mask, c.mask)


# ------------------------------------------------------------------------------ gradients


def test_every_trainable_parameter_gets_gradient():
    model = small_model().train()
    images, noise = images_and_noise()
    model(images, noise=noise).loss.backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable
    no_grad = [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad, f"parameters without gradient: {no_grad}"
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert name.endswith("pos_embed"), name
            assert p.grad is None


def test_lowest_tap_loss_reaches_only_the_blocks_below_it():
    taps = [2, 3, 4]
    model = small_model(taps=taps, scales=[2.0, 1.0, 0.5]).train()
    images, noise = images_and_noise()
    model(images, noise=noise).losses[0].backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    def all_no_grad(module):
        return all(p.grad is None or p.grad.abs().sum() == 0 for p in module.parameters())

    lowest = taps[0]
    for i, block in enumerate(model.encoder.blocks):  # block i is layer i + 1
        if i < lowest:
            assert has_grad(block), f"block {i} (below tap layer {lowest}) got no gradient"
        else:
            assert all_no_grad(block), f"block {i} (above tap layer {lowest}) got gradient"
    assert has_grad(model.encoder.patch_embed) and model.encoder.cls_token.grad is not None
    assert has_grad(model.encoder.tap_norms[0]) and has_grad(model.decoders[0])
    for k in range(1, len(taps)):
        assert all_no_grad(model.encoder.tap_norms[k]) and all_no_grad(model.decoders[k])
    assert model.encoder.pos_embed.grad is None
    assert all(d.pos_embed.grad is None for d in model.decoders)


# ------------------------------------------------------------------------------ published .pth




# Published name "MIM_vit_small_patch16" implies 6 heads; decoder heads are read as width // 32.
PUB = dict(dim=48, heads=6, dec_width=32, dec_heads=1)


@pytest.mark.parametrize("bias", [False, True])
def test_published_pth_round_trip(tmp_path, bias):
    model = small_model(seed=0, target_options={"bias": bias}, **PUB).eval()
    path = tmp_path / "checkpoint-3.pth"
    args = argparse.Namespace(model="MIM_vit_small_patch16", hog_nbins=9, hog_bias=bias,
                              ID=[0, 1, 2, 3], mask_ratio=0.75, input_size=IMG, lr=1.5e-4,
                              batch_size=8, norm_pix_loss=False, output_dir="./out", seed=0)
    torch.save({"model": to_authors_layout(model.state_dict()), "args": args, "epoch": 3}, path)

    state, read_args = read_published(path)
    assert read_args["model"] == "MIM_vit_small_patch16" and read_args["ID"] == [0, 1, 2, 3]
    settings = settings_from_published(state, read_args)
    assert settings.img_size == IMG
    assert settings.taps == [1, 2, 3, 4]
    assert settings.scales == [4.0, 2.0, 1.0, 0.5]
    assert settings.target.options == {"nbins": 9, "bias": bias}
    assert settings.encoder.options["num_heads"] == 6

    torch.manual_seed(123)  # other random weights, and other Sobel biases, before loading
    rebuilt = build_model(settings).eval()
    report = load_published_into(rebuilt, state)
    assert report.missing == [] and report.unexpected == []
    report.raise_if_incomplete(path)

    ours, theirs = model.state_dict(), rebuilt.state_dict()
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    images, noise = images_and_noise()
    with torch.no_grad():
        a, b = model(images, noise=noise), rebuilt(images, noise=noise)
    assert torch.equal(a.loss, b.loss)
    for x, y in zip(a.preds + a.targets, b.preds + b.targets):
        assert torch.equal(x, y)


def test_published_state_with_wrong_keys_is_reported(tmp_path):
    model = small_model(**PUB)
    state = to_authors_layout(model.state_dict())
    del state["norm.1.weight"]
    state["head.weight"] = torch.zeros(3)
    report = load_published_into(model, state)
    assert report.missing == ["encoder.tap_norms.1.weight"]
    assert report.unexpected == ["head.weight"]
    with pytest.raises(CheckpointError, match="keys do not match"):
        report.raise_if_incomplete(tmp_path / "x.pth")


class SneakyDict(collections.OrderedDict):
    pass


class Payload:
    """Would create a file while being unpickled, were it ever unpickled with plain pickle."""

    marker: pathlib.Path

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def refused_args(tmp_path):
    payload = Payload()
    payload.marker = tmp_path / "code-ran"
    return {
        "ordereddict-subclass": (SneakyDict(model="MIM_vit_small_patch16"), "SneakyDict"),
        "posixpath": (pathlib.PosixPath("/etc/passwd"), "PosixPath"),
        "code-on-load": (payload, "open"),
    }


@pytest.mark.parametrize("case", ["ordereddict-subclass", "posixpath", "code-on-load"])
def test_pth_with_other_pickled_objects_is_refused(tmp_path, case):
    args, wanted = refused_args(tmp_path)[case]
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8)}, "args": args, "epoch": 3}, path)
    with pytest.raises(CheckpointError, match="refused") as info:
        read_published(path)
    message = str(info.value)
    assert str(path) in message
    assert wanted in message, f"the message should name what the file wanted: {message}"
    assert not (tmp_path / "code-ran").exists()


def test_missing_checkpoint_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "checkpoint.pth"
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_published(path)


def test_unreadable_checkpoint_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        read_published(path)


# ------------------------------------------------------------------------------ registry


def test_registry_lists_built_in_plugins():
    encoders = {r.name: r for r in registry.discover("encoders")}
    targets = {r.name: r for r in registry.discover("targets")}
    assert "vit" in encoders and encoders["vit"].ok
    assert {"hog", "pixel"} <= {n for n, r in targets.items() if r.ok}
    assert registry.encoder("vit").name == "vit"
    assert registry.target("hog").name == "hog"


def test_registry_unknown_name_lists_installed():
    with pytest.raises(registry.PluginError, match="nope") as info:
        registry.get("targets", "nope")
    message = str(info.value)
    assert "hog" in message and "pixel" in message
    assert isinstance(info.value, LookupError)
