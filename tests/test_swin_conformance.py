"""Number-for-number conformance with the authors' published LocalMIM Swin implementation.

Every `*.json` card in the shared folder's `conformance/swin/` (and in
$LOCALMIM_CONFORMANCE_DIR_SWIN, where set) is checked: the model is built from the card's
`model_config`, the published-layout weights are imported (published_swin.py), the card's images
and unit mask go through it, and every reference tensor is compared at the tolerances the
folder's README states. The maximum differences are printed (`pytest -s`).

The shared folder is $LOCALMIM_SHARED_DIR, else `shared/` beside the repository checkout
(`<repo>/../shared`), as for the ViT cards (test_conformance.py).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localmim_cli.model.build import build_model
from localmim_cli.model.masking import unit_major_restore
from localmim_cli.weights.published import read_published
from localmim_cli.weights.published_swin import from_published_swin, load_published_swin_into, to_published_swin
from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice

MASK_ATOL = 1e-6      # masks and targets, absolute
PRED_ATOL = 1e-4      # predictions (and tap latents), absolute
LOSS_RTOL = 1e-5      # losses, relative


def shared_dir() -> Path:
    env = os.environ.get("LOCALMIM_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def conformance_dirs() -> list[Path]:
    dirs = [shared_dir() / "conformance" / "swin"]
    extra = os.environ.get("LOCALMIM_CONFORMANCE_DIR_SWIN")
    if extra:
        dirs.append(Path(extra))
    return dirs


def discover_cards() -> list[Path]:
    seen: dict[Path, None] = {}
    for folder in conformance_dirs():
        if folder.is_dir():
            for card in sorted(folder.glob("*.json")):
                seen.setdefault(card.parent.resolve() / card.name, None)
    return list(seen)


CARDS = discover_cards()
NO_SHARED = f"shared folder {shared_dir()} not found (set LOCALMIM_SHARED_DIR to its path)"


def card_params() -> list:
    params = [pytest.param(path, id=path.stem) for path in CARDS]
    if not shared_dir().is_dir():
        params.append(pytest.param(None, id="no-shared-folder", marks=pytest.mark.skip(reason=NO_SHARED)))
    return params


def test_folders_found_and_hold_cards():
    if not shared_dir().is_dir():
        pytest.skip(NO_SHARED)
    extra = os.environ.get("LOCALMIM_CONFORMANCE_DIR_SWIN")
    if extra:
        assert Path(extra).is_dir(), f"LOCALMIM_CONFORMANCE_DIR_SWIN={extra} is not a folder"
    assert CARDS, f"no *.json conformance cards in {[str(d) for d in conformance_dirs()]}"


# ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    card: dict
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    settings: ModelSettings


def settings_from_card(card: dict) -> ModelSettings:
    """The model the card describes, sizes from its model_config; published rules for the rest:
    a tap after every stage (after its patch merging), decoder widths C_dec/2 then C_dec."""
    cfg = card["model_config"]
    assert cfg.get("in_chans", 3) == 3, "only RGB models are supported"
    n_stages = len(cfg["depths"])
    strides = [cfg["patch_size"] * 2 ** min(k + 1, n_stages - 1) for k in range(n_stages)]
    if cfg["target"] == "HOG":
        target = PluginChoice(name="hog", options={"nbins": cfg["hog_nbins"], "bias": cfg["hog_bias"]})
    else:
        target = PluginChoice(name="pixel", options={"normalize": cfg["norm_pix_loss"]})
    width = cfg["decoder_embed_dim"]
    return ModelSettings(
        encoder=PluginChoice(name="swin", options={
            "arch": None,
            "patch_size": cfg["patch_size"],
            "embed_dim": cfg["embed_dim"],
            "depths": cfg["depths"],
            "num_heads": cfg["num_heads"],
            "window_size": cfg["window_size"],
            "mlp_ratio": cfg["mlp_ratio"],
            "qkv_bias": cfg["qkv_bias"],
        }),
        target=target,
        img_size=cfg["img_size"],
        scales=[stride / cell for stride, cell in zip(strides, card["target_cells_px"])],
        decoder=DecoderSettings(width=[width // 2] + [width] * (n_stages - 1), depth=cfg["decoder_depth"],
                                num_heads=cfg["decoder_num_heads"],
                                mlp_ratio=cfg.get("decoder_mlp_ratio", cfg["mlp_ratio"])),
        layer_norm_eps=card["layer_norm_eps"],
    )


@cache
def reference(card_path: Path) -> Reference:
    card = json.loads(card_path.read_text())
    tensors_path = card_path.with_name(f"{card_path.stem}.safetensors")
    weights_path = card_path.with_name(f"{card_path.stem}_weights.safetensors")
    assert tensors_path.is_file(), f"card {card_path.name} has no tensors file {tensors_path}"
    assert weights_path.is_file(), f"card {card_path.name} has no weights file {weights_path}"
    weights, _ = read_published(weights_path)
    return Reference(card, load_file(str(tensors_path)), weights, settings_from_card(card))


def max_diff(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    return (actual.float() - expected.float()).abs().max().item()


def relative(actual: float, expected: float) -> float:
    return abs(actual - expected) / max(abs(expected), 1e-12)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("card_path", card_params())
def test_card_lists_what_its_files_hold(card_path):
    ref = reference(card_path)
    for name, shape in ref.card.get("weights", {}).items():
        assert name in ref.weights, f"card lists {name}, weights file lacks it"
        assert list(ref.weights[name].shape) == list(shape), name
    for name, shape in ref.card.get("tensors", {}).items():
        assert name in ref.tensors, f"card lists {name}, tensors file lacks it"
        assert list(ref.tensors[name].shape) == list(shape), name


@pytest.mark.parametrize("card_path", card_params())
def test_published_layout_round_trips(card_path):
    weights = reference(card_path).weights
    back = to_published_swin(from_published_swin(weights))
    assert sorted(back) == sorted(weights)
    for key, value in weights.items():
        assert torch.equal(back[key].to(value.dtype), value), key


@pytest.mark.parametrize("card_path", card_params())
def test_conformance(card_path):
    ref = reference(card_path)
    t, card = ref.tensors, ref.card
    torch.manual_seed(card.get("seed", 0))
    model = build_model(ref.settings).eval()
    sincos = {k: decoder.pos_embed.detach().clone() for k, decoder in enumerate(model.decoders)}
    load_published_swin_into(model, ref.weights)

    taps = []  # the encoder's TapOutputs, caught on the way through
    forward_taps = model.encoder.forward_taps

    def catching(*args):
        taps.extend(forward_taps(*args))
        return taps

    model.encoder.forward_taps = catching
    with torch.no_grad():
        out = model(t["images"], mask=t["mask_units"])
    n_scales = len(model.decoders)
    assert n_scales == len(card["target_cells_px"]) == len(taps)

    diffs: dict[str, float] = {"mask": max_diff(out.mask, t["mask_units"], "mask")}
    for k in range(n_scales):
        diffs[f"decoder.{k}.pos_embed (ours)"] = max_diff(sincos[k], ref.weights[f"decoder.{k}.pos_embed"], "pos")
        diffs[f"mask.scale{k}"] = max_diff(out.masks[k], t[f"mask.scale{k}"], f"mask.scale{k}")
        diffs[f"target.scale{k}"] = max_diff(out.targets[k], t[f"target.scale{k}"], f"target.scale{k}")
        diffs[f"latent.{k}"] = max_diff(taps[k].tokens, t[f"latent.{k}"], f"latent.{k}")
        diffs[f"pred.scale{k}"] = max_diff(out.preds[k], t[f"pred.scale{k}"], f"pred.scale{k}")
        diffs[f"loss.scale{k} (rel)"] = relative(out.losses[k].item(), t[f"loss.scale{k}"].item())
        # The published ids_restore.k is indexed by unit-major position; ours by raster cell.
        side = model.encoder.unit_px // model.encoder.taps[k].stride_px
        units = torch.arange(model.num_units).expand(t["images"].shape[0], -1)
        unit_major = unit_major_restore(units, model.encoder.unit_grid, side)  # raster cell -> unit-major
        published = t[f"ids_restore.{k}"].gather(1, unit_major)
        assert torch.equal(taps[k].ids_restore, published.to(taps[k].ids_restore.dtype)), f"ids_restore.{k}"
        if "losses_per_scale" in card:
            diffs[f"card losses_per_scale[{k}] (rel)"] = relative(out.losses[k].item(), card["losses_per_scale"][k])
    diffs["loss (rel)"] = relative(out.loss.item(), t["loss"].item())
    if "loss" in card:
        diffs["card loss (rel)"] = relative(out.loss.item(), card["loss"])
    print(f"\n{card_path.stem}: max abs differences (relative for losses)")
    for name, value in diffs.items():
        print(f"  {name:32s} {value:.3g}")

    def limit(name: str) -> float:
        if name.startswith(("pred", "latent")):
            return PRED_ATOL
        return LOSS_RTOL if "loss" in name else MASK_ATOL

    over = {name: value for name, value in diffs.items() if not value <= limit(name)}
    assert not over, f"over tolerance: {over}"
