"""Encoder weights from anything a user may point at (what locate.py recognises):

    pretrain run, checkpoint folder, its model.safetensors     meta.json kind "pretrain"
    finetune run or checkpoint                                 meta.json kind "finetune"
    exported encoder folder (`localmim export`)                config.json + model.safetensors
    published .pth / .safetensors file                         authors' LocalMIM ViT layout
                                                               (blocks.N, norm.K, decoder.K.*),
                                                               MAE's (norm.*, decoder_*), or the
                                                               authors' LocalMIM Swin layout

What they make is an `EncoderWeights` (encoder_weights.py). For a ViT, `EncoderWeights.state` uses timm's VisionTransformer names: patch_embed.*, cls_token,
pos_embed, blocks.N.*, and where the source has one, the norm the features go through: `norm.*`
(per token before pooling: a pretrained encoder's last tap norm, or MAE's final norm) or
`fc_norm.*` (after pooling: a fine-tuned model), plus `head.*` for a fine-tuned model.
Decoders, the other tap norms and HOG constants are pretraining-only and dropped here. Other
encoders (plugins, the published Swin) keep their own encoder's names; via_timm.py takes them on.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from localmim_cli.errors import CheckpointError, ModelError
from localmim_cli.weights.encoder_weights import EncoderWeights, Pooling, ViTShape
from localmim_cli.weights.loading import load_exactly
from localmim_cli.weights.locate import CheckpointFolder, ExportFolder, TensorFile, locate, without_meta

if TYPE_CHECKING:
    from localmim_cli.engine.checkpoints import Checkpoint


# ---------------------------------------------------------------------------------------------
# Loading


def load_encoder_weights(path: Path | str) -> EncoderWeights:
    """Read any supported source; raises CheckpointError naming the path and what is wrong."""
    from localmim_cli.engine import checkpoints

    found = locate(path)
    if isinstance(found, ExportFolder):
        return _from_export(found.folder)
    if isinstance(found, CheckpointFolder):
        ckpt = checkpoints.load(found.folder)
        if found.kind == "pretrain":
            return _from_pretrain(found, ckpt)
        if found.kind == "finetune":
            return _from_finetune(found, ckpt)
        raise CheckpointError(f"{found.folder}: checkpoint kind {found.kind!r} is not one this command reads "
                              "(pretrain or finetune)")
    if found.layout == "localmim_swin":
        return _from_published_swin(found)
    if found.layout == "ours":
        raise without_meta(found.path)
    return _from_published_vit(found)


def _from_pretrain(found: CheckpointFolder, ckpt: "Checkpoint") -> EncoderWeights:
    from localmim_cli.config.schema import ModelSettings

    try:
        model_settings = ModelSettings.model_validate(ckpt.meta["settings"]["model"])
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path}: its meta.json has no usable model settings ({exc})") from None
    state = ckpt.model_state()
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    name = model_settings.encoder.name
    weights_shape = None
    if name == "vit":
        from localmim_cli.encoders.vit import ViTOptions, default_vit_taps
        options = ViTOptions.model_validate(model_settings.encoder.options)
        weights_shape = ViTShape(model_settings.img_size, options.patch_size, options.embed_dim, options.depth,
                                 options.num_heads, options.mlp_ratio, options.qkv_bias)
        taps = list(ckpt.meta.get("tap_layers") or model_settings.taps or default_vit_taps(options.depth))
        encoder = _keep_last_tap_norm(encoder, taps, options.depth)
    pooling: Pooling = "norm_then_pool" if "norm.weight" in encoder else "pool"
    return EncoderWeights("pretrain", found.path, weights_shape or _unknown_shape(), encoder, pooling,
                          run_dir=found.run_dir, model_file=ckpt.model_file, meta=ckpt.meta,
                          encoder_name=name)


def _unknown_shape(img_size: int = 0) -> ViTShape:
    return ViTShape(img_size, 0, 0, 0, 0)


def _keep_last_tap_norm(encoder: dict[str, torch.Tensor], taps: list[int], depth: int) -> dict[str, torch.Tensor]:
    """tap_norms.K -> norm.* for the last tap when it sits on the last layer; others dropped."""
    out = {k: v for k, v in encoder.items() if not k.startswith("tap_norms.")}
    if taps and taps[-1] == depth:
        last = len(taps) - 1
        for part in ("weight", "bias"):
            key = f"tap_norms.{last}.{part}"
            if key in encoder:
                out[f"norm.{part}"] = encoder[key]
    return out


def _from_finetune(found: CheckpointFolder, ckpt: "Checkpoint") -> EncoderWeights:
    timm_meta = ckpt.meta.get("timm") or {}
    plugin = timm_meta.get("plugin")
    if plugin:   # built via an encoder plugin's to_timm(): no ViT shape, the image size only
        return EncoderWeights("finetune", found.path, _unknown_shape(int(plugin["img_size"])), ckpt.model_state(),
                              "pool_then_norm", classes=list(ckpt.meta.get("classes") or []),
                              run_dir=found.run_dir, model_file=ckpt.model_file, meta=ckpt.meta,
                              encoder_name=plugin["encoder"]["name"])
    try:
        shape = ViTShape(**timm_meta["shape"])
    except Exception as exc:
        raise CheckpointError(f"{ckpt.path}: its meta.json does not describe the model ({exc})") from None
    return EncoderWeights("finetune", found.path, shape, ckpt.model_state(), "pool_then_norm",
                          classes=list(ckpt.meta.get("classes") or []), run_dir=found.run_dir,
                          model_file=ckpt.model_file, meta=ckpt.meta)


def _from_export(folder: Path) -> EncoderWeights:
    from localmim_cli.weights.loading import read_safetensors

    try:
        config = json.loads((folder / "config.json").read_text())
    except ValueError as exc:
        raise CheckpointError(f"{folder / 'config.json'}: not valid JSON ({exc})") from None
    ours = config.get("localmim") or {}
    args = config.get("model_args") or {}
    try:
        shape = ViTShape(**ours["shape"]) if "shape" in ours else ViTShape(
            _side(args["img_size"]), int(args["patch_size"]), int(args["embed_dim"]), int(args["depth"]),
            int(args["num_heads"]), float(args.get("mlp_ratio", 4.0)), bool(args.get("qkv_bias", True)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{folder / 'config.json'}: not a ViT export this program can read "
                              f"(missing {exc})") from None
    state = read_safetensors(folder / "model.safetensors")
    pooling: Pooling = ("pool_then_norm" if "fc_norm.weight" in state
                        else "norm_then_pool" if "norm.weight" in state else "pool")
    classes = config.get("label_names") if "head.weight" in state else None
    return EncoderWeights("export", folder, shape, state, pooling, classes=classes,
                          model_file=folder / "model.safetensors", meta=config)


def _side(size: Any) -> int:
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            raise ValueError(f"square images only, got {size}")
        return int(size[0])
    return int(size)


def _from_published_vit(found: TensorFile) -> EncoderWeights:
    """A published LocalMIM or MAE ViT (or any ViT in timm's names): the encoder and its norm."""
    from localmim_cli.weights.published import published_vit_dims

    state, args = found.state, found.args
    vit = published_vit_dims(state, args, found.path)
    shape = ViTShape(vit.img_size, vit.patch_size, vit.embed_dim, vit.depth, vit.num_heads, vit.mlp_ratio,
                     vit.qkv_bias)
    encoder = {k: v for k, v in state.items()
               if k in ("cls_token", "pos_embed") or k.startswith(("patch_embed.", "blocks."))}
    if vit.taps:   # LocalMIM: one norm per tap; the last one is the features' norm if on the last layer
        if vit.taps[-1] == vit.depth:
            last = len(vit.taps) - 1
            encoder["norm.weight"], encoder["norm.bias"] = state[f"norm.{last}.weight"], state[f"norm.{last}.bias"]
    elif "norm.weight" in state:   # MAE: the encoder's final norm
        encoder["norm.weight"], encoder["norm.bias"] = state["norm.weight"], state["norm.bias"]
    pooling: Pooling = "norm_then_pool" if "norm.weight" in encoder else "pool"
    return EncoderWeights("published", found.path, shape, encoder, pooling, model_file=found.path,
                          meta={"args": _jsonable_args(args), "heads_guessed": vit.heads_guessed})


def _from_published_swin(found: TensorFile) -> EncoderWeights:
    """A published LocalMIM Swin: our swin encoder's weights, with the settings read off the file
    (as a pretrain checkpoint of the swin encoder plugin, which via_timm.py takes on)."""
    from localmim_cli.weights.published_swin import from_published_swin, settings_from_published_swin

    settings = settings_from_published_swin(found.state, found.args, str(found.path))
    try:
        ours = from_published_swin(found.state)
    except CheckpointError as exc:
        raise CheckpointError(f"{found.path}: {exc}") from None
    encoder = {k[len("encoder."):]: v for k, v in ours.items() if k.startswith("encoder.")}
    meta = {"settings": {"model": settings.model_dump(mode="json")}, "tap_layers": settings.taps,
            "args": _jsonable_args(found.args)}
    return EncoderWeights("published", found.path, _unknown_shape(settings.img_size), encoder, "norm_then_pool",
                          model_file=found.path, meta=meta, encoder_name="swin")


def _jsonable_args(args: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in args.items() if _jsonable(v)}


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Building timm models from weights


def require_vit(weights: EncoderWeights, what: str) -> None:
    if weights.encoder_name != "vit" or weights.shape.depth == 0:
        raise CheckpointError(f"{weights.source}: {what} supports ViT encoders; this checkpoint was "
                              f"pretrained with the {weights.encoder_name!r} encoder")


def arch_shape(arch: str, img_size: int | None = None) -> ViTShape:
    """The shape timm gives a named architecture, read off a model built on the meta device."""
    import timm

    if not timm.is_model(arch):
        import difflib
        close = difflib.get_close_matches(arch, timm.list_models("vit_*"), n=3)
        raise ModelError(f"model.arch {arch!r} is not a timm architecture"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    if not hasattr(model, "blocks") or not hasattr(model, "patch_embed"):
        raise ModelError(f"model.arch {arch!r} is not a plain ViT (no blocks / patch_embed)")
    block = model.blocks[0]
    return ViTShape(img_size or model.patch_embed.img_size[0], model.patch_embed.patch_size[0],
                    model.embed_dim, len(model.blocks), block.attn.num_heads,
                    block.mlp.fc1.out_features / model.embed_dim, block.attn.qkv.bias is not None)


def check_arch(weights: EncoderWeights, arch: str | None, where: str = "model.arch") -> None:
    """Refuse a checkpoint whose architecture is not the one asked for, saying both."""
    if not arch:
        return
    wanted = arch_shape(arch, weights.shape.img_size)
    if not wanted.same_architecture(weights.shape):
        raise CheckpointError(
            f"{weights.source} is a {weights.shape.describe()}, but {where} asks for {arch} "
            f"({wanted.describe()}); use a preset or checkpoint that match, or --set model.arch=null "
            "to take the checkpoint's architecture")


def create_vit(shape: ViTShape, *, num_classes: int = 0, pooling: Pooling = "pool_then_norm",
               drop_path: float = 0.0, arch: str | None = None):
    """A timm VisionTransformer of this shape with average pooling.

    pooling: "pool_then_norm" is the published fine-tuning model (avg pool, then a new fc_norm);
    "norm_then_pool" puts the norm on every token before pooling (a pretrained encoder's
    features); "pool" has no norm after the blocks.
    """
    import timm

    extra: dict[str, Any] = {}
    if pooling == "norm_then_pool":
        extra["fc_norm"] = False
    elif pooling == "pool":
        extra["final_norm"] = False
    return timm.create_model(arch or shape.arch, pretrained=False, num_classes=num_classes,
                             global_pool="avg", drop_path_rate=drop_path, **shape.timm_kwargs(), **extra)


def timm_model_args(shape: ViTShape, pooling: Pooling, num_classes: int) -> dict[str, Any]:
    """The create_model keyword arguments that rebuild `create_vit(...)` (JSON-ready)."""
    args: dict[str, Any] = {"num_classes": num_classes, "global_pool": "avg", **shape.timm_kwargs()}
    if pooling == "norm_then_pool":
        args["fc_norm"] = False
    elif pooling == "pool":
        args["final_norm"] = False
    return args


def fit_positions(state: dict[str, torch.Tensor], shape: ViTShape, img_size: int) -> dict[str, torch.Tensor]:
    """Resample pos_embed from the checkpoint's grid to img_size's (bicubic, cls slot kept)."""
    if img_size == shape.img_size or "pos_embed" not in state:
        return state
    from timm.layers import resample_abs_pos_embed

    if img_size % shape.patch_size:
        raise ModelError(f"image size {img_size} is not divisible by the checkpoint's patch size "
                         f"{shape.patch_size}")
    side = img_size // shape.patch_size
    old = shape.img_size // shape.patch_size
    out = dict(state)
    out["pos_embed"] = resample_abs_pos_embed(state["pos_embed"], new_size=[side, side],
                                              old_size=[old, old], num_prefix_tokens=1)
    return out


def reference_feature_model(weights: EncoderWeights, img_size: int | None = None) -> torch.nn.Module:
    """A module mapping images (B, 3, H, W) to the checkpoint's features (B, C), in eval mode.

    A pretrained encoder's features come from our own encoder (MaskedEncoder.forward_features:
    patch tokens after all blocks, through the last tap norm when the last tap is the last layer,
    averaged). Other checkpoints' come from timm: `forward_head(x, pre_logits=True)`, the pooled
    and normed pre-logits of a fine-tuned model.
    """
    if weights.pretrained_encoder:
        return _PretrainFeatures(weights, img_size).eval()
    from localmim_cli.weights import via_timm
    if via_timm.is_plugin_checkpoint(weights):
        _native_size_only(weights, img_size)
        return _TimmFeatures(via_timm.finetuned_from_weights(weights, 0)).eval()
    require_vit(weights, "feature extraction")
    size = img_size or weights.shape.img_size
    model = create_vit(dataclasses.replace(weights.shape, img_size=size), num_classes=0,
                       pooling=weights.pooling)
    state = {k: v for k, v in fit_positions(weights.state, weights.shape, size).items()
             if not k.startswith("head.")}
    load_exactly(model, state, weights.file)
    return _TimmFeatures(model).eval()


def _native_size_only(weights: EncoderWeights, img_size: int | None) -> None:
    if img_size and img_size != weights.shape.img_size:
        raise ModelError(f"img_size {img_size}: a model built by the {weights.encoder_name!r} encoder plugin "
                         f"runs at its own size {weights.shape.img_size}; leave img_size unset")


def classifier_model(weights: EncoderWeights, img_size: int) -> torch.nn.Module:
    """A fine-tuned checkpoint's whole model (head included) at img_size, for scoring."""
    from localmim_cli.weights import via_timm
    if via_timm.is_plugin_checkpoint(weights):
        _native_size_only(weights, img_size)
        return via_timm.finetuned_from_weights(weights)
    shape = dataclasses.replace(weights.shape, img_size=img_size)
    model = create_vit(shape, num_classes=len(weights.classes or []), pooling=weights.pooling)
    load_exactly(model, fit_positions(weights.state, weights.shape, img_size), weights.file)
    return model


class _TimmFeatures(torch.nn.Module):
    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True)


class _PretrainFeatures(torch.nn.Module):
    """A pretraining encoder built as its settings say, with its weights: forward_features."""

    def __init__(self, weights: EncoderWeights, img_size: int | None):
        super().__init__()
        from localmim_cli.model.build import build_model
        from localmim_cli.config.schema import ModelSettings

        settings = ModelSettings.model_validate(weights.meta["settings"]["model"])
        if img_size and img_size != settings.img_size:
            raise ModelError(f"img_size {img_size}: features of a pretrained encoder are taken at its "
                             f"pretraining size {settings.img_size}; leave img_size unset")
        self.encoder = build_model(settings).encoder
        load_exactly(self.encoder, _own_encoder_state(weights), weights.file)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder.forward_features(images)


def _own_encoder_state(weights: EncoderWeights) -> dict[str, torch.Tensor]:
    """The encoder's weights in its own names: a ViT's state went to timm's names (tap norms
    dropped), so its file is read again; other encoders keep theirs."""
    if weights.encoder_name != "vit":
        return weights.state
    from localmim_cli.weights.loading import read_safetensors
    state = read_safetensors(weights.model_file)
    return {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
