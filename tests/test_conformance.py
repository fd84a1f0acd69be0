"""Number-for-number conformance with the authors' published LocalMIM implementation.

Every `*.json` card in the shared conformance folder (and in $LOCALMIM_CONFORMANCE_DIR, where set)
is checked: the model is built from the card's `model_config` (not from the weights' shapes), the
published-layout weights are loaded, the card's images and noise go through it, and every
reference tensor is compared at the tolerances the folder's README states.

The shared folder is $LOCALMIM_SHARED_DIR, else `shared/` beside the repository checkout
(`<repo>/../shared`, i.e. `parents[2]` of this file, for /work/main and for CI clones alike).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from localmim_cli.model.build import build_model
from localmim_cli.weights.published import load_published_into, read_published
from localmim_cli.config.schema import DecoderSettings, ModelSettings, PluginChoice
from localmim_cli.targets.hog import HOGOptions, HOGTarget

HOG_ATOL = 1e-6       # HOG targets and masks, absolute
PRED_ATOL = 1e-4      # decoder predictions (and tap latents), absolute
LOSS_RTOL = 1e-5      # losses, relative


def shared_dir() -> Path:
    env = os.environ.get("LOCALMIM_SHARED_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def conformance_dirs() -> list[Path]:
    dirs = [shared_dir() / "conformance"]
    extra = os.environ.get("LOCALMIM_CONFORMANCE_DIR")
    if extra:
        dirs.append(Path(extra))
    return dirs


def discover_cards() -> list[Path]:
    seen: dict[Path, None] = {}
    for folder in conformance_dirs():
        if folder.is_dir():
            for card in sorted(folder.glob("*.json")):
                seen.setdefault(card.parent.resolve() / card.name, None)  # links keep their stem
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
    extra = os.environ.get("LOCALMIM_CONFORMANCE_DIR")
    if extra:
        assert Path(extra).is_dir(), f"LOCALMIM_CONFORMANCE_DIR={extra} is not a folder"
    assert CARDS, f"no *.json conformance cards in {[str(d) for d in conformance_dirs()]}"


def test_default_shared_dir_sits_beside_the_repository(monkeypatch):
    monkeypatch.delenv("LOCALMIM_SHARED_DIR", raising=False)
    repo_root = Path(__file__).resolve().parent.parent
    assert (repo_root / "pyproject.toml").is_file()
    assert shared_dir() == repo_root.parent / "shared"


# ---------------------------------------------------------------------------------------------


@dataclass
class Reference:
    card: dict
    tensors: dict[str, torch.Tensor]
    weights: dict[str, torch.Tensor]
    settings: ModelSettings


def settings_from_card(card: dict) -> ModelSettings:
    cfg = card["model_config"]
    assert cfg.get("in_chans", 3) == 3, "only RGB models are supported"
    return ModelSettings(
        encoder=PluginChoice(name="vit", options={
            "arch": None,
            "patch_size": cfg["patch_size"],
            "embed_dim": cfg["embed_dim"],
            "depth": cfg["depth"],
            "num_heads": cfg["num_heads"],
            "mlp_ratio": cfg["mlp_ratio"],
        }),
        target=PluginChoice(name="hog", options={"nbins": cfg["hog_nbins"], "bias": cfg["hog_bias"]}),
        img_size=cfg["img_size"],
        taps=[t + 1 for t in card["taps_0_indexed_blocks"]],  # ours are 1-indexed layers
        scales=[float(s) for s in card["decoder_scales"]],
        decoder=DecoderSettings(width=cfg["decoder_embed_dim"], depth=cfg["decoder_depth"],
                                num_heads=cfg["decoder_num_heads"],
                                mlp_ratio=cfg.get("decoder_mlp_ratio", cfg["mlp_ratio"])),
        mask_ratio=card["mask_ratio"],
        layer_norm_eps=card["layer_norm_eps"],
    )


@cache
def reference(card_path: Path) -> Reference:
    card = json.loads(card_path.read_text())
    tensors_path = card_path.with_name(f"{card_path.stem}.safetensors")
    weights_path = card_path.with_name(f"{card_path.stem}_weights.safetensors")
    assert tensors_path.is_file(), f"card {card_path.name} has no tensors file {tensors_path}"
    assert weights_path.is_file(), f"card {card_path.name} has no weights file {weights_path}"
    tensors = load_file(str(tensors_path))
    weights, _ = read_published(weights_path)
    return Reference(card, tensors, weights, settings_from_card(card))


def fresh_model(ref: Reference) -> torch.nn.Module:
    torch.manual_seed(ref.card.get("seed", 0))
    return build_model(ref.settings).eval()


def loaded_model(ref: Reference) -> torch.nn.Module:
    model = fresh_model(ref)
    report = load_published_into(model, ref.weights)
    assert not report.missing and not report.unexpected, report
    return model


def hog_keys(tensors: dict) -> dict[tuple[int, int], str]:
    """{(nbins, cell_px): key} for every `hogN.cellC` tensor."""
    found = {}
    for key in tensors:
        m = re.fullmatch(r"hog(\d+)\.cell(\d+)", key)
        if m:
            found[(int(m.group(1)), int(m.group(2)))] = key
    return found


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual.float() - expected.float()).abs().max().item()
    assert diff <= atol, f"{what}: max abs difference {diff:.3g} > {atol:g}"


def assert_rel(actual: float, expected: float, rtol: float, what: str) -> None:
    rel = abs(actual - expected) / max(abs(expected), 1e-12)
    assert rel <= rtol, f"{what}: {actual!r} vs reference {expected!r} (relative error {rel:.3g} > {rtol:g})"


def check_hog_targets(ref: Reference, model, targets: list[torch.Tensor]) -> int:
    """Compare every hogN.cellC reference; the model's own nbins against the model's targets."""
    keys = hog_keys(ref.tensors)
    assert keys, "the tensors file holds no hogN.cellC reference"
    model_nbins = model.target.nbins
    by_cell = dict(zip(model.cells_px, targets))
    extra_targets: dict[int, dict[int, torch.Tensor]] = {}
    for (nbins, cell), key in sorted(keys.items()):
        if nbins == model_nbins:
            assert cell in by_cell, f"{key}: the model has no scale with {cell}px cells ({model.cells_px})"
            actual = by_cell[cell]
        else:
            if nbins not in extra_targets:
                cells = list(ref.card["hog_cells_px"])
                assert cell in cells, f"{key}: {cell}px not in the card's hog_cells_px {cells}"
                hog = HOGTarget(HOGOptions(nbins=nbins), cells)
                with torch.no_grad():
                    extra_targets[nbins] = dict(zip(cells, hog(ref.tensors["images"])))
            actual = extra_targets[nbins][cell]
        assert actual.dtype == torch.float32, f"{key}: target computed in {actual.dtype}"
        assert_close(actual, ref.tensors[key], HOG_ATOL, key)
    return len(keys)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("card_path", card_params())
def test_card_model_config_matches_weights(card_path):
    ref = reference(card_path)
    for name, shape in ref.card.get("weights", {}).items():
        assert name in ref.weights, f"card lists {name}, weights file lacks it"
        assert list(ref.weights[name].shape) == list(shape), name
    for name, shape in ref.card.get("tensors", {}).items():
        assert name in ref.tensors, f"card lists {name}, tensors file lacks it"
        assert list(ref.tensors[name].shape) == list(shape), name


@pytest.mark.parametrize("card_path", card_params())
def test_sincos_positions_match_published(card_path):
    ref = reference(card_path)
    model = fresh_model(ref)  # before loading: our own computed buffers
    assert_close(model.encoder.pos_embed.detach(), ref.weights["pos_embed"], 1e-6, "pos_embed")
    for k, decoder in enumerate(model.decoders):
        key = f"decoder.{k}.pos_embed"
        assert_close(decoder.pos_embed.detach(), ref.weights[key], 1e-6, key)


@pytest.mark.parametrize("card_path", card_params())
def test_conformance(card_path):
    ref = reference(card_path)
    t, card = ref.tensors, ref.card
    model = loaded_model(ref)
    n_scales = len(model.decoders)
    assert n_scales == len(card["decoder_scales"])

    # tap latents (cls + visible tokens after each tap's norm), caught on the way through
    latents: dict[int, torch.Tensor] = {}
    hooks = [norm.register_forward_hook(lambda mod, inp, out, k=k: latents.__setitem__(k, out))
             for k, norm in enumerate(model.encoder.tap_norms)]
    try:
        with torch.no_grad():
            out = model(t["images"], noise=t["noise"])
    finally:
        for h in hooks:
            h.remove()

    assert_close(out.mask, t["mask"], HOG_ATOL, "mask")
    assert torch.equal(out.ids_restore, t["ids_restore"].to(out.ids_restore.dtype)), "ids_restore"
    for k in range(n_scales):
        if f"latent.{k}" in t:
            assert_close(latents[k], t[f"latent.{k}"], PRED_ATOL, f"latent.{k}")

    assert check_hog_targets(ref, model, out.targets) >= n_scales

    assert len(out.preds) == len(out.masks) == out.losses.shape[0] == n_scales
    for k in range(n_scales):
        assert_close(out.masks[k], t[f"mask.scale{k}"], HOG_ATOL, f"mask.scale{k}")
        assert_close(out.preds[k], t[f"pred.scale{k}"], PRED_ATOL, f"pred.scale{k}")
        assert_rel(out.losses[k].item(), t[f"loss.scale{k}"].item(), LOSS_RTOL, f"loss.scale{k}")
        if "losses_per_scale" in card:
            assert_rel(out.losses[k].item(), card["losses_per_scale"][k], LOSS_RTOL,
                       f"card losses_per_scale[{k}]")
    assert_rel(out.loss.item(), t["loss"].item(), LOSS_RTOL, "loss")
    if "loss" in card:
        assert_rel(out.loss.item(), card["loss"], LOSS_RTOL, "card loss")


@pytest.mark.parametrize("card_path", card_params())
def test_hog_targets_stay_float32_under_autocast(card_path):
    ref = reference(card_path)
    model = loaded_model(ref)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ref.tensors["images"], noise=ref.tensors["noise"])
    assert any(p.dtype == torch.bfloat16 for p in out.preds), "autocast did not take effect"
    assert torch.isfinite(out.loss)
    assert out.loss.dtype == torch.float32
    check_hog_targets(ref, model, out.targets)
