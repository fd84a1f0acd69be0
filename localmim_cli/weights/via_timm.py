"""timm models from encoder plugins: the way `finetune`, `export` and `evaluate --protocol
classifier` take an encoder other than the built-in ViT.

An encoder plugin may implement `MaskedEncoder.to_timm()`: a timm model without classifier
holding the encoder's weights, whose pre-logits equal `forward_features`. Everything here goes
through it; nothing about a particular architecture is assumed beyond timm's common model
interface (`reset_classifier`, `get_classifier`, `forward_head(..., pre_logits=True)`).

A fine-tuning checkpoint of such a model records in `meta["timm"]["plugin"]` what rebuilds it
(`PluginRecord`): the encoder plugin's name and options, the image size and the tap layers, with
`"via": "to_timm"`. Rebuilding = the plugin's encoder (random weights) -> `to_timm()` ->
`reset_classifier(num_classes)`, then the checkpoint's weights.

For `export`, the timm model says how timm itself rebuilds it: `pretrained_cfg["architecture"]`
names a timm architecture, and an optional `model_args` attribute holds the `create_model`
keyword arguments (sizes) that this architecture needs to match.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import CheckpointError, ModelError
from localmim_cli.weights.loading import load_exactly

if TYPE_CHECKING:
    import torch

    from localmim_cli.weights.encoder_weights import EncoderWeights

VIA = "to_timm"


def is_plugin_checkpoint(weights: "EncoderWeights") -> bool:
    """A pretrained non-ViT encoder (a pretrain checkpoint, a published LocalMIM Swin), or a
    fine-tuned model built via to_timm()."""
    if weights.pretrained_encoder:
        return weights.encoder_name != "vit"
    return weights.kind == "finetune" and plugin_record(weights) is not None


def plugin_record(weights: "EncoderWeights") -> dict[str, Any] | None:
    """What rebuilds the model (see the module docstring), for either kind of checkpoint."""
    if weights.kind == "finetune":
        return (weights.meta.get("timm") or {}).get("plugin")
    if weights.pretrained_encoder:
        model = weights.meta["settings"]["model"]
        return {"via": VIA, "encoder": model["encoder"], "img_size": int(model["img_size"]),
                "taps": list(weights.meta.get("tap_layers") or model.get("taps") or []) or None}
    return None


def build_encoder(record: dict[str, Any]):
    """The plugin's encoder as the record describes it, with fresh weights."""
    from localmim_cli.plugins import registry

    plugin = registry.encoder(record["encoder"]["name"])
    options = plugin.options.model_validate(record["encoder"].get("options") or {})
    return plugin.build(options, int(record["img_size"]), record.get("taps"))


def to_timm(encoder, name: str) -> "torch.nn.Module":
    """encoder.to_timm(), or an error naming the plugin when it has none."""
    try:
        model = encoder.to_timm()
    except NotImplementedError:
        raise CheckpointError(f"encoder plugin {name!r} does not implement to_timm(): finetune and export "
                              "need to_timm() to turn it into a timm model (see docs/plugins.md)") from None
    for method in ("reset_classifier", "get_classifier", "forward_head", "forward_features"):
        if not callable(getattr(model, method, None)):
            raise CheckpointError(f"encoder plugin {name!r}: to_timm() returned a {type(model).__name__}, "
                                  f"which has no {method}() (not a timm model)")
    return model


def pretrained_timm(weights: "EncoderWeights") -> "torch.nn.Module":
    """A pretrain checkpoint's encoder with its weights, as a timm model without classifier."""
    record = plugin_record(weights)
    name = record["encoder"]["name"]
    encoder = build_encoder(record)
    load_exactly(encoder, weights.state, weights.file)
    return to_timm(encoder.eval(), name)


def add_classifier(model: "torch.nn.Module", num_classes: int, head_init_std: float | None = None) -> "torch.nn.Module":
    """timm's reset_classifier (pooling kept), the new head trunc-normal(head_init_std), zero bias."""
    import torch
    from timm.layers import trunc_normal_

    model.reset_classifier(num_classes)
    head = model.get_classifier()
    if head_init_std is not None and isinstance(head, torch.nn.Linear):
        with torch.no_grad():
            trunc_normal_(head.weight, std=head_init_std)
            torch.nn.init.zeros_(head.bias)
    return model


def finetuned_timm(record: dict[str, Any], num_classes: int, state: "dict[str, torch.Tensor] | None" = None,
                   source: Any = None) -> "torch.nn.Module":
    """The fine-tuning model a record describes; with a checkpoint's state, holding its weights."""
    model = add_classifier(to_timm(build_encoder(record), record["encoder"]["name"]), num_classes)
    if state is not None:
        load_exactly(model, state, source)
    return model


def finetuned_from_weights(weights: "EncoderWeights", num_classes: int | None = None) -> "torch.nn.Module":
    """A fine-tuned checkpoint's model; num_classes 0 drops its head (features = pre-logits)."""
    classes = len(weights.classes or [])
    model = finetuned_timm(plugin_record(weights), classes, weights.state, weights.source)
    if num_classes is not None and num_classes != classes:
        model.reset_classifier(num_classes)
    return model


def timm_identity(model: "torch.nn.Module", name: str) -> tuple[str, dict[str, Any]]:
    """(architecture, create_model kwargs) that rebuild the model's structure in timm."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    arch = cfg.get("architecture") if isinstance(cfg, dict) else getattr(cfg, "architecture", None)
    if not arch:
        raise CheckpointError(f"encoder plugin {name!r}: the model to_timm() returns does not say which timm "
                              "architecture it is (pretrained_cfg['architecture']); export needs that")
    return arch, dict(getattr(model, "model_args", None) or {})


def describe(record: dict[str, Any], arch: str | None = None) -> str:
    return (f"{record['encoder']['name']!r} encoder plugin via to_timm()"
            + (f" (timm {arch})" if arch else "") + f", {record['img_size']} px")


@dataclass(frozen=True)
class PluginShape:
    """What finetune needs to know of a model built via to_timm() (a ViTShape's counterpart)."""

    record: dict[str, Any]
    arch: str | None = None                  # the timm architecture, when the model names one
    model_args: dict[str, Any] = field(default_factory=dict)

    @property
    def img_size(self) -> int:
        return int(self.record["img_size"])

    def describe(self) -> str:
        return describe(self.record, self.arch)

    def with_drop_path(self, rate: float) -> "PluginShape":
        """Fine-tuning's model.drop_path, given to the encoder as its own `drop_path` option when the
        plugin declares one (swin and the Hiera example do); without one, it has no stochastic depth."""
        from localmim_cli.plugins import registry

        encoder = self.record["encoder"]
        if "drop_path" not in registry.encoder(encoder["name"]).options.model_fields:
            return self
        options = {**(encoder.get("options") or {}), "drop_path": rate}
        record = {**self.record, "encoder": {**encoder, "options": options}}
        return dataclasses.replace(self, record=record)

    def timm_record(self, num_classes: int) -> dict[str, Any]:
        """meta["timm"] of a fine-tuning checkpoint: rebuilds the model (see the module docstring)."""
        return {"architecture": self.arch, "model_args": {**self.model_args, "num_classes": num_classes},
                "plugin": self.record}


def plugin_shape(weights: "EncoderWeights", arch: str | None = None, img_size: int | None = None) -> PluginShape:
    """Check the checkpoint's plugin can go through to_timm() (on fresh weights), and that
    model.arch / model.img_size, when set, are what it gives."""
    record = plugin_record(weights)
    name = record["encoder"]["name"]
    if img_size and img_size != int(record["img_size"]):
        raise ModelError(f"model.img_size {img_size}: a model built by the {name!r} encoder plugin keeps its "
                         f"pretraining size {record['img_size']}; leave model.img_size unset")
    model = to_timm(build_encoder(record), name)
    if not callable(getattr(model, "reset_classifier", None)):
        raise CheckpointError(f"encoder plugin {name!r}: its timm model has no reset_classifier()")
    try:
        own_arch, model_args = timm_identity(model, name)
    except CheckpointError:
        own_arch, model_args = None, {}
    if arch and arch != own_arch:
        raise CheckpointError(f"{weights.source}: the {name!r} encoder plugin gives timm {own_arch or 'an unnamed model'}, "
                              f"but model.arch asks for {arch}; use --set model.arch=null")
    return PluginShape(record, own_arch, model_args)


def shape_from_record(timm_meta: dict[str, Any]) -> PluginShape:
    return PluginShape(timm_meta["plugin"], timm_meta.get("architecture"),
                       {k: v for k, v in (timm_meta.get("model_args") or {}).items() if k != "num_classes"})


def init_classifier(shape: PluginShape, weights: "EncoderWeights | None", num_classes: int,
                    head_init_std: float) -> "torch.nn.Module":
    """The model to fine-tune: the checkpoint's encoder (a fine-tuned one without its head) through
    to_timm(), with a new classifier; without weights, fresh (a resumed run loads its own)."""
    name = shape.record["encoder"]["name"]
    if weights is None or weights.pretrained_encoder:
        encoder = build_encoder(shape.record)
        if weights is not None:
            load_exactly(encoder, weights.state, weights.file)
        model = to_timm(encoder, name)
    else:
        model = finetuned_timm(shape.record, len(weights.classes or []), weights.state, weights.source)
        model.reset_classifier(0)
    return add_classifier(model, num_classes, head_init_std)
