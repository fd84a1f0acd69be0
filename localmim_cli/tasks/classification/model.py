"""The classifier: a pretrained encoder as a timm VisionTransformer with global average pooling,
a new fc_norm and a new head with trunc-normal(2e-5) weights (MAE's models_vit); an encoder
plugin's checkpoint becomes its to_timm() model."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import ModelError, UsageError

if TYPE_CHECKING:
    import torch

    from localmim_cli.config.schema import FinetuneSettings
    from localmim_cli.weights.encoder_weights import EncoderWeights, ViTShape
    from localmim_cli.weights.via_timm import PluginShape


def model_shape(settings: "FinetuneSettings", weights: "EncoderWeights | None") -> "ViTShape | PluginShape":
    """The ViT to fine-tune: the checkpoint's, checked against model.arch, at model.img_size.
    A checkpoint of another encoder plugin: its to_timm() model (a PluginShape)."""
    from localmim_cli.weights import via_timm
    from localmim_cli.weights.sources import arch_shape, check_arch, require_vit

    m = settings.model
    if weights is not None and via_timm.is_plugin_checkpoint(weights):
        return via_timm.plugin_shape(weights, m.arch, m.img_size).with_drop_path(m.drop_path)
    if weights is None:
        if not m.arch:
            raise UsageError("finetune needs --init CHECKPOINT (or model.arch to train from scratch)")
        shape = arch_shape(m.arch, m.img_size)
    else:
        require_vit(weights, "finetune")
        check_arch(weights, m.arch)
        shape = weights.shape
    if m.img_size and m.img_size != shape.img_size:
        if m.img_size % shape.patch_size:
            raise ModelError(f"model.img_size {m.img_size} is not divisible by the patch size {shape.patch_size}")
        shape = dataclasses.replace(shape, img_size=m.img_size)
    return shape


def build_classifier(shape: "ViTShape | PluginShape", num_classes: int, settings: "FinetuneSettings",
                     weights: "EncoderWeights | None") -> "torch.nn.Module":
    """The fine-tuning model with the encoder's weights in and a fresh fc_norm and head."""
    import torch
    from timm.layers import trunc_normal_

    from localmim_cli.weights.sources import create_vit, fit_positions
    from localmim_cli.weights.loading import load_exactly
    from localmim_cli.weights.via_timm import PluginShape, init_classifier

    if isinstance(shape, PluginShape):
        return init_classifier(shape, weights, num_classes, settings.model.head_init_std)
    model = create_vit(shape, num_classes=num_classes, pooling="pool_then_norm",
                       drop_path=settings.model.drop_path, arch=settings.model.arch)
    if weights is not None:
        state = fit_positions(weights.encoder_state(), weights.shape, shape.img_size)
        load_exactly(model, state, weights.source, allow_missing=("fc_norm.", "head."))
    with torch.no_grad():
        trunc_normal_(model.head.weight, std=settings.model.head_init_std)
        torch.nn.init.zeros_(model.head.bias)
        torch.nn.init.ones_(model.fc_norm.weight)
        torch.nn.init.zeros_(model.fc_norm.bias)
    return model


def layer_decay_groups(model: "torch.nn.Module", weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """timm's layer-wise groups: patch_embed/cls/pos = layer 0, block i = i + 1, norms and head
    = L + 1 (scale 1); no decay on 1-D parameters, pos_embed and cls_token (MAE's choice)."""
    from timm.optim import param_groups_layer_decay
    no_decay = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    return param_groups_layer_decay(model, weight_decay, no_weight_decay_list=no_decay, layer_decay=layer_decay)




def timm_record(settings: "FinetuneSettings", shape: "ViTShape | PluginShape", num_classes: int) -> dict[str, Any]:
    """What rebuilds the fine-tuned model with timm: checkpoints and the manifest record it."""
    from localmim_cli.weights.sources import timm_model_args
    from localmim_cli.weights.via_timm import PluginShape

    if isinstance(shape, PluginShape):
        return shape.timm_record(num_classes)
    return {"architecture": settings.model.arch or shape.arch,
            "model_args": timm_model_args(shape, "pool_then_norm", num_classes),
            "shape": dataclasses.asdict(shape)}
