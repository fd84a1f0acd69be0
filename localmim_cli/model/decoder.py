"""The light local decoder LocalMIM attaches to one encoder tap.

tokens -> linear embed -> mask tokens re-inserted, unshuffled -> fixed sin-cos positions ->
transformer block(s) -> norm -> prefix dropped -> grid -> head that changes resolution by the
tap's scale (transposed convolutions up, average pooling down) -> 1x1 projection to the target.
Module names follow the published decoders so their checkpoints load key for key.

The loss reads only the masked cells. Above scale 1 the head works token by token (2x2 stride-2
transposed convolutions, per-pixel norms and 1x1 projections), so the tokens whose cells are read
can be decoded alone: the last block computes their rows only (block_rows.py), the norm and head
see only them. Below scale 1 pooling mixes neighbouring tokens, and the decoder runs in full.
"""

from __future__ import annotations

import functools
import math

import torch
from timm.layers import LayerNorm2d
from timm.models.vision_transformer import Block
from torch import nn

from localmim_cli.encoders.base import TapOutput
from localmim_cli.model.block_rows import block_at_rows
from localmim_cli.model.positions import sincos_2d
from localmim_cli.model.init import xavier_linears_unit_norms


def prediction_head(width: int, scale: float, out_dim: int, eps: float = 1e-6) -> nn.Sequential:
    """(B, width, h, w) -> (B, out_dim, h*scale, w*scale).

    x4 is ConvT(w, w/2) -> LN -> GELU -> ConvT(w/2, w/4) -> 1x1, x2 ConvT(w, w/2) -> 1x1,
    x1 a 1x1, x0.5 AvgPool(2) -> 1x1 (published); other powers of two extend the same pattern.
    """
    layers: list[nn.Module] = []
    if scale >= 1:
        n_up = round(math.log2(scale))
        channels = width
        for i in range(n_up):
            if i > 0:
                layers += [LayerNorm2d(channels, eps=eps), nn.GELU()]
            layers.append(nn.ConvTranspose2d(channels, channels // 2, kernel_size=2, stride=2))
            channels //= 2
    else:
        factor = round(1 / scale)
        layers.append(nn.AvgPool2d(factor, stride=factor))
        channels = width
    layers.append(nn.Conv2d(channels, out_dim, kernel_size=1))
    return nn.Sequential(*layers)


def check_scale(scale: float) -> None:
    log = math.log2(scale) if scale > 0 else float("nan")
    if not math.isfinite(log) or log != round(log):
        raise ValueError(f"decoder scale {scale} must be a power of two (..., 0.25, 0.5, 1, 2, 4, ...)")


class LocalDecoder(nn.Module):
    """Decodes one encoder tap, built for that tap's full grid.

    Prefix tokens (a ViT's cls) take part in attention with a zero position and are dropped
    before the head; how many there are is read off each TapOutput. `pos_prefix_rows` only
    shapes the stored position table: that many zero rows ahead of the grid's, as the published
    checkpoints store them (ViT: one, its cls slot), so those load key for key.
    `label` names the encoder tap in errors ("layer 4").
    """

    def __init__(self, in_dim: int, grid: tuple[int, int], pos_prefix_rows: int, width: int, depth: int,
                 num_heads: int, mlp_ratio: float, scale: float, out_dim: int, eps: float = 1e-6,
                 label: str = "tap"):
        super().__init__()
        check_scale(scale)
        if width % num_heads:
            raise ValueError(f"decoder width {width} is not divisible by its {num_heads} heads")
        if scale >= 1 and width % (2 ** round(math.log2(scale))):
            raise ValueError(f"decoder width {width} cannot be halved {round(math.log2(scale))} times")
        self.grid = tuple(grid)
        self.scale = scale
        self.label = label
        self.embed = nn.Linear(in_dim, width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, width))
        pos = sincos_2d(width, *grid, cls_token=False)
        pos = torch.cat([torch.zeros(1, pos_prefix_rows, width), pos], dim=1)
        self.pos_embed = nn.Parameter(pos, requires_grad=False)  # (1, rows + h*w, width)
        norm = functools.partial(nn.LayerNorm, eps=eps)
        self.blocks = nn.ModuleList(
            Block(width, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm) for _ in range(depth)
        )
        self.norm = norm(width)
        self.pred = prediction_head(width, scale, out_dim, eps)
        self._init_weights()

    def _init_weights(self) -> None:
        # Published: mask token N(0, .02), xavier linears, unit norms; convolutions keep PyTorch's init.
        nn.init.normal_(self.mask_token, std=0.02)
        xavier_linears_unit_norms(self)

    @property
    def decodes_by_token(self) -> bool:
        """Whether each token's cells depend on that token alone (scale >= 1: no pooling)."""
        return self.scale >= 1

    def tokens_with_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """Which grid tokens have a cell of nonzero weight: (B, cells) at the prediction grid ->
        (B, h*w) bool, raster order. Needs decodes_by_token."""
        (h, w), s = self.grid, round(self.scale)
        return weight.reshape(-1, h, s, w, s).ne(0).any(dim=4).any(dim=2).flatten(1)

    def cells(self, tokens: torch.Tensor) -> torch.Tensor:
        """The prediction-grid cells of `tokens` (B, n) in the order forward(tap, only=tokens)
        returns them: token by token, each token's s x s cells row by row. -> (B, n*s*s)"""
        (h, w), s = self.grid, round(self.scale)
        sub = torch.arange(s, device=tokens.device)
        rows = (tokens // w)[:, :, None, None] * s + sub[:, None]   # (B, n, s, 1)
        cols = (tokens % w)[:, :, None, None] * s + sub             # (B, n, 1, s)
        return (rows * (w * s) + cols).flatten(1)

    def forward(self, tap: TapOutput, only: torch.Tensor | None = None) -> torch.Tensor:
        """Predictions at every cell of the grid, row-major: (B, cells, out).

        only: (B, n) raster indices of grid tokens (decodes_by_token decoders): predictions at
        those tokens' cells alone, in the order cells(only) gives, (B, n*s*s, out); each equals
        the full forward's at that cell.
        """
        if tuple(tap.grid) != self.grid:
            raise ValueError(f"encoder tap at {self.label} returned a {tap.grid[0]}x{tap.grid[1]} grid; its "
                             f"decoder was built for {self.grid[0]}x{self.grid[1]} (image side / tap stride)")
        h, w = self.grid
        n_prefix = tap.n_prefix
        x = self.embed(tap.tokens)  # (B, P + n_vis, D)
        prefix, visible = x[:, :n_prefix], x[:, n_prefix:]
        batch, n_cells = tap.ids_restore.shape
        mask_tokens = self.mask_token.expand(batch, n_cells - visible.shape[1], -1)
        x = torch.cat([visible, mask_tokens], dim=1)  # (B, h*w, D) in [visible..., masked...]
        x = torch.gather(x, 1, tap.ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = x + self.pos_embed[:, -h * w:]
        x = torch.cat([prefix, x], dim=1)  # prefix positions are zeros: nothing to add
        if only is None:
            for block in self.blocks:
                x = block(x)
            x = self.norm(x)[:, n_prefix:]
            x = x.transpose(1, 2).reshape(batch, -1, h, w)  # (B, D, h, w)
            x = self.pred(x)  # (B, out, h*s, w*s)
            return x.flatten(2).transpose(1, 2)  # (B, cells, out), row-major
        if not self.decodes_by_token:
            raise ValueError(f"the decoder at {self.label} pools neighbouring tokens (scale {self.scale}); "
                             "it has no per-token path")
        for block in self.blocks[:-1]:
            x = block(x)
        x = self.norm(block_at_rows(self.blocks[-1], x, only + n_prefix))  # (B, n, D)
        # The tokens as one row of an image: token i's s x s cells come out as columns
        # s*i .. s*i+s-1 of s rows, the head's kernels applied as on the grid.
        x = self.pred(x.transpose(1, 2).unsqueeze(2))  # (B, out, s, n*s)
        s, out = round(self.scale), x.shape[1]
        return x.reshape(batch, out, s, -1, s).permute(0, 3, 2, 4, 1).reshape(batch, -1, out)
