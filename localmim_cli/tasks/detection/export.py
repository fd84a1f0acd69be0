"""`localmim export SOURCE --format detectron2|mmdet`: the encoder in the key layout the detection
ecosystem's backbones load, checked name by name and shape by shape against their definitions.

    ViT   detectron2  {"model": {"backbone.net.<name>": tensor}}   detectron2's ViTDet `ViT`
                      (projects/ViTDet, configs/common/models/mask_rcnn_vitdet.py), loaded by
                      train.init_checkpoint without matching heuristics
          mmdet       {"model": {"<name>": tensor}}                 mmdetection's projects/ViTDet `ViT`,
                      loaded by its init_cfg=dict(type="Pretrained", checkpoint=...)
    Swin  detectron2  {"model": {"backbone.bottom_up.<name>": ...}} detectron2's `SwinTransformer`
                      (the original Swin layout, output norms norm0..norm3)
          mmdet       {"state_dict": {"<name>": tensor}}            the original Swin layout, which
                      mmdetection's `SwinTransformer` loads with convert_weights=True (its configs'
                      setting for Swin checkpoints)

ViTDet's ViT has the pretrained ViT's names (patch_embed.proj, pos_embed at the pretraining grid
with its cls slot, blocks.N.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}) plus a relative
position table per block (attn.rel_pos_h / rel_pos_w), which a pretrained encoder lacks: those
the frameworks start at zero, as localmim does; a detection run's own are exported. The cls token
and the final norm have no place there. A Swin's timm weights go back to the original layout (a
stage's patch merging at the end of the stage before, relative_position_index included).

The file is a torch.save of tensors only (what detectron2's and mmdetection's checkpoint loaders
read; `torch.load(..., weights_only=True)` opens it), beside config.json with our "localmim" block
(the source, the format, the backbone settings the loading config needs).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from localmim_cli.errors import ExportError

FORMATS = ("detectron2", "mmdet")
FILES = {"detectron2": "model_final.pth", "mmdet": "backbone.pth"}


# ---------------------------------------------------------------------------------------------
# The backbones as published: parameter (and persistent buffer) names and shapes


def vitdet_layout(embed_dim: int, depth: int, num_heads: int, patch: int, mlp_ratio: float, pretrain_img_size: int,
                  img_size: int = 1024, window_size: int = 14, window_blocks: list[int] | None = None,
                  use_rel_pos: bool = True) -> dict[str, tuple[int, ...]]:
    """detectron2's (and mmdetection's ViTDet project's) `ViT(...)` state dict: names -> shapes.
    window_blocks: 0-indexed, as ViTDet's window_block_indexes (default: all but every 4th)."""
    if window_blocks is None:
        window_blocks = [i for i in range(depth) if (i + 1) % max(depth // 4, 1)]
    grid, hidden, head_dim = img_size // patch, int(embed_dim * mlp_ratio), embed_dim // num_heads
    out: dict[str, tuple[int, ...]] = {"pos_embed": (1, (pretrain_img_size // patch) ** 2 + 1, embed_dim),
                                       "patch_embed.proj.weight": (embed_dim, 3, patch, patch),
                                       "patch_embed.proj.bias": (embed_dim,)}
    for i in range(depth):
        b = f"blocks.{i}."
        size = window_size if i in window_blocks else grid
        out.update({b + "norm1.weight": (embed_dim,), b + "norm1.bias": (embed_dim,),
                    b + "attn.qkv.weight": (3 * embed_dim, embed_dim), b + "attn.qkv.bias": (3 * embed_dim,),
                    b + "attn.proj.weight": (embed_dim, embed_dim), b + "attn.proj.bias": (embed_dim,),
                    b + "norm2.weight": (embed_dim,), b + "norm2.bias": (embed_dim,),
                    b + "mlp.fc1.weight": (hidden, embed_dim), b + "mlp.fc1.bias": (hidden,),
                    b + "mlp.fc2.weight": (embed_dim, hidden), b + "mlp.fc2.bias": (embed_dim,)})
        if use_rel_pos:
            out[b + "attn.rel_pos_h"] = out[b + "attn.rel_pos_w"] = (2 * size - 1, head_dim)
    return out


def swin_layout(embed_dim: int, depths: list[int], num_heads: list[int], window_size: int, patch: int = 4,
                mlp_ratio: float = 4.0, out_norms: bool = False) -> dict[str, tuple[int, ...]]:
    """The original Swin Transformer's state dict (detectron2's `SwinTransformer` keeps it, with
    an output norm norm{i} per stage): names -> shapes."""
    out: dict[str, tuple[int, ...]] = {"patch_embed.proj.weight": (embed_dim, 3, patch, patch),
                                       "patch_embed.proj.bias": (embed_dim,),
                                       "patch_embed.norm.weight": (embed_dim,), "patch_embed.norm.bias": (embed_dim,)}
    for i, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** i
        hidden = int(dim * mlp_ratio)
        for j in range(depth):
            b = f"layers.{i}.blocks.{j}."
            out.update({b + "norm1.weight": (dim,), b + "norm1.bias": (dim,),
                        b + "attn.relative_position_bias_table": ((2 * window_size - 1) ** 2, heads),
                        b + "attn.relative_position_index": (window_size ** 2, window_size ** 2),
                        b + "attn.qkv.weight": (3 * dim, dim), b + "attn.qkv.bias": (3 * dim,),
                        b + "attn.proj.weight": (dim, dim), b + "attn.proj.bias": (dim,),
                        b + "norm2.weight": (dim,), b + "norm2.bias": (dim,),
                        b + "mlp.fc1.weight": (hidden, dim), b + "mlp.fc1.bias": (hidden,),
                        b + "mlp.fc2.weight": (dim, hidden), b + "mlp.fc2.bias": (dim,)})
        if i < len(depths) - 1:
            d = f"layers.{i}.downsample."
            out.update({d + "reduction.weight": (2 * dim, 4 * dim), d + "norm.weight": (4 * dim,),
                        d + "norm.bias": (4 * dim,)})
        if out_norms:
            out[f"norm{i}.weight"] = out[f"norm{i}.bias"] = (dim,)
    return out


# ---------------------------------------------------------------------------------------------
# From what a user points at


def _vit_state(source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(ViTDet-named tensors, what the loading config needs) of a ViT source: any --init source
    or a detection run of a ViT."""
    meta = _detection_meta(source)
    if meta is not None:
        state, settings = meta["state"], meta["settings"]
        prefix = "backbone.pyramid.encoder."
        encoder = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        vit = meta["spec"]["vit"]
        blocks = [b for b in range(vit["depth"]) if not _is_global(b, settings["model"], vit["depth"])]
        config = {"embed_dim": vit["embed_dim"], "depth": vit["depth"], "num_heads": vit["num_heads"],
                  "patch_size": vit["patch_size"], "mlp_ratio": vit["mlp_ratio"],
                  "pretrain_img_size": vit["img_size"], "img_size": meta["spec"]["img_size"],
                  "window_size": settings["model"]["window_size"], "window_block_indexes": blocks,
                  "use_rel_pos": settings["model"]["rel_pos"]}
        return encoder, config
    from localmim_cli.weights.sources import load_encoder_weights, require_vit

    weights = load_encoder_weights(source)
    require_vit(weights, "--format detectron2 / mmdet")
    shape = weights.shape
    encoder = {k: v for k, v in weights.encoder_state().items() if k != "cls_token"}
    config = {"embed_dim": shape.embed_dim, "depth": shape.depth, "num_heads": shape.num_heads,
              "patch_size": shape.patch_size, "mlp_ratio": shape.mlp_ratio, "pretrain_img_size": shape.img_size,
              "img_size": 1024, "window_size": 14,
              "window_block_indexes": [i for i in range(shape.depth) if (i + 1) % max(shape.depth // 4, 1)],
              "use_rel_pos": True}
    return encoder, config


def _is_global(block: int, model: dict[str, Any], depth: int) -> bool:
    from localmim_cli.model.simple_pyramid import default_global_blocks
    chosen = model.get("global_blocks") or default_global_blocks(depth)
    return block + 1 in chosen or not model.get("window_size")


def _detection_meta(source: Path) -> dict[str, Any] | None:
    """A detection checkpoint's weights, settings and pyramid spec, or None for other sources."""
    from localmim_cli.engine import checkpoints
    from localmim_cli.errors import CheckpointError
    from localmim_cli.weights.locate import CheckpointFolder, locate

    try:
        found = locate(source)
    except CheckpointError:
        raise
    if not isinstance(found, CheckpointFolder) or found.kind != "detection":
        return None
    ckpt = checkpoints.load(found.folder)
    return {"state": ckpt.model_state(), "settings": ckpt.meta["settings"], "spec": ckpt.meta["detector"]["pyramid"]}


def _swin_state(source: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors in the original Swin layout, its shape) from a Swin source: a pretrain run of the
    swin encoder, a published LocalMIM Swin, or a detection run of one."""
    import timm

    meta = _detection_meta(source)
    norms: dict[str, Any] = {}
    if meta is not None:
        from localmim_cli.model.feature_pyramid import _stage_model
        spec = meta["spec"]
        model = _stage_model(spec["timm"], spec["img_size"], 0.0)
        own = {k[len("backbone.pyramid.encoder."):]: v for k, v in meta["state"].items()
               if k.startswith("backbone.pyramid.encoder.")}
        model.load_state_dict(own, strict=False)
        for k, v in meta["state"].items():
            if m := re.fullmatch(r"backbone\.pyramid\.norms\.(\d)\.(weight|bias)", k):
                norms[f"norm{m.group(1)}.{m.group(2)}"] = v
    else:
        from localmim_cli.weights import via_timm
        from localmim_cli.weights.sources import load_encoder_weights

        weights = load_encoder_weights(source)
        if weights.encoder_name != "swin" or not weights.pretrained_encoder:
            raise ExportError(f"{source}: --format detectron2 / mmdet takes a ViT or Swin encoder; this is a "
                              f"{weights.kind} checkpoint of the {weights.encoder_name!r} encoder")
        model = via_timm.pretrained_timm(weights)
    if not isinstance(model, timm.models.swin_transformer.SwinTransformer):
        raise ExportError(f"{source}: not a Swin Transformer ({type(model).__name__})")
    state: dict[str, Any] = {}
    for name, value in model.state_dict().items():
        if name.startswith(("head.", "norm.")):
            continue
        if m := re.match(r"layers\.(\d+)\.downsample\.(.*)", name):   # timm: at the start of the next stage
            name = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
        state[name] = value
    for name, module in model.named_modules():
        if hasattr(module, "relative_position_index") and name.endswith("attn"):
            state[f"{name}.relative_position_index"] = module.relative_position_index
    state.update(norms)
    layers = model.layers
    config = {"embed_dim": int(model.embed_dim if isinstance(model.embed_dim, int) else model.embed_dim[0]),
              "depths": [len(s.blocks) for s in layers], "num_heads": [s.blocks[0].attn.num_heads for s in layers],
              "window_size": int(layers[0].blocks[0].window_size[0]),
              "patch_size": int(model.patch_embed.patch_size[0]),
              "mlp_ratio": layers[0].blocks[0].mlp.fc1.out_features / layers[0].blocks[0].mlp.fc1.in_features}
    return state, config


def check_layout(state: dict[str, Any], expected: dict[str, tuple[int, ...]], what: str) -> list[str]:
    """Every tensor has its name and shape in the published definition (ExportError otherwise);
    returns the definition's names the export does not provide (what the framework initialises)."""
    wrong = [f"{k} {tuple(v.shape)}" + (f" (published {expected[k]})" if k in expected else " (no such name)")
             for k, v in state.items() if expected.get(k) != tuple(v.shape)]
    if wrong:
        raise ExportError(f"the export does not fit {what}: {'; '.join(wrong[:4])}"
                          f"{' ...' if len(wrong) > 4 else ''}; nothing was written")
    return sorted(k for k in expected if k not in state)


def export_backbone(source: Path, out: Path, fmt: str, overwrite: bool = False) -> dict[str, Any]:
    """Write SOURCE's encoder in `fmt`'s layout into the folder `out`, checked; returns a report."""
    import torch

    from localmim_cli.engine import atomic, outputs
    from localmim_cli.version import __version__

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: choose timm, {' or '.join(FORMATS)}")
    out = Path(out)
    outputs.check_folder(out, outputs.EXPORT, overwrite, reads=[source])
    kind, state, config = _read(source)
    if kind == "vit":
        expected = vitdet_layout(config["embed_dim"], config["depth"], config["num_heads"], config["patch_size"],
                                 config["mlp_ratio"], config["pretrain_img_size"], config["img_size"],
                                 config["window_size"], config["window_block_indexes"], config["use_rel_pos"])
        what = "ViTDet's ViT backbone"
        prefix, wrapper = ("backbone.net.", "model") if fmt == "detectron2" else ("", "model")
    else:
        expected = swin_layout(config["embed_dim"], config["depths"], config["num_heads"], config["window_size"],
                               config["patch_size"], config["mlp_ratio"], out_norms=fmt == "detectron2")
        what = "the Swin Transformer backbone (original layout)"
        prefix, wrapper = ("backbone.bottom_up.", "model") if fmt == "detectron2" else ("", "state_dict")
    initialised = check_layout(state, expected, what)
    tensors = {prefix + k: v.detach().contiguous().clone() for k, v in state.items()}
    record = {"version": __version__, "source": str(source), "format": fmt, "backbone": kind, "file": FILES[fmt],
              "key": wrapper, "prefix": prefix, "tensors": len(tensors), "backbone_settings": config,
              "initialised_by_the_framework": initialised}

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        torch.save({wrapper: tensors}, tmp / FILES[fmt])
        reread = torch.load(tmp / FILES[fmt], map_location="cpu", weights_only=True)[wrapper]
        if reread.keys() != tensors.keys() or any(not torch.equal(reread[k], tensors[k]) for k in tensors):
            raise ExportError(f"{tmp / FILES[fmt]}: does not read back as written; nothing was written")
        atomic.write_json(tmp / "config.json", {"localmim": record})
        outputs.check_folder(out, outputs.EXPORT, overwrite, reads=[source])
        if out.is_dir():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {**record, "out": str(out), "path": str(out / FILES[fmt])}


def _read(source: Path) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """("vit" or "swin", tensors in the published names, backbone settings)."""
    meta = _detection_meta(source)
    if meta is not None:
        kind = "vit" if meta["spec"]["kind"] in ("vit", "vit_simple") else "swin"
    else:
        from localmim_cli.weights.sources import load_encoder_weights
        weights = load_encoder_weights(source)
        kind = "vit" if weights.encoder_name == "vit" else "swin"
    state, config = _vit_state(source) if kind == "vit" else _swin_state(source)
    return kind, state, config


def load_lines(report: dict[str, Any]) -> list[str]:
    """How the frameworks load the file (config lines), for the command's output."""
    c, path = report["backbone_settings"], report["path"]
    if report["backbone"] == "vit":
        net = (f"embed_dim={c['embed_dim']}, depth={c['depth']}, num_heads={c['num_heads']}, "
               f"patch_size={c['patch_size']}, pretrain_img_size={c['pretrain_img_size']}, "
               f"window_size={c['window_size']}, window_block_indexes={c['window_block_indexes']}")
        if report["format"] == "detectron2":
            return [f"train.init_checkpoint = {path!r}", f"model.backbone.net: {net}"]
        return [f"backbone=dict(type='ViT', {net}, init_cfg=dict(type='Pretrained', checkpoint={path!r}))"]
    swin = f"embed_dim={c['embed_dim']}, depths={c['depths']}, num_heads={c['num_heads']}, window_size={c['window_size']}"
    if report["format"] == "detectron2":
        return [f"train.init_checkpoint = {path!r}", f"model.backbone.bottom_up: SwinTransformer({swin})"]
    return [f"backbone=dict(type='SwinTransformer', embed_dims={c['embed_dim']}, depths={c['depths']}, "
            f"num_heads={c['num_heads']}, window_size={c['window_size']}, convert_weights=True, "
            f"init_cfg=dict(type='Pretrained', checkpoint={path!r}))"]
