"""`localmim export`: a checkpoint's encoder as a timm model folder (model.safetensors + config.json).

The folder loads with timm alone, either way:

    timm.create_model("local-dir:DIR", pretrained=True)
    timm.create_model(ARCH, pretrained=True,
                      pretrained_cfg_overlay=dict(file="DIR/model.safetensors", num_classes=0),
                      **config["model_args"])      # num_classes=0, global_pool="avg", sizes

config.json follows timm's hub layout ("architecture", "num_classes", "num_features",
"global_pool", "model_args", "pretrained_cfg") plus our "localmim" block (source checkpoint,
encoder shape, how features are pooled). `forward_head(forward_features(x), pre_logits=True)` of
the reloaded model gives the checkpoint's features: for a pretrained encoder the mean of the
patch tokens after the last tap norm (hence `fc_norm=False`: the norm sits before the pooling),
for a fine-tuned model its pooled, normed pre-logits. The export checks this itself: it reloads
the folder through timm both ways and compares features on a probe batch with the checkpoint's
own (max abs diff < 1e-4, else an error and nothing written).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from localmim_cli.errors import ExportError

if TYPE_CHECKING:
    import torch

TOLERANCE = 1e-4




_FEATURES = {
    "norm_then_pool": "mean of the patch tokens after all blocks, each through the last tap norm "
                      "(MaskedEncoder.forward_features)",
    "pool_then_norm": "mean of the patch tokens after all blocks, then fc_norm (fine-tuned pre-logits)",
    "pool": "mean of the patch tokens after all blocks (no norm: the last tap is below the last layer)",
}


def config_for(weights, arch: str, model_args: dict[str, Any], num_classes: int) -> dict[str, Any]:
    from localmim_cli.version import __version__
    from localmim_cli.data.images import IMAGENET_MEAN, IMAGENET_STD

    size = weights.shape.img_size
    config: dict[str, Any] = {
        "architecture": arch,
        "num_classes": num_classes,
        "num_features": weights.shape.embed_dim,
        "global_pool": "avg",
        "model_args": model_args,
        "pretrained_cfg": {
            "tag": "localmim", "custom_load": False, "input_size": [3, size, size], "fixed_input_size": True,
            "interpolation": "bicubic", "crop_pct": 0.875, "crop_mode": "center",
            "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD), "num_classes": num_classes,
            "pool_size": None, "first_conv": "patch_embed.proj", "classifier": "head",
        },
    }
    if num_classes:
        config["label_names"] = list(weights.classes)
    config["localmim"] = {
        "version": __version__, "source": str(weights.source), "source_kind": weights.kind,
        "shape": dataclasses.asdict(weights.shape), "pooling": weights.pooling,
        "features": _FEATURES[weights.pooling],
        "encoder_options": ((weights.meta.get("settings") or {}).get("model") or {}).get("encoder"),
    }
    return config


def _features(model: "torch.nn.Module", x: "torch.Tensor") -> "torch.Tensor":
    return model.forward_head(model.forward_features(x), pre_logits=True)


def reload_checks(folder: Path, arch: str, model_args: dict[str, Any], probe: "torch.Tensor",
                  reference: "torch.Tensor", reference_logits: "torch.Tensor | None") -> dict[str, float]:
    """Max abs feature difference of each timm loading route against the reference."""
    import timm
    import torch

    routes = {
        "create_model(arch, pretrained_cfg_overlay=file)": lambda: timm.create_model(
            arch, pretrained=True, pretrained_cfg_overlay={"file": str(folder / "model.safetensors"),
                                                           "num_classes": model_args["num_classes"]},
            **model_args),
        "create_model('local-dir:...')": lambda: timm.create_model(f"local-dir:{folder}", pretrained=True),
    }
    diffs = {}
    for name, build in routes.items():
        try:
            model = build().eval()
        except Exception as exc:   # any failure to reload is the export's failure
            raise ExportError(f"the export does not reload through timm {name}: {type(exc).__name__}: {exc}") \
                from exc
        with torch.no_grad():
            diff = (_features(model, probe) - reference).abs().max().item()
            if reference_logits is not None:
                diff = max(diff, (model(probe) - reference_logits).abs().max().item())
        diffs[name] = diff
    return diffs


def export_encoder(checkpoint: Path, out: Path, *, with_head: bool = False, overwrite: bool = False,
                   probe_batch: int = 4, seed: int = 0) -> dict[str, Any]:
    """Write the export, verified; returns a report (arch, model_args, diffs, the files)."""
    import torch
    from localmim_cli.engine import atomic, outputs
    from localmim_cli.weights import via_timm
    from localmim_cli.weights.sources import load_encoder_weights, reference_feature_model, require_vit

    out = Path(out)
    # before the weights are read: nothing is computed for an --out that will be refused
    outputs.check_folder(out, outputs.EXPORT, overwrite, reads=[checkpoint])
    weights = load_encoder_weights(checkpoint)
    plugin = via_timm.is_plugin_checkpoint(weights)
    if not plugin:
        require_vit(weights, "export")
    has_head = weights.has_head
    if with_head and not has_head:
        raise ExportError(f"--with-head: {weights.source} is a {weights.kind} checkpoint without a "
                          "classifier head; export the encoder alone")
    num_classes = len(weights.classes) if with_head else 0
    shape = weights.shape
    build = _plugin_model if plugin else _vit_model
    model, arch, model_args, config, description = build(weights, num_classes, with_head)

    size = config["pretrained_cfg"]["input_size"][-1]
    probe = torch.randn(probe_batch, 3, size, size,
                        generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        reference = reference_feature_model(weights)(probe)
        reference_logits = model(probe) if with_head else None

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        atomic.write_tensors(tmp / "model.safetensors",
                             {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
                             metadata={"format": "pt"})
        atomic.write_json(tmp / "config.json", config)
        diffs = reload_checks(tmp, arch, model_args, probe, reference, reference_logits)
        worst = max(diffs.values())
        if not worst < TOLERANCE:
            detail = "; ".join(f"{k}: {v:.3g}" for k, v in diffs.items())
            raise ExportError(f"the export's features differ from the checkpoint's by up to {worst:.3g} "
                              f"(tolerance {TOLERANCE:g}; {detail}); nothing was written")
        config["localmim"]["verified_max_abs_diff"] = worst
        atomic.write_json(tmp / "config.json", config)
        outputs.check_folder(out, outputs.EXPORT, overwrite, reads=[checkpoint])   # still so after the work
        if out.is_dir():   # empty, or an earlier export: what check_folder allows
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"out": str(out), "architecture": arch, "model_args": model_args, "max_abs_diff": worst,
            "diffs": diffs, "source_kind": weights.kind, "shape": shape, "num_classes": num_classes,
            "description": description}


def _vit_model(weights, num_classes: int, with_head: bool):
    """(model with the weights, arch, model_args, config.json, description) of a ViT checkpoint."""
    from localmim_cli.weights.loading import load_exactly
    from localmim_cli.weights.sources import create_vit, timm_model_args

    shape = weights.shape
    arch = shape.arch
    if weights.kind == "finetune":
        arch = (weights.meta.get("timm") or {}).get("architecture") or arch
    model_args = timm_model_args(shape, weights.pooling, num_classes)
    model = create_vit(shape, num_classes=num_classes, pooling=weights.pooling, arch=arch).eval()
    state = {k: v for k, v in weights.state.items() if with_head or not k.startswith("head.")}
    load_exactly(model, state, weights.file)
    return model, arch, model_args, config_for(weights, arch, model_args, num_classes), shape.describe()


def _plugin_model(weights, num_classes: int, with_head: bool):
    """The same for a checkpoint of an encoder plugin: the timm model its to_timm() gives."""
    from localmim_cli.weights import via_timm

    record = via_timm.plugin_record(weights)
    name = record["encoder"]["name"]
    if weights.pretrained_encoder:
        model = via_timm.pretrained_timm(weights)
    else:
        model = via_timm.finetuned_from_weights(weights, num_classes)
    arch, args = via_timm.timm_identity(model, name)
    model_args = {**args, "num_classes": num_classes}
    config = config_for(weights, arch, model_args, num_classes)
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    config["num_features"] = int(model.num_features)
    size = record["img_size"]
    config["pretrained_cfg"].update(input_size=[3, size, size], first_conv=cfg.get("first_conv"), classifier=cfg.get("classifier", "head"))
    ours = config["localmim"]
    del ours["shape"]
    ours.update(encoder_plugin=record, via=via_timm.VIA,
                features=f"the {name!r} encoder plugin's forward_features (its to_timm() model's pre-logits)"
                         if weights.pretrained_encoder else _FEATURES["pool_then_norm"])
    return model.eval(), arch, model_args, config, via_timm.describe(record, arch)


def load_call(report: dict[str, Any]) -> str:
    args = ", ".join(f"{k}={v!r}" for k, v in report["model_args"].items())
    return (f"timm.create_model({report['architecture']!r}, pretrained=True, pretrained_cfg_overlay=dict("
            f"file={str(Path(report['out']) / 'model.safetensors')!r}, num_classes={report['num_classes']}), {args})")
