"""What a path holds (weights/locate.py), told once for every command: real run directories and
checkpoints written by a tiny pretrain and fine-tune, an export, the published conformance
weights (ViT and Swin), MAE's layout, and what is refused. Also the one ViT size table against
timm, and the one way weights are loaded (weights/loading.py)."""

from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import localmim_cli as lm
from conftest import TINY_TOML, run_cli
from localmim_cli.encoders.vit import VIT_ARCHS, vit_arch_of
from localmim_cli.engine import checkpoints
from localmim_cli.errors import CheckpointError
from localmim_cli.weights.loading import load_exactly
from localmim_cli.weights.locate import CheckpointFolder, ExportFolder, TensorFile, locate
from localmim_cli.weights.published import heads_for, published_vit_dims, read_published, settings_from_published
from localmim_cli.weights.encoder_weights import ViTShape
from localmim_cli.weights.sources import load_encoder_weights, reference_feature_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "conformance"
VIT_WEIGHTS = SHARED / "vit_hog_reference_weights.safetensors"
SWIN_CARDS = sorted((SHARED / "swin").glob("swin_*_reference.json"))
needs_conformance = pytest.mark.skipif(not VIT_WEIGHTS.is_file() or not SWIN_CARDS,
                                       reason=f"conformance weights not found under {SHARED}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A tiny pretrain run (one epoch), a one-epoch fine-tune from it, and its export."""
    from localmim_cli.data.sample_photos import sample_photo_paths

    root = tmp_path_factory.mktemp("locate")
    photos = sample_photo_paths()[:6]
    for i, photo in enumerate(photos):
        folder = root / "labelled" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(photo, folder / photo.name)
    (root / "tiny.toml").write_text(TINY_TOML)
    torch.manual_seed(0)
    pretrain = lm.pretrain(root / "labelled", config=root / "tiny.toml", out=root / "pretrain",
                           train__epochs=1, quiet=True)
    finetune = lm.finetune(root / "labelled", init=pretrain, preset="ft-small", out=root / "finetune",
                           train__epochs=1, train__batch_size=2, train__device="cpu", data__workers=0,
                           data__val_fraction=0.0, quiet=True)
    lm.export(pretrain, out=root / "export")
    return {"pretrain": pretrain, "finetune": finetune, "export": root / "export"}


# ------------------------------------------------------------------------------ our checkpoints


def test_every_form_of_a_run_is_one_checkpoint(runs):
    run = runs["pretrain"]
    latest = run / "checkpoints" / json.loads((run / "checkpoints" / "latest.json").read_text())["name"]
    forms = {"run": run, "checkpoints": run / "checkpoints", "checkpoint": latest,
             "model_file": latest / "model.safetensors"}
    for given_as, path in forms.items():
        found = locate(path)
        assert isinstance(found, CheckpointFolder), path
        assert (found.given_as, found.folder, found.kind, found.run_dir) == (given_as, latest, "pretrain", run)
        assert checkpoints.load(path).path == latest
        weights = load_encoder_weights(path)
        assert (weights.kind, weights.source, weights.run_dir) == ("pretrain", path, run)


def test_a_finetune_run_is_told_by_its_meta(runs):
    found = locate(runs["finetune"])
    assert isinstance(found, CheckpointFolder) and found.kind == "finetune" and found.given_as == "run"
    assert load_encoder_weights(runs["finetune"]).has_head


def test_an_export_folder_and_its_file(runs):
    out = runs["export"]
    for path in (out, out / "model.safetensors"):
        found = locate(path)
        assert isinstance(found, ExportFolder) and found.folder == out
    assert load_encoder_weights(out / "model.safetensors").kind == "export"
    with pytest.raises(CheckpointError, match=re.escape(str(out)) + ".*no meta.json"):
        checkpoints.load(out)


def test_our_weights_away_from_their_meta_are_named_as_such(runs, tmp_path):
    loose = tmp_path / "loose.safetensors"
    shutil.copy(checkpoints.load(runs["pretrain"]).model_file, loose)
    found = locate(loose)
    assert isinstance(found, TensorFile) and found.layout == "ours"
    with pytest.raises(CheckpointError, match=re.escape(str(loose)) + ".*no meta.json beside them"):
        load_encoder_weights(loose)


# ------------------------------------------------------------------------------ published files


@needs_conformance
def test_published_vit_weights_are_read_once_for_every_caller():
    found = locate(VIT_WEIGHTS)
    assert isinstance(found, TensorFile) and found.layout == "localmim_vit"
    vit = published_vit_dims(found.state, found.args, VIT_WEIGHTS)
    card = json.loads((SHARED / "vit_hog_reference.json").read_text())
    config = card["model_config"]
    assert (vit.embed_dim, vit.depth, vit.num_heads, vit.patch_size, vit.img_size) == \
        (config["embed_dim"], config["depth"], config["num_heads"], config["patch_size"], config["img_size"])
    assert vit.heads_guessed    # a .safetensors file has no args: heads from the width (vit_tiny's)
    assert vit.taps == [t + 1 for t in card["taps_0_indexed_blocks"]]
    # visualize (settings) and export/evaluate/finetune (encoder weights) read the same sizes
    options = settings_from_published(found.state, found.args).encoder.options
    shape = load_encoder_weights(VIT_WEIGHTS).shape
    assert (shape.embed_dim, shape.depth, shape.num_heads, shape.patch_size, shape.img_size) == \
        (options["embed_dim"], options["depth"], options["num_heads"], options["patch_size"], vit.img_size)
    assert shape.named_arch == "vit_tiny_patch16_224"


@needs_conformance
@pytest.mark.parametrize("card", SWIN_CARDS, ids=lambda p: p.stem)
def test_published_swin_weights_rebuild_the_card_model(card):
    from test_swin_conformance import settings_from_card

    from localmim_cli.model.build import build_model
    from localmim_cli.weights.published_swin import load_published_swin_into, settings_from_published_swin

    weights_file = card.with_name(card.stem + "_weights.safetensors")
    found = locate(weights_file)
    assert isinstance(found, TensorFile) and found.layout == "localmim_swin"
    settings = settings_from_published_swin(found.state, found.args, str(weights_file))
    expected = settings_from_card(json.loads(card.read_text())).model_copy(update={"taps": [1, 2, 3, 4]})
    assert settings == expected

    # Its encoder, read as any other encoder weights, gives the published model's features.
    model = build_model(settings).eval()
    load_published_swin_into(model, found.state)
    weights = load_encoder_weights(weights_file)
    assert (weights.kind, weights.encoder_name, weights.pooling) == ("published", "swin", "norm_then_pool")
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reference_feature_model(weights)(images),
                                   model.encoder.forward_features(images), atol=0, rtol=0)


@needs_conformance
def test_a_published_swin_exports_to_timm(tmp_path):
    weights_file = SWIN_CARDS[0].with_name(SWIN_CARDS[0].stem + "_weights.safetensors")
    report = lm.export(weights_file, tmp_path / "swin")
    assert report["source_kind"] == "published" and report["max_abs_diff"] < 1e-4
    config = json.loads((tmp_path / "swin" / "config.json").read_text())
    assert config["localmim"]["encoder_plugin"]["encoder"]["name"] == "swin"


@needs_conformance
def test_visualize_draws_a_published_swin_checkpoint(tmp_path):
    from localmim_cli.data.sample_photos import sample_photo_paths

    weights_file = SWIN_CARDS[0].with_name(SWIN_CARDS[0].stem + "_weights.safetensors")
    out = tmp_path / "swin.png"
    done = run_cli("visualize", weights_file, sample_photo_paths()[0], "--out", out)
    assert done.returncode == 0, done.stderr
    sidecar = json.loads(out.with_suffix(".json").read_text())
    assert "published LocalMIM Swin" in json.dumps(sidecar) and len(sidecar["images"][0]["losses"]) == 4


def test_mae_layout_is_a_vit_encoder(runs, tmp_path):
    """MAE's pretraining file: the encoder in timm's names, its final norm, MAE's decoder."""
    tiny = load_encoder_weights(runs["pretrain"])
    state = {**tiny.state, "mask_token": torch.zeros(1, 1, 16), "decoder_embed.weight": torch.zeros(16, 32),
             "decoder_pred.weight": torch.zeros(192, 16)}
    torch.save({"model": state, "args": argparse.Namespace(model="mae_vit_tiny_patch8")}, tmp_path / "mae.pth")
    found = locate(tmp_path / "mae.pth")
    assert isinstance(found, TensorFile) and found.layout == "vit"
    weights = load_encoder_weights(tmp_path / "mae.pth")
    assert weights.kind == "published" and weights.pooling == "norm_then_pool"
    sizes = ("img_size", "patch_size", "embed_dim", "depth", "mlp_ratio", "qkv_bias")
    assert all(getattr(weights.shape, size) == getattr(tiny.shape, size) for size in sizes)
    assert weights.meta["heads_guessed"]   # 32 wide, no size of that width: 1 head of 64 assumed
    assert torch.equal(weights.state["norm.weight"], tiny.state["norm.weight"])


# ------------------------------------------------------------------------------ refusals


def test_what_is_not_a_checkpoint_is_refused_by_name(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    empty = tmp_path / "empty"
    empty.mkdir()
    save_file({"weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    for path in (notes, empty, tmp_path / "other.safetensors", tmp_path / "nowhere"):
        with pytest.raises(CheckpointError) as info:
            locate(path)
        message = str(info.value)
        assert str(path) in message and "run directory" in message and "published LocalMIM" in message


# ------------------------------------------------------------------------------ sizes and loading


@pytest.mark.parametrize("arch", sorted(VIT_ARCHS))
def test_the_size_table_is_timms(arch):
    patch = 14 if arch == "vit_huge" else 16
    with torch.device("meta"):
        model = timm.create_model(f"{arch}_patch{patch}_224", pretrained=False)
    dims = (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads)
    assert dims == VIT_ARCHS[arch] and vit_arch_of(*dims) == arch
    assert ViTShape(224, patch, *dims).named_arch == f"{arch}_patch{patch}_224"
    assert heads_for(dims[0], f"MIM_{arch}_patch{patch}") == (dims[2], False)


def test_heads_come_from_the_name_then_the_width_then_a_guess():
    assert heads_for(48, "MIM_vit_small_patch16") == (6, False)
    assert heads_for(1280, "") == (16, True)      # huge's heads are 80 wide: the table knows
    assert heads_for(320, "") == (5, True)


def test_load_exactly_names_the_source_and_the_keys(runs):
    weights = load_encoder_weights(runs["pretrain"])
    model = reference_feature_model(weights).encoder
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_exactly(model, state, "here")
    del state["cls_token"]
    state["extra.weight"] = torch.zeros(1)
    state["pos_embed"] = torch.zeros(1, 2, 3)
    with pytest.raises(CheckpointError) as info:
        load_exactly(model, state, "there.safetensors")
    message = str(info.value)
    assert message.startswith("there.safetensors") and "'cls_token'" in message
    assert "'extra.weight'" in message and "pos_embed (1, 2, 3)" in message
    del state["extra.weight"], state["pos_embed"]
    before = model.cls_token.clone()
    load_exactly(model, state, "ok", allow_missing=("cls_token", "pos_embed"))
    assert torch.equal(model.cls_token, before)


def test_published_pth_through_locate_matches_the_file(runs, tmp_path):
    """A .pth as the authors save it: read safely, its args kept, the same tensors."""
    from conftest import to_authors_layout

    state = to_authors_layout(load_file(str(checkpoints.load(runs["pretrain"]).model_file)))
    torch.save({"model": state, "args": argparse.Namespace(model="MIM_vit_tiny", ID=[0, 1, 2, 3])},
               tmp_path / "authors.pth")
    found = locate(tmp_path / "authors.pth")
    assert isinstance(found, TensorFile) and found.layout == "localmim_vit" and found.args["ID"] == [0, 1, 2, 3]
    assert found.state.keys() == read_published(tmp_path / "authors.pth")[0].keys()
