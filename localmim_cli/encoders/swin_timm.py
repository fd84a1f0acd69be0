"""The swin encoder as a timm SwinTransformer: for fine-tuning, export and classifier evaluation.

Three differences of layout, none of function:
- timm merges patches at the start of the next stage (`layers.k+1.downsample`), the published
  pretraining model at the end of a stage (`layers.k.downsample`);
- timm (like the published fine-tuning code and the original Swin) concatenates the 2x2
  neighbours as (row, col) = (0,0), (1,0), (0,1), (1,1), pretraining as (0,0), (0,1), (1,0),
  (1,1): the middle two C-wide chunks of the merge norm and of the reduction's inputs swap;
- timm's final `norm` is our last tap norm.
timm builds its LayerNorms with eps 1e-5; the model returned here gets the encoder's eps (1e-6
as published), so its features equal `forward_features`. A model rebuilt from the architecture
name and `model_args` alone (timm.create_model, as `export` writes and checks) has eps 1e-5
again, and no JSON-ready argument changes that: SwinTransformer's `norm_layer` must be a class
(timm 1.0's string names, e.g. "layernorm" with its eps 1e-6, reach PatchEmbed unresolved and
fail), and config.json cannot hold one. The difference is small: features move by 2.5e-5 at
most (9e-6 relative) on the sample photos after the swin-demo preset's 420 steps, 3e-5 on a
small random Swin; tests/test_swin_encoder.py bounds it at export's 1e-4.
Grids that windows do not tile are refused (timm pads them; this encoder cuts windows).
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from localmim_cli.encoders.swin_options import SwinOptions

if TYPE_CHECKING:
    # Not swin.MaskedSwin: swin.py calls this module, and this one does not call back.
    from localmim_cli.encoders.base import MaskedEncoder


def swap_merge_chunks(weight: torch.Tensor) -> torch.Tensor:
    """Swap the 2nd and 3rd quarters of the last dimension (its own inverse): converts a merge
    norm's (4C,) or a reduction's (2C, 4C) weights between the two neighbour orders."""
    chunks = weight.unflatten(-1, (4, -1))
    return chunks[..., [0, 2, 1, 3], :].flatten(-2).contiguous()


def timm_architecture(options: SwinOptions) -> str:
    """A registered timm Swin name: the one of this size when it is a published size with 4-px
    patches, else swin_tiny's. `model_args` carries every size (window and image size too), so
    the name only tells people and `finetune --set model.arch=...` which size this is."""
    size = options.size_name() if options.patch_size == 4 else None
    return f"{size or 'swin_tiny'}_patch4_window7_224"


def timm_model_args(options: SwinOptions, img_size: int) -> dict[str, Any]:
    """timm.create_model keyword arguments (JSON-ready) that give this encoder's structure."""
    return {"img_size": img_size, "patch_size": options.patch_size, "window_size": options.window_size,
            "embed_dim": options.embed_dim, "depths": list(options.depths), "num_heads": list(options.num_heads),
            "mlp_ratio": options.mlp_ratio, "qkv_bias": options.qkv_bias, "drop_path_rate": options.drop_path}


def timm_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder's state dict (all stages built) -> timm SwinTransformer's (no head)."""
    out = {}
    last_norm = f"tap_norms.{max(int(k.split('.')[1]) for k in state if k.startswith('tap_norms.'))}."
    for key, value in state.items():
        if m := re.fullmatch(r"layers\.(\d+)\.downsample\.(norm\.weight|norm\.bias|reduction\.weight)", key):
            out[f"layers.{int(m.group(1)) + 1}.downsample.{m.group(2)}"] = swap_merge_chunks(value)
        elif key.startswith(last_norm):
            out["norm." + key[len(last_norm):]] = value
        elif not key.startswith("tap_norms."):
            out[key] = value
    return out


def to_timm_swin(encoder: "MaskedEncoder") -> nn.Module:
    """`encoder` is a swin.MaskedSwin (its stages, grid and options are read)."""
    import timm

    options = encoder.options
    n_stages = len(options.depths)
    if encoder.tap_layers[-1] != n_stages:
        raise NotImplementedError(f"to_timm() needs the last stage tapped (taps {encoder.tap_layers} of "
                                  f"{n_stages} stages leave the top stages unbuilt)")
    # timm pads a grid its windows do not divide and attends to the padding (and, shifted, rolls
    # it into view); our windows are just cut at the border. They agree when windows tile.
    for k, stage in enumerate(encoder.layers):
        side = encoder.patch_grid // 2**k
        if side % stage.window_size:
            raise NotImplementedError(f"to_timm(): stage {k + 1}'s {side}x{side} grid is not a whole number of "
                                      f"{stage.window_size}x{stage.window_size} windows, where timm's Swin pads "
                                      "and differs from this encoder")
    arch, args = timm_architecture(options), timm_model_args(options, encoder.img_size)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **args)
    model.load_state_dict(timm_state_dict(encoder.state_dict()))
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = encoder.layer_norm_eps
    model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), "architecture": arch}
    model.model_args = args
    return model.to(next(encoder.parameters()).device).eval()
