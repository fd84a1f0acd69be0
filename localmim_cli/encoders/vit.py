"""Vision Transformer that encodes visible patches only and exposes several taps.

Parameter names follow timm's VisionTransformer (patch_embed, cls_token, pos_embed, blocks.N),
so the encoder's weights load into `timm.create_model("vit_base_patch16_224")` unchanged; the
tap norms are ours (`tap_norms.K`), one LayerNorm per tap as in the published model.
"""

from __future__ import annotations

import functools

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from localmim_cli.encoders.base import ENCODER_API_VERSION, MaskedEncoder, TapInfo, TapOutput
from localmim_cli.encoders.vit_options import VIT_ARCHS, VIT_SUMMARY, ViTOptions, vit_arch_of  # noqa: F401  (re-exported)
from localmim_cli.plugins.api import EncoderPlugin
from localmim_cli.model.positions import sincos_2d
from localmim_cli.model.init import xavier_linears_unit_norms

def default_vit_taps(depth: int) -> list[int]:
    """Published taps, 1-indexed: layers 2, 4, L-2 and L."""
    return [2, 4, depth - 2, depth]


class MaskedViT(MaskedEncoder):
    n_prefix = 1  # the cls token

    def __init__(self, options: ViTOptions, img_size: int, tap_layers: list[int],
                 layer_norm_eps: float = 1e-6):
        super().__init__()
        if img_size % options.patch_size:
            raise ValueError(f"image size {img_size} is not divisible by patch size {options.patch_size}")
        depth = options.depth
        bad = [t for t in tap_layers if not 1 <= t <= depth]
        if bad:
            raise ValueError(f"taps {bad} are outside the encoder's layers 1..{depth}")
        if sorted(set(tap_layers)) != list(tap_layers):
            raise ValueError(f"taps must be increasing and distinct, got {tap_layers}")
        self.options = options
        self.unit_px = options.patch_size
        side = img_size // options.patch_size
        self.unit_grid = (side, side)
        self.tap_layers = list(tap_layers)
        self.taps = [TapInfo(options.embed_dim, options.patch_size) for _ in tap_layers]

        dim = options.embed_dim
        self.patch_embed = PatchEmbed(img_size, options.patch_size, 3, dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(sincos_2d(dim, side, side, cls_token=True), requires_grad=False)
        drop_path = torch.linspace(0, options.drop_path, depth).tolist()
        norm = functools.partial(nn.LayerNorm, eps=layer_norm_eps)
        self.blocks = nn.ModuleList(
            Block(dim, options.num_heads, options.mlp_ratio, qkv_bias=options.qkv_bias,
                  drop_path=drop_path[i], norm_layer=norm)
            for i in range(depth)
        )
        self.tap_norms = nn.ModuleList(norm(dim) for _ in tap_layers)
        self._init_weights()
        # Blocks above the highest tap get no loss in pretraining (forward_taps does not run
        # them): frozen, so every trainable parameter gets a gradient and DDP needs no
        # search for unused ones. They stay in the model, which keeps the timm layout.
        for block in self.blocks[self.tap_layers[-1]:]:
            block.requires_grad_(False)

    def _init_weights(self) -> None:
        # MAE's initialisation: patch projection as a linear layer, tokens N(0, .02), xavier linears.
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        xavier_linears_unit_norms(self)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        # (B, 3, H, W) -> (B, L, C) with positions added
        return self.patch_embed(images) + self.pos_embed[:, 1:, :]

    def _cls(self, batch: int) -> torch.Tensor:
        return (self.cls_token + self.pos_embed[:, :1, :]).expand(batch, -1, -1)

    def forward_taps(self, images, ids_keep, ids_restore):
        x = self._embed(images)
        x = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # (B, n_keep, C)
        x = torch.cat([self._cls(x.shape[0]), x], dim=1)
        outputs = []
        # Blocks above the highest tap get no loss in pretraining, so they are not run.
        for i, block in enumerate(self.blocks[: self.tap_layers[-1]], start=1):
            x = block(x)
            if i in self.tap_layers:
                k = self.tap_layers.index(i)
                outputs.append(TapOutput(self.tap_norms[k](x), 1, self.unit_grid, ids_restore))
        return outputs

    def forward_features(self, images):
        x = self._embed(images)
        x = torch.cat([self._cls(x.shape[0]), x], dim=1)
        for block in self.blocks:
            x = block(x)
        if self.tap_layers[-1] == len(self.blocks):
            x = self.tap_norms[-1](x)
        return x[:, 1:, :].mean(dim=1)


def build_vit(options: ViTOptions, img_size: int, tap_layers: list[int] | None) -> MaskedViT:
    return MaskedViT(options, img_size, tap_layers or default_vit_taps(options.depth))


plugin = EncoderPlugin(
    name="vit",
    api_version=ENCODER_API_VERSION,
    options=ViTOptions,
    build=build_vit,
    summary=VIT_SUMMARY,
)
