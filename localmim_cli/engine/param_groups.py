"""Optimizer parameter groups by layer, for models that number their layers (dense-task models
on model/feature_pyramid.py: `num_layers`, `layer_of(name)`), as mmsegmentation's and
mmdetection's layer-decay optimizer constructors (and detectron2's ViTDet `lr_factor_func`)
form them."""

from __future__ import annotations

from typing import Any

from torch import nn

# detectron2's `get_default_optimizer_params` norm types: their weights and biases get
# `weight_decay_norm` (0 in the ViTDet recipes)
NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def norm_parameters(model: nn.Module) -> set[int]:
    """ids of the parameters that belong to normalisation layers."""
    return {id(p) for m in model.modules() if isinstance(m, NORM_TYPES) for p in m.parameters(recurse=False)}


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, no_decay_1d: bool,
                       no_decay_names: list[str], no_decay_norm: bool = False) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay) as mmsegmentation's LayerDecayOptimizerConstructor (BEiT's)
    forms them, for a model that says its `num_layers` and `layer_of(parameter name)`:
    lr_scale = layer_decay ^ (num_layers - 1 - layer); no weight decay on 1-D parameters and
    biases (with no_decay_1d), on the parameters of normalisation layers (with no_decay_norm,
    detectron2's weight_decay_norm = 0) and on names containing one of no_decay_names."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    top = model.num_layers - 1
    norms = norm_parameters(model) if no_decay_norm else set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not ((no_decay_1d and (param.ndim == 1 or name.endswith(".bias"))) or id(param) in norms
                     or any(key in name for key in no_decay_names))
        layer = model.layer_of(name)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (top - layer)})
        group["params"].append(param)
    return [group for _, group in sorted(groups.items())]
