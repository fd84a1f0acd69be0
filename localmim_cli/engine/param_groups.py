"""Optimizer parameter groups by layer, for models that number their layers (dense-task models
on model/feature_pyramid.py: `num_layers`, `layer_of(name)`), as mmsegmentation's and
mmdetection's layer-decay optimizer constructors form them."""

from __future__ import annotations

from typing import Any

from torch import nn


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float, no_decay_1d: bool,
                       no_decay_names: list[str]) -> list[dict[str, Any]]:
    """AdamW groups by (layer, decay) as mmsegmentation's LayerDecayOptimizerConstructor (BEiT's)
    forms them, for a model that says its `num_layers` and `layer_of(parameter name)`:
    lr_scale = layer_decay ^ (num_layers - 1 - layer); no weight decay on 1-D parameters and
    biases (with no_decay_1d) and on names containing one of no_decay_names."""
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    top = model.num_layers - 1
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = not ((no_decay_1d and (param.ndim == 1 or name.endswith(".bias")))
                     or any(key in name for key in no_decay_names))
        layer = model.layer_of(name)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (top - layer)})
        group["params"].append(param)
    return [group for _, group in sorted(groups.items())]
