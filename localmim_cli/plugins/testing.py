"""Checks a plugin author can run in their own tests: does my encoder or target keep the contract?

    from localmim_cli.plugins.testing import check_encoder, check_target

    def test_my_encoder():
        check_encoder(my_package.plugin, {"depth": 2}, img_size=64)

    def test_my_target():
        check_target(my_package.plugin, cells_px=[4, 8, 16])

Both build the plugin, run it on a small batch and raise AssertionError with every problem found,
each naming the plugin and what is wrong. They return the built object for further checks of the
author's own. A plugin may also be given by its entry-point name ("hiera"), which checks that it
is installed and discoverable, through the same lookup the CLI uses.

The `*_problems` functions (from checks.py) are the cheap shape checks `localmim` itself applies
to every plugin when it builds one; they return messages instead of raising.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from localmim_cli.encoders.base import MaskedEncoder, TapInfo, TapOutput
from localmim_cli.model.masking import mask_at_scale, masking_from_noise
from localmim_cli.plugins import registry
from localmim_cli.plugins.api import EncoderPlugin, TargetPlugin
from localmim_cli.plugins.checks import (encoder_structure_problems, probe_images, target_output_problems,
                                         target_structure_problems)
from localmim_cli.targets.base import ReconstructionTarget

__all__ = ["check_encoder", "check_target", "check_target_output", "probe_images",
           "encoder_structure_problems", "target_structure_problems", "target_output_problems"]


def _name(plugin: Any) -> str:
    kind = "encoder" if isinstance(plugin, EncoderPlugin) else "target"
    return f"{kind} plugin {getattr(plugin, 'name', plugin)!r}"


def _fail(name: str, problems: list[str]) -> None:
    if problems:
        raise AssertionError(f"{name}: " + "; ".join(problems))


def _resolve_plugin(plugin: Any, kind: str, expected: type) -> Any:
    if isinstance(plugin, str):
        registry.clear_cache()
        try:
            return registry.get(kind, plugin)
        except registry.PluginError as exc:
            raise AssertionError(str(exc)) from None
    if not isinstance(plugin, expected):
        raise AssertionError(f"{plugin!r} is a {type(plugin).__name__}, not a "
                             f"localmim_cli.plugins.api.{expected.__name__}")
    if plugin.api_version != expected.expected_api_version:
        raise AssertionError(f"{_name(plugin)}: written for interface version {plugin.api_version}, "
                             f"this localmim speaks {expected.expected_api_version}")
    return plugin


def check_target_output(target: ReconstructionTarget, images: torch.Tensor, name: str | None = None):
    """Run `target(images)` and assert its output matches cells_px and dims; returns the output."""
    with torch.no_grad():
        output = target(images)
    _fail(name or f"target {type(target).__name__}", target_output_problems(target, images, output))
    return output


# ---------------------------------------------------------------------------------------------
# Encoders


def check_encoder(plugin: EncoderPlugin | str, options: dict[str, Any] | None = None, *, img_size: int = 64,
                  tap_layers: list[int] | None = None, batch: int = 2, mask_ratio: float = 0.75,
                  seed: int = 0, atol: float = 1e-5) -> MaskedEncoder:
    """Build an encoder plugin and check it keeps the encoder contract (interface version 1).

    Checked: the plugin object and its options; the built encoder's unit_px, unit_grid, taps and
    tap_layers; forward_taps on a randomly masked batch (one TapOutput per tap, its grid from the
    tap's stride, tokens (B, n_prefix + visible cells, channels), ids_restore a permutation per
    image that puts exactly the cells of visible mask units first); that hidden pixels do not
    reach the taps (changing them changes nothing); that every trainable parameter gets a finite
    gradient from forward_taps (DistributedDataParallel needs that); forward_features (B, C); and,
    when the encoder implements the optional to_timm(), that the timm model gives the same features.
    Seeds torch's global generator with `seed` before building (reproducible weights).
    """
    plugin = _resolve_plugin(plugin, "encoders", EncoderPlugin)
    name = _name(plugin)
    try:
        opts = plugin.options.model_validate(options or {})
    except Exception as exc:
        raise AssertionError(f"{name}: options {options!r} do not validate: {exc}") from None
    torch.manual_seed(seed)
    encoder = plugin.build(opts, img_size, tap_layers)
    _fail(name, encoder_structure_problems(encoder, img_size))
    if tap_layers is not None and list(encoder.tap_layers) != list(tap_layers):
        _fail(name, [f"asked for taps {tap_layers}, built {encoder.tap_layers}"])

    gen = torch.Generator().manual_seed(seed)
    units = encoder.unit_grid[0] * encoder.unit_grid[1]
    masking = masking_from_noise(torch.rand(batch, units, generator=gen), mask_ratio)
    images = probe_images(batch, img_size, seed)

    encoder.train()
    outputs = encoder.forward_taps(images, masking.ids_keep, masking.ids_restore)
    problems = _tap_problems(encoder, outputs, masking, batch, mask_at_scale)
    _fail(name, problems)

    # Gradients: a fixed random projection of every tap (a plain sum of squares of a normed
    # output would give parameters below the norm no gradient at all).
    loss = sum((out.tokens.float() * torch.randn(out.tokens.shape, generator=gen)).sum() for out in outputs)
    loss.backward()
    no_grad = [n for n, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    bad_grad = [n for n, p in encoder.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
    if no_grad:
        problems.append(f"{len(no_grad)} trainable parameter(s) get no gradient from forward_taps "
                        f"(e.g. {no_grad[:4]}); leave them out or freeze them: DistributedDataParallel fails on them")
    if bad_grad:
        problems.append(f"non-finite gradients in {bad_grad[:4]}")
    if not any(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters()):
        problems.append("no parameter gets a non-zero gradient from forward_taps")
    _fail(name, problems)
    encoder.zero_grad(set_to_none=True)

    encoder.eval()
    with torch.no_grad():
        base = encoder.forward_taps(images, masking.ids_keep, masking.ids_restore)
        hidden = _upsample_units(masking.mask, encoder.unit_grid, encoder.unit_px)  # (B, 1, H, W)
        altered = images + hidden * probe_images(batch, img_size, seed + 1) * 3
        moved = encoder.forward_taps(altered, masking.ids_keep, masking.ids_restore)
        for k, (a, b) in enumerate(zip(base, moved)):
            if not torch.allclose(a.tokens, b.tokens, atol=atol, rtol=1e-4):
                problems.append(f"tap {k}: changing only hidden pixels changed the visible tokens by up to "
                                f"{(a.tokens - b.tokens).abs().max().item():.3g}: hidden content leaks into "
                                "the encoder")
        feats = encoder.forward_features(images)
    if not torch.is_tensor(feats) or feats.ndim != 2 or feats.shape[0] != batch or feats.shape[1] < 1:
        problems.append(f"forward_features returned {getattr(feats, 'shape', type(feats).__name__)}, "
                        f"expected (batch={batch}, C)")
    elif not torch.isfinite(feats).all():
        problems.append("forward_features returned non-finite values")
    _fail(name, problems)
    try:
        exported = encoder.to_timm()
    except NotImplementedError:
        return encoder  # optional
    with torch.no_grad():
        theirs = exported.eval().forward_head(exported.forward_features(images), pre_logits=True)
    if theirs.shape != feats.shape or not torch.allclose(theirs, feats, atol=atol, rtol=1e-4):
        _fail(name, [f"to_timm(): the timm model's pre-logits {tuple(theirs.shape)} differ from "
                     f"forward_features {tuple(feats.shape)}"])
    return encoder


def _upsample_units(mask: torch.Tensor, grid: tuple[int, int], unit_px: int) -> torch.Tensor:
    m = mask.reshape(mask.shape[0], 1, *grid)
    return m.repeat_interleave(unit_px, dim=2).repeat_interleave(unit_px, dim=3)


def _tap_problems(encoder: MaskedEncoder, outputs: Any, masking, batch: int, mask_at_scale) -> list[str]:
    if not isinstance(outputs, (list, tuple)) or len(outputs) != len(encoder.taps):
        return [f"forward_taps returned {type(outputs).__name__}"
                + (f" of {len(outputs)}" if isinstance(outputs, (list, tuple)) else "")
                + f"; expected a list of {len(encoder.taps)} TapOutput, one per tap"]
    problems = []
    unit_px, (uh, uw) = encoder.unit_px, encoder.unit_grid
    for k, (tap, out) in enumerate(zip(encoder.taps, outputs)):
        where = f"tap {k} (layer {encoder.tap_layers[k]}, stride {tap.stride_px} px)"
        if not isinstance(out, TapOutput):
            problems.append(f"{where}: a {type(out).__name__}, not a TapOutput")
            continue
        grid = (uh * unit_px // tap.stride_px, uw * unit_px // tap.stride_px)
        if tuple(out.grid) != grid:
            problems.append(f"{where}: grid {tuple(out.grid)}, expected {grid} from the stride")
            continue
        n_cells = grid[0] * grid[1]
        ids = out.ids_restore
        if not torch.is_tensor(ids) or tuple(ids.shape) != (batch, n_cells) or ids.dtype != torch.long:
            problems.append(f"{where}: ids_restore must be a (B, h*w) = {(batch, n_cells)} int64 tensor, got "
                            f"{tuple(getattr(ids, 'shape', ()))} {getattr(ids, 'dtype', type(ids).__name__)}")
            continue
        if not torch.equal(ids.sort(dim=1).values, torch.arange(n_cells).expand(batch, -1)):
            problems.append(f"{where}: ids_restore is not a permutation of 0..{n_cells - 1} in every row")
            continue
        t = out.tokens
        if not torch.is_tensor(t) or t.ndim != 3 or t.shape[0] != batch or t.shape[2] != tap.channels:
            problems.append(f"{where}: tokens must be (B, n_prefix + visible, {tap.channels}), got "
                            f"{tuple(getattr(t, 'shape', ()))}")
            continue
        n_visible = t.shape[1] - out.n_prefix
        if tap.stride_px <= unit_px:
            hidden = mask_at_scale(masking.mask, (uh, uw), unit_px / tap.stride_px)  # (B, h*w)
            expected_visible = int((hidden[0] == 0).sum())
            if n_visible != expected_visible:
                problems.append(f"{where}: {n_visible} visible tokens after {out.n_prefix} prefix token(s), "
                                f"expected {expected_visible} (the cells of the visible mask units)")
                continue
            first = ids < n_visible
            if not torch.equal(first, hidden == 0):
                problems.append(f"{where}: ids_restore does not send exactly the cells of visible mask "
                                "units to the token positions [0, n_visible)")
        elif not 0 < n_visible <= n_cells:
            problems.append(f"{where}: {n_visible} visible tokens for a grid of {n_cells} cells")
        if not torch.isfinite(t).all():
            problems.append(f"{where}: non-finite tokens")
    return problems


# ---------------------------------------------------------------------------------------------
# Targets


def check_target(plugin: TargetPlugin | str, options: dict[str, Any] | None = None, *,
                 cells_px: Sequence[int] = (4, 8, 16), img_size: int | None = None, batch: int = 2,
                 seed: int = 0, require_render: bool = True) -> ReconstructionTarget:
    """Build a target plugin and check it keeps the target contract (interface version 1).

    Checked: the plugin object and its options; cells_px and dims; forward's shapes (one
    (B, cells, dims[k]) tensor per cell size); float32 finite values, also under bf16 autocast
    (targets are computed in float32) and equal to the fp32 ones; determinism; that each image's
    targets do not depend on the rest of the batch; and `render` of a target and of an arbitrary
    prediction: an (h*s, w*s, 3) uint8 array, s >= 1 pixels per cell (require_render=False
    accepts a target without a drawing, i.e. one whose render raises NotImplementedError).
    """
    plugin = _resolve_plugin(plugin, "targets", TargetPlugin)
    name = _name(plugin)
    cells = [int(c) for c in cells_px]
    try:
        opts = plugin.options.model_validate(options or {})
    except Exception as exc:
        raise AssertionError(f"{name}: options {options!r} do not validate: {exc}") from None
    target = plugin.build(opts, cells)
    _fail(name, target_structure_problems(target, cells))
    if img_size is None:
        img_size = math.lcm(*cells)
        img_size *= math.ceil(2 * max(cells) / img_size)
    images = probe_images(batch, img_size, seed)
    out = check_target_output(target, images, name)
    problems = []
    for k, t in enumerate(out):
        if t.dtype != torch.float32:
            problems.append(f"scale {k}: dtype {t.dtype}, expected float32")
        if not torch.isfinite(t).all():
            problems.append(f"scale {k}: non-finite values")
    with torch.no_grad(), torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out_amp = target(images)
    for k, (a, b) in enumerate(zip(out, out_amp)):
        if b.dtype != torch.float32:
            problems.append(f"scale {k}: dtype {b.dtype} under bf16 autocast; compute targets in float32 "
                            "(torch.autocast(..., enabled=False) and images.float())")
        elif not torch.allclose(a, b, atol=1e-5, rtol=1e-4):
            problems.append(f"scale {k}: under bf16 autocast the targets differ by up to "
                            f"{(a - b).abs().max().item():.3g}; compute them in float32")
    with torch.no_grad():
        again = target(images)
        single = target(images[:1])
    for k, (a, b, c) in enumerate(zip(out, again, single)):
        if not torch.equal(a, b):
            problems.append(f"scale {k}: two calls on the same images differ (targets must be deterministic)")
        if not torch.allclose(a[:1], c, atol=1e-5, rtol=1e-4):
            problems.append(f"scale {k}: an image's targets change with the rest of the batch")
    _fail(name, problems)

    gen = torch.Generator().manual_seed(seed)
    for k, (cell, t) in enumerate(zip(cells, out)):
        h, w = img_size // cell, img_size // cell
        truth = t[0].reshape(h, w, -1)
        prediction = torch.randn(truth.shape, generator=gen)
        for what, cells_in in (("target", truth), ("prediction", prediction)):
            try:
                drawn = target.render(cells_in, cell, images[0])
            except NotImplementedError:
                if require_render:
                    _fail(name, ["render raises NotImplementedError (pass require_render=False to "
                                 "accept a target without a drawing; visualize then shows vector lengths)"])
                return target
            except Exception as exc:
                problems.append(f"scale {k}: render of a {what} failed: {type(exc).__name__}: {exc}")
                continue
            problems += _render_problems(f"scale {k} ({cell} px cells): render of a {what}", drawn, h, w)
    _fail(name, problems)
    return target


def _render_problems(where: str, drawn: Any, h: int, w: int) -> list[str]:
    if not isinstance(drawn, np.ndarray):
        return [f"{where} returned a {type(drawn).__name__}, not a numpy array"]
    if drawn.dtype != np.uint8 or drawn.ndim != 3 or drawn.shape[2] != 3:
        return [f"{where}: expected (h*s, w*s, 3) uint8, got {drawn.shape} {drawn.dtype}"]
    rows, cols = drawn.shape[:2]
    if rows % h or cols % w or rows // h != cols // w or rows < h:
        return [f"{where}: {rows}x{cols} pixels is not the same whole number of pixels per cell "
                f"for a {h}x{w} grid"]
    return []
