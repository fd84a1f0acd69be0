"""ViTDet's adapter: a plain ViT run at the detection crop, mostly with window attention, and a
simple feature pyramid built from its last block alone (Li et al., "Exploring Plain Vision
Transformer Backbones for Object Detection", ECCV 2022; detectron2's `ViT` and
`SimpleFeaturePyramid`).

    images (B, 3, S, S) -> patches (B, S/p, S/p, C) + positions (resampled from the pretraining grid)
        -> L blocks: window attention (window_size x window_size, padded) in all but the global
           blocks (ViT-B: 3, 6, 9, 12), a decomposed relative position bias (MViTv2's) in each
        -> (B, C, S/p, S/p) -> levels at strides 4, 8, 16, 32:
           x4 ConvT-LN-GELU-ConvT (C/4), x2 ConvT (C/2), identity (C), 2 x 2 max pool (C)

The positions stay a parameter of the pretraining grid (with its cls slot, which is dropped),
resampled bicubically at every forward as detectron2's `get_abs_pos` does, so the encoder's
weights keep the pretrained encoder's shapes and go back to detectron2 or mmdetection as they
are (tasks/detection/export.py). The blocks are timm's SAM blocks (`vision_transformer_sam.Block`:
the same parameters and function as detectron2's ViTDet block); new relative position tables
start at zero, so at the start the encoder computes the pretrained ViT on each window.
With 8-px patches the levels are x2 ConvT, identity, max pools of 2 and 4; other powers of two alike.
"""

from __future__ import annotations

import functools
import math
import re
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from localmim_cli.errors import CheckpointError, ModelError

if TYPE_CHECKING:
    from localmim_cli.weights.encoder_weights import EncoderWeights, ViTShape


def default_global_blocks(depth: int) -> list[int]:
    """1-indexed blocks with global attention: the last of each quarter (ViTDet's 2, 5, 8, 11
    0-indexed for 12 blocks; 6, 12, 18, 24 for 24; 8, 16, 24, 32 for 32)."""
    return sorted({max(1, round(depth * k / 4)) for k in (1, 2, 3, 4)})


def positions_at(pos_embed: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(1, [1 +] g^2, C) -> (1, h, w, C): the cls slot dropped when there is one, the grid
    resampled bicubically (align_corners False), as detectron2's get_abs_pos."""
    n = pos_embed.shape[1]
    side = math.isqrt(n)
    if side * side != n:
        pos_embed, side = pos_embed[:, 1:], math.isqrt(n - 1)
    grid = pos_embed.reshape(1, side, side, -1)
    if (side, side) == tuple(hw):
        return grid
    grid = F.interpolate(grid.permute(0, 3, 1, 2), size=hw, mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1)


class PatchEmbed(nn.Module):
    """(B, 3, H, W) -> (B, H/p, W/p, C): one strided convolution (`proj`, timm's and detectron2's name)."""

    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).permute(0, 2, 3, 1)


class ViTDetEncoder(nn.Module):
    """detectron2's ViTDet `ViT` (no cls token, no final norm), in its parameter names."""

    def __init__(self, shape: ViTShape, img_size: int, window_size: int = 14, global_blocks: list[int] | None = None,
                 rel_pos: bool = True, drop_path: float = 0.0):
        super().__init__()
        from timm.models.vision_transformer_sam import Block

        patch, dim, depth = shape.patch_size, shape.embed_dim, shape.depth
        if img_size % patch:
            raise ModelError(f"model.img_size {img_size} is not divisible by the patch size {patch}")
        self.global_blocks = list(global_blocks) if global_blocks is not None else default_global_blocks(depth)
        if any(not 1 <= b <= depth for b in self.global_blocks):
            raise ModelError(f"model.global_blocks {self.global_blocks}: blocks are 1..{depth}")
        grid = img_size // patch
        self.patch_embed = PatchEmbed(patch, dim)
        pretrain_grid = shape.img_size // patch
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + pretrain_grid * pretrain_grid, dim))
        rates = [x.item() for x in torch.linspace(0, drop_path, depth)]   # ViTDet's stochastic depth rule
        norm = functools.partial(nn.LayerNorm, eps=1e-6)
        self.blocks = nn.ModuleList(
            Block(dim, shape.num_heads, mlp_ratio=shape.mlp_ratio, qkv_bias=shape.qkv_bias, drop_path=rates[i],
                  norm_layer=norm, use_rel_pos=rel_pos,
                  window_size=0 if i + 1 in self.global_blocks or not window_size else window_size,
                  input_size=(grid, grid))
            for i in range(depth))
        self._init_weights()

    def _init_weights(self) -> None:
        """ViTDet's: truncated normal (0.02) linear weights and positions, zero biases, LayerNorms 1 / 0."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)                                   # (B, h, w, C)
        x = x + positions_at(self.pos_embed, (x.shape[1], x.shape[2]))
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 3, 1, 2)                                   # (B, C, h, w)


def simple_rescale(channels: int, factor: float) -> tuple[nn.Module, int]:
    """One level of ViTDet's simple pyramid and its output channels: x2^k by k transposed
    convolutions halving the channels (LayerNorm and GELU between), identity, or a max pool."""
    from timm.layers import LayerNorm2d

    if factor == 1:
        return nn.Identity(), channels
    if factor < 1:
        k = round(1 / factor)
        return nn.MaxPool2d(kernel_size=k, stride=k), channels
    layers: list[nn.Module] = []
    for i in range(round(math.log2(factor))):
        if i:
            layers += [LayerNorm2d(channels, eps=1e-6), nn.GELU()]
        layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
        channels //= 2
    return nn.Sequential(*layers), channels


class SimplePyramid(nn.Module):
    """The ViTDet encoder and its simple pyramid: four levels at strides 4..32 from the last block."""

    def __init__(self, shape: ViTShape, img_size: int, window_size: int = 14, global_blocks: list[int] | None = None,
                 rel_pos: bool = True, drop_path: float = 0.0):
        super().__init__()
        from localmim_cli.model.levels import STRIDES, feature_info

        patch = shape.patch_size
        factors = [patch / s for s in STRIDES]
        if any(f not in (0.125, 0.25, 0.5, 1, 2, 4, 8) or (f > 1 and shape.embed_dim % round(f)) for f in factors):
            raise ModelError(f"patch size {patch}: the simple pyramid needs a power of two from 4 to 32 px (and a "
                             "width its upsampling halves) to reach strides 4, 8, 16 and 32")
        self.shape, self.img_size = shape, img_size
        self.encoder = ViTDetEncoder(shape, img_size, window_size, global_blocks, rel_pos, drop_path)
        ops = [simple_rescale(shape.embed_dim, f) for f in factors]
        self.levels = nn.ModuleList(op for op, _ in ops)
        self.feature_info = feature_info([c for _, c in ops], [f"levels.{i}" for i in range(4)])

    @property
    def num_layers(self) -> int:
        """Layer ids for lr decay: 0 = patch embedding and positions, 1..L = blocks, L + 1 = the rest."""
        return self.shape.depth + 2

    def layer_of(self, name: str) -> int:
        """detectron2's `get_vit_lr_decay_rate` on a name relative to this module."""
        if name == "encoder.pos_embed" or name.startswith("encoder.patch_embed."):
            return 0
        if m := re.match(r"encoder\.blocks\.(\d+)\.", name):
            return int(m.group(1)) + 1
        return self.num_layers - 1

    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.encoder(images)
        return [level(x) for level in self.levels]

    def load_vit(self, weights: EncoderWeights) -> LoadReport:
        """The ViT's weights (timm names) into the encoder: the same names, positions kept at the
        pretraining grid (resampled at each forward), the cls token left out (ViTDet has none).
        A CheckpointError names the source when anything of the encoder is missing or misshapen."""
        from localmim_cli.model.levels import LoadReport

        state = dict(weights.encoder_state())
        unused = sorted(k for k in weights.state if k not in state)
        if "cls_token" in state:
            unused.append("cls_token")
            del state["cls_token"]
        own = self.encoder.state_dict()
        if "pos_embed" in state and state["pos_embed"].shape[1] != own["pos_embed"].shape[1]:
            # a checkpoint whose positions have no cls slot: the parameter takes its grid as given
            self.encoder.pos_embed = nn.Parameter(torch.zeros_like(state["pos_embed"]))
            own = self.encoder.state_dict()
        new = [k for k in own if k not in state]
        surprise = [k for k in new if not k.endswith(("rel_pos_h", "rel_pos_w"))]
        if surprise or any(k not in own for k in state):
            from localmim_cli.weights.loading import compare
            relative = tuple(k for k in new if k.endswith(("rel_pos_h", "rel_pos_w")))
            compare(self.encoder, state, allow_missing=relative).raise_if_incomplete(weights.source)
        for key, value in state.items():
            if own[key].shape != value.shape:
                raise CheckpointError(f"{weights.source}: {key} is {tuple(value.shape)}, the model's "
                                      f"{tuple(own[key].shape)}")
        self.encoder.load_state_dict(state, strict=False)
        grid, old = self.img_size // self.shape.patch_size, weights.shape.img_size // weights.shape.patch_size
        windowed = sum(1 for b in self.encoder.blocks if b.window_size)
        notes = [f"{windowed} window-attention and {len(self.encoder.blocks) - windowed} global blocks"]
        if grid != old:
            notes.append(f"positions resampled {old}^2 -> {grid}^2 at each forward")
        return LoadReport(str(weights.source), sorted(f"encoder.{k}" for k in state),
                          sorted(f"encoder.{k}" for k in new) + [f"levels.{n}" for n, _ in self.levels.named_parameters()],
                          unused, notes)
