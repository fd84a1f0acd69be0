"""Multi-scale features from a pretrained encoder: four levels at strides 4, 8, 16 and 32 px,
what a dense head (segmentation's UperNet, detection's FPN) takes.

    images (B, 3, H, W) -> [(B, C1, H/4, W/4), (B, C2, H/8, W/8), (B, C3, H/16, W/16), (B, C4, H/32, W/32)]

Two backbones, as the published dense-transfer code builds them:

- `ViTPyramid`: the ViT as BEiT's segmentation backbone (timm's `Beit`): absolute position
  embeddings resampled to the crop, a new relative position bias per block (zero at the start)
  and layer scale starting at 1.0, so at the start it computes exactly the pretrained ViT
  function. Four taps (after blocks 2, 4, L-2, L: the published `out_indices [1, 3, 9, 11]` for
  12 blocks, the same blocks LocalMIM pretrains with decoders) of stride `patch` are brought
  to strides 4..32 by BEiT's pyramid: with 16-px patches fpn1 = ConvT-BN-GELU-ConvT (x4),
  fpn2 = ConvT (x2), fpn3 = identity, fpn4 = 2x2 max pool; with 8-px patches BEiT's own
  variant (ConvT, identity, max pool 2, max pool 4); other powers of two alike. (The pool is
  BEiT's `nn.MaxPool2d`; the pretraining decoders' x0.5 head is the one that average-pools.)
- `StagePyramid`: a hierarchical encoder's stages through timm (`forward_intermediates`): the
  Swin encoder as fine-tuning builds it (via `to_timm()`), rebuilt for the crop size, each
  stage's output behind a new LayerNorm (the published Swin segmentation backbone's
  `norm0..norm3`).

- `SimplePyramid` (model/simple_pyramid.py): the ViT as ViTDet's detection backbone, window
  attention with a few global blocks, and a simple pyramid from the last block alone.

All expose `feature_info` as timm's `features_only` models do (`.channels()`, `.reduction()`),
so torchvision's `FeaturePyramidNetwork` or a detector can take the levels as they are, and
`layer_of(name)` / `num_layers` for layer-wise lr decay. `pyramid_from_weights` builds either
from what `weights.sources.load_encoder_weights` read and names, in a `LoadReport`, every
weight it loaded and every new part.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional as F

from localmim_cli.errors import CheckpointError, ModelError
from localmim_cli.model.levels import STRIDES, LoadReport, feature_info

if TYPE_CHECKING:
    from localmim_cli.weights.encoder_weights import EncoderWeights, ViTShape



def default_vit_taps(depth: int) -> list[int]:
    """1-indexed blocks 2, 4, L-2, L: the published [1, 3, 9, 11] for 12 blocks (BEiT's
    out_indices, which are LocalMIM's pretraining taps), and for a 24-block ViT-L 2, 4, 22, 24,
    the blocks its pretraining tapped (BEiT-L spreads them: [7, 11, 15, 23]). Below 7 blocks,
    where those collide, the quarters: ceil(L/4), ceil(L/2), ceil(3L/4), L (4 blocks: 1-4)."""
    if depth < 4:
        raise ModelError(f"a ViT of {depth} blocks cannot feed four pyramid levels; it needs 4 or more")
    if depth >= 7:
        return [2, 4, depth - 2, depth]
    return [math.ceil(depth * k / 4) for k in (1, 2, 3, 4)]


def resize_positions(pos_embed: torch.Tensor, old_grid: int, new_grid: int) -> torch.Tensor:
    """(1, 1 + old^2, C) -> (1, 1 + new^2, C): the patch positions resampled bicubically (no
    antialiasing), the cls slot kept, as BEiT's segmentation checkpoint loader does."""
    if old_grid == new_grid:
        return pos_embed
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    grid = grid.reshape(1, old_grid, old_grid, -1).permute(0, 3, 1, 2)            # (1, C, old, old)
    grid = F.interpolate(grid.float(), size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, -1).to(pos_embed.dtype)
    return torch.cat([cls, grid], dim=1)


def rescale_op(channels: int, factor: float) -> nn.Module:
    """One level of BEiT's pyramid: x2^k by k transposed convolutions (BatchNorm and GELU
    between them), identity, or /2^k by a 2^k max pool."""
    if factor == 1:
        return nn.Identity()
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k)
    layers: list[nn.Module] = []
    for i in range(round(math.log2(factor))):
        if i:
            layers += [nn.BatchNorm2d(channels), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels, kernel_size=2, stride=2))
    return nn.Sequential(*layers)


class ViTPyramid(nn.Module):
    """A ViT as BEiT's dense backbone, tapped at four blocks and rescaled to strides 4..32."""

    def __init__(self, shape: ViTShape, img_size: int, taps: list[int] | None = None, drop_path: float = 0.0,
                 rel_pos_bias: bool = True, layer_scale: float | None = 1.0):
        super().__init__()
        from timm.models.beit import Beit

        patch = shape.patch_size
        if img_size % patch:
            raise ModelError(f"model.img_size {img_size} is not divisible by the patch size {patch}")
        factors = [patch / s for s in STRIDES]
        if any(f not in (0.125, 0.25, 0.5, 1, 2, 4, 8) for f in factors):
            raise ModelError(f"patch size {patch}: the pyramid needs a power of two from 4 to 32 px "
                             "to reach strides 4, 8, 16 and 32 by transposed convolutions and pooling")
        self.taps = list(taps or default_vit_taps(shape.depth))
        if len(self.taps) != 4 or sorted(set(self.taps)) != self.taps or not 1 <= self.taps[0] <= self.taps[-1] <= shape.depth:
            raise ModelError(f"model.taps {self.taps}: four increasing blocks between 1 and {shape.depth}")
        self.shape, self.img_size = shape, img_size
        self.encoder = Beit(img_size=img_size, patch_size=patch, embed_dim=shape.embed_dim, depth=shape.depth,
                            num_heads=shape.num_heads, mlp_ratio=shape.mlp_ratio, qkv_bias=shape.qkv_bias,
                            drop_path_rate=drop_path, use_abs_pos_emb=True, use_rel_pos_bias=rel_pos_bias,
                            init_values=layer_scale, num_classes=0)
        self.encoder.prune_intermediate_layers([t - 1 for t in self.taps], prune_norm=True, prune_head=True)
        # Beit draws a random table in case it is ever used; the published backbone starts at zero
        # (BEiT: "trunc_normal_ ... commented out"), which keeps the start exactly the ViT.
        for block in self.encoder.blocks:
            if block.attn.relative_position_bias_table is not None:
                nn.init.zeros_(block.attn.relative_position_bias_table)
        self.levels = nn.ModuleList(rescale_op(shape.embed_dim, f) for f in factors)
        self.feature_info = feature_info([shape.embed_dim] * 4, [f"levels.{i}" for i in range(4)])

    @property
    def num_layers(self) -> int:
        """Layer ids for lr decay: 0 = embeddings, 1..L = blocks, L + 1 = everything after."""
        return self.shape.depth + 2

    def layer_of(self, name: str) -> int:
        """BEiT's `get_num_layer_for_vit` on a name relative to this module."""
        if name in ("encoder.cls_token", "encoder.pos_embed") or name.startswith("encoder.patch_embed."):
            return 0
        if m := re.match(r"encoder\.blocks\.(\d+)\.", name):
            return int(m.group(1)) + 1
        return self.num_layers - 1

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        taps = self.encoder.forward_intermediates(images, indices=[t - 1 for t in self.taps],
                                                  intermediates_only=True)   # 4 x (B, C, H/p, W/p)
        return [level(x) for level, x in zip(self.levels, taps)]

    def load_vit(self, weights: EncoderWeights) -> LoadReport:
        """The ViT's weights (timm names, as `EncoderWeights` holds them) into the encoder: the
        qkv bias goes to Beit's q_bias and v_bias (its key bias is fixed at zero: a key bias adds
        the same q.b_k to every logit of a query, which softmax cancels); positions resampled.
        A CheckpointError names the source when anything of the encoder is missing."""
        grid = self.img_size // self.shape.patch_size
        state = dict(weights.encoder_state())
        unused = sorted(k for k in weights.state if k not in state)
        if "pos_embed" in state:
            state["pos_embed"] = resize_positions(state["pos_embed"], weights.shape.img_size // weights.shape.patch_size,
                                                  grid)
        for key in [k for k in state if k.endswith(".attn.qkv.bias")]:
            q, _, v = state.pop(key).chunk(3)
            state[key.replace("qkv.bias", "q_bias")], state[key.replace("qkv.bias", "v_bias")] = q, v
        deeper = max(self.taps)
        for key in [k for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= deeper]:
            unused.append(key)          # blocks above the last tap never run
            del state[key]
        own = self.encoder.state_dict()
        new = [k for k in own if k not in state and not k.endswith("relative_position_index")]
        allowed = ("relative_position_bias_table", "gamma_1", "gamma_2")
        surprise = [k for k in new if not k.endswith(allowed)]
        if surprise or any(k not in own for k in state):
            from localmim_cli.weights.loading import compare
            compare(self.encoder, state, allow_missing=()).raise_if_incomplete(weights.source)
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise CheckpointError(f"{weights.source}: {key} is {tuple(value.shape)}, the model's "
                                      f"{tuple(own[key].shape)}")
        self.encoder.load_state_dict(state, strict=False)
        notes = [f"positions resampled {weights.shape.img_size // weights.shape.patch_size}^2 -> {grid}^2"] \
            if weights.shape.img_size // weights.shape.patch_size != grid else []
        return LoadReport(str(weights.source), sorted(f"encoder.{k}" for k in state),
                          sorted(f"encoder.{k}" for k in new) + self._own_new(), unused, notes)

    def _own_new(self) -> list[str]:
        return [f"levels.{name}" for name, _ in self.levels.named_parameters()]


class StagePyramid(nn.Module):
    """A hierarchical timm model's four stage outputs (strides 4..32), each behind a new
    LayerNorm, as the published Swin segmentation backbone adds one per output."""

    def __init__(self, model: nn.Module, level_norms: bool = True):
        super().__init__()
        info = model.feature_info
        infos = list(info) if not hasattr(info, "get_dicts") else info.get_dicts()
        if [int(i["reduction"]) for i in infos[-4:]] != list(STRIDES):
            raise ModelError(f"the encoder's stages have strides {[i['reduction'] for i in infos]}, not 4, 8, 16, 32")
        self.indices = list(range(len(infos) - 4, len(infos)))
        model.prune_intermediate_layers(self.indices, prune_norm=True, prune_head=True)
        self.encoder = model
        channels = [int(i["num_chs"]) for i in infos[-4:]]
        # nn.LayerNorm's default eps (1e-5), as the published backbone's norm_layer
        self.norms = nn.ModuleList(nn.LayerNorm(c) if level_norms else nn.Identity() for c in channels)
        self.feature_info = feature_info(channels, [f"norms.{i}" for i in range(4)])

    @property
    def num_layers(self) -> int:
        return _swin_block_count(self.encoder) + 2

    def layer_of(self, name: str) -> int:
        """Swin fine-tuning's rule (published `Swin/util/lr_decay.py`): patch embedding 0, block j
        (counted over all stages) j + 1, a patch merging the id of the last block before it,
        everything else num_layers - 1 (scale 1)."""
        if name.startswith("encoder.patch_embed."):
            return 0
        depths = _swin_depths(self.encoder)
        if m := re.match(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.", name):
            return sum(depths[:int(m.group(1))]) + int(m.group(2)) + 1
        if m := re.match(r"encoder\.layers\.(\d+)\.downsample\.", name):
            return sum(depths[:int(m.group(1))])
        return self.num_layers - 1

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        stages = self.encoder.forward_intermediates(images, indices=self.indices, intermediates_only=True)
        # each (B, C, h, w): LayerNorm over channels
        return [norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous() for norm, x in zip(self.norms, stages)]


def _swin_depths(model: nn.Module) -> list[int]:
    layers = getattr(model, "layers", None)
    return [len(stage.blocks) if hasattr(stage, "blocks") else 0 for stage in layers] if layers is not None else []


def _swin_block_count(model: nn.Module) -> int:
    return sum(_swin_depths(model))


# ---------------------------------------------------------------------------------------------
# From a checkpoint


@dataclass(frozen=True)
class PyramidSpec:
    """What builds a pyramid again (checkpoints record it): a ViT's shape, or a timm stage model."""

    kind: str                                   # "vit" (BEiT's), "vit_simple" (ViTDet's) or "stages"
    img_size: int
    vit: dict[str, Any] | None = None           # ViTShape fields
    timm: dict[str, Any] | None = None          # {"architecture", "model_args"} of the stage model
    source: str = ""                            # where the encoder came from (for describe)

    def describe(self) -> str:
        if self.kind in ("vit", "vit_simple"):
            from localmim_cli.weights.encoder_weights import ViTShape
            how = "BEiT pyramid" if self.kind == "vit" else "ViTDet simple pyramid from the last block"
            return ViTShape(**self.vit).describe().rsplit(",", 1)[0] + f", {self.img_size} px crops, " \
                                                                        f"{how} (strides 4-32)"
        return f"timm {self.timm['architecture']} stages, {self.img_size} px crops (strides 4-32)"


def pyramid_spec(weights: EncoderWeights | None, img_size: int, arch: str | None = None,
                 vit: str = "vit") -> PyramidSpec:
    """The pyramid `weights` make at crop `img_size` (checked: ViT patch sizes, arch); without
    weights, model.arch's ViT from scratch. `vit`: the kind a ViT becomes, "vit" (BEiT's
    pyramid from four blocks) or "vit_simple" (ViTDet's from the last)."""
    from localmim_cli.weights import via_timm
    from localmim_cli.weights.sources import arch_shape, check_arch

    if weights is None:
        if not arch:
            raise ModelError("this task needs --init CHECKPOINT (or model.arch to train from scratch)")
        shape = arch_shape(arch)   # positions at timm's size: a random ViTDet keeps a pretraining grid
        if vit == "vit":
            shape = dataclasses.replace(shape, img_size=img_size)
        return PyramidSpec(vit, img_size, vit=dataclasses.asdict(shape), source=f"random {arch}")
    if via_timm.is_plugin_checkpoint(weights):
        if arch:
            raise CheckpointError(f"{weights.source}: model.arch {arch!r} names a ViT, but this is a "
                                  f"{weights.encoder_name!r} encoder; use --set model.arch=null")
        model = _stage_model_from(weights)
        architecture, args = via_timm.timm_identity(model, weights.encoder_name)
        return PyramidSpec("stages", img_size, timm={"architecture": architecture, "model_args": args},
                           source=str(weights.source))
    via_timm_required = weights.encoder_name != "vit" or weights.shape.depth == 0
    if via_timm_required:
        raise CheckpointError(f"{weights.source}: a {weights.encoder_name!r} encoder without to_timm() cannot "
                              "give multi-scale features")
    check_arch(weights, arch)
    if img_size % weights.shape.patch_size:
        raise ModelError(f"model.img_size {img_size} is not divisible by the patch size {weights.shape.patch_size}")
    return PyramidSpec(vit, img_size, vit=dataclasses.asdict(weights.shape), source=str(weights.source))


def build_pyramid(spec: PyramidSpec, *, taps: list[int] | None = None, drop_path: float = 0.0,
                  rel_pos_bias: bool = True, layer_scale: float | None = 1.0, window_size: int = 14,
                  global_blocks: list[int] | None = None, rel_pos: bool = True) -> nn.Module:
    """A pyramid of fresh weights as `spec` says (a resumed run loads its own). taps,
    rel_pos_bias, layer_scale: BEiT's ViT; window_size, global_blocks, rel_pos: ViTDet's."""
    if spec.kind in ("vit", "vit_simple"):
        from localmim_cli.weights.encoder_weights import ViTShape
        if spec.kind == "vit_simple":
            from localmim_cli.model.simple_pyramid import SimplePyramid
            return SimplePyramid(ViTShape(**spec.vit), spec.img_size, window_size, global_blocks, rel_pos, drop_path)
        return ViTPyramid(ViTShape(**spec.vit), spec.img_size, taps, drop_path, rel_pos_bias, layer_scale)
    return StagePyramid(_stage_model(spec.timm, spec.img_size, drop_path))


def _stage_model(record: dict[str, Any], img_size: int, drop_path: float) -> nn.Module:
    """The timm stage model at the crop size with the run's drop path. A Swin takes any input
    size and keeps its pretrained window everywhere, padding a grid the windows do not divide
    (`always_partition`), as the published segmentation backbone does: timm would otherwise
    shrink the window of a stage whose grid is smaller than it."""
    import timm

    args = {**record["model_args"], "img_size": img_size, "drop_path_rate": drop_path}
    try:
        return timm.create_model(record["architecture"], pretrained=False, num_classes=0, strict_img_size=False,
                                 always_partition=True, **args)
    except TypeError:   # not a Swin: its own fixed-size model
        return timm.create_model(record["architecture"], pretrained=False, num_classes=0, **args)


def _stage_model_from(weights: EncoderWeights) -> nn.Module:
    """The encoder plugin's timm model with the checkpoint's weights (pretrained, or a
    fine-tuned classifier without its head)."""
    from localmim_cli.weights import via_timm

    if weights.pretrained_encoder:
        model = via_timm.pretrained_timm(weights)
    else:
        model = via_timm.finetuned_from_weights(weights, 0)
    if not callable(getattr(model, "forward_intermediates", None)) or not hasattr(model, "feature_info"):
        raise CheckpointError(f"{weights.source}: the {weights.encoder_name!r} encoder's timm model has no "
                              "forward_intermediates(), so it cannot give multi-scale features")
    return model


def pyramid_from_weights(spec: PyramidSpec, weights: EncoderWeights | None, **options: Any
                         ) -> tuple[nn.Module, LoadReport]:
    """The pyramid with the checkpoint's encoder weights in; the report names them and the new parts."""
    pyramid = build_pyramid(spec, **options)
    if weights is None:
        return pyramid, LoadReport(spec.source, [], [n for n, _ in pyramid.named_parameters()])
    if hasattr(pyramid, "load_vit"):
        return pyramid, pyramid.load_vit(weights)
    source = {k: v for k, v in _stage_model_from(weights).state_dict().items()
              if not k.startswith(("head.", "norm."))}
    own = pyramid.encoder.state_dict()
    buffers = {name for name, _ in pyramid.encoder.named_buffers()}
    state = {k: v for k, v in source.items() if k in own and k not in buffers}
    missing = [k for k in own if k not in state and k not in buffers]
    odd = [k for k in source if k not in own]
    if missing or odd or any(own[k].shape != v.shape for k, v in state.items()):
        from localmim_cli.weights.loading import compare
        compare(pyramid.encoder, state, allow_missing=tuple(buffers)).raise_if_incomplete(weights.source)
    pyramid.encoder.load_state_dict(state, strict=False)
    unused = [k for k in weights.state if k.startswith("tap_norms.")]
    return pyramid, LoadReport(str(weights.source), sorted(f"encoder.{k}" for k in state),
                               [f"norms.{n}" for n, _ in pyramid.norms.named_parameters()], unused)
